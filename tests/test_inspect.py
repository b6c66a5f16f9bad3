"""`inspect`: counts equal transformers' own parameter count for every fixture; CLI output."""

import json
import subprocess
import sys

import pytest

from dsedge.cli import main
from dsedge.inspection import inspect_checkpoint
from dsedge.models.reference import load_reference_model
from dsedge.testing.tiny import VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("style", ["published", "transformers"])
def test_counts_match_transformers(tiny_checkpoint, variant, style):
    path = tiny_checkpoint(variant, style=style)
    report = inspect_checkpoint(path)
    model = load_reference_model(path)
    assert report.params["total"] == sum(p.numel() for p in model.parameters())
    assert report.params_on_disk == report.params["total_with_mtp"] + report.params["buffers"]
    assert report.validated and report.tokenizer == "tokenizer.json"
    assert report.chat_template == "tokenizer_config.json"


def test_mtp_counted_apart(tiny_checkpoint):
    path = tiny_checkpoint("v3", mtp=True, num_shards=3)
    report = inspect_checkpoint(path)
    model = load_reference_model(path)  # transformers drops the MTP layer
    assert report.params["total"] == sum(p.numel() for p in model.parameters())
    assert report.params["mtp"] > 0 and report.mtp_on_disk and report.mtp_in_config
    assert report.params_on_disk == report.params["total_with_mtp"] + report.params["buffers"]
    assert report.params["buffers"] == 3 * 16  # correction bias of 2 MoE layers + the MTP layer
    assert report.files == 3


def test_fp8_reported(tiny_checkpoint):
    report = inspect_checkpoint(tiny_checkpoint("v3", fp8=True))
    assert report.fp8 and report.bytes_by_dtype["F8_E4M3"] > 0
    assert report.spec["fp8_block_size"] == [32, 32]
    plain = inspect_checkpoint(tiny_checkpoint("v3"))
    assert report.params == plain.params


def test_active_params_for_moe(tiny_checkpoint):
    report = inspect_checkpoint(tiny_checkpoint("v3"))
    p = report.params
    routed_active = p["active_by_component"]["routed_experts"]
    assert routed_active * report.spec["moe"]["n_routed_experts"] == p["by_component"]["routed_experts"] * 4
    assert p["active"] < p["total"]


def test_cli_inspect_human_and_json(tiny_checkpoint, capsys):
    path = tiny_checkpoint("v2")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "group_limited_greedy" in text and "keep 2 of 4 groups" in text and "q-LoRA 56" in text
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["spec"]["moe"]["routing"] == "group_limited_greedy"


def test_inspect_without_torch(tiny_checkpoint):
    """inspect reads headers only, so it runs in a runtime-only install (no torch)."""
    code = ("import sys; sys.modules['torch'] = None\n"  # make any torch import fail
            "from dsedge.inspection import inspect_checkpoint\n"
            f"r = inspect_checkpoint({str(tiny_checkpoint('v3', fp8=True))!r})\n"
            "print(r.params['total'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 0


def test_help_teaches(capsys):
    for argv in (["--help"], ["inspect", "--help"], ["plan", "--help"], ["targets", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes" in text and "deepseek-v2-lite" in text and "--json" in text


def test_usage_error_exit_2(capsys):
    assert main(["plan"]) == 2  # returned, not raised (main reports usage errors itself: --json gets JSON)
    assert "the following arguments are required: model" in capsys.readouterr().err
    assert main([]) == 2


def test_targets_cli(capsys):
    assert main(["targets", "--json"]) == 0
    names = {t["name"] for t in json.loads(capsys.readouterr().out)["targets"]}
    assert {"x86-cpu-16g", "gpu-24g", "jetson-orin-nano-8g"} <= names
    assert main(["targets", "gpu-12g"]) == 0
    assert "gpu-12g" in capsys.readouterr().out
