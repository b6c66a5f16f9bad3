"""A missing optional dependency is exit 3 with the pip line that installs it, never an 'internal error'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsedge.extras import EXTRA_FOR_MODULE, missing_extra


def _run_without(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m dsedge argv`` with ``module`` unimportable (as in an install without its extra)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from dsedge.cli import main\nsys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, argv, extra", [
    ("onnx", ["export", "deepseek-v3-tiny", "-o", "never-written.bundle", "--json"], "export"),
    ("torch", ["compress", "deepseek-v3-tiny", "-o", "never-written.ckpt", "--json"], "compress"),
])
def test_missing_extra_is_exit_3_with_the_install_line(module, argv, extra, tmp_path):
    argv = [a if not a.startswith("never-written") else str(tmp_path / a) for a in argv]
    out = _run_without(module, argv)
    assert out.returncode == 3, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert f"'{module}'" in error["message"] and f"dsedge[{extra}" in error["hint"]
    assert not any(tmp_path.iterdir())  # nothing written


def test_other_missing_modules_are_not_dressed_up():
    exc = ModuleNotFoundError("No module named 'no_such_thing'", name="no_such_thing")
    assert missing_extra(exc) is None
    assert set(EXTRA_FOR_MODULE) >= {"torch", "onnx", "hnswlib", "matplotlib", "transformers"}
