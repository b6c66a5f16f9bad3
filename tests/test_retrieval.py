"""Retrieval: the converted embedder vs PyTorch, HNSW recall vs brute force on real MiniLM embeddings of a
real corpus (the Python 3.11 docs shipped as dsedge/demo/data/heldout.txt, PSF license), save/load,
incremental updates and deletions, errors through the CLI, RAG prompt assembly, torch-free queries.

The embedder is converted once per session into a temporary DSEDGE_CACHE; the corpus index is built once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsedge.cli import main
from dsedge.errors import UserError
from dsedge.retrieval.embedder import Embedder
from dsedge.retrieval.index import (
    Index,
    IndexError_,
    IndexParams,
    build_index,
    index_stats,
    new_index,
    update_index,
)
from dsedge.retrieval.rag import Retriever, build_rag_prompt, cited_sources

CORPUS = Path(__file__).resolve().parents[1] / "dsedge" / "demo" / "data" / "heldout.txt"
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "dsedge" / "demo" / "models" / "qwen2-tiny" / "tokenizer.json"
INDEXED_FRACTION = 0.25  # of the corpus' paragraphs (~28k word pieces: embedding dominates the test time)


@pytest.fixture(scope="session")
def embedder(embedder_dir):
    return Embedder.open(embedder_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first quarter of the corpus' paragraphs as 4 .rst documents; sentences of the rest as queries."""
    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    cut = int(len(paragraphs) * INDEXED_FRACTION)
    docs = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        part = paragraphs[i * cut // 4:(i + 1) * cut // 4]
        (docs / f"part{i}.rst").write_text("\n\n".join(part) + "\n", encoding="utf-8")
    sentences = [s.strip() for p in paragraphs[cut:] for s in re.split(r"(?<=[.?!])\s+", p)]
    queries = [s for s in sentences if 8 <= len(s.split()) <= 40 and not s.startswith((".. ", ">>>"))]
    return docs, queries[::max(1, len(queries) // 120)][:120]


@pytest.fixture(scope="session")
def corpus_index(embedder, corpus, tmp_path_factory):
    """(in-memory index before saving, its directory) over the corpus, 64-token chunks."""
    from dsedge.retrieval.chunking import collect_documents, read_document

    docs, _ = corpus
    index = new_index(IndexParams(chunk_tokens=64, overlap=16), embedder, capacity=64)
    texts = {p.as_posix(): read_document(p) for p in collect_documents([docs])}
    index.add_documents(texts, {})
    path = tmp_path_factory.mktemp("indexes") / "corpus.index"
    index.save(path, embedder_from=embedder.root)
    return index, path


@pytest.fixture(scope="session")
def query_vectors(embedder, corpus):
    return embedder.embed(corpus[1])


# --- embedder -----------------------------------------------------------------------------------------

def test_converted_embedder_matches_pytorch(embedder, corpus_index):
    """The ONNX graph (mean pooling + L2 norm inside) vs transformers' BertModel on real chunks, padded batch."""
    from dsedge.retrieval.convert import MIN_COSINE, _torch_embeddings, source_model_dir

    assert embedder.info["validation"]["min_cosine"] >= MIN_COSINE  # checked at conversion
    texts = [c["text"] for c in list(corpus_index[0].chunks.values())[::40][:16]]
    ours = embedder.embed(texts, batch_size=16)
    reference = _torch_embeddings(source_model_dir(), texts)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(ours * reference, axis=1)) >= MIN_COSINE


def test_embedding_order_and_batching_do_not_change_vectors(embedder, corpus):
    texts = corpus[1][:12]
    together = embedder.embed(texts, batch_size=64)
    one_by_one = np.stack([embedder.embed_query(t) for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)  # padding is masked out exactly
    assert embedder.embed([]).shape == (0, embedder.dim)


# --- HNSW recall, persistence ---------------------------------------------------------------------------

def _live_vectors(index: Index) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(index.chunks), dtype=np.uint64)
    return ids, np.asarray(index.hnsw.get_items(ids), dtype=np.float32)


def recall_at(index: Index, queries: np.ndarray, k: int, ef: int | None = None) -> float:
    ids, vectors = _live_vectors(index)
    exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]  # brute force, cosine
    found, _ = index.search_vectors(queries, k, ef)
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)]))


def test_recall_at_10_vs_brute_force_at_default_ef(corpus_index, query_vectors):
    index, _ = corpus_index
    assert len(index.chunks) > 400 and len(query_vectors) >= 100
    assert index.params.ef == IndexParams().ef == 64
    assert recall_at(index, query_vectors, 10) >= 0.95


def test_query_ef_is_honoured(corpus_index, query_vectors):
    """A wider beam finds more true neighbours: recall grows with ef and the narrowest beam is measurably worse
    (an ef that were ignored would give one recall for every ef). ef below k is raised to k."""
    index, _ = corpus_index
    recalls = [recall_at(index, query_vectors, 10, ef=ef) for ef in (10, 64, 400)]
    print("recall@10 at ef 10, 64, 400:", recalls)
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1] - 0.05  # measured 0.85 vs 0.996
    assert recalls[-1] >= 0.99
    assert recall_at(index, query_vectors, 10, ef=1) == recalls[0]  # never below k


def test_save_load_identical_and_ef_restored(corpus_index, query_vectors):
    index, path = corpus_index
    loaded = Index.open(path)
    assert loaded.hnsw.ef == index.params.ef == 64  # hnswlib's load_index resets ef to 10; we restore it
    for ef in (None, 16):
        before, after = index.search_vectors(query_vectors, 10, ef), loaded.search_vectors(query_vectors, 10, ef)
        assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert loaded.chunks == index.chunks and loaded.documents == index.documents


def test_chunks_are_exact_spans_of_their_documents(corpus_index):
    index, _ = corpus_index
    texts = {p: Path(p).read_text(encoding="utf-8") for p in index.documents}
    for chunk in index.chunks.values():
        assert texts[chunk["source"]][chunk["start"]:chunk["end"]] == chunk["text"]
        assert chunk["tokens"] <= 64


def test_retriever_search_with_timings(corpus_index):
    _, path = corpus_index
    retriever = Retriever.open(path)
    result = retriever.search("How do I log to a single file from multiple processes?", k=5)
    assert len(result) == 5 and [h.rank for h in result] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(result.hits, result.hits[1:], strict=False))
    assert result.embed_ms > 0 and result.search_ms > 0 and result.ef == 64
    assert set(result.to_json()) >= {"hits", "timings", "question"}


# --- incremental updates --------------------------------------------------------------------------------

TOPICS = {
    "bees.md": "# Bees\n\nHoney bees live in colonies with one queen and thousands of workers.\n\n"
               "Workers collect nectar and pollen from flowers and store honey in wax combs.\n",
    "trains.md": "# Trains\n\nSteam locomotives burn coal to boil water; the steam drives pistons.\n",
    "guide/cheese.txt": "Cheese is made by curdling milk with rennet, then pressing and ageing the curds.\n",
}


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _sources(result) -> list[str]:
    return [Path(h.source).name for h in result]


def test_copy_index_into_a_bundle_folder(corpus_index, query_vectors, tmp_path):
    from dsedge.retrieval import copy_index

    index, path = corpus_index
    summary = copy_index(path, tmp_path / "bundle" / "retriever")
    assert summary["chunks"] == len(index.chunks) and summary["embedder"]["dim"] == 384
    copied = Retriever.open(tmp_path / "bundle" / "retriever").index
    assert np.array_equal(copied.search_vectors(query_vectors, 5)[0], index.search_vectors(query_vectors, 5)[0])
    with pytest.raises(UserError, match="already exists"):
        copy_index(path, tmp_path / "bundle" / "retriever")


def test_incremental_add_replace_delete(embedder_dir, tmp_path):
    docs = _write(tmp_path / "docs", TOPICS)
    index_dir = tmp_path / "small.index"
    report = build_index([docs], index_dir, embedder=embedder_dir, ef=24)
    assert report.documents == 3 and report.added_chunks == report.chunks
    assert Retriever.open(index_dir).index.hnsw.ef == 24  # ef restored from the manifest
    old_ids = {h.chunk_id for h in Retriever.open(index_dir).search("steam locomotive", k=10)
               if h.source.endswith("trains.md")}

    (docs / "trains.md").write_text("# Trains\n\nElectric trains draw power from overhead catenary wires.\n")
    (docs / "guide" / "cheese.txt").unlink()
    _write(docs, {"volcano.rst": "Volcanoes\n=========\n\nMagma rises through the crust and erupts as lava.\n"})
    report = update_index(index_dir, [docs])
    assert (report.added_chunks, report.unchanged_documents, report.documents) == (2, 1, 3)
    assert report.removed_chunks >= 2  # the old trains.md chunk(s) and cheese.txt

    retriever = Retriever.open(index_dir)
    everything = retriever.search("steam locomotive coal", k=100, ef=200)
    assert not old_ids & {h.chunk_id for h in everything}  # a deleted chunk is never returned
    assert "cheese.txt" not in _sources(everything) and len(everything) == len(retriever.index.chunks)
    assert _sources(retriever.search("electric overhead wires", k=1)) == ["trains.md"]
    assert _sources(retriever.search("lava eruption", k=1)) == ["volcano.rst"]

    update_index(index_dir, remove=[docs / "bees.md"])
    stats = index_stats(index_dir)
    assert stats.sources == sorted(p.as_posix() for p in [(docs / "trains.md").resolve(),
                                                           (docs / "volcano.rst").resolve()])
    assert "bees.md" not in _sources(Retriever.open(index_dir).search("honey bees", k=10))


def test_deleted_slots_are_reused(embedder_dir, tmp_path):
    docs = _write(tmp_path / "docs", {"a.md": "Alpha paragraph about owls.\n", "b.md": "Beta text about foxes.\n"})
    index_dir = tmp_path / "i"
    build_index([docs], index_dir, embedder=embedder_dir)
    update_index(index_dir, remove=[docs / "a.md"])
    assert index_stats(index_dir).deleted_slots == 1
    _write(docs, {"c.md": "Gamma note about whales.\n"})
    update_index(index_dir, [docs / "c.md"])
    stats = index_stats(index_dir)
    assert (stats.deleted_slots, stats.chunks, stats.capacity >= 2) == (0, 2, True)


# --- CLI and errors ---------------------------------------------------------------------------------------

@pytest.fixture
def small_docs(tmp_path):
    return _write(tmp_path / "docs", TOPICS | {
        "page.html": "<html><head><style>p{}</style></head><body><h1>Tea</h1><p>Green tea is steamed, "
                     "black tea is oxidised.</p><script>x()</script></body></html>"})


def _cli_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_cli_build_query_stats_add(embedder_dir, small_docs, tmp_path, capsys):
    index_dir = str(tmp_path / "cli.index")
    code, out = _cli_json(capsys, ["index", "build", str(small_docs), "-o", index_dir, "--chunk-tokens", "64",
                                   "--overlap", "8", "--M", "8", "--ef-construction", "50", "--ef", "20"])
    assert code == 0 and out["ok"] and out["documents"] == 4 and out["params"]["M"] == 8
    code, out = _cli_json(capsys, ["index", "query", index_dir, "how is black tea made?", "-k", "2"])
    assert code == 0 and Path(out["hits"][0]["source"]).name == "page.html" and out["ef"] == 20
    assert "x()" not in out["hits"][0]["text"] and "oxidised" in out["hits"][0]["text"]
    code, out = _cli_json(capsys, ["index", "stats", index_dir])
    assert code == 0 and out["chunks"] >= 4 and out["params"]["ef"] == 20
    assert main(["index", "build", str(small_docs), "-o", index_dir]) == 3  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["index", "query", index_dir, "honey", "-k", "1"]) == 0
    captured = capsys.readouterr()
    assert "bees.md" in captured.out and "embed" in captured.err
    code, out = _cli_json(capsys, ["index", "add", index_dir, str(small_docs)])
    assert code == 0 and out["unchanged_documents"] == 4 and out["added_chunks"] == 0


def test_cli_index_without_action_is_a_usage_error(capsys):
    assert main(["index"]) == 2
    assert "required: ACTION" in capsys.readouterr().err


def test_empty_corpus_is_refused(embedder_dir, tmp_path, capsys):
    docs = _write(tmp_path / "docs", {"empty.md": "", "blank.txt": "  \n\n \n"})
    code, out = _cli_json(capsys, ["index", "build", str(docs), "-o", str(tmp_path / "i")])
    assert code == 3 and "empty corpus" in out["error"]["message"]
    (tmp_path / "none").mkdir()
    code, out = _cli_json(capsys, ["index", "build", str(tmp_path / "none"), "-o", str(tmp_path / "i")])
    assert code == 3 and "empty corpus" in out["error"]["message"] and not (tmp_path / "i").exists()


@pytest.fixture
def small_index(embedder_dir, small_docs, tmp_path):
    path = tmp_path / "s.index"
    build_index([small_docs], path, embedder=embedder_dir)
    return path


def test_corrupt_index_file_is_refused(small_index, capsys):
    hnsw = small_index / "hnsw.bin"
    data = bytearray(hnsw.read_bytes())
    data[-5] ^= 0xFF
    hnsw.write_bytes(bytes(data))
    code, out = _cli_json(capsys, ["index", "query", str(small_index), "tea"])
    assert code == 3 and "sha256" in out["error"]["message"] and out["error"]["where"].endswith("hnsw.bin")
    assert "rebuild" in out["error"]["hint"]
    hnsw.write_bytes(bytes(data[:len(data) // 2]))  # truncated: the listed size is checked even without sha256s
    with pytest.raises(IndexError_, match="cannot be read|manifest says"):
        Index.open(small_index, verify=False)
    (small_index / "chunks.json").write_text("{not json")
    with pytest.raises(IndexError_, match="corrupt"):
        Index.open(small_index, verify=False)


def test_missing_or_foreign_index(tmp_path, capsys):
    code, out = _cli_json(capsys, ["index", "stats", str(tmp_path)])
    assert code == 3 and "not an index" in out["error"]["message"]
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": {}}))  # a bundle
    code, out = _cli_json(capsys, ["index", "stats", str(tmp_path)])
    assert code == 3 and "does not describe a dsedge index" in out["error"]["message"]


def _tiny_embedder(path: Path, dim: int, source: Path) -> Path:
    """A stand-in ONNX embedder of another dimension: mean of random token vectors, L2-normalized."""
    import shutil

    from dsedge.export.graph import FLOAT, INT64, GraphBuilder
    from dsedge.manifest import sha256_file
    from dsedge.retrieval.convert import _pool, _save

    g = GraphBuilder("tiny_embedder")
    ids = g.input("input_ids", INT64, ["batch", "tokens"])
    mask = g.input("attention_mask", INT64, ["batch", "tokens"])
    table = np.random.default_rng(0).standard_normal((30522, dim)).astype(np.float32)
    g.output(_pool(g, g.op("Gather", g.weight("table", table), ids), mask), "embeddings", FLOAT, ["batch", dim])
    path.mkdir()
    _save(g.model(), path / "model.onnx")
    shutil.copyfile(source / "tokenizer.json", path / "tokenizer.json")
    info = {"schema_version": 1, "id": "test/tiny", "dim": dim, "max_tokens": 256,
            "model_sha256": sha256_file(path / "model.onnx")}
    (path / "embedder.json").write_text(json.dumps(info))
    return path


def test_dimension_mismatch_is_refused(small_index, small_docs, embedder_dir, tmp_path, capsys):
    other = _tiny_embedder(tmp_path / "tiny", 16, embedder_dir)
    code, out = _cli_json(capsys, ["index", "add", str(small_index), str(small_docs), "--embedder", str(other)])
    assert code == 3 and "embedder mismatch" in out["error"]["message"] and "dim 384 vs 16" in out["error"]["message"]
    index = Index.open(small_index)
    with pytest.raises(IndexError_, match="dimension 16"):
        index.search_vectors(np.ones((1, 16), np.float32), 3)

    # An hnsw.bin of another dimension under a consistent manifest (as if files of two builds were mixed):
    built = build_index([small_docs], tmp_path / "tiny.index", embedder=other)
    assert built.embedder["dim"] == 16
    (small_index / "hnsw.bin").write_bytes((tmp_path / "tiny.index" / "hnsw.bin").read_bytes())
    manifest = json.loads((small_index / "manifest.json").read_text())
    from dsedge.manifest import file_entry

    manifest["files"]["hnsw.bin"] = file_entry(small_index, "hnsw.bin")
    (small_index / "manifest.json").write_text(json.dumps(manifest))
    code, out = _cli_json(capsys, ["index", "query", str(small_index), "tea"])
    assert code == 3 and "dimension mismatch" in out["error"]["message"]


# --- RAG prompt assembly ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llm_count():
    """Token count in a real LLM tokenizer (the demo Qwen2 model's), not the embedder's."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO_TOKENIZER))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("budget", [90, 200, 400, 800, 4000])
def test_rag_prompt_fits_budget_and_cites_right_sources(corpus_index, llm_count, budget):
    _, path = corpus_index
    question = "How do I send log records from several processes to one file?"
    hits = Retriever.open(path, verify=False).search(question, k=8).hits
    prompt = build_rag_prompt(question, hits, llm_count, budget)
    assert prompt.tokens == llm_count(prompt.text) <= budget
    assert prompt.text.endswith(f"Question: {question}") and prompt.messages[1]["content"] in prompt.text
    assert [s.number for s in prompt.sources] == list(range(1, len(prompt.sources) + 1))
    assert [s.hit for s in prompt.sources] == hits[:len(prompt.sources)]  # best first, none skipped
    assert prompt.dropped == len(hits) - len(prompt.sources)
    for s in prompt.sources:
        assert s.hit.text.startswith(s.text) and s.truncated == (s.text != s.hit.text)
        block = prompt.text.split(f"[{s.number}] {Path(s.hit.source).name}:{s.hit.start}-{s.hit.end}\n", 1)[1]
        assert block.startswith(s.text)
    assert sum(s.truncated for s in prompt.sources) <= 1 and (not prompt.sources or not prompt.sources[0].truncated
                                                             or len(prompt.sources) == 1)
    if budget >= 4000:
        assert len(prompt.sources) == len(hits) and prompt.dropped == 0


def test_retriever_prompt_for_profile_and_r1_style(corpus_index, llm_count):
    _, path = corpus_index
    retriever = Retriever.open(path, verify=False)
    prompt = retriever.prompt("What does the sched module do?", llm_count, 600, k=4, system_role=False)
    assert set(prompt.timings) == {"embed_ms", "search_ms", "assembly_ms"} and prompt.timings["embed_ms"] > 0
    assert prompt.retrieval.hits[:len(prompt.sources)] == [s.hit for s in prompt.sources]
    assert [m["role"] for m in prompt.messages] == ["user"] and prompt.messages[0]["content"] == prompt.text
    assert prompt.text.startswith("Answer the question") and prompt.tokens <= 600
    assert json.loads(json.dumps(prompt.to_json()))["timings"] == prompt.timings


def test_rag_prompt_budget_errors_and_citations(llm_count):
    from dsedge.retrieval.index import Hit

    hits = [Hit(1, 0.9, 7, "/d/a.md", 0, 11, "alpha beta."), Hit(2, 0.8, 3, "/d/b.md", 5, 16, "gamma delta")]
    with pytest.raises(UserError, match="question alone"):
        build_rag_prompt("why " * 200, hits, llm_count, 50)
    prompt = build_rag_prompt("q?", [*hits, hits[0]], llm_count, 1000)  # duplicates collapse
    assert [s.hit.chunk_id for s in prompt.sources] == [7, 3] and prompt.dropped == 0
    assert [s.number for s in cited_sources("See [2], also [1] and [2]; [9] is not a source.", prompt.sources)] \
        == [2, 1]


# --- torch-free -----------------------------------------------------------------------------------------------

def test_retrieval_runtime_is_torch_free(corpus_index):
    _, path = corpus_index
    code = ("import sys\nfrom dsedge.retrieval import Retriever, build_rag_prompt\n"
            f"r = Retriever.open({str(path)!r}).search('signal handlers', k=3)\n"
            "p = build_rag_prompt(r.question, r.hits, lambda s: len(s.split()), 300)\n"
            "print(len(p.sources))\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
