"""Issue 13's 25%-resident cell: misses loaded as sessions (stock) against misses streamed from the file.

    .venv/bin/python benchmarks/stream_misses.py /work/scale/v2/v2-lite-int4.bundle --rounds 3

A partitioned bundle under a budget of 25% of its routed-expert bytes keeps that share of its partitions as
sessions. With dsedge-kernels installed (pip install ./kernels) and AVX-512 VNNI, the runtime runs a miss from
the bundle's file (dsedge/runtime/streamed.py: the partition's graph with QMoE as MoEInt4, its codes and scales
fed as views of the mapped file); with DSEDGE_KERNELS=0 it creates the missed partition's session as before
(onnxruntime prepacks its weights: 3-6 ms per V2-Lite expert); ``DSEDGE_KERNELS=/path/lib.so`` streams through
that build of the library instead (e.g. one compiled with -mavx2 -mfma). Variants, each in a fresh process,
alternated per round:

- resident: every expert resident, the composed graph (the reference time of the goal "25% resident <= 2x");
- 25pct: the budget, DSEDGE_KERNELS=0 (misses loaded as sessions, LRU-evicted);
- 25pct-streamed: the budget, misses streamed (the file's pages stay mapped once touched: file-backed RSS);
- 25pct-streamed-dropped: as streamed, the pages unmapped again after each streamed call (madvise DONTNEED),
  so the process holds only the resident 25%; the page cache (the OS's, shared, evictable) keeps the rest;
- 25pct-streamed-cold: as dropped, and the bundle's expert files dropped from the page cache too after each
  streamed call (posix_fadvise DONTNEED), so every miss reads its expert from the disk, with the runtime asking
  for each missed expert's pages in one request (DSEDGE_STREAM_PREFAULT=1, what it does where the experts do not
  fit the page cache); not in the default list: give it with --variants.

First, in a process of its own, the agreement of streamed and stock misses (``agreement``); then per round each
variant's decode tokens/s at each cached length, hit rate and RSS (anonymous, file-backed), and at the end each
budget variant's time per token over the resident one. The page cache is warm (the bundle was read just before)
except in 25pct-streamed-cold.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import dsedge_context_curve  # noqa: E402 — sibling scripts
from export_bench import read_bandwidth_gbps  # noqa: E402
from step_split import rss_gib  # noqa: E402

from dsedge.runtime import load_bundle  # noqa: E402
from dsedge.runtime.session import own_process_threads  # noqa: E402
from dsedge.runtime.streamed import StreamedSession  # noqa: E402

VARIANTS = ("resident", "25pct", "25pct-streamed", "25pct-streamed-dropped", "25pct-streamed-cold")


def drop_pages_after_each_miss(engine, cold: bool = False) -> None:
    """After every streamed partition's run, unmap the pages the kernel touched (madvise DONTNEED over the
    bundle files' maps): the process holds no expert page between calls; the next miss faults them back in from
    the page cache. ``cold``: also drop the files' pages from the page cache (posix_fadvise DONTNEED; clean
    pages, no privilege needed), so that every miss reads its expert from the disk."""
    streamer = engine.experts.streamer.__self__  # dsedge.runtime.streamed.StreamedPartitions
    run_with = StreamedSession.run_with
    files = {}

    def dropped(self, values, in_place=None):
        out = run_with(self, values, in_place)
        for path, data in streamer._maps.items():
            data.madvise(mmap.MADV_DONTNEED)
            if cold:
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(files[path], 0, 0, os.POSIX_FADV_DONTNEED)
        return out

    StreamedSession.run_with = dropped


def greedy_logits(engine, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Logits of a prefill and ``steps`` greedy decode steps (stacked), and the tokens chosen."""
    cache = engine.new_cache(max_len=len(ids) + steps + 1)
    logits = engine.forward(np.asarray([ids]), np.ones((1, len(ids)), np.int64), cache, last_only=True)
    rows, tokens = [np.asarray(logits).reshape(-1, logits.shape[-1])[-1]], []
    for _ in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        n = len(ids) + len(tokens)
        logits = engine.forward(np.asarray([[tokens[-1]]]), np.ones((1, n), np.int64), cache)
        rows.append(np.asarray(logits).reshape(-1, logits.shape[-1])[-1])
    return np.stack(rows), tokens


def layer_trace(engine, ids: list[int]) -> list[np.ndarray]:
    """Each layer's output hidden state for a prompt (the engine's graph-by-graph trace, as validation uses)."""
    engine.trace = []
    engine.forward(np.asarray([ids]), np.ones((1, len(ids)), np.int64), engine.new_cache(max_len=len(ids) + 1),
                   last_only=True)
    trace, engine.trace = engine.trace, None
    return trace


def agreement(bundle: Path, vocab: int, budget: int) -> dict:
    """Stock misses (DSEDGE_KERNELS=0) against streamed ones: logits of a one-token prompt and a 12-token
    prefill, each with 8 greedy tokens, and each layer's output for the one token. For scale, the stock resident
    engine (layer_experts graphs, composed) against the stock misses: two stock paths that differ only in how
    the experts' sums are ordered. In a process of its own (the stock misses' sessions would stay in a timed
    variant's memory through the shared arena)."""
    prompts = {"decode": [int(vocab // 3)], "prefill": np.random.default_rng(2).integers(2, vocab, 12).tolist()}
    streaming = os.environ.get("DSEDGE_KERNELS", "1")  # "1", or the path of a library build to compare
    os.environ["DSEDGE_KERNELS"] = "0"
    engine = load_bundle(bundle, memory_budget_bytes=budget)
    stock = {kind: greedy_logits(engine, ids, 8) for kind, ids in prompts.items()}
    stock_trace = layer_trace(engine, prompts["decode"])
    composed = load_bundle(bundle)
    resident = {kind: greedy_logits(composed, ids, 8) for kind, ids in prompts.items()}
    del engine, composed
    os.environ["DSEDGE_KERNELS"] = streaming
    engine = load_bundle(bundle, memory_budget_bytes=budget)
    if engine.experts.streamer is None:
        raise SystemExit("the runtime does not stream misses here: is dsedge-kernels installed (pip install ./kernels)"
                         " and does this CPU have AVX-512 VNNI?")
    streamed = {kind: greedy_logits(engine, ids, 8) for kind, ids in prompts.items()}
    result = {kind: {"max_abs_diff": float(np.abs(stock[kind][0] - streamed[kind][0]).max()),
                     "max_abs_logit": float(np.abs(stock[kind][0]).max()),
                     "same_greedy_tokens": stock[kind][1] == streamed[kind][1],
                     "first_row_diff": float(np.abs(stock[kind][0][0] - streamed[kind][0][0]).max()),
                     "resident_first_row_diff": float(np.abs(stock[kind][0][0] - resident[kind][0][0]).max()),
                     "resident_same_greedy_tokens": stock[kind][1] == resident[kind][1]}
              for kind in prompts}
    result["decode"]["layer_max_abs_diff"] = [
        float(np.abs(a - b).max()) for a, b in zip(stock_trace, layer_trace(engine, prompts["decode"]), strict=True)]
    return result


def one(bundle: Path, variant: str, contexts: list[int], steps: int) -> dict:
    own_process_threads()  # as the dsedge command does: a partitioned bundle's sessions share one thread pool
    manifest = json.loads((bundle / "manifest.json").read_text())
    vocab = int(manifest["model"]["vocab_size"])
    budget = None if variant == "resident" else manifest["placement"]["expert_bytes"] // 4
    if variant == "agreement":
        return {"variant": variant, "agreement": agreement(bundle, vocab, budget)}
    if not variant.startswith("25pct-streamed"):
        os.environ["DSEDGE_KERNELS"] = "0"
    elif os.environ.get("DSEDGE_KERNELS", "1") == "0":
        raise SystemExit("DSEDGE_KERNELS=0 leaves nothing to stream: unset it, or give a library's path")
    if variant.endswith("cold"):  # the runtime's choice where the experts do not fit the page cache
        os.environ["DSEDGE_STREAM_PREFAULT"] = "1"
    started = time.perf_counter()
    engine = load_bundle(bundle, memory_budget_bytes=budget)
    record = {"variant": variant, "load_seconds": time.perf_counter() - started}
    if variant.startswith("25pct-streamed") and engine.experts.streamer is None:
        raise SystemExit("the runtime does not stream misses here (dsedge-kernels missing or CPU without VNNI)")
    if variant.endswith(("dropped", "cold")):
        drop_pages_after_each_miss(engine, cold=variant.endswith("cold"))
    record["decode_tps"] = dsedge_context_curve(engine, vocab, contexts, steps)
    record["experts"] = {k: v for k, v in engine.experts.stats.to_json().items() if k != "calls"}
    record["rss_gib"] = rss_gib()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("bundle", type=Path, help="a partitioned int4 bundle whose experts are int4 QMoE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed at each cached length")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="write every round's records here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one variant in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.bundle, args.one, args.contexts, args.steps)))
        return
    agreed = run_one(args, "agreement")
    print(summary_line(-1, agreed), flush=True)
    rounds = []
    for r in range(args.rounds):
        record = {"round": r, "loadavg": os.getloadavg()[0], "read_gbps": read_bandwidth_gbps(2), "variants": {}}
        for variant in args.variants:
            result = run_one(args, variant)
            record["variants"][variant] = result
            print(summary_line(r, result), flush=True)
        record["loadavg_after"] = os.getloadavg()[0]
        print(f"round {r + 1}: load {record['loadavg']:.2f} -> {record['loadavg_after']:.2f}, "
              f"read {record['read_gbps']:.1f} GB/s", flush=True)
        rounds.append(record)
    print(ratios(rounds, args.contexts))
    if args.json:
        args.json.write_text(json.dumps({"agreement": agreed, "rounds": rounds}, indent=1))


def run_one(args, variant: str) -> dict:
    """One variant in a fresh process (its own memory)."""
    cmd = [sys.executable, __file__, str(args.bundle), "--one", variant,
           "--steps", str(args.steps), "--contexts", *map(str, args.contexts)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary_line(r: int, result: dict) -> str:
    if "agreement" in result:
        return "streamed vs stock misses" + agreement_line(result["agreement"])
    tps = " ".join(f"@{n} {t:.1f}" for n, t in result["decode_tps"].items())
    rss = result["rss_gib"]
    return (f"round {r + 1} {result['variant']:24s} tokens/s {tps}; hit {result['experts']['hit_rate']:.3f}; "
            f"RSS anon {rss['RssAnon']:.2f} file {rss['RssFile']:.2f} GiB; load {result['load_seconds']:.2f} s")


def agreement_line(agree: dict) -> str:
    layers = " ".join(f"{d:.0e}" for d in agree["decode"]["layer_max_abs_diff"])
    return f": one token's layers {layers}" + "".join(
        f"; {kind}: logits {a['max_abs_diff']:.1e} (of up to {a['max_abs_logit']:.1f}; first row "
        f"{a['first_row_diff']:.1e}), same greedy tokens {a['same_greedy_tokens']}; stock resident vs stock misses: "
        f"first row {a['resident_first_row_diff']:.1e}, same greedy tokens {a['resident_same_greedy_tokens']}"
        for kind, a in agree.items())


def ratios(rounds: list[dict], contexts: list[int]) -> str:
    """Per variant and cached length: time per token ÷ the resident time, min/median/max over rounds."""
    lines = []
    for variant in VARIANTS[1:]:
        for n in contexts:
            values = [r["variants"]["resident"]["decode_tps"][str(n)] / r["variants"][variant]["decode_tps"][str(n)]
                      for r in rounds if variant in r["variants"] and "resident" in r["variants"]]
            if values:
                lines.append(f"{variant:24s} @{n}: {min(values):.2f}/{np.median(values):.2f}/{max(values):.2f}x "
                             "the resident time per token")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
