"""`dsedge profile`: timings add up, per-graph and per-layer rows, expert-cache stats, JSON and plot."""

import json
from concurrent.futures import wait

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
    # A prefetch started now (a partition that is neither loaded nor on its way) must complete, without an
    # error, and join the loaded set when harvested — waited for, not sampled while the thread may still run.
    experts = tight.experts
    name = next((n for n in sorted(experts.partitions) if n not in experts.loaded and n not in experts.pending), None)
    assert name is not None, "a budget of 1 byte keeps at most a few partitions loaded"
    experts.prefetch([name])
    finished, unfinished = wait(list(experts.pending.values()), timeout=60)
    assert not unfinished and all(f.exception() is None for f in finished)
    experts.prefetch([])  # harvests the finished loads
    assert not experts.pending and name in experts.loaded


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


# --- the ends of the model, the plot, sweeps ----------------------------------------------------------

def test_embedding_and_lm_head_are_timed_in_both_layouts(bundles):
    part = profile_bundle(bundles["partitioned"], prompt_tokens=8, gen_tokens=4, trials=2, compose=False)
    by_name = {g["name"]: g["decode_ms_per_token"] for g in part.graphs}
    assert part.embed_ms_per_token == by_name["prelude"] and part.head_ms_per_token == by_name["head"] > 0
    assert len(part.trial_prefill_tokens_per_s) == 2 and len(part.trial_decode_tokens_per_s) == 2
    mono = profile_bundle(bundles["monolithic"], prompt_tokens=8, gen_tokens=4, trials=1, by_op=True)
    assert mono.head_ms_per_token > 0 and mono.embed_ms_per_token > 0  # the nodes after / before the layers
    layers = sum(r["ms_per_token"] for r in mono.layers)
    total = sum(o["ms_per_token"] for o in mono.ops)
    assert layers + mono.head_ms_per_token + mono.embed_ms_per_token == pytest.approx(total, rel=1e-3)


def test_a_composed_partitioned_bundle_is_split_by_layer_from_the_node_profile(bundles, capsys):
    """Every expert resident: one composed graph, timed as one; the node profile splits it by layer as it
    splits a monolithic graph (the composed graph's nodes carry the layers.N/ prefix)."""
    r = profile_bundle(bundles["partitioned"], prompt_tokens=8, gen_tokens=4, trials=1, by_op=True)
    assert r.one_graph and r.layout == "partitioned"
    assert [g["name"] for g in r.graphs] == []  # no bundle graph ran on its own
    assert [row["layer"] for row in r.layers] == [0, 1, 2]
    total = sum(o["ms_per_token"] for o in r.ops)
    layers = sum(row["ms_per_token"] for row in r.layers)
    assert layers + r.head_ms_per_token + r.embed_ms_per_token == pytest.approx(total, rel=1e-3)
    assert r.experts["hits"] > 0 and r.experts["misses"] == 0
    assert main(["profile", bundles["partitioned"], "-p", "4", "-n", "2", "-r", "1"]) == 0
    assert "(partitioned, composed into one graph)" in capsys.readouterr().out
    assert main(["profile", bundles["partitioned"], "-p", "4", "-n", "2", "-r", "1", "--graph-by-graph"]) == 0
    assert "(partitioned) on" in capsys.readouterr().out


def test_plot_puts_the_lm_head_beside_the_layers_and_decode_on_its_own_axis(bundles):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsedge.runtime.profile_plot import _decode_parts, profile_figure

    r = profile_bundle(bundles["partitioned"], prompt_tokens=8, gen_tokens=4, trials=1, compose=False)
    parts = dict(_decode_parts(r))
    assert parts["LM head"] == r.head_ms_per_token and parts["embedding"] == r.embed_ms_per_token
    assert sum(parts.values()) == pytest.approx(r.decode_ms_per_token["mean"], rel=1e-3)
    fig = profile_figure(r, plt)
    ttft_ax, decode_ax, layer_ax = fig.axes
    assert [t.get_text() for t in layer_ax.get_xticklabels()] == ["embed", "0", "1", "2", "LM head"]
    # The decode step has an axis of its own, scaled to it, not to the TTFT beside it.
    assert decode_ax.get_xlim()[1] < ttft_ax.get_xlim()[1] or r.ttft_ms["p50"] < r.decode_ms_per_token["mean"]
    assert decode_ax.get_xlim()[1] == pytest.approx(max(parts.values()) * 1.45)
    plt.close(fig)


def test_sweep_prints_a_llama_bench_table(bundles, capsys):
    assert main(["profile", bundles["partitioned"], "-p", "4,8", "-n", "3", "--threads", "1,2", "-r", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| threads | test | t/s |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(t, test) for t, test, _ in rows] == [(t, test) for t in ("1", "2")
                                                  for test in ("pp4", "tg3 @ pp4", "pp8", "tg3 @ pp8")]
    for _, _, rate in rows:
        mean, std = (float(v.replace(",", "")) for v in rate.split(" ± "))
        assert mean > 0 and std >= 0


def test_sweep_json_is_a_list_of_results(bundles, capsys):
    assert main(["profile", bundles["monolithic"], "-p", "6", "-n", "2,4", "-r", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and [r["test"] for r in out["results"]] == ["pp6", "tg2", "tg4"]
    assert all(r["tokens_per_s"] > 0 and r["threads"] for r in out["results"])


def test_sweep_refuses_single_run_options_and_bad_lists(bundles, capsys):
    assert main(["profile", bundles["monolithic"], "-p", "4,8", "--plot", "p.png"]) == 2
    assert "--plot" in capsys.readouterr().err
    assert main(["profile", bundles["monolithic"], "-p", "4,x"]) == 2
    assert main(["profile", bundles["monolithic"], "--threads", "0,2"]) == 2
