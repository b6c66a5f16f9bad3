"""Decode and prefill benchmark on the bench models (../shared/bench) at fp32 / fp16 / int8 / int4.

For each model and precision, in one run: dsedge bundles (int8 and int4 made by `dsedge compress`, exported
as MatMulNBits), PyTorch eager (transformers `generate` on the same weights, fp32 and bf16), and the
machine's read bandwidth. Reports decode tokens/s (batch 1, median over steps after a warm-up), TTFT of a
512-token prompt, weight bytes read per decoded token (dense weights + top-k/E of the routed experts,
counted from the bundle's initializers), the bandwidth that implies and its share of the measured one, and
llama.cpp's figures from ../shared/bench/README.md as anchors.

    .venv/bin/python benchmarks/decode_bench.py [--models ds3bench qwen2bench] [--precisions fp32 fp16 int8 int4]
                                                [--decode 64] [--threads 2] [--json out.json]
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
# channel, or int4 g32 symmetric (Q4_0: blocks of 32, one scale each), and the LM head int8 (a recipe rule
# names it; no preset quantizes the head). RTN: the weights are random, calibration cannot help them.
RECIPES = {p: str(Path(__file__).parent / "recipes" / f"bench-{p}.json") for p in ("int8", "int4")}
# ../shared/bench/README.md: llama.cpp llama-bench on this machine (2 threads, batch 1), tokens/s.
LLAMA_CPP = {"ds3bench": {"fp32": 76.9, "fp16": 122.7, "int8": 170.7, "int4": 235.4},
             "qwen2bench": {"fp32": 61.3, "fp16": 136.2, "int8": 223.1, "int4": 365.1}}


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
            if init.name == "model.embed_tokens.weight" and not manifest["model"].get("tie_word_embeddings"):
                size = size // init.dims[0]  # one row per token
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
                        choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    results = {}
    for name in args.models:
        results[name] = run_model(name, args.precisions, args.decode, args.threads)
        print(table(name, results[name], args.precisions), flush=True)
    (args.json or OUT / "decode_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
