"""Progress on stderr: plain lines when stderr is not a terminal, tqdm bars on one, nothing with -q/--json, and
no progress bar of transformers' own."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from dsedge import progress
from dsedge.progress import Bar, PlainLines, Silent, format_duration

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm", "COLUMNS": "100"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsedge", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _cli_on_pty(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); what the terminal showed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "dsedge", *args], stdout=subprocess.PIPE, stderr=follower,
                            env=_env())
    os.close(follower)
    shown = bytearray()
    while True:  # drain while it runs: a full pty buffer would block the child
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    proc.stdout.read()
    return proc.wait(timeout=300), shown.decode("utf-8", "replace")


# --- the library side ---------------------------------------------------------------------------------

def test_plain_line_says_count_rate_and_eta(monkeypatch):
    lines = []
    monkeypatch.setattr(PlainLines, "_emit", lambda self, text: lines.append(text))
    previous = progress.use_renderer(PlainLines())
    clock = iter([0.0, 1.2, 2.4, 3.6])
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    try:
        with progress.progress("compress", total=3, unit="layer") as bar:
            bar.advance(detail="SQNR min 31.2 dB")  # t = 1.2
            bar.advance()  # t = 2.4
            bar.advance()  # t = 3.6
    finally:
        progress.use_renderer(previous)
    assert lines[0] == "compress: layer 1/3, 1.2 s/layer, ETA 2.4 s (SQNR min 31.2 dB)"
    assert lines[-1] == "compress: layer 3/3, 1.2 s/layer, done in 3.6 s"


def test_long_loops_emit_at_most_a_line_a_second_and_always_the_last(monkeypatch):
    lines = []
    monkeypatch.setattr(PlainLines, "_emit", lambda self, text: lines.append(text))
    previous = progress.use_renderer(PlainLines())
    try:
        with progress.progress("index", total=500, unit="chunk") as bar:
            for _ in range(50):
                bar.advance(10)
    finally:
        progress.use_renderer(previous)
    assert 1 <= len(lines) <= 3  # the first, maybe one more on a slow machine, the last
    assert lines[-1].startswith("index: chunk 500/500, ") and "chunks/s" in lines[-1]


def test_default_renderer_logs_and_library_never_prints(caplog, capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger("dsedge"), "handlers", [])  # an earlier in-process CLI run's handler
    previous = progress.use_renderer(PlainLines())  # the default (an earlier in-process CLI run may have replaced it)
    try:
        with caplog.at_level(logging.INFO, logger="dsedge.progress"), progress.progress("export", 2, "layer") as bar:
            bar.advance()
            bar.advance()
    finally:
        progress.use_renderer(previous)
    fresh = subprocess.run([sys.executable, "-c", "from dsedge import progress; "
                            "print(type(progress.current_renderer()).__name__)"], capture_output=True, text=True,
                           env=_env(), check=True)
    assert fresh.stdout.strip() == "PlainLines"  # a library user gets log lines, never a bar or a print
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["export: layer 1/2", "export: layer 2/2"]
    assert capsys.readouterr() == ("", "")


def test_silent_renderer_and_bar_closed_on_error():
    closed = []

    class Recording(Silent):
        def close(self, bar):
            closed.append(bar.done)

    previous = progress.use_renderer(Recording())
    try:
        with pytest.raises(RuntimeError), progress.progress("compress", 4, "layer") as bar:
            bar.advance()
            raise RuntimeError("layer 2 failed")
    finally:
        progress.use_renderer(previous)
    assert closed == [1]


def test_tqdm_renderer_draws_a_bar():
    stream = io.StringIO()
    renderer = progress.TqdmRenderer(stream)
    bar = Bar("export", 4, "layer", renderer)
    renderer.start(bar)
    for _ in range(4):
        bar.advance(detail="ok")
    renderer.close(bar)
    assert "export: 100%|" in stream.getvalue() and "4/4" in stream.getvalue()


@pytest.mark.parametrize(("seconds", "text"), [(0.42, "0.4 s"), (11.2, "11 s"), (125, "2 min 05 s"),
                                               (3780, "1 h 03 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_transformers_loading_bar_is_silenced(tiny_checkpoint, capfd):
    from dsedge.models.reference import load_reference_model

    load_reference_model(tiny_checkpoint("v3"))
    assert "Loading weights" not in capfd.readouterr().err


# --- the CLI side -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("v3")


def _layers(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]


def test_plain_lines_when_stderr_is_not_a_terminal(checkpoint, tmp_path):
    run = _cli("export", str(checkpoint), "-o", str(tmp_path / "b"), "--layout", "partitioned")
    assert run.returncode == 0, run.stderr
    n = _layers(checkpoint)
    layers = [line for line in run.stderr.splitlines() if line.startswith("export: layer ")]
    assert len(layers) == n and layers[-1].startswith(f"export: layer {n}/{n}, ") and "done in" in layers[-1]
    assert "ETA" in layers[0]
    assert any(line.startswith(f"validate: layer {n}/{n}, ") for line in run.stderr.splitlines())  # streamed
    assert "\r" not in run.stderr and "%|" not in run.stderr  # no bar drawn into a file
    assert "Loading weights" not in run.stderr


def test_quiet_and_json_print_no_progress(checkpoint, tmp_path):
    quiet = _cli("export", str(checkpoint), "-o", str(tmp_path / "q"), "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    as_json = _cli("export", str(checkpoint), "-o", str(tmp_path / "j"), "--json")
    assert as_json.returncode == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["ok"] is True


def test_a_bar_renders_on_a_terminal_and_quiet_draws_none(checkpoint, tmp_path):
    code, shown = _cli_on_pty("export", str(checkpoint), "-o", str(tmp_path / "t"))
    assert code == 0, shown
    n = _layers(checkpoint)
    assert "export: 100%|" in shown and f"{n}/{n}" in shown and "\r" in shown  # tqdm redraws in place
    assert "validate: 100%|" in shown
    assert "export: validating against the PyTorch reference" in shown  # log lines still shown, above the bars
    assert "Loading weights" not in shown
    code, shown = _cli_on_pty("export", str(checkpoint), "-o", str(tmp_path / "tq"), "-q")
    assert code == 0 and shown == ""


def test_index_build_reports_embedding_progress(embedder_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.md").write_text(f"# Note {i}\n\n" + "Some words about modules and packages. " * 40)
    run = _cli("index", "build", str(docs), "-o", str(tmp_path / "idx"), "--embedder", str(embedder_dir))
    assert run.returncode == 0, run.stderr
    last = [line for line in run.stderr.splitlines() if line.startswith("index: chunk ")][-1]
    count = last.split()[2].rstrip(",")
    assert count.split("/")[0] == count.split("/")[1] != "0"
    assert "Loading weights" not in run.stderr and "%|" not in run.stderr
