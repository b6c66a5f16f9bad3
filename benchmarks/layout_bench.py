"""Monolithic vs partitioned, every expert resident: decode and TTFT of bundles of one checkpoint, side by side.

Issue 12's goal "partitioned-all-resident ≥ 0.95× monolithic". A partitioned bundle whose expert partitions are
all resident runs three ways: as one graph composed of its graphs (``dsedge.runtime.compose``, the default),
graph by graph with each layer's layer_experts graph (one QMoE per layer; ``compose=False``), or graph by graph
through the partitions one by one (``fuse_layers=False``, what a memory budget runs). Each (bundle, way) cell
runs in a fresh process, cells alternate within a round, rounds repeat; a bandwidth probe and the load average go with
each round. Run it on a quiet machine (nothing else timing or testing):

    .venv/bin/python benchmarks/layout_bench.py --monolithic benchmarks/out/ds3bench.int4.mono.bundle \\
        --partitioned benchmarks/out/ds3bench.int4.part.bundle --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling scripts: decode_bench, export_bench

CONTEXTS, DECODE, PROMPT = [16, 512], 32, 512
CELL = """
import json, sys
sys.path.insert(0, "benchmarks")
from decode_bench import dsedge_context_curve, dsedge_prefill_tps
from dsedge.runtime import load_bundle
from dsedge.runtime.session import own_process_threads
own_process_threads()  # as the dsedge command does: a partitioned bundle's sessions share one thread pool
args = json.loads(sys.argv[1])
engine = load_bundle(args["bundle"], fuse_layers=args["fuse"], compose=args["compose"])
vocab = int(engine.spec["vocab_size"])
decode = dsedge_context_curve(engine, vocab, args["contexts"], args["decode"])
print(json.dumps({"decode": decode, "prefill": dsedge_prefill_tps(engine, vocab, args["prompt"])}))
"""


def cell(bundle: Path, fuse: bool, compose: bool = False) -> dict:
    args = {"bundle": str(bundle), "fuse": fuse, "compose": compose, "contexts": CONTEXTS, "decode": DECODE,
            "prompt": PROMPT}
    out = subprocess.run([sys.executable, "-c", CELL, json.dumps(args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from export_bench import read_bandwidth_gbps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monolithic", type=Path, required=True)
    parser.add_argument("--partitioned", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ways = {"monolithic": (args.monolithic, True), "partitioned_composed": (args.partitioned, True, True),
            "partitioned_fused": (args.partitioned, True),
            "partitioned_per_partition": (args.partitioned, False)}
    rounds = []
    for r in range(args.rounds):
        record = {"loadavg": os.getloadavg(), "bandwidth_gbps": read_bandwidth_gbps(2),
                  "cells": {name: cell(*way) for name, way in ways.items()}}
        record["loadavg_after"] = os.getloadavg()
        rounds.append(record)
        print(f"round {r + 1}/{args.rounds}: load {record['loadavg'][0]:.2f} -> {record['loadavg_after'][0]:.2f}",
              file=sys.stderr, flush=True)
    result = {"rounds": rounds, "summary": summary(rounds)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


def summary(rounds: list[dict]) -> dict:
    """Medians over rounds: decode tokens/s per context, TTFT ms, and each way ÷ monolithic (per round)."""
    out = {}
    for name in rounds[0]["cells"]:
        row = {f"decode@{n}": statistics.median(r["cells"][name]["decode"][str(n)] for r in rounds) for n in CONTEXTS}
        row["ttft_ms"] = statistics.median(1000 * PROMPT / r["cells"][name]["prefill"] for r in rounds)
        ratios = {f"decode@{n}": [r["cells"][name]["decode"][str(n)] / r["cells"]["monolithic"]["decode"][str(n)]
                                  for r in rounds] for n in CONTEXTS}
        row["vs_monolithic"] = {k: [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)]
                                for k, v in ratios.items()}
        out[name] = row
    return out


if __name__ == "__main__":
    main()
