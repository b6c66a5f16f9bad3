"""Chunking: token budgets in the embedder's word pieces, exact offsets, structure, document reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsedge.errors import UserError
from dsedge.retrieval.chunking import chunk_text, collect_documents, html_to_text, read_document

CORPUS = Path(__file__).resolve().parents[1] / "dsedge" / "demo" / "data" / "heldout.txt"


@pytest.fixture(scope="module")
def tokenizer():
    """all-MiniLM-L6-v2's word-piece tokenizer (what the embedder counts), untruncated."""
    from tokenizers import Tokenizer

    from dsedge.retrieval.convert import source_model_dir

    tok = Tokenizer.from_file(str(source_model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def starts_of(tokenizer):
    return lambda text: [a for a, _ in tokenizer.encode(text, add_special_tokens=False).offsets]


def count_of(tokenizer):
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize(("budget", "overlap"), [(200, 32), (64, 16), (16, 0)])
def test_corpus_chunks_respect_budget_offsets_and_cover_the_text(tokenizer, budget, overlap):
    text = CORPUS.read_text(encoding="utf-8")[:120_000]
    chunks = chunk_text(text, starts_of(tokenizer), max_tokens=budget, overlap=overlap)
    count = count_of(tokenizer)
    covered = np.zeros(len(text), bool)
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.text == c.text.strip()
        assert c.tokens == count(c.text) <= budget  # counted alone, as the embedder will see it
        covered[c.start:c.end] = True
    assert all(text[i].isspace() for i in np.flatnonzero(~covered))  # nothing but whitespace left out
    assert all(a.start < b.start for a, b in zip(chunks, chunks[1:], strict=False))
    assert np.mean([c.tokens for c in chunks]) > budget * 0.5  # packed, not one paragraph per chunk


def test_overlap_repeats_the_tail_of_the_previous_chunk(tokenizer):
    text = "\n\n".join(f"Paragraph {i} says something about topic number {i} in a few words." for i in range(12))
    chunks = chunk_text(text, starts_of(tokenizer), max_tokens=40, overlap=8)
    assert len(chunks) > 2
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # overlapping span …
        assert a.text.endswith(text[b.start:a.end]) and text[b.start - 1].isspace()  # … of whole words
        assert count_of(tokenizer)(text[b.start:a.end]) <= 8


def test_headings_start_chunks(tokenizer):
    text = ("# Install\n\nRun pip install.\n\n## Configure\n\nEdit the file.\n\n"
            "Usage\n=====\n\nCall the function.\n")
    chunks = chunk_text(text, starts_of(tokenizer), max_tokens=100, overlap=10)
    assert [c.text.split("\n")[0] for c in chunks] == ["# Install", "## Configure", "Usage"]
    assert all(not c.text.startswith("Run") for c in chunks)  # no overlap across sections


def test_long_paragraph_and_unbroken_runs_are_split(tokenizer):
    sentence = "The quick brown fox jumps over the lazy dog again and again. "
    text = sentence * 40 + "\n\n" + "a1b2c3d4e5" * 60
    chunks = chunk_text(text, starts_of(tokenizer), max_tokens=30, overlap=0)
    count = count_of(tokenizer)
    assert all(count(c.text) <= 30 and text[c.start:c.end] == c.text for c in chunks)
    prose = [c for c in chunks if c.end <= len(sentence * 40)]
    assert all(c.text.endswith(".") for c in prose)  # split at sentence ends when they exist


def test_bad_budget_is_a_user_error(tokenizer):
    with pytest.raises(UserError):
        chunk_text("x", starts_of(tokenizer), max_tokens=4)
    with pytest.raises(UserError):
        chunk_text("x", starts_of(tokenizer), max_tokens=64, overlap=40)


def test_html_to_text():
    html = ("<html><head><title>T</title><style>.a{}</style></head><body><h2>Intro &amp; more</h2>"
            "<p>First   para\n with <b>bold</b>.</p><script>var x;</script><pre>a  b\n  c</pre></body></html>")
    text = html_to_text(html)
    assert "## Intro & more" in text and "First para with bold." in text and "a  b\n  c" in text
    assert "var x" not in text and ".a{}" not in text


def test_collect_and_read_documents(tmp_path):
    (tmp_path / "d" / ".hidden").mkdir(parents=True)
    for name in ["d/a.md", "d/b.RST", "d/c.html", "d/skip.py", "d/.hidden/x.md", "d/e.txt"]:
        (tmp_path / name).write_text("text\r\nline\n", encoding="utf-8")
    found = [p.name for p in collect_documents([tmp_path / "d", tmp_path / "d" / "a.md"])]
    assert found == ["a.md", "b.RST", "c.html", "e.txt"]
    assert read_document(tmp_path / "d" / "a.md")[0] == "text\nline\n"
    with pytest.raises(UserError, match="unsupported"):
        collect_documents([tmp_path / "d" / "skip.py"])
    with pytest.raises(UserError, match="not found"):
        collect_documents([tmp_path / "missing"])
