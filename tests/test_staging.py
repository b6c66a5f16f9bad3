"""dsedge.staging: the staged output every writing command uses — refusals, the lock, signals, leftovers.

In-process tests of the helper itself; tests/test_cli_contract.py drives the commands in real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsedge.errors import Terminated, UserError
from dsedge.staging import (
    Artifact,
    check_output,
    clean_leftovers,
    has_file,
    lock_path,
    output_lock,
    staged_output,
)

THING = Artifact("thing (thing.json)", has_file("thing.json"))
REPO = Path(__file__).resolve().parents[1]


def _write_thing(root: Path, text: str) -> None:
    (root / "thing.json").write_text(text)


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside", "containing", "same-via-link"])
def test_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, where):
    source = tmp_path / "data" / "input"
    source.mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"precious")
    (tmp_path / "link").symlink_to(source)
    output = {"same": source, "inside": source / "out", "containing": tmp_path / "data",
              "same-via-link": tmp_path / "link"}[where]
    refused = pytest.raises(UserError, match="output (is|lies inside|contains) the input")
    with refused, staged_output(output, inputs=[source], overwrite=True, artifact=THING):
        raise AssertionError("the body must not run")
    assert (source / "weights.bin").read_bytes() == b"precious"
    assert _siblings(source) == ["weights.bin"]
    assert _siblings(tmp_path) == ["data", "link"]


def test_existing_output_refusals(tmp_path):
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_output(file_out, overwrite=True, artifact=THING)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "holiday.jpg").write_text("mine")
    with pytest.raises(UserError, match="already exists") as exc:
        check_output(folder, overwrite=False, artifact=THING)
    assert "--overwrite" in exc.value.hint
    with pytest.raises(UserError, match="is not a thing") as exc:  # --overwrite never removes a foreign folder
        check_output(folder, overwrite=True, artifact=THING)
    assert "remove this one yourself" in exc.value.hint
    assert (folder / "holiday.jpg").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=True, artifact=THING)  # an empty directory may be replaced


# --- writing and replacing -----------------------------------------------------------------------------

def test_output_appears_only_when_complete_and_nothing_is_left_behind(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, artifact=THING) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.partial-{os.getpid()}-")
        assert not out.exists() and lock_path(out).is_file()
        _write_thing(tmp, "one")
    assert (out / "thing.json").read_text() == "one"
    assert _siblings(tmp_path) == ["out"]  # no partial, no old copy, no lock file


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, artifact=THING) as tmp:
        _write_thing(tmp, "old")
    with pytest.raises(RuntimeError, match="build failed"), staged_output(out, overwrite=True, artifact=THING) as tmp:
        _write_thing(tmp, "new")
        raise RuntimeError("build failed")
    assert (out / "thing.json").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]
    with staged_output(out, overwrite=True, artifact=THING) as tmp:
        _write_thing(tmp, "new")
    assert (out / "thing.json").read_text() == "new"
    assert _siblings(tmp_path) == ["out"]


# --- the lock ---------------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from dsedge.staging import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = pytest.raises(UserError, match=f"another dsedge process \\(pid {holder.pid}\\) is writing")
        with refused, staged_output(out, artifact=THING):
            raise AssertionError("the body must not run")
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert _siblings(tmp_path) == []  # the holder removed its lock file
    with output_lock(out), output_lock(out):  # re-entrant: index add holds it across its own save
        with staged_output(out, artifact=THING) as tmp:
            _write_thing(tmp, "x")
        assert lock_path(out).is_file()
    assert _siblings(tmp_path) == ["out"]


# --- signals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_termination_signal_cleans_up_like_ctrl_c_and_handlers_are_restored(tmp_path, signame):
    number = getattr(signal, signame)
    # The default disposition, as a shell gives it: under nohup SIGHUP arrives ignored, and an ignored signal
    # stays ignored (the next test), so the handler under test would never be installed.
    inherited = signal.signal(number, signal.SIG_DFL)
    try:
        out = tmp_path / "out"
        with pytest.raises(Terminated) as exc, staged_output(out, artifact=THING) as tmp:
            _write_thing(tmp, "half")
            os.kill(os.getpid(), number)
            time.sleep(10)  # the handler raises Terminated here, at once
            raise AssertionError("the signal handler should have raised")
        assert exc.value.exit_code == 128 + number and exc.value.signal_name == signame
        assert _siblings(tmp_path) == []
        assert signal.getsignal(number) is signal.SIG_DFL
    finally:
        signal.signal(number, inherited)


def test_an_ignored_signal_stays_ignored(tmp_path):
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with staged_output(tmp_path / "out", artifact=THING) as tmp:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            _write_thing(tmp, "x")
    finally:
        signal.signal(signal.SIGHUP, before)


# --- leftovers of killed runs -------------------------------------------------------------------------

def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-0a1b2c3d"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    live_process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = tmp_path / f".out.partial-{live_process.pid}-0a1b2c3d"
        live.mkdir()
        unrelated = tmp_path / ".other.partial-1-0a1b2c3d"
        unrelated.mkdir()
        with staged_output(out, artifact=THING) as tmp:
            _write_thing(tmp, "x")
        assert not stale.exists()
        assert live.is_dir() and unrelated.is_dir()  # another running process's, another output's
    finally:
        live_process.communicate(b"", timeout=30)


def test_old_output_of_a_run_killed_mid_swap_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-0a1b2c3d"  # killed after moving out aside, before renaming in
    old.mkdir()
    _write_thing(old, "the only copy")
    with output_lock(out) as real:
        assert clean_leftovers(real) == [old]
    assert (out / "thing.json").read_text() == "the only copy"
    assert _siblings(tmp_path) == ["out"]
