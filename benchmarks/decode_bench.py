"""Decode and prefill benchmark on the bench models (../shared/bench) at fp32 / fp16 / int8 / int4.

For each model and precision, in one run: dsedge bundles (int8 and int4 made by `dsedge compress`, exported
as MatMulNBits), PyTorch eager (transformers `generate` on the same weights, fp32 and bf16), and the
machine's read bandwidth. Reports decode tokens/s (batch 1, median over steps after a warm-up), TTFT of a
512-token prompt, weight bytes read per decoded token (dense weights + top-k/E of the routed experts,
counted from the bundle's initializers), the bandwidth that implies and its share of the measured one, and
llama.cpp's figures from ../shared/bench/README.md as anchors.

    .venv/bin/python benchmarks/decode_bench.py [--models ds3bench qwen2bench]
                                                [--precisions fp32 fp16 int8 int4 int4-g128]
                                                [--decode 64] [--threads 2] [--json out.json]

``--llamacpp``: side by side in one run with llama.cpp's llama-bench (../shared/bench/llamacpp.sh builds it and
converts the same checkpoints to F32/F16/Q8_0/Q4_0 GGUF), alternating dsedge and llama-bench per round (≥ 3,
a bandwidth probe and the load average each round): decode tokens/s at 16/512/2048/4096 cached tokens and
prefill, for 1 and 2 threads and dsedge's spinning on and off, each with min/median/max and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import OUT, _timed, checkpoint, read_bandwidth_gbps  # noqa: E402 — sibling script

PROMPT, TTFT_PROMPT = 32, 512
# Like llama.cpp's Q8_0 / Q4_0 files, whose output layer is quantized too (Q8_0 / Q6_K): every linear int8 per
# channel, or int4 g32 symmetric (Q4_0: blocks of 32, one scale each), and the LM head int8 (as the int8/int4
# presets write it). RTN: the weights are random, calibration cannot help them.
RECIPES = {p: str(Path(__file__).parent / "recipes" / f"bench-{p}.json") for p in ("int8", "int4")}
# What a user gets from `dsedge compress --recipe int4` (groups of 128, the LM head too; embedding int8 at
# export), against the same Q4_0 file (whose head is Q6_K): at groups of 32, MLAS's packed int8-activation
# layout reads an fp32 scale and an fp32 block sum per block (6 bits per weight against Q4_0's 4.5); at 128 it
# reads 4.5, Q4_0's bytes (benchmarks/README.md). RTN here as for the other cells (same bytes as GPTQ).
RECIPES["int4-g128"] = "int4-g128"
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int4-g128")
# ../shared/bench/README.md: llama.cpp llama-bench on this machine (2 threads, batch 1), tokens/s.
LLAMA_CPP = {"ds3bench": {"fp32": 76.9, "fp16": 122.7, "int8": 170.7, "int4": 235.4},
             "qwen2bench": {"fp32": 61.3, "fp16": 136.2, "int8": 223.1, "int4": 365.1}}
for _anchors in LLAMA_CPP.values():
    _anchors["int4-g128"] = _anchors["int4"]  # the same Q4_0 file


def compressed(ckpt: Path, precision: str) -> Path:
    out = OUT / f"{ckpt.name}.{precision}.ckpt"
    if not (out / "config.json").exists():
        _dsedge("compress", str(ckpt), "-o", str(out), "--recipe", RECIPES[precision], "--method", "rtn",
                "--calib-tokens", "512", "--no-eval", "--overwrite")
    return out


def bundle(ckpt: Path, precision: str) -> Path:
    source = compressed(ckpt, precision) if precision in RECIPES else ckpt
    out = OUT / f"{ckpt.name}.{precision}.bundle"
    if not (out / "manifest.json").exists():
        _dsedge("export", str(source), "-o", str(out), "--max-context", "1024", "--overwrite", "--no-validate",
                "--dtype", "fp16" if precision == "fp16" else "fp32")
    return out


def _dsedge(*args: str) -> None:
    print("dsedge", " ".join(args), file=sys.stderr)
    subprocess.run([sys.executable, "-m", "dsedge", *args, "-q"], check=True)


def weight_bytes_per_token(path: Path) -> int:
    """Initializer bytes a decode step reads: everything, except routed experts at top-k/E and the embedding
    table, of which a step gathers one row."""
    import onnx

    manifest = json.loads((path / "manifest.json").read_text())
    moe = manifest["model"].get("moe") or {}
    share = moe["num_experts_per_tok"] / moe["n_routed_experts"] if moe else 1.0
    total = 0.0
    for graph in manifest["graphs"]:
        model = onnx.load(str(path / graph["file"]), load_external_data=False)
        for init in model.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            size = int(ext["length"]) if "length" in ext else len(init.raw_data)
            # the float table, or a quantized one's codes and scales (GatherBlockQuantized): one row per token
            if init.name.startswith("model.embed_tokens.") and not manifest["model"].get("tie_word_embeddings"):
                size = size // init.dims[0]
            total += size * (share if ".experts." in init.name else 1.0)
    return int(total)


def dsedge_speed(path: Path, vocab: int, steps: int, threads: int) -> dict:
    from dsedge.runtime import load_bundle

    engine = load_bundle(path, threads=threads)
    rng = np.random.default_rng(0)
    engine.logits(rng.integers(2, vocab, size=TTFT_PROMPT).tolist())  # warm-up
    ttft = min(_timed(lambda: engine.logits(rng.integers(2, vocab, size=TTFT_PROMPT).tolist())) for _ in range(2))
    cache = engine.new_cache(max_len=PROMPT + steps + 1)
    mask = np.ones((1, PROMPT), np.int64)
    logits = engine.forward(np.asarray([rng.integers(2, vocab, size=PROMPT).tolist()]), mask, cache)
    times, overhead = [], []
    for _ in range(steps):
        token = np.asarray([[int(logits[0, -1].argmax())]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        engine.timers.reset()
        started = time.perf_counter()
        logits = engine.forward(token, mask, cache)
        times.append(time.perf_counter() - started)
        overhead.append(times[-1] - engine.timers.total)
    ms = float(np.median(times[3:]) * 1e3)
    return {"decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms, "ttft_512_ms": ttft * 1e3,
            "prefill_tokens_per_s": TTFT_PROMPT / ttft, "outside_ort_ms": float(np.median(overhead[3:]) * 1e3)}


def torch_eager_speed(ckpt: Path, steps: int, dtype: str, threads: int) -> dict:
    import torch

    from dsedge.models.reference import load_reference_model

    torch.set_num_threads(threads)
    model = load_reference_model(ckpt).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    prompt = torch.randint(2, model.config.vocab_size, (1, PROMPT))

    def generate(n: int) -> None:
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)

    generate(4)
    one, many = _timed(lambda: generate(1)), _timed(lambda: generate(steps + 1))
    long_prompt = torch.randint(2, model.config.vocab_size, (1, TTFT_PROMPT))
    with torch.no_grad():
        model(long_prompt)
        ttft = _timed(lambda: model(long_prompt))
    ms = (many - one) / steps * 1e3
    return {"decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms, "ttft_512_ms": ttft * 1e3}


def run_model(name: str, precisions: list[str], steps: int, threads: int) -> dict:
    ckpt = checkpoint(name)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    rows: dict = {"bandwidth_gbps": read_bandwidth_gbps(threads)}
    for precision in precisions:
        path = bundle(ckpt, precision)
        per_token = weight_bytes_per_token(path)
        speed = dsedge_speed(path, vocab, steps, threads)
        achieved = per_token * speed["decode_tokens_per_s"] / 1e9
        rows[f"dsedge_{precision}"] = speed | {
            "bundle_mb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20,
            "weight_mb_per_token": per_token / 2**20, "achieved_gbps": achieved,
            "share_of_bandwidth": achieved / rows["bandwidth_gbps"],
            "llama_cpp_tokens_per_s": LLAMA_CPP[name][precision]}
    for dtype in ("fp32", "bf16"):
        rows[f"torch_eager_{dtype}"] = torch_eager_speed(ckpt, steps, dtype, threads)
    rows["bandwidth_gbps_after"] = read_bandwidth_gbps(threads)  # it drifts: bracket the run
    return rows


def table(name: str, rows: dict, precisions: list[str]) -> str:
    lines = [f"{name}: read bandwidth {rows['bandwidth_gbps']:.1f} → {rows['bandwidth_gbps_after']:.1f} GB/s",
             "| precision | dsedge tok/s | TTFT 512 ms | MB/token | achieved GB/s (share) | outside ORT ms | "
             "PyTorch eager tok/s | × eager | llama.cpp tok/s | × llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in precisions:
        r = rows[f"dsedge_{p}"]
        eager = rows["torch_eager_bf16" if p == "fp16" else "torch_eager_fp32"]["decode_tokens_per_s"]
        lines.append(f"| {p} | {r['decode_tokens_per_s']:.1f} | {r['ttft_512_ms']:.0f} "
                     f"| {r['weight_mb_per_token']:.0f} | {r['achieved_gbps']:.1f} ({r['share_of_bandwidth']:.0%}) "
                     f"| {r['outside_ort_ms']:.2f} "
                     f"| {eager:.1f} | {r['decode_tokens_per_s'] / eager:.1f} | {r['llama_cpp_tokens_per_s']} "
                     f"| {r['decode_tokens_per_s'] / r['llama_cpp_tokens_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ds3bench", "qwen2bench"], choices=["ds3bench", "qwen2bench"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int4"],
                        choices=PRECISIONS)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llamacpp", action="store_true",
                        help="side by side with llama-bench, alternating per round (see benchmarks/README.md)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS),
                        help="cached tokens before each measured decode step (--llamacpp)")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--spin", type=lambda v: v == "on", nargs="+", default=[True, False], metavar="on|off")
    parser.add_argument("--prompt", type=int, default=TTFT_PROMPT, help="prefill length (--llamacpp)")
    parser.add_argument("--checkpoint", help="(--llamacpp) this checkpoint instead of the bench models (smoke runs)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.llamacpp:
        result = side_by_side(args)
        print(side_by_side_table(result), flush=True)
        (args.json or OUT / "decode_bench_llamacpp.json").write_text(json.dumps(result, indent=2))
        return
    results = {}
    for name in args.models:
        results[name] = run_model(name, args.precisions, args.decode, args.threads)
        print(table(name, results[name], args.precisions), flush=True)
    (args.json or OUT / "decode_bench.json").write_text(json.dumps(results, indent=2))



# --- side by side with llama.cpp (--llamacpp) -----------------------------------------------------------
GGUF_TYPES = {"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "Q4_0", "int4-g128": "Q4_0"}
CONTEXTS = (16, 512, 2048, 4096)


def llamacpp_script() -> Path:
    """../shared/bench/llamacpp.sh beside the checkout (or $DSEDGE_LLAMACPP_SH)."""
    import os

    if os.environ.get("DSEDGE_LLAMACPP_SH"):
        return Path(os.environ["DSEDGE_LLAMACPP_SH"])
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "bench" / "llamacpp.sh"
        if candidate.exists():
            return candidate
    raise SystemExit("llamacpp.sh not found: set DSEDGE_LLAMACPP_SH")


def gguf(ckpt: Path, precision: str) -> Path:
    out = OUT / f"{ckpt.name}.{GGUF_TYPES[precision]}.gguf"
    if not out.exists():
        subprocess.run(["bash", str(llamacpp_script()), "gguf", str(ckpt), str(out), GGUF_TYPES[precision]],
                       check=True, env={**__import__("os").environ, "PYTHON": sys.executable})
    return out


def long_bundle(ckpt: Path, precision: str, context: int) -> Path:
    """A bundle with room for the longest measured context (decode per token at 16 … 4096 cached)."""
    source = compressed(ckpt, precision) if precision in RECIPES else ckpt
    out = OUT / f"{ckpt.name}.{precision}.ctx{context}.bundle"
    if not (out / "manifest.json").exists():
        _dsedge("export", str(source), "-o", str(out), "--max-context", str(context), "--overwrite", "--no-validate",
                "--dtype", "fp16" if precision == "fp16" else "fp32")
    return out


def dsedge_context_curve(engine, vocab: int, contexts: list[int], steps: int) -> dict[int, float]:
    """Decode tokens/s after each cached length (the cache content is random tokens' entries)."""
    rng = np.random.default_rng(0)
    cache = engine.new_cache(max_len=max(contexts) + steps + 1)
    engine.forward(np.asarray([rng.integers(2, vocab, size=max(contexts)).tolist()]),
                   np.ones((1, max(contexts)), np.int64), cache, last_only=True)
    speeds = {}
    for n in sorted(contexts, reverse=True):  # truncate only shrinks: the longest context first
        times = []
        for _ in range(steps):
            cache.truncate(n)
            started = time.perf_counter()
            engine.forward(np.asarray([[int(rng.integers(2, vocab))]]), np.ones((1, n + 1), np.int64), cache)
            times.append(time.perf_counter() - started)
        speeds[n] = 1.0 / float(np.median(times))
    return speeds


def dsedge_prefill_tps(engine, vocab: int, prompt: int) -> float:
    rng = np.random.default_rng(1)
    ids = np.asarray([rng.integers(2, vocab, size=prompt).tolist()])
    seconds = _timed(lambda: engine.forward(ids, np.ones_like(ids), engine.new_cache(max_len=prompt), last_only=True))
    return prompt / seconds


def llamacpp_speeds(path: Path, threads: int, contexts: list[int], decode: int, prompt: int) -> dict:
    """llama-bench tokens/s: prompt processing, and generation at each depth (-d)."""
    depths = ",".join(str(n) for n in contexts)
    result = subprocess.run(["bash", str(llamacpp_script()), "bench", str(path), "-t", str(threads), "-p", str(prompt),
                             "-n", str(decode), "-d", depths, "-r", "1", "-o", "json"],
                            check=True, capture_output=True, text=True)
    out = {"decode": {}, "prefill": None}
    for row in json.loads(result.stdout):
        if row.get("n_gen"):
            out["decode"][int(row.get("n_depth", 0))] = float(row["avg_ts"])
        elif row.get("n_prompt") and int(row.get("n_depth", 0)) == contexts[0]:
            out["prefill"] = float(row["avg_ts"])
    return out


def side_by_side(args) -> dict:
    """Alternate dsedge and llama-bench per round; cells: model × precision × threads × spin."""
    import os

    from dsedge.runtime import load_bundle

    rounds: list[dict] = []
    models = [(Path(args.checkpoint).name, Path(args.checkpoint))] if args.checkpoint else \
        [(name, checkpoint(name)) for name in args.models]
    prepared = {}
    for name, ckpt in models:
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        for precision in args.precisions:
            prepared[(name, precision)] = (long_bundle(ckpt, precision, max(args.contexts) + args.decode + 8),
                                           gguf(ckpt, precision), vocab)
    for r in range(args.rounds):
        record = {"round": r, "loadavg": os.getloadavg(), "cells": [],
                  "bandwidth_gbps": read_bandwidth_gbps(max(args.thread_counts))}
        for (name, precision), (path, gguf_path, vocab) in prepared.items():
            for threads in args.thread_counts:
                for spin in args.spin:
                    engine = load_bundle(path, threads=threads, spin=spin)
                    cell = {"model": name, "precision": precision, "threads": threads, "spin": spin,
                            "dsedge": {"decode": dsedge_context_curve(engine, vocab, args.contexts, args.decode),
                                       "prefill": dsedge_prefill_tps(engine, vocab, args.prompt)}}
                    del engine
                    cell["llamacpp"] = llamacpp_speeds(gguf_path, threads, args.contexts, args.decode, args.prompt)
                    record["cells"].append(cell)
        record["loadavg_after"] = os.getloadavg()
        rounds.append(record)
        print(f"round {r + 1}/{args.rounds} done (load {record['loadavg'][0]:.2f} → {record['loadavg_after'][0]:.2f})",
              file=sys.stderr, flush=True)
    return {"rounds": rounds}


def side_by_side_table(result: dict) -> str:
    """tokens/s min/median/max over rounds per cell, and the dsedge ÷ llama.cpp ratio per round."""
    cells: dict[tuple, dict[str, list]] = {}
    for record in result["rounds"]:
        for c in record["cells"]:
            metrics = [(f"decode@{n}", v, c["llamacpp"]["decode"].get(n)) for n, v in c["dsedge"]["decode"].items()]
            metrics.append(("prefill", c["dsedge"]["prefill"], c["llamacpp"]["prefill"]))
            for metric, ours, theirs in metrics:
                key = (c["model"], c["precision"], c["threads"], c["spin"], metric)
                entry = cells.setdefault(key, {"dsedge": [], "llamacpp": [], "ratio": []})
                entry["dsedge"].append(ours)
                if theirs:
                    entry["llamacpp"].append(theirs)
                    entry["ratio"].append(ours / theirs)

    def spread(values: list[float], fmt: str = ".1f") -> str:
        if not values:
            return "–"
        return "/".join(format(v, fmt) for v in (min(values), float(np.median(values)), max(values)))

    lines = ["| model | precision | threads | spin | metric | dsedge tok/s min/med/max | llama.cpp tok/s min/med/max "
             "| ratio min/med/max |", "|---|---|---|---|---|---|---|---|"]
    for (model, precision, threads, spin, metric), e in cells.items():
        lines.append(f"| {model} | {precision} | {threads} | {spin} | {metric} | {spread(e['dsedge'])} "
                     f"| {spread(e['llamacpp'])} | {spread(e['ratio'], '.2f')} |")
    loads = [f"{r['loadavg'][0]:.2f}→{r['loadavg_after'][0]:.2f}" for r in result["rounds"]]
    bandwidth = [f"{r['bandwidth_gbps']:.1f}" for r in result["rounds"]]
    footer = f"load average per round: {', '.join(loads)}; read GB/s per round: {', '.join(bandwidth)}"
    return "\n".join([*lines, footer])


if __name__ == "__main__":
    main()
