"""`pip install dsedge` without extras gives a working runtime: a fresh venv, no torch, `dsedge run` works."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsedge.export.bundle import export_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_runtime_only_install_runs_a_bundle(tmp_path, tiny_checkpoint):
    bundle = export_bundle(tiny_checkpoint("v3"), tmp_path / "bundle", max_context=64, validate=False).output
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)],
                   check=True, timeout=900)
    missing = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                              "('torch', 'transformers', 'onnx', 'safetensors') if u.find_spec(m)])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert missing == "[]", f"a runtime-only install pulled in {missing}"
    run = subprocess.run([str(venv / "bin" / "dsedge"), "run", bundle, "--prompt", "def f(x):", "-n", "6", "--greedy",
                          "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    # The tiny model runs all 6 tokens (no EOS among them), exactly as the development install generates them.
    from dsedge.runtime import load_bundle

    here = load_bundle(bundle).generate("def f(x):", max_new_tokens=6)
    assert result["ok"] and result["finish_reason"] == "length" and len(result["token_ids"]) == 6
    assert result["token_ids"] == here.token_ids and result["prompt_tokens"] == here.prompt_tokens > 0
    # The workstation commands need their extras: in this install they say which, as exit 3 (not a crash).
    for argv, extra in ((["export", str(tiny_checkpoint("v3")), "-o", str(tmp_path / "never")], "export"),
                        (["compress", str(tiny_checkpoint("v3")), "-o", str(tmp_path / "never")], "compress")):
        out = subprocess.run([str(venv / "bin" / "dsedge"), *argv, "--json"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 3, out.stdout + out.stderr
        error = json.loads(out.stdout)["error"]
        assert extra in error["hint"] and "pip install" in error["hint"] and "not installed" in error["message"], error
    assert not (tmp_path / "never").exists()
