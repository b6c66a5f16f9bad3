"""In-process A/B of the GQA cache path: explicit attention over [B, KV, S, d] prefix views (copied by
onnxruntime every step: not contiguous) vs one GroupQueryAttention over whole buffers bound in place.

Both bundles are exported in this process from one random Llama-shaped checkpoint (head_dim 64); rounds
alternate A and B; each cell is the median decode step at a cached length. Prints one JSON object (with the
load average before and after: on a shared machine the numbers mean little).

    .venv/bin/python benchmarks/cache_ab.py [--lengths 16 512 2048] [--rounds 3] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
         "intermediate_size": 1024, "num_hidden_layers": 8}


def checkpoint(root: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsedge.testing.tiny import write_checkpoint

    base = write_checkpoint(root / "base", "llama")
    config = json.loads((base / "config.json").read_text()) | SHAPE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    out = root / "ckpt"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text()) | {"head_dim": SHAPE["head_dim"]}
    (out / "config.json").write_text(json.dumps(saved))
    return out


def export_both(ckpt: Path, root: Path, context: int) -> dict[str, Path]:
    from dsedge.export import attention
    from dsedge.export.bundle import export_bundle

    paths = {"A_prefix_views": root / "a", "B_gqa_in_place": root / "b"}
    multiple = attention.GQA_HEAD_MULTIPLE
    try:
        attention.GQA_HEAD_MULTIPLE = 1 << 30  # no head size qualifies: the explicit subgraph
        export_bundle(ckpt, paths["A_prefix_views"], max_context=context, validate=False)
    finally:
        attention.GQA_HEAD_MULTIPLE = multiple
    export_bundle(ckpt, paths["B_gqa_in_place"], max_context=context, validate=False)
    return paths


def step_ms(engine, cache, cached: int, steps: int) -> float:
    """Median ms of one decode step after ``cached`` positions (their content is irrelevant to the time)."""
    times = []
    token = np.array([[7]], np.int64)
    for _ in range(steps):
        cache.length = cached
        mask = np.ones((1, cached + 1), np.int64)
        started = time.perf_counter()
        engine.forward(token, mask, cache)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from dsedge.runtime import load_bundle

    root = Path(tempfile.mkdtemp(prefix="dsedge-cache-ab-"))
    context = max(args.lengths) + 8
    paths = export_both(checkpoint(root), root, context)
    engines = {name: load_bundle(path, threads=args.threads, spin=False) for name, path in paths.items()}
    caches = {name: engine.new_cache(max_len=context) for name, engine in engines.items()}
    load_before = os.getloadavg()
    cells: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.lengths} for name in engines}
    for _ in range(args.rounds):
        for n in args.lengths:
            for name, engine in engines.items():  # A then B, every round and length
                cells[name][n].append(step_ms(engine, caches[name], n, args.steps))
    print(json.dumps({"ms_per_step": {name: {n: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                                             for n, v in per.items()} for name, per in cells.items()},
                      "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "shape": SHAPE,
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
