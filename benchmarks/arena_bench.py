"""onnxruntime memory and thread settings on a partitioned bundle (issue 13): one variant per process.

Variants: ``base`` (one arena and thread pool per session), ``noarena`` (sessions without a CPU arena),
``envalloc`` (one arena in onnxruntime's environment for every session: what dsedge ships for partitioned
bundles), ``globalthreads`` (one global thread pool), ``both``. Reports load time, a 512-token prefill,
decode tokens/s over 16 steps and the process's peak RSS. Run each variant in its own process (the arena
and the thread pools are process-wide), on a quiet machine:

    for v in base noarena envalloc globalthreads both; do .venv/bin/python benchmarks/arena_bench.py $v BUNDLE; done
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort

from dsedge.rss import peak_rss_bytes
from dsedge.runtime import engine as engine_module
from dsedge.runtime import load_bundle

VARIANTS = ("base", "noarena", "envalloc", "globalthreads", "both")


def session_factory(variant: str):
    if variant in ("envalloc", "both"):
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    if variant in ("globalthreads", "both"):
        ort.set_global_thread_pool_sizes(2, 1)

    def make(path, config):
        options = ort.SessionOptions()
        if config.threads and variant not in ("globalthreads", "both"):
            options.intra_op_num_threads = config.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        if variant == "noarena":
            options.enable_cpu_mem_arena = False
        if variant in ("envalloc", "both"):
            options.add_session_config_entry("session.use_env_allocators", "1")
        if variant in ("globalthreads", "both"):
            options.use_per_session_threads = False
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return make


def main() -> None:
    variant, bundle = sys.argv[1], sys.argv[2]
    if variant not in VARIANTS:
        raise SystemExit(f"variant must be one of {', '.join(VARIANTS)}")
    engine_module.make_session = session_factory(variant)
    started = time.perf_counter()
    engine = load_bundle(bundle)
    loaded = time.perf_counter()
    ids = np.asarray([np.random.default_rng(0).integers(2, 1000, 512).tolist()])
    cache = engine.new_cache(max_len=600)
    engine.forward(ids, np.ones_like(ids), cache, last_only=True)
    prefilled = time.perf_counter()
    steps = []
    for i in range(16):
        t0 = time.perf_counter()
        engine.forward(np.asarray([[5 + i]]), np.ones((1, 513 + i), np.int64), cache)
        steps.append(time.perf_counter() - t0)
    peak = peak_rss_bytes() / 2**30
    print(f"{variant}: load {loaded - started:.1f} s, prefill 512 {prefilled - loaded:.2f} s, "
          f"decode {1 / np.median(steps):.1f} tokens/s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
