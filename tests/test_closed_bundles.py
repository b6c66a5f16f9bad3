"""Closed bundles and indexes (issue #15 item 1) and fast start (issue #13 item 3).

Every file the runtime or the retriever opens is listed with its sha256 and reached through one verified door
(``dsedge.verified.VerifiedFiles.path``). The attacker here re-hashes what they change, so the sha256 check
alone would pass: what must stop them is the door (listed, inside, no link, regular file) and the chain of
manifests (a bundle's manifest lists ``retriever/manifest.json``, which lists every index file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from dsedge import verified
from dsedge.cli import main
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.manifest import MANIFEST_FILE, BundleError, write_manifest
from dsedge.rag import open_retriever
from dsedge.retrieval import build_index
from dsedge.retrieval.index import Index, IndexError_
from dsedge.runtime import load_bundle
from dsedge.runtime.chat import load_chat_template
from dsedge.verified import sha256_file

DOCS = {"cheese.txt": "Cheese is made by curdling milk with rennet, then pressing and ageing the curds.\n",
        "bees.md": "# Bees\n\nHoney bees live in colonies with one queen and thousands of workers.\n"}
MARKER = "OUTSIDE-THE-BUNDLE"


@pytest.fixture(scope="module")
def index(embedder_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("closed-docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("closed-index") / "docs.index"
    build_index([docs], out, chunk_tokens=48, overlap=8, embedder=embedder_dir)
    return out


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, index, tmp_path_factory):
    """A monolithic bundle with its own index (retriever/) and tokenizer files."""
    out = tmp_path_factory.mktemp("closed-bundle") / "b"
    export_bundle(tiny_checkpoint("qwen2"), out, max_context=64, validate=False, index=index)
    return out


@pytest.fixture(scope="module")
def partitioned(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("closed-partitioned") / "p"
    export_bundle(tiny_checkpoint("v3"), out, max_context=32, layout="partitioned", experts_per_partition=2,
                  validate=False)
    return out


def copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    time.sleep(verified.RACY_NS / 1e9 * 2)  # past the racy window, so that a first load records every file
    return dst


def rehash(root: Path, *rels: str) -> None:
    """What an attacker does after editing: list the files again with the sha256 of what they now read."""
    path = root / MANIFEST_FILE
    data = json.loads(path.read_text())
    for rel in rels:
        data["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
    path.write_text(json.dumps(data))


def outside(tmp_path: Path, name: str, content: bytes | str) -> Path:
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content.encode() if isinstance(content, str) else content)
    return target


def symlink_to_outside(root: Path, rel: str, tmp_path: Path) -> None:
    """Replace ``rel`` by a link to a copy of itself outside the bundle, re-hashed (the content is valid)."""
    target = outside(tmp_path, Path(rel).name, (root / rel).read_bytes())
    (root / rel).unlink()
    (root / rel).symlink_to(target)
    rehash(root, rel)


def cli_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


# --- escapes: a link to anywhere, for each kind of file --------------------------------------------------

BUNDLE_FILES = ["graphs/decoder.onnx", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


@pytest.mark.parametrize("rel", BUNDLE_FILES + ["graphs/decoder.onnx.data"])
def test_a_linked_bundle_file_is_refused_even_re_hashed(bundle, tmp_path, capsys, rel):
    root = copy(bundle, tmp_path)
    if rel.endswith(".data"):
        rel = next(r for r in json.loads((root / MANIFEST_FILE).read_text())["files"] if r.startswith("graphs/")
                   and not r.endswith(".onnx"))
    symlink_to_outside(root, rel, tmp_path)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(root)
    code, out = cli_json(capsys, ["run", str(root), "-p", "hi", "-n", "2"])
    assert code == 3 and "symbolic link" in out["error"]["message"] and rel in out["error"]["message"]


def test_an_unlisted_chat_template_never_becomes_the_prompt(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    engine = load_bundle(root)
    before = load_chat_template(engine)
    (root / "tokenizer" / "chat_template.jinja").write_text(MARKER + "{{ messages[0]['content'] }}")
    engine = load_bundle(root)  # an unlisted file is ignored (logged), never opened
    assert load_chat_template(engine).source == before.source and MARKER not in before.source
    rehash(root, "tokenizer/chat_template.jinja")  # listed: now it is the bundle's own template, as transformers
    engine = load_bundle(root)
    assert load_chat_template(engine).source.startswith(MARKER)


def test_a_linked_chat_template_is_refused(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    secret = outside(tmp_path, "secret.txt", MARKER)
    (root / "tokenizer" / "chat_template.jinja").symlink_to(secret)
    rehash(root, "tokenizer/chat_template.jinja")
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(root)


def test_a_linked_retriever_directory_is_refused(bundle, index, tmp_path):
    root = copy(bundle, tmp_path)
    other = shutil.copytree(index, tmp_path / "other.index")
    shutil.rmtree(root / "retriever")
    (root / "retriever").symlink_to(other, target_is_directory=True)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(root)


def test_the_embedded_index_manifest_is_listed_and_chained(bundle, tmp_path):
    files = json.loads((bundle / MANIFEST_FILE).read_text())["files"]
    assert "retriever/manifest.json" in files and MANIFEST_FILE not in files  # only the top one is left out
    root = copy(bundle, tmp_path)
    hnsw = root / "retriever" / "hnsw.bin"
    data = bytearray(hnsw.read_bytes())
    data[-5] ^= 0xFF
    hnsw.write_bytes(bytes(data))
    rehash(root, "retriever/hnsw.bin")  # the bundle's table re-hashed, the index's own manifest not
    with pytest.raises(IndexError_, match="sha256"):
        open_retriever(load_bundle(root))
    rehash(root / "retriever", "hnsw.bin")  # now the index manifest changed: the bundle's entry for it fails
    with pytest.raises(BundleError, match="retriever/manifest.json"):
        open_retriever(load_bundle(root))


INDEX_FILES = ["hnsw.bin", "chunks.json", "embedder/model.onnx", "embedder/tokenizer.json", "embedder/embedder.json"]


@pytest.mark.parametrize("rel", INDEX_FILES)
def test_a_linked_index_file_is_refused_even_re_hashed(index, tmp_path, capsys, rel):
    root = copy(index, tmp_path)
    symlink_to_outside(root, rel, tmp_path)
    with pytest.raises(IndexError_, match="symbolic link"):
        Index.open(root)
    code, out = cli_json(capsys, ["index", "query", str(root), "cheese"])
    assert code == 3 and "symbolic link" in out["error"]["message"]


def test_a_linked_embedder_directory_is_refused(index, tmp_path):
    root = copy(index, tmp_path)
    other = shutil.copytree(root / "embedder", tmp_path / "other-embedder")
    shutil.rmtree(root / "embedder")
    (root / "embedder").symlink_to(other, target_is_directory=True)
    with pytest.raises(IndexError_, match="symbolic link"):
        Index.open(root)


def _onnx_with_external(location: str) -> bytes:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    node = helper.make_node("Identity", ["w"], ["embeddings"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [2])],
                              initializer=[weight])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize(("location", "problem"), [("../../elsewhere/w.bin", "not a relative path inside"),
                                                   ("w.bin", "not listed")])
def test_the_embedder_graph_external_data_is_checked(index, tmp_path, location, problem):
    root = copy(index, tmp_path)
    outside(tmp_path, "w.bin", np.arange(2, dtype=np.float32).tobytes())
    (root / "embedder" / "w.bin").write_bytes(np.arange(2, dtype=np.float32).tobytes())  # present, unlisted
    (root / "embedder" / "model.onnx").write_bytes(_onnx_with_external(location))
    rehash(root, "embedder/model.onnx")
    info = json.loads((root / "embedder" / "embedder.json").read_text())
    (root / "embedder" / "embedder.json").write_text(json.dumps(info | {"model_sha256": sha256_file(
        root / "embedder" / "model.onnx")}))
    rehash(root, "embedder/embedder.json")
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["embedder"]["model_sha256"] = info["model_sha256"] = sha256_file(root / "embedder" / "model.onnx")
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match=problem):
        Index.open(root)


def test_links_are_refused_at_write_time(tmp_path):
    root = tmp_path / "b"
    (root / "graphs").mkdir(parents=True)
    (root / "graphs" / "x.bin").symlink_to(outside(tmp_path, "x.bin", b"x"))
    with pytest.raises(BundleError, match="symbolic link"):
        write_manifest(root, {})


def test_a_fifo_in_a_bundle_is_refused_without_blocking(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    (root / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(root / "tokenizer" / "tokenizer.json")
    data = json.loads((root / MANIFEST_FILE).read_text())
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing
    data["files"]["tokenizer/tokenizer.json"] = {"sha256": empty, "bytes": 0}
    (root / MANIFEST_FILE).write_text(json.dumps(data))
    run = subprocess.run([sys.executable, "-m", "dsedge", "run", str(root), "-p", "hi", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "not a regular file" in json.loads(run.stdout)["error"]["message"]


# --- fast start: verify once, record, re-verify what changed ----------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch):
    calls: list[str] = []
    real = verified.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verified, "sha256_file", counting)
    return calls


def test_an_unchanged_bundle_skips_hashing_and_a_changed_file_fails(bundle, tmp_path, hash_calls):
    root = copy(bundle, tmp_path)
    load_bundle(root).codec  # noqa: B018 — the tokenizer is opened on first use
    first = len(hash_calls)
    assert first >= 3  # graph, its data, the tokenizer
    hash_calls.clear()
    load_bundle(root).codec  # noqa: B018
    assert hash_calls == []  # the record vouches for every file: no sha256 at all
    load_bundle(root, verify="full")
    assert len(hash_calls) == len(json.loads((root / MANIFEST_FILE).read_text())["files"])  # --verify: all
    hash_calls.clear()

    data = next(p for p in (root / "graphs").iterdir() if not p.name.endswith(".onnx"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size: only the sha256 can tell
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root)


def test_a_touched_file_voids_the_record(bundle, tmp_path, hash_calls):
    root = copy(bundle, tmp_path)
    load_bundle(root).codec  # noqa: B018
    hash_calls.clear()
    os.utime(root / "tokenizer" / "tokenizer.json")  # same bytes, new mtime/ctime
    load_bundle(root).codec  # noqa: B018
    assert "tokenizer.json" in hash_calls and "decoder.onnx" in hash_calls  # every file hashed again


def test_a_moved_or_copied_bundle_is_hashed_again(bundle, tmp_path, hash_calls):
    root = copy(bundle, tmp_path, "one")
    load_bundle(root)
    hash_calls.clear()
    other = copy(root, tmp_path, "two")  # new inodes, new path: another record
    load_bundle(other)
    assert hash_calls


def test_partitions_are_verified_when_first_loaded(partitioned, tmp_path):
    root = copy(partitioned, tmp_path)
    files = json.loads((root / MANIFEST_FILE).read_text())
    part = next(g for g in files["graphs"] if g["role"] == "experts")
    data = root / part["data_files"][0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    engine = load_bundle(root, memory_budget_bytes=1)  # no partition resident: nothing of it opened yet
    with pytest.raises(BundleError, match="sha256"):
        engine.experts.get(part["name"])  # verified right before its session is created
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root, verify="full", memory_budget_bytes=1)


def test_an_unchanged_index_skips_hashing(index, tmp_path, hash_calls):
    root = copy(index, tmp_path)
    Index.open(root)
    assert hash_calls
    hash_calls.clear()
    Index.open(root)
    assert hash_calls == []


def test_the_record_lives_outside_the_bundle(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    load_bundle(root)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    records = list((verified.cache_dir() / "verified").glob("*.json"))
    assert records and all(json.loads(r.read_text())["digest"] for r in records)


def test_a_forged_record_is_ignored(bundle, tmp_path, hash_calls):
    root = copy(bundle, tmp_path)
    load_bundle(root)
    record = verified.VerificationRecord(Path(os.path.realpath(root)),
                                         __import__("hashlib").sha256((root / MANIFEST_FILE).read_bytes()).hexdigest())
    data = json.loads(record.file.read_text())
    data["entries"]["graphs/decoder.onnx"]["stat"][0] += 1  # edited by hand: the digest no longer fits
    record.file.write_text(json.dumps(data))
    hash_calls.clear()
    load_bundle(root)
    assert "decoder.onnx" in hash_calls


def test_user_error_for_unknown_verify_mode(bundle):
    with pytest.raises(UserError, match="verify"):
        load_bundle(bundle, verify="sometimes")
