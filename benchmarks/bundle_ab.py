"""A/B two bundles of one model in one process: do they compute the same, and which decodes faster?

First the logits of both on one random prompt (max |Δ| and argmax agreement: an export change meant to be exact
shows 0.0 / 1.0), then decode tokens/s at each cached length, the two bundles alternated per round (the order
flipped every round) with a bandwidth probe per round, so drift of this VM's memory bandwidth hits both alike.

    .venv/bin/python benchmarks/bundle_ab.py A.bundle B.bundle [--rounds 8] [--contexts 16 512] [--steps 64]

Report medians and how many rounds B beat A (a paired count: the spread between rounds is often larger than
the change being measured). Quiet machine only: nothing else running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import dsedge_context_curve  # noqa: E402 — sibling script
from export_bench import read_bandwidth_gbps  # noqa: E402


def compare_logits(a, b, vocab: int, length: int = 48) -> tuple[float, float]:
    ids = np.random.default_rng(5).integers(2, vocab, size=length).tolist()
    la, lb = np.asarray(a.logits(ids)), np.asarray(b.logits(ids))
    return float(np.abs(la - lb).max()), float((la.argmax(-1) == lb.argmax(-1)).mean())


def main() -> None:
    from dsedge.runtime import load_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per cached length and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    engines = {"A": load_bundle(args.a, threads=args.threads), "B": load_bundle(args.b, threads=args.threads)}
    vocab = int(engines["A"].spec["vocab_size"])
    delta, agree = compare_logits(engines["A"], engines["B"], vocab)
    print(f"logits: max |A - B| {delta:.3g}, argmax agreement {agree:.3f}")
    speeds: dict[str, list[dict[int, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        bandwidth = read_bandwidth_gbps(args.threads)
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            speeds[name].append(dsedge_context_curve(engines[name], vocab, args.contexts, args.steps))
        cells = "  ".join(f"@{c} A {speeds['A'][-1][c]:.1f} B {speeds['B'][-1][c]:.1f}" for c in args.contexts)
        print(f"round {r + 1}/{args.rounds}: read {bandwidth:.1f} GB/s  {cells}", flush=True)
    for c in args.contexts:
        a, b = (np.array([s[c] for s in speeds[n]]) for n in ("A", "B"))
        ratio = np.median(b) / np.median(a)
        print(f"decode @{c} cached: A {np.median(a):.1f}, B {np.median(b):.1f} tokens/s (medians, B/A {ratio:.3f}),"
              f" B faster in {int((b > a).sum())}/{len(a)} rounds")


if __name__ == "__main__":
    main()
