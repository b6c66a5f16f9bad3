"""In-process A/B of the runtime's IO binding for caches bound in place (GroupQueryAttention: the dense models).
Old (the runtime before commit 0945025): a fresh binding per run, every tensor bound, every output fetched. New:
the binding ``dsedge.runtime.session.BoundRuns`` keeps across runs (each cache bound once) with the logits bound
into an array of ours. An MLA cache is not bound in place and runs ``session.run`` either way (binding its
prefix views and writing its new entries straight into the cache's next columns was tried: no gain, 11 of 24
rounds on ds3bench int4-g128, benchmarks/README.md).

Two engines on one bundle, the same prompt cached in each, decode steps through ``Engine.forward`` at each cached
length, the two alternated per round (order swapped every round).

    .venv/bin/python benchmarks/binding_ab.py benchmarks/out/qwen2bench.int4-g128.ctx584.bundle --rounds 12
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import numpy as np

from dsedge.runtime import load_bundle


def per_call_binding(session, input_names, output_names, values, in_place):
    """The previous runtime's ``run_bound``: a new IOBinding each run, every tensor bound, every output fetched."""
    binding, keep = session.io_binding(), []
    for name in input_names:
        array = values[name]
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
            keep.append(array)
        binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    for name in output_names:
        if name in in_place:
            target = in_place[name]
            binding.bind_output(name, "cpu", 0, target.dtype, list(target.shape), target.ctypes.data)
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    return {n: in_place[n] if n in in_place else v.numpy() for n, v in zip(output_names, outputs, strict=True)}


def old_engine(path: Path, threads: int):
    engine = load_bundle(path, threads=threads)
    if not engine.new_cache(max_len=1).in_place:
        raise SystemExit(f"{path}: its cache is not bound in place (MLA), both runtimes run it alike")
    decoder = engine.decoder

    def run_graph(self, feeds, cache):
        values = {**feeds, **cache.past()}
        return per_call_binding(decoder._session, decoder._inputs, decoder._outputs, values, cache.in_place_outputs())

    engine.run_graph = types.MethodType(run_graph, engine)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engines = {"old": old_engine(args.bundle, args.threads), "new": load_bundle(args.bundle, threads=args.threads)}
    vocab = int(engines["new"].spec["vocab_size"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, vocab, size=max(args.contexts)).tolist()
    caches = {}
    for name, engine in engines.items():
        for n in args.contexts:
            cache = engine.new_cache(max_len=min(engine.max_context, max(args.contexts) + 1))
            engine.forward(np.asarray([prompt[:n]]), np.ones((1, n), np.int64), cache, last_only=True)
            caches[name, n] = cache
    n = min(args.contexts)
    step = {name: engines[name].forward(np.asarray([[7]]), np.ones((1, n + 1), np.int64), caches[name, n])
            for name in engines}
    print(f"logits bit-identical: {np.array_equal(step['old'], step['new'])}")
    speeds = {key: [] for key in caches}
    for r in range(args.rounds):
        for n in args.contexts:
            for name in (("old", "new") if r % 2 else ("new", "old")):
                cache, times = caches[name, n], []
                for _ in range(args.steps):
                    cache.truncate(n)
                    started = time.perf_counter()
                    engines[name].forward(np.asarray([[int(rng.integers(2, vocab))]]), np.ones((1, n + 1), np.int64),
                                          cache)
                    times.append(time.perf_counter() - started)
                speeds[name, n].append(1.0 / float(np.median(times)))
    for n in args.contexts:
        old, new = np.array(speeds["old", n]), np.array(speeds["new", n])
        print(f"decode @{n} cached: per-call binding {np.median(old):.1f}, kept binding {np.median(new):.1f} "
              f"tokens/s (medians, {np.median(new) / np.median(old):.3f}x), kept faster in {(new > old).sum()}/"
              f"{len(new)} rounds")


if __name__ == "__main__":
    main()
