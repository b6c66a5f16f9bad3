"""Export benchmark on the bench models (../shared/bench): export time and peak RSS, bundle bytes, load time,
prefill and decode speed for monolithic vs partitioned bundles and for the routed-expert operator paths,
against PyTorch eager (transformers) and the machine's read bandwidth measured in the same run.

    .venv/bin/python benchmarks/export_bench.py [--model ds3bench] [--decode 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
PROMPT, PREFILL = 32, 128


def read_bandwidth_gbps(threads: int = 1, size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: ``threads`` numpy sums over disjoint parts of 1 GiB (numpy drops the GIL)."""
    data = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    data.sum()  # fault the pages in

    def read_all() -> None:
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return data.nbytes / min(_timed(read_all) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def checkpoint(name: str) -> Path:
    from dsedge.testing.bench import write_bench_checkpoint

    path = OUT / name
    if not (path / "config.json").exists():
        print(f"building {name} checkpoint in {path}", file=sys.stderr)
        write_bench_checkpoint(path, name)
    return path


def export(ckpt: Path, layout: str, validate: bool) -> dict:
    """Run `dsedge export` in its own process so its peak RSS is its own."""
    out = OUT / f"{ckpt.name}.{layout}.bundle"
    cmd = [sys.executable, "-m", "dsedge", "export", str(ckpt), "-o", str(out), "--layout", layout,
           "--max-context", "1024", "--overwrite", "--json", "--target", "x86-cpu-16g"]
    if not validate:
        cmd.append("--no-validate")
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"layout": layout, "validated": validate, "export_s": result["elapsed_s"],
            "export_peak_rss_mb": result["peak_rss_bytes"] / 2**20, "bundle_mb": result["bundle_bytes"] / 2**20,
            "path": str(out)}


def decode_speed(engine, vocab: int, steps: int) -> dict:
    """Median decode ms/token after a warm-up, and prefill tokens/s, through the engine's cache."""
    rng = np.random.default_rng(0)
    engine.logits(rng.integers(2, vocab, size=PREFILL).tolist())  # warm-up
    prefill_s = _timed(lambda: engine.logits(rng.integers(2, vocab, size=PREFILL).tolist()))
    prompt = rng.integers(2, vocab, size=PROMPT).tolist()
    cache = engine.new_cache(max_len=PROMPT + steps + 1)
    mask = np.ones((1, PROMPT), np.int64)
    logits = engine.forward(np.asarray([prompt]), mask, cache)
    times = []
    for _ in range(steps):
        token = np.asarray([[int(logits[0, -1].argmax())]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        started = time.perf_counter()
        logits = engine.forward(token, mask, cache)
        times.append(time.perf_counter() - started)
    ms = float(np.median(times[3:]) * 1e3)
    return {"decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms, "prefill_tokens_per_s": PREFILL / prefill_s}


def bundle_speed(path: str, vocab: int, steps: int) -> dict:
    from dsedge.runtime import load_bundle

    started = time.perf_counter()
    engine = load_bundle(path)
    load_s = time.perf_counter() - started
    return {"load_s": load_s, **decode_speed(engine, vocab, steps)}


def expert_path_speed(ckpt: Path, path: str, vocab: int, steps: int) -> dict:
    """The monolithic graph with another routed-expert operator path ("moe_op" or the "dense" baseline)."""
    from dsedge.export.bundle import export_bundle

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        export_bundle(ckpt, Path(tmp) / "b", max_context=1024, validate=False, expert_path=path)
        return bundle_speed(str(Path(tmp) / "b"), vocab, steps)


def torch_eager_speed(ckpt: Path, steps: int) -> dict:
    import torch

    from dsedge.models.reference import load_reference_model

    model = load_reference_model(ckpt)
    prompt = torch.randint(2, model.config.vocab_size, (1, PROMPT))
    mask = torch.ones_like(prompt)

    def generate(n):
        with torch.no_grad():
            model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(4)
    one, many = _timed(lambda: generate(1)), _timed(lambda: generate(steps + 1))
    ms = (many - one) / steps * 1e3
    return {"decode_ms_per_token": ms, "decode_tokens_per_s": 1e3 / ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ds3bench", choices=["ds3bench", "qwen2bench"])
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    ckpt = checkpoint(args.model)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    rows = {"bandwidth_gbps": read_bandwidth_gbps()}
    layouts = ["monolithic", "partitioned"] if args.model == "ds3bench" else ["monolithic"]
    for layout in layouts:
        exported = export(ckpt, layout, validate=True)
        rows[layout] = exported | bundle_speed(exported["path"], vocab, args.decode)
    rows["monolithic_no_validation"] = export(ckpt, "monolithic", validate=False)
    if args.model == "ds3bench":
        for path in ("moe_op", "dense"):
            rows[f"{path}_expert_path"] = expert_path_speed(ckpt, path, vocab, args.decode)
    rows["torch_eager"] = torch_eager_speed(ckpt, args.decode)
    print(json.dumps(rows, indent=2))
    (args.json or OUT / f"export_bench.{args.model}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
