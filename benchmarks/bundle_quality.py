"""Quality of bundles of one model against the first: held-out perplexity, KL and top-1 agreement, batch invariance.

For an export change that is not exact (a lower-precision op), what it costs in quality, on the runtime's own
logits: the held-out perplexity of each bundle (``heldout-16k``, windows of ``--window``), the mean KL from the
first bundle and the share of positions whose argmax agrees with it (over ``--windows`` windows), and the mean KL
between a window run alone and the same window run in a batch of two beside a shorter, left-padded one (0 for an
export whose rows do not depend on their batch-mates, as speculative verification and batching need).

    .venv/bin/python benchmarks/bundle_quality.py BASE.bundle VARIANT.bundle [...] [--tokens 16384]

Deterministic (no timing): run it beside anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dsedge.demo import heldout_path
from dsedge.evaluation import encode_text_file, evaluate_perplexity
from dsedge.export.validate import mean_kl
from dsedge.runtime import load_bundle


def batched_first_row(engine, full: list[int], other: list[int]) -> np.ndarray:
    """Logits of ``full`` computed in a batch of two beside ``other`` (half as long, left-padded)."""
    n, short = len(full), other[: len(full) // 2]
    ids, mask = np.zeros((2, n), np.int64), np.zeros((2, n), np.int64)
    ids[0], mask[0] = full, 1
    ids[1, n - len(short):], mask[1, n - len(short):] = short, 1
    return np.asarray(engine.forward(ids, mask, engine.new_cache(max_len=n, batch=2)))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path, help="the first is the base the others are compared to")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens for perplexity")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="windows for KL, agreement and batch invariance")
    args = ap.parse_args()
    tokenizer = args.bundles[0] / "tokenizer" / "tokenizer.json"
    ids = encode_text_file(tokenizer, heldout_path())
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    base = None
    for path in args.bundles:
        engine = load_bundle(path)
        ppl = evaluate_perplexity(engine_logits(engine), ids[: args.tokens], window=args.window, batch_size=1)
        alone = [np.asarray(engine.logits(w), np.float64) for w in windows]
        base = alone if base is None else base
        print(json.dumps({"bundle": str(path), **ppl.to_json(), **against_base(engine, windows, alone, base)}),
              flush=True)


def engine_logits(engine):
    """A batch of windows' logits, each window run alone (the scorer's interface)."""
    return lambda batch: np.stack([engine.logits(row) for row in batch])


def against_base(engine, windows: list[list[int]], alone: list[np.ndarray], base: list[np.ndarray]) -> dict:
    """KL from the base and top-1 agreement with it, and KL of a window alone vs in a batch of two (logits)."""
    pairs = [(b, a) for b, a in zip(base, alone, strict=True)]
    batched = [batched_first_row(engine, windows[i], windows[i + 1]).astype(np.float64)
               for i in range(0, len(windows) - 1, 2)]
    return {"kl_from_base": float(np.mean([mean_kl(b, a) for b, a in pairs])),
            "top1_agreement": float(np.mean([(b.argmax(-1) == a.argmax(-1)).mean() for b, a in pairs])),
            "batch_vs_alone_kl": float(np.mean([mean_kl(alone[2 * j], row) for j, row in enumerate(batched)]))}


if __name__ == "__main__":
    main()
