"""benchmarks/serve_bench.py smoke-run tiny (nothing timed is asserted): its expert-traffic accounting of
batched decode steps over a partitioned MoE bundle — distinct routed experts, expert and partition bytes of a
step over B rows vs one row's."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dsedge.export.bundle import export_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_bench  # noqa: E402 — the benchmark script, beside the tests


def _partition(first, last, size):
    return SimpleNamespace(experts=(first, last), bytes=size)


def test_step_traffic_counts_distinct_experts_and_the_partitions_they_fall_in():
    partitions = [_partition(0, 4, 400), _partition(4, 8, 800)]  # 100 and 200 bytes an expert
    chosen = np.array([[0, 1], [1, 2], [5, 1]])  # 3 rows, top-2: experts {0, 1, 2, 5}
    step = serve_bench.step_traffic([(chosen, partitions)], rows=3)
    assert step["experts"] == 4 and step["experts_one_row"] == 2
    assert step["expert_bytes"] == 100 * 3 + 200
    assert step["expert_bytes_one_row"] == pytest.approx((200 + 200 + 300) / 3)
    assert step["partition_bytes"] == 1200 and step["partition_bytes_one_row"] == pytest.approx((400 + 400 + 1200) / 3)
    assert serve_bench.independent_ratio({"experts_per_layer": 32, "top_k": 4}, 4) == pytest.approx(3.31, abs=0.01)


def test_the_bench_reports_expert_traffic_of_batched_steps(tiny_checkpoint, tmp_path, capsys):
    bundle = Path(export_bundle(tiny_checkpoint("v2_lite"), tmp_path / "moe.bundle", max_context=256,
                                layout="partitioned", experts_per_partition=2, validate=False).output)
    result = serve_bench.run(bundle, [1, 4], requests=4, max_tokens=6, turns=1, threads=None)
    alone, batched = result["levels"]
    assert alone["expert_traffic"] is None  # one client: no batched step
    traffic = batched["expert_traffic"]
    assert traffic, batched
    for rows, t in traffic.items():
        assert 1 <= t["experts_ratio"] <= int(rows) and 1 <= t["partition_bytes_ratio"] <= int(rows)
        assert t["expert_bytes_ratio"] == pytest.approx(t["experts_ratio"])  # experts of one size
    assert "routed experts" in capsys.readouterr().out
