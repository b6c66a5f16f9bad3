"""The CLI's reliability contract, in real processes where it matters (README "Exit codes and reliability"):

inputs are never destroyed (an output that is, contains or lies inside an input: exit 3, input intact byte for
byte), one writer per output (a second concurrent one: exit 3 naming the first's pid), SIGTERM/SIGHUP clean up
(exit 143/129, nothing left), a SIGKILLed run's partial directory is removed by the next run, a failed
--overwrite keeps the old output, and --json prints exactly one strict-JSON object for every outcome.

Writers are caught mid-way deterministically: ``DSEDGE_TEST_PAUSE_BEFORE_COMMIT=GATE`` makes a writer announce
itself in ``GATE.waiting`` with its lock held and its partial directory complete, and wait for ``GATE``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsedge import cli
from dsedge.cli import all_units_failed, main
from dsedge.errors import UserError
from dsedge.staging import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
EXPORT_FAST = ["--no-validate", "--max-context", "16", "-q"]


# --- helpers -----------------------------------------------------------------------------------------------

def _env(**extra: str) -> dict:
    return os.environ | {"PYTHONPATH": str(REPO), **extra}


def dsedge(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsedge", *map(str, args)], env=_env(**env), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def start_paused(gate: Path, *args: str) -> subprocess.Popen:
    """Start ``dsedge ARGS`` and return once it is waiting at the gate (lock held, partial directory written)."""
    proc = subprocess.Popen([sys.executable, "-m", "dsedge", *map(str, args)], env=_env(**{PAUSE_ENV: str(gate)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sighup)
    waiting = Path(f"{gate}.waiting")
    deadline = time.monotonic() + TIMEOUT_S
    while not waiting.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited {proc.returncode} before the gate: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer never reached the gate")
        time.sleep(0.05)
    return proc


def _default_sighup() -> None:
    """In the child: SIGHUP at its default even when the tests run under nohup (an ignored signal is inherited,
    and staging leaves an ignored signal ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content hash: equal trees are equal byte for byte."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def strict_json(text: str) -> dict:
    """Exactly one JSON object; NaN/Infinity tokens (not JSON) rejected."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text

    def reject(token):
        raise AssertionError(f"bare {token} in JSON output")

    return json.loads(lines[0], parse_constant=reject)


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of a tiny checkpoint in ``tmp_path/models/ckpt`` (tests point outputs at and around it)."""
    dest = tmp_path / "models" / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), dest)
    return dest


# --- inputs are never destroyed --------------------------------------------------------------------------

AROUND = ["is", "inside", "contains"]


def _around(source: Path, relation: str) -> Path:
    return {"is": source, "inside": source / "out", "contains": source.parent}[relation]


@pytest.mark.parametrize("relation", AROUND)
def test_export_output_around_the_checkpoint_is_refused(checkpoint, relation, capsys):
    before = tree(checkpoint.parent)
    code = main(["export", str(checkpoint), "-o", str(_around(checkpoint, relation)), "--overwrite", *EXPORT_FAST])
    assert code == 3
    assert f"the input {checkpoint}" in capsys.readouterr().err
    assert tree(checkpoint.parent) == before


@pytest.mark.parametrize("relation", AROUND)
def test_compress_output_around_the_checkpoint_is_refused(checkpoint, relation, capsys):
    before = tree(checkpoint.parent)
    code = main(["compress", str(checkpoint), "-o", str(_around(checkpoint, relation)), "--overwrite", "-r", "int8",
                 "--no-eval", "-q"])
    assert code == 3
    assert f"the input {checkpoint}" in capsys.readouterr().err
    assert tree(checkpoint.parent) == before


@pytest.mark.parametrize("relation", AROUND)
def test_index_build_output_around_the_documents_is_refused(tmp_path, relation, capsys):
    docs = tmp_path / "corpus" / "docs"
    docs.mkdir(parents=True)
    (docs / "a.md").write_text("# Owls\n\nOwls hunt at night.\n")
    before = tree(tmp_path)
    code = main(["index", "build", str(docs), "-o", str(_around(docs, relation)), "--overwrite",
                 "--embedder", str(tmp_path / "no-embedder-needed"), "-q"])  # refused before the embedder opens
    assert code == 3
    assert f"the input {docs}" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_refusal_in_a_real_process_with_json(checkpoint):
    before = tree(checkpoint)
    result = dsedge("export", checkpoint, "-o", checkpoint, "--overwrite", "--json", *EXPORT_FAST)
    assert result.returncode == 3
    out = strict_json(result.stdout)
    assert out["ok"] is False and out["error"]["exit_code"] == 3 and "is the input" in out["error"]["message"]
    assert tree(checkpoint) == before


# --- one writer per output, signals, leftovers (export) --------------------------------------------------

def _bundle_dir_clean(parent: Path, *expected: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)  # no partial, old or lock left


def test_second_concurrent_export_is_refused_naming_the_first(checkpoint, tmp_path):
    out, gate = tmp_path / "out" / "b", tmp_path / "gate"
    first = start_paused(gate, "export", checkpoint, "-o", out, *EXPORT_FAST)
    try:
        second = dsedge("export", checkpoint, "-o", out, "--overwrite", *EXPORT_FAST)
        assert second.returncode == 3
        assert f"another dsedge process (pid {first.pid}) is writing this output" in second.stderr
    finally:
        gate.touch()
    code, _, err = finish(first)
    assert code == 0, err
    assert (out / "manifest.json").is_file()
    _bundle_dir_clean(out.parent, "b")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_termination_mid_overwrite_leaves_the_old_bundle_and_nothing_else(checkpoint, tmp_path, signame):
    out, gate = tmp_path / "out" / "b", tmp_path / "gate"
    assert dsedge("export", checkpoint, "-o", out, *EXPORT_FAST).returncode == 0
    old = tree(out)
    writer = start_paused(gate, "export", checkpoint, "-o", out, "--overwrite", "--max-context", "8",
                          "--no-validate", "--json")
    partial = Path(Path(f"{gate}.waiting").read_text().split()[1])
    assert partial.is_dir() and any(partial.iterdir())  # caught with a complete new bundle not yet renamed in
    writer.send_signal(getattr(signal, signame))
    code, stdout, _ = finish(writer)
    assert code == 128 + getattr(signal, signame)  # 143 SIGTERM, 129 SIGHUP
    report = strict_json(stdout)
    assert report["ok"] is False and report["error"]["signal"] == signame
    assert tree(out) == old  # the failed --overwrite kept the old bundle, byte for byte
    _bundle_dir_clean(out.parent, "b")


def test_partial_directory_of_a_killed_export_is_removed_by_the_next_run(checkpoint, tmp_path):
    out, gate = tmp_path / "out" / "b", tmp_path / "gate"
    writer = start_paused(gate, "export", checkpoint, "-o", out, *EXPORT_FAST)
    writer.kill()  # SIGKILL: no cleanup can run
    finish(writer)
    left = sorted(p.name for p in out.parent.iterdir())
    assert any(name.startswith(f".b.partial-{writer.pid}-") for name in left) and ".b.lock" in left
    result = dsedge("export", checkpoint, "-o", out, *EXPORT_FAST)
    assert result.returncode == 0, result.stderr
    _bundle_dir_clean(out.parent, "b")


# --- index: inputs and the read-modify-write lock ---------------------------------------------------------

def _docs(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_concurrent_index_add_never_loses_a_document(embedder_dir, tmp_path):
    docs = _docs(tmp_path / "docs", {"owls.md": "# Owls\n\nOwls hunt small mammals at night.\n"})
    extra = _docs(tmp_path / "extra", {"bees.md": "# Bees\n\nBees make honey from nectar.\n",
                                       "ships.md": "# Ships\n\nSailing ships cross the ocean with the wind.\n"})
    index = tmp_path / "docs.index"
    assert dsedge("index", "build", docs, "-o", index, "--embedder", embedder_dir, "-q").returncode == 0
    gate = tmp_path / "gate"
    first = start_paused(gate, "index", "add", index, extra / "bees.md", "-q")
    try:
        second = dsedge("index", "add", index, extra / "ships.md")
        assert second.returncode == 3  # refused clearly, not silently lost
        assert f"pid {first.pid}" in second.stderr
        assert "index:" not in second.stderr  # refused before reading the index: the lock spans read-modify-write
    finally:
        gate.touch()
    assert finish(first)[0] == 0
    assert dsedge("index", "add", index, extra / "ships.md", "-q").returncode == 0  # the retry the message asks for
    stats = strict_json(dsedge("index", "stats", index, "--json").stdout)
    assert sorted(Path(s).name for s in stats["sources"]) == ["bees.md", "owls.md", "ships.md"]
    _bundle_dir_clean(tmp_path, "docs", "extra", "docs.index", "gate", "gate.waiting")


def test_index_inputs_are_protected_in_add_and_export(embedder_dir, checkpoint, tmp_path, capsys):
    docs = _docs(tmp_path / "docs", {"owls.md": "# Owls\n\nOwls hunt small mammals at night.\n"})
    index = tmp_path / "docs.index"
    assert main(["index", "build", str(docs), "-o", str(index), "--embedder", str(embedder_dir), "-q"]) == 0
    before = tree(index)
    assert main(["index", "add", str(index), str(index), "-q"]) == 3  # the index as its own document
    assert main(["export", str(checkpoint), "-o", str(index), "--index", str(index), "--overwrite",
                 *EXPORT_FAST]) == 3
    assert main(["index", "build", str(docs), "-o", str(checkpoint), "--overwrite", "--embedder",
                 str(embedder_dir), "-q"]) == 3  # --overwrite replaces an index, never a checkpoint
    err = capsys.readouterr().err
    assert err.count("error: output is the input") == 2 and "is not a dsedge index" in err
    assert tree(index) == before


# --- --json: one object for every outcome ---------------------------------------------------------------

@pytest.mark.parametrize("argv", [["export", "--json"], ["plan", "--json", "--bogus"], ["index", "--json"]])
def test_usage_error_under_json_prints_one_object(argv):
    result = dsedge(*argv)
    assert result.returncode == 2
    out = strict_json(result.stdout)
    assert out["ok"] is False and out["error"]["exit_code"] == 2 and out["error"]["kind"] == "usage"
    assert out["error"]["message"] and "usage:" in out["error"]["hint"]


class _Result:
    def __init__(self, payload: dict, failure=None):
        self.payload, self.failure = payload, failure

    def to_json(self) -> dict:
        return self.payload


def _run_targets_returning(monkeypatch, result) -> None:
    monkeypatch.setattr(cli, "_run_targets", lambda args: result)
    monkeypatch.setattr(cli, "_render_targets", lambda r: print("rendered"))


def test_nan_and_infinity_print_as_null(monkeypatch, capsys):
    import numpy as np

    _run_targets_returning(monkeypatch, _Result({"loss": math.nan, "ratio": [math.inf, -math.inf, 1.5],
                                                 "np": np.float32("nan"), "arr": np.array([1.0, np.nan]),
                                                 "nested": _Result({"ppl": float("nan")})}))
    assert main(["targets", "--json"]) == 0
    out = strict_json(capsys.readouterr().out)
    assert out == {"ok": True, "loss": None, "ratio": [None, None, 1.5], "np": None, "arr": [1.0, None],
                   "nested": {"ppl": None}}


def test_a_command_whose_every_unit_failed_exits_non_zero(monkeypatch, capsys):
    errors = [UserError("the conversation no longer fits the context", where="turn 1"),
              UserError("the conversation no longer fits the context", where="turn 2")]
    _run_targets_returning(monkeypatch, _Result({"turns": []}, all_units_failed(errors, 0, "turn")))
    assert main(["targets", "--json"]) == 3
    out = strict_json(capsys.readouterr().out)
    assert out["ok"] is False and out["turns"] == [] and out["error"]["exit_code"] == 3
    assert out["error"]["message"].startswith("every turn failed (2)") and len(out["error"]["failures"]) == 2
    assert main(["targets"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "rendered\n" and "error: every turn failed" in captured.err
    _run_targets_returning(monkeypatch, _Result({"turns": [{}]}, all_units_failed(errors, 1, "turn")))
    assert main(["targets", "--json"]) == 0  # one turn succeeded: the command did its job
    assert strict_json(capsys.readouterr().out)["ok"] is True
