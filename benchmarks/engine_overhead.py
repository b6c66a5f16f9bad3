"""What dsedge's engine adds to a decode step: ``engine.forward`` of one token after ``--cached`` against a bare
``session.run`` of the very feeds it passed, alternated in one process (one spinning session), paired per round.

    .venv/bin/python benchmarks/engine_overhead.py benchmarks/out/ds3bench.int4-g128.ctx584.bundle --rounds 20

The difference is the runtime's per-token Python work (feeds, positions, the cache's append and views, the timer
around ``session.run``); benchmarks/step_split.py's bare steps leave it out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dsedge.runtime import load_bundle


def ms_per_call(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--cached", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100, help="steps per variant and round")
    args = parser.parse_args()
    engine = load_bundle(args.bundle, threads=2, spin=True)
    cache = engine.new_cache(max_len=args.cached + 8)
    prompt = np.random.default_rng(0).integers(2, 1000, (1, args.cached))
    engine.forward(prompt, np.ones_like(prompt), cache, last_only=True)

    def engine_step():
        cache.truncate(args.cached)
        engine.forward(np.asarray([[5]]), np.ones((1, args.cached + 1), np.int64), cache)

    if cache.in_place:
        raise SystemExit("an in-place (GroupQueryAttention) cache binds its buffers: this compares MLA bundles only")
    captured = {}
    run_with = engine.decoder.run_with

    def spy(values, in_place):
        captured["values"] = dict(values)
        return run_with(values, in_place)

    engine.decoder.run_with = spy
    engine_step()
    engine.decoder.run_with = run_with
    session, feeds = engine.decoder._session._session, captured["values"]
    times = {"engine": [], "bare": []}
    for r in range(args.rounds):
        for name in (("engine", "bare") if r % 2 == 0 else ("bare", "engine")):
            fn = engine_step if name == "engine" else (lambda: session.run(None, feeds))
            times[name].append(ms_per_call(fn, args.calls))
    diff = np.array(times["engine"]) - np.array(times["bare"])
    print(f"engine.forward {np.median(times['engine']):.3f} ms, bare session.run {np.median(times['bare']):.3f} ms "
          f"a token; paired difference {np.median(diff):.3f} ms (IQR {np.percentile(diff, 25):.3f}–"
          f"{np.percentile(diff, 75):.3f}), {args.rounds} rounds of {args.calls}")


if __name__ == "__main__":
    main()
