"""`dsedge profile`: timings add up, per-graph and per-layer rows, expert-cache stats, JSON and plot."""

import json

import pytest

from dsedge.cli import main
from dsedge.export.bundle import export_bundle
from dsedge.runtime.profile import profile_bundle


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    ckpt = tiny_checkpoint("v3")
    return {layout: export_bundle(ckpt, root / layout, layout=layout, max_context=64, validate=False,
                                  experts_per_partition=2).output
            for layout in ("monolithic", "partitioned")}


def test_partitioned_profile_accounts_for_graphs_layers_and_experts(bundles):
    r = profile_bundle(bundles["partitioned"], prompt_tokens=12, gen_tokens=6, trials=2, memory_budget_bytes=1)
    assert r.layout == "partitioned" and r.providers == ["CPUExecutionProvider"]
    assert r.ttft_ms["p50"] > 0 and r.decode_ms_per_token["p90"] >= r.decode_ms_per_token["p50"] > 0
    assert r.decode_tokens_per_s == pytest.approx(1e3 / r.decode_ms_per_token["p50"])
    kinds = {g["kind"] for g in r.graphs}
    assert {"prelude", "layer", "head", "experts"} <= kinds
    assert [row["layer"] for row in r.layers] == [0, 1, 2]  # the fixture has 3 layers, layer 0 dense
    assert r.layers[0]["experts_ms_per_token"] == 0 and r.layers[1]["experts_ms_per_token"] > 0
    # A budget below one partition: every expert call is a miss whose load time is reported separately.
    assert r.experts["misses"] > 0 and r.expert_load_ms_per_token > 0
    inside = sum(g["decode_ms_per_token"] for g in r.graphs)
    assert inside + r.outside_ort_ms_per_token + r.expert_load_ms_per_token == pytest.approx(
        r.decode_ms_per_token["mean"], rel=1e-3)  # graph rows are rounded to 0.1 µs


def test_monolithic_by_op_splits_time_by_layer(bundles):
    r = profile_bundle(bundles["monolithic"], prompt_tokens=8, gen_tokens=4, trials=1, by_op=True)
    assert r.experts is None and [g["name"] for g in r.graphs] == ["decoder"]
    assert [row["layer"] for row in r.layers] == [0, 1, 2]
    assert r.ops and abs(sum(o["share"] for o in r.ops) - 1) < 1e-3
    assert any(o["op"] == "MatMul" for o in r.ops)


def test_cli_json_and_plot(bundles, tmp_path, capsys):
    plot = tmp_path / "p.png"
    assert main(["profile", bundles["partitioned"], "--prompt-tokens", "8", "--gen-tokens", "3", "--trials", "1",
                 "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["profile", bundles["partitioned"], "--prompt-tokens", "5", "--gen-tokens", "2", "--trials", "1"]) == 0
    assert "decode" in capsys.readouterr().out


def test_bad_arguments_exit_3(bundles, capsys):
    assert main(["profile", bundles["monolithic"], "--trials", "0"]) == 3
    assert main(["profile", bundles["monolithic"], "--prompt-tokens", "60", "--gen-tokens", "10"]) == 3
    assert main(["profile", bundles["monolithic"], "--plot", "x.svg", "--trials", "1", "--gen-tokens", "2"]) == 3
    assert "max context" in capsys.readouterr().err


def test_prefetch_under_a_small_budget_keeps_tokens_and_counts_prefetches(bundles):
    from dsedge.runtime import load_bundle

    prompt = [5, 9, 200, 31, 7, 77, 140, 12]
    plain = load_bundle(bundles["partitioned"])
    tight = load_bundle(bundles["partitioned"], memory_budget_bytes=1, prefetch_experts=True)
    assert tight.greedy(prompt, 10) == plain.greedy(prompt, 10)
    stats = tight.experts.stats
    assert stats.prefetches > 0 and stats.misses > 0
    assert not tight.experts.pending or all(f.done() or f.running() for f in tight.experts.pending.values())


def test_missing_execution_provider_falls_back_to_cpu_with_a_warning(bundles, caplog):
    import logging

    import onnxruntime as ort

    from dsedge.runtime import load_bundle
    from dsedge.runtime import session as session_module

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: nothing to fall back from")
    session_module._warned_providers.clear()  # the warning is given once per process
    with caplog.at_level(logging.WARNING, logger="dsedge"):
        engine = load_bundle(bundles["monolithic"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert engine.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_target_threads_are_capped_at_the_cores_available(bundles):
    import os

    from dsedge.runtime import load_bundle

    engine = load_bundle(bundles["monolithic"], target="x86-cpu-16g")  # the profile says 8 threads
    assert engine.session_config.threads == min(8, len(os.sched_getaffinity(0)))
