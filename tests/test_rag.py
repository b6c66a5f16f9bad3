"""Retrieval-augmented generation through a bundle: dsedge.rag.ask, `run --index/--rag`, RAG chat, an index
embedded by `export --index`, the context budget, and retrieval in `dsedge profile`."""

import io
import json
from pathlib import Path

import pytest

from dsedge.cli import main
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.rag import RagSources, ask, open_retriever
from dsedge.retrieval import build_index
from dsedge.runtime import load_bundle
from dsedge.runtime.chat import ChatSession

DOCS = {
    "bees.md": "# Bees\n\nHoney bees live in colonies with one queen and thousands of workers.\n\n"
               "Workers collect nectar and pollen from flowers and store honey in wax combs.\n",
    "trains.md": "# Trains\n\nSteam locomotives burn coal to boil water; the steam drives pistons.\n",
    "cheese.txt": "Cheese is made by curdling milk with rennet, then pressing and ageing the curds.\n",
}
QUESTION = "How is cheese made?"


@pytest.fixture(scope="module")
def index(embedder_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("rag-docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("rag") / "docs.index"
    build_index([docs], out, chunk_tokens=48, overlap=8, embedder=embedder_dir)
    return out


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, index, tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-bundles")
    ckpt = tiny_checkpoint("qwen2")
    plain = export_bundle(ckpt, root / "plain", max_context=256, validate=False).output
    embedded = export_bundle(ckpt, root / "embedded", max_context=256, validate=False, index=index).output
    return {"plain": Path(plain), "embedded": Path(embedded)}


def test_ask_gives_the_model_numbered_sources_within_the_context(bundles, index):
    engine = load_bundle(bundles["plain"])
    result = ask(engine, QUESTION, index=index, k=3, max_new_tokens=8)
    assert result.sources and result.sources[0]["source"].endswith("cheese.txt")
    assert [s["number"] for s in result.sources] == list(range(1, len(result.sources) + 1))
    assert "[1] cheese.txt" in result.prompt and QUESTION in result.prompt
    assert result.prompt_tokens + 8 <= engine.max_context
    assert set(result.retrieval) == {"embed_ms", "search_ms", "assembly_ms"}
    assert len(result.token_ids) == 8 and result.finish_reason == "length"  # the tiny model never emits EOS here


def test_a_small_context_keeps_fewer_sources_and_still_fits(bundles, index):
    engine = load_bundle(bundles["plain"])
    retriever = open_retriever(engine, index)
    roomy = ask(engine, QUESTION, retriever=retriever, k=3, max_new_tokens=8)
    tight = ask(engine, QUESTION, retriever=retriever, k=3, max_new_tokens=90)
    assert len(tight.sources) < len(roomy.sources) or any(s["truncated"] for s in tight.sources)
    assert tight.prompt_tokens + 90 <= engine.max_context
    with pytest.raises(UserError, match="no room for sources"):
        ask(engine, QUESTION, retriever=retriever, max_new_tokens=engine.max_context)


def test_an_embedded_index_is_verified_and_used(bundles, tmp_path):
    manifest = json.loads((bundles["embedded"] / "manifest.json").read_text())
    assert manifest["retriever"]["dir"] == "retriever"
    assert any(rel.startswith("retriever/") for rel in manifest["files"])
    engine = load_bundle(bundles["embedded"])
    assert ask(engine, QUESTION, k=1, max_new_tokens=4).sources[0]["source"].endswith("cheese.txt")
    assert open_retriever(load_bundle(bundles["plain"])) is None
    with pytest.raises(UserError, match="no index"):
        ask(load_bundle(bundles["plain"]), QUESTION)


def test_tampering_with_the_embedded_index_is_refused(bundles, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundles["embedded"], copy)
    chunks = next(p for p in (copy / "retriever").rglob("*") if p.is_file() and p.suffix == ".json"
                  and p.name != "manifest.json")
    chunks.write_text(chunks.read_text().replace("rennet", "vinegar"))
    with pytest.raises(UserError, match="sha256"):
        load_bundle(copy)


def test_run_cli_with_sources(bundles, index, capsys):
    assert main(["run", str(bundles["plain"]), "--index", str(index), "-p", QUESTION, "-n", "4", "-k", "2",
                 "--show-sources"]) == 0
    out = capsys.readouterr().out
    assert "sources:" in out and "cheese.txt" in out
    assert main(["run", str(bundles["embedded"]), "--rag", "-p", QUESTION, "-n", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["sources"][0]["source"].endswith("cheese.txt") and "show_sources" not in result
    assert main(["run", str(bundles["plain"]), "--rag", "-p", QUESTION]) == 3  # no embedded index


def test_rag_chat_keeps_plain_questions_in_the_history(bundles, index, monkeypatch, capsys):
    engine = load_bundle(bundles["plain"])
    session = ChatSession(engine, max_new_tokens=4, sources=RagSources(open_retriever(engine, index), k=2))
    for _ in session.send(QUESTION):
        pass
    assert session.messages[0] == {"role": "user", "content": QUESTION}
    assert session.turns[0]["sources"] and "[1]" in session.turns[0]["prompt"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\nWhat do bees store?\n"))
    assert main(["chat", str(bundles["plain"]), "--index", str(index), "-n", "4", "--json"]) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    assert len(turns) == 2 and turns[1]["sources"][0]["source"].endswith("bees.md")


def test_profile_reports_retrievals_share_of_ttft(bundles):
    from dsedge.runtime.profile import profile_engine

    engine = load_bundle(bundles["embedded"])
    r = profile_engine(engine, prompt_tokens=8, gen_tokens=4, trials=1, retriever=open_retriever(engine))
    q = r.retrieval
    assert q["embed_ms"] > 0 and q["search_ms"] > 0 and 0 < q["share_of_ttft"] < 1 and q["sources"] >= 1
