"""Every bad input is a UserError: exit 3 through the CLI, with a message naming the file or field (issue #15
item 3). Each case below used to be an exit 1 "internal error", a hang, or a silent wrong result."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsedge.cli import main
from dsedge.export.bundle import export_bundle
from dsedge.manifest import MANIFEST_FILE
from dsedge.retrieval import build_index
from dsedge.verified import sha256_file

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-inputs") / "b"
    export_bundle(tiny_checkpoint("qwen2"), out, max_context=64, validate=False)
    return out


@pytest.fixture(scope="module")
def index(embedder_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("bad-docs")
    (docs / "cheese.txt").write_text("Cheese is made by curdling milk with rennet.\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("bad-index") / "docs.index"
    build_index([docs], out, embedder=embedder_dir)
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def rehash(root: Path, rel: str) -> None:
    data = json.loads((root / MANIFEST_FILE).read_text())
    data["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
    (root / MANIFEST_FILE).write_text(json.dumps(data))


def edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST_FILE).read_text())
    edit(data)
    (root / MANIFEST_FILE).write_text(json.dumps(data))


def fails_with_3(capsys, argv: list[str], *names: str, stdin: str | None = None, monkeypatch=None) -> dict:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    error = out.get("error") or {}
    text = f"{error.get('message')} {error.get('where')}"
    assert code == 3 and error.get("exit_code") == 3, out
    for name in names:
        assert name in text, (name, text)
    return error


# --- the bundle's files -------------------------------------------------------------------------------------

def test_malformed_bundle_tokenizer_json(bundle, tmp_path, capsys):
    root = copy(bundle, tmp_path)
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    rehash(root, "tokenizer/tokenizer.json")
    fails_with_3(capsys, ["run", str(root), "-p", "hi", "-n", "2"], "tokenizer.json")


def test_malformed_bundle_tokenizer_config(bundle, tmp_path, capsys, monkeypatch):
    root = copy(bundle, tmp_path)
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"chat_template": ')
    rehash(root, "tokenizer/tokenizer_config.json")
    fails_with_3(capsys, ["chat", str(root), "-n", "2"], "tokenizer_config.json", stdin="hi\n",
                 monkeypatch=monkeypatch)


def test_mistyped_chat_template_field(bundle, tmp_path, capsys, monkeypatch):
    root = copy(bundle, tmp_path)
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"chat_template": 7}')
    rehash(root, "tokenizer/tokenizer_config.json")
    fails_with_3(capsys, ["chat", str(root), "-n", "2"], "chat_template", stdin="hi\n", monkeypatch=monkeypatch)


@pytest.mark.parametrize("eos", ["two", 10**9, [1, "x"], True])
def test_mistyped_token_ids_in_the_manifest(bundle, tmp_path, capsys, eos):
    root = copy(bundle, tmp_path)
    edit_manifest(root, lambda d: d["tokenizer"].__setitem__("eos_token_id", eos))
    fails_with_3(capsys, ["run", str(root), "-p", "hi", "-n", "2"], "eos_token_id")


@pytest.mark.parametrize(("context", "field"), [(128, "RoPE"), (0, "max_context"), (10**9, "max_position_embeddings")])
def test_edited_max_context(bundle, tmp_path, capsys, context, field):
    root = copy(bundle, tmp_path)  # exported with --max-context 64: its RoPE tables hold 64 rows
    edit_manifest(root, lambda d: d.__setitem__("max_context", context))
    error = fails_with_3(capsys, ["run", str(root), "-p", "hi", "-n", "2"], "max_context", field)
    assert "re-export" in (error["hint"] or "") or field != "max_context"


def _chat_fails(bundle, template: Path, *names: str) -> None:
    # Through the API: `dsedge chat` reports a failed turn on stderr and goes on to the next line (the exit
    # code of a chat whose every turn failed is the chat command's, cli_chat.py).
    from dsedge.errors import UserError
    from dsedge.runtime import load_bundle

    with pytest.raises(UserError) as err:
        load_bundle(bundle).chat([{"role": "user", "content": "hi"}], max_new_tokens=2, template=template)
    assert err.value.exit_code == 3
    for name in names:
        assert name in err.value.message


def test_nested_loop_template_is_stopped(bundle, tmp_path):
    template = tmp_path / "slow.jinja"
    template.write_text(NESTED_LOOPS)
    started = time.monotonic()
    _chat_fails(bundle, template, "rendering took longer", "slow.jinja")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("source", ["{{ 'x' * 1000000000 }}", "{{ 'x'|center(1000000000) }}",
                                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
                                    "{{ 'a' + 1 }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"])
def test_templates_that_blow_up_or_break(bundle, tmp_path, source):
    template = tmp_path / "bad.jinja"
    template.write_text(source)
    _chat_fails(bundle, template, "chat template", "bad.jinja")


def test_a_fifo_as_template_is_refused_without_blocking(bundle, tmp_path):
    fifo = tmp_path / "t.jinja"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "dsedge", "chat", str(bundle), "--template", str(fifo), "--json"],
                         input="hi\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "not a regular file" in run.stdout


# --- sampling and export flags ---------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "value", "name"), [("--temperature", "1e-310", "temperature"),
                                                     ("--temperature", "nan", "temperature"),
                                                     ("--temperature", "inf", "temperature"),
                                                     ("--top-p", "nan", "top_p"),
                                                     ("--repetition-penalty", "inf", "repetition_penalty")])
def test_sampling_values_that_would_give_inf_or_nan(bundle, capsys, flag, value, name):
    fails_with_3(capsys, ["run", str(bundle), "-p", "hi", "-n", "2", flag, value], name)


def test_export_max_context_zero(tiny_checkpoint, tmp_path, capsys):
    fails_with_3(capsys, ["export", str(tiny_checkpoint("qwen2")), "-o", str(tmp_path / "b"), "--max-context", "0",
                          "--no-validate"], "--max-context")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("name", "text"), [("tokenizer_config.json", '{"bos_token": '),
                                            ("tokenizer_config.json", "[1, 2]"),
                                            ("tokenizer.json", '{"model": 3}'),
                                            ("generation_config.json", "nan nan")])
def test_malformed_checkpoint_tokenizer_files(tiny_checkpoint, tmp_path, capsys, name, text):
    ckpt = Path(shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "ckpt"))
    (ckpt / name).write_text(text)
    fails_with_3(capsys, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--no-validate"], name)
    assert not (tmp_path / "b").exists()


def test_a_fifo_in_the_checkpoint_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "ckpt"))
    (ckpt / "tokenizer_config.json").unlink()
    os.mkfifo(ckpt / "tokenizer_config.json")
    run = subprocess.run([sys.executable, "-m", "dsedge", "export", str(ckpt), "-o", str(tmp_path / "b"),
                          "--no-validate", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr
    assert "tokenizer_config.json" in run.stdout and "not a regular file" in run.stdout


# --- the index ------------------------------------------------------------------------------------------

def test_an_emptied_chunks_json_is_an_error_not_zero_hits(index, tmp_path, capsys):
    root = copy(index, tmp_path)
    store = json.loads((root / "chunks.json").read_text())
    (root / "chunks.json").write_text(json.dumps(store | {"chunks": [], "documents": {}}))
    rehash(root, "chunks.json")
    fails_with_3(capsys, ["index", "query", str(root), "cheese"], "chunks.json")


def test_a_malformed_embedder_tokenizer(index, tmp_path, capsys):
    root = copy(index, tmp_path)
    (root / "embedder" / "tokenizer.json").write_text("{}")
    rehash(root, "embedder/tokenizer.json")
    fails_with_3(capsys, ["index", "query", str(root), "cheese"], "tokenizer.json")


@pytest.mark.parametrize("entry", [{"sha256": "x", "bytes": 1}, {"sha256": "0" * 64, "bytes": -1}, {"bytes": 1}])
def test_a_mistyped_index_files_entry(index, tmp_path, capsys, entry):
    root = copy(index, tmp_path)
    edit_manifest(root, lambda d: d["files"].__setitem__("chunks.json", entry))
    fails_with_3(capsys, ["index", "query", str(root), "cheese"], "chunks.json")
