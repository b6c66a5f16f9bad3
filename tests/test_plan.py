"""`plan`: weights per precision, latent vs naive KV cache, budget fit, expert residency, decode bound."""

import json

import pytest

from dsedge.cli import main
from dsedge.errors import ConfigError
from dsedge.models.published import published_config
from dsedge.models.registry import spec_from_config
from dsedge.models.spec import TensorSpec
from dsedge.planning import kv_bytes_per_token, plan, tensor_bytes


def by_scheme(report):
    return {row.scheme: row for row in report.precisions}


def test_v3_on_a_24g_gpu():
    # a GPU bundle is exported in fp16: with fp32 floats (export's default) not even int8's trunk fits 24 GB
    report = plan("deepseek-r1", target="gpu-24g", context=4096, dtype="fp16")
    assert report.params["total"] / 1e9 == pytest.approx(671, rel=0.01)
    assert report.params["total_with_mtp"] / 1e9 == pytest.approx(685, rel=0.01)
    # Latent MLA cache: 61 layers × 576 values × 2 bytes; the naive cache is ~71× larger.
    assert report.kv_latent_bytes_per_token == 61 * 576 * 2
    assert report.kv_naive_bytes_per_token == 61 * 128 * (192 + 128) * 2
    rows = by_scheme(report)
    # the bundle holds the MTP module too (the draft graph), less its embedding and head copies (129280 × 7168
    # each), which the draft shares with the main graphs
    assert rows["bf16"].weight_bytes / 1e9 == pytest.approx(2 * (685 - 2 * 129280 * 7168 / 1e9), rel=0.01)
    assert all(not row.fits for row in rows.values())
    # int4 halves int8's routed-expert bytes (plus scales), so more experts stay resident.
    assert rows["int4"].resident_experts > rows["int8"].resident_experts > rows["bf16"].resident_experts
    assert report.total_routed_experts == 58 * 256
    assert rows["int4"].decode_tokens_per_s_bound > rows["int8"].decode_tokens_per_s_bound


def test_v2_lite_fits_a_cpu_box_at_int4_only():
    rows = by_scheme(plan("deepseek-v2-lite", target="x86-cpu-16g", context=2048))
    assert rows["int4"].fits and not rows["bf16"].fits
    assert rows["bf16"].fits_with_offload  # a CPU box maps the rest of the experts from disk
    assert rows["int4"].resident_experts == 26 * 64 and rows["int4"].offloaded_bytes == 0


def test_decode_bound_is_bandwidth_over_bytes():
    report = plan("r1-distill-qwen-1.5b", target="arm-sbc-8g", context=1000)
    row = by_scheme(report)["int8"]
    expected = 17.1e9 / (row.active_bytes_per_token + report.kv_bytes_at_context)
    assert row.decode_tokens_per_s_bound == pytest.approx(expected, rel=1e-3)
    assert row.resident_experts is None  # dense


def test_kv_cache_dense_gqa():
    spec = spec_from_config(published_config("r1-distill-llama-8b"))
    latent, naive = kv_bytes_per_token(spec)
    assert latent is None and naive == 32 * 2 * 8 * 128 * 2


def test_tensor_bytes_per_scheme():
    """What export writes: MatMulNBits codes padded to whole blocks plus one scale per block, in the bundle's
    float dtype; per-channel int8 repeats its scale over blocks of 128 inputs."""
    t = TensorSpec("w", (576, 7168), "attention", 0, linear=True)
    assert tensor_bytes(t, None) == 576 * 7168 * 4
    assert tensor_bytes(t, None, 2) == 576 * 7168 * 2
    assert tensor_bytes(t, (8, None)) == 576 * 7168 + 576 * 56 * 4
    assert tensor_bytes(t, (4, 128), 2) == 576 * 7168 // 2 + 576 * 56 * 2
    assert tensor_bytes(TensorSpec("w", (10, 100), "attention", 0, linear=True), (4, 128)) == 10 * 64 + 10 * 4
    norm = TensorSpec("n", (7168,), "norms", 0)
    assert tensor_bytes(norm, (4, 128)) == 7168 * 4
    router = TensorSpec("r", (256, 7168), "router", 3)
    assert tensor_bytes(router, None, 2) == 256 * 7168 * 4  # routers stay fp32
    kv_b = TensorSpec("model.layers.0.self_attn.kv_b_proj.weight", (4096, 512), "attention", 0, linear=True)
    # absorbed into per-head matrices: int8 with a scale per head and column in an fp32 export, else float
    assert tensor_bytes(kv_b, (4, 128)) == 4096 * 512 + 4096 * 4
    assert tensor_bytes(kv_b, (4, 128), 2) == 4096 * 512 * 2
    assert tensor_bytes(kv_b, None) == 4096 * 512 * 4


def test_plan_without_target_and_from_config_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(published_config("deepseek-v2")))
    report = plan(tmp_path)
    assert report.target is None and report.precisions[0].fits is None
    assert report.params["active"] / 1e9 == pytest.approx(21, rel=0.03)
    assert plan(tmp_path / "config.json").params == report.params


def test_plan_errors():
    with pytest.raises(ConfigError, match="did you mean"):
        plan("deepseek-v2-light")
    with pytest.raises(ConfigError, match="no such checkpoint"):
        plan("./missing/dir")
    with pytest.raises(ConfigError, match="context"):
        plan("deepseek-v3", context=0)


def test_plan_cli_json(capsys):
    assert main(["plan", "deepseek-v3", "--target", "gpu-12g", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["model_type"] == "deepseek_v3"
    assert {p["scheme"] for p in out["precisions"]} == {"bf16", "int8", "int4", "int4-experts"}


def test_plan_cli_human_and_errors(capsys):
    assert main(["plan", "deepseek-v2-lite", "--target", "x86-cpu-16g"]) == 0
    text = capsys.readouterr().out
    assert "latent MLA" in text and "decode tok/s" in text and "int4-experts" in text
    assert main(["plan", "deepseek-v2-lite", "--target", "no-such-target", "--json"]) == 3
    err = json.loads(capsys.readouterr().out)
    assert err["ok"] is False and err["error"]["exit_code"] == 3
