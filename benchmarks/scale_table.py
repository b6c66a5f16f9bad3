"""docs/scale.md's tables from scale_bench.py's JSON results (numbers are never typed by hand).

    .venv/bin/python benchmarks/scale_table.py /work/scale/qwen.json /work/scale/v2lite.json [--v3 v3-layer.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _spread(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "–"
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def _per_round(result: dict, recipe: str, kind: str, metric: str) -> list[float]:
    out = []
    for r in result.get("rounds", []):
        cell = r["cells"][recipe].get(kind)
        if cell is None:
            continue
        if metric == "ttft_ms":
            out.append(1000 * 512 / cell["prefill"])
        else:
            n = metric.split("@")[1]
            out.append(float(cell["decode"].get(n) or cell["decode"].get(int(n))))
    return out


def pipeline_rows(result: dict) -> list[str]:
    rows = []
    for recipe, e in result["recipes"].items():
        bound = 1.3 * e["bundle_bytes"] + 512 * 2**20
        rows.append(
            f"| {result['model']} | {result['layers']} | {recipe} | {e['compress']['seconds']:.0f} s / "
            f"{_gib(e['compress']['peak_rss_bytes'])} | {e['export']['seconds']:.0f} s / "
            f"{_gib(e['export']['peak_rss_bytes'])} (bound {_gib(bound)}) | {_gib(e['bundle_bytes'])} / "
            f"{100 * e['plan_error']:+.2f}% | {e['compress'].get('loadavg', ['–'])[0]} |")
    return rows


def speed_rows(result: dict) -> list[str]:
    rows = []
    for recipe in result["recipes"]:
        for metric in ("decode@16", "decode@512", "ttft_ms"):
            ours = _per_round(result, recipe, "resident", metric)
            theirs = _per_round(result, recipe, "llamacpp", metric)
            quarter = _per_round(result, recipe, "25pct", metric)
            split = _per_round(result, recipe, "resident_layered", metric)
            if metric == "ttft_ms":
                ratio = [t / o for o, t in zip(ours, theirs, strict=False)]
            else:
                ratio = [o / t for o, t in zip(ours, theirs, strict=False)]
            rows.append(f"| {result['model']} | {recipe} | {metric} | {_spread(ours)} | {_spread(split)} | "
                        f"{_spread(quarter)} | {_spread(theirs)} | {_spread(ratio, '.2f')} |")
    return rows


def run_rows(result: dict) -> list[str]:
    rows = []
    summary = result.get("summary", {})
    for recipe, row in summary.items():
        for kind in ("resident", "resident_layered", "25pct"):
            if kind not in row:
                continue
            loads = row[kind]["load_seconds"]
            hit = row[kind].get("hit_rate")
            rows.append(f"| {result['model']} | {recipe} | {kind} | {loads[0]:.2f} s / "
                        f"{statistics.median(loads[1:]) if len(loads) > 1 else float('nan'):.2f} s | "
                        f"{_gib(row[kind]['peak_rss_bytes'])} | {'–' if hit is None else f'{hit:.3f}'} |")
    return rows


def rounds_line(result: dict) -> str:
    loads = ", ".join(f"{r['loadavg'][0]:.2f}→{r['loadavg_after'][0]:.2f}" for r in result.get("rounds", []))
    bandwidth = ", ".join(f"{r['bandwidth_gbps']:.1f}" for r in result.get("rounds", []))
    return f"{result['model']}: load average per round {loads}; read GB/s per round {bandwidth}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    print("| model | layers | recipe | compress time / peak RSS | export+validate time / peak RSS | bundle / vs plan "
          "| load avg at compress |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print("\n".join(pipeline_rows(r)))
    print("\n| model | recipe | metric | dsedge resident | resident, graph by graph | dsedge 25% resident "
          "| llama.cpp | dsedge ÷ llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print("\n".join(speed_rows(r)))
    print("\n| model | recipe | experts | load first / later | peak RSS | expert-cache hit rate |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print("\n".join(run_rows(r)))
    print()
    for r in results:
        print(rounds_line(r) + "  ")


if __name__ == "__main__":
    main()
