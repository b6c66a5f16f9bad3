"""Measure export validation's errors against its bounds (dsedge.export.validate.TOLERANCES), per precision.

Exports each model with validation at fp32, fp16, int8 and int4 (int8/int4: `dsedge compress` with the
``int8`` / ``int4`` preset, exported at the default accuracy level 4, where activations are quantized too) and
prints, per model and precision, the worst measured value of each bounded quantity next to its bound:
max |Δlogit| / std(reference logits), mean KL (nats), least top-1 agreement, worst per-layer relative error
(partitioned only). Correctness numbers only, no timing: run it under `nice` on a shared machine.

    PYTHONPATH=$PWD nice python scripts/validation_tolerances.py                # the demo models
    PYTHONPATH=$PWD nice python scripts/validation_tolerances.py --fixtures      # + the tiny fixtures
    PYTHONPATH=$PWD nice python scripts/validation_tolerances.py CKPT_DIR ...   # any checkpoint
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8", "int4")
FIXTURES = ("v2_lite", "v2", "v3", "qwen2", "llama")


def measure(checkpoint: Path, precision: str, work: Path, layout: str) -> dict:
    from dsedge.compress.pipeline import compress
    from dsedge.errors import CheckFailed
    from dsedge.export.bundle import export_bundle
    from dsedge.export.validate import TOLERANCES

    source = checkpoint
    if precision.startswith("int"):
        source = work / f"{checkpoint.name}-{precision}"
        if not source.exists():
            compress(checkpoint, source, recipe=precision, evaluate=False, calib_tokens=512)
    out = work / f"{checkpoint.name}-{precision}-{layout}"
    try:
        checks = export_bundle(source, out, max_context=64, layout=layout, experts_per_partition=4,
                               dtype="fp16" if precision == "fp16" else "fp32", overwrite=True).validation
        passed = True
    except CheckFailed as failure:
        return {"model": checkpoint.name, "precision": precision, "layout": layout, "passed": False,
                "error": failure.message}
    logits = [c for c in checks if c["output"] == "logits"]
    layers = [c["relative_err"] for c in checks if c["name"].startswith("layer_")]
    bound = TOLERANCES[precision]
    return {"model": checkpoint.name, "precision": precision, "layout": layout, "passed": passed,
            "relative_logit": max(c["relative_err"] for c in logits), "bound_relative_logit": bound.relative_logit,
            "max_abs_logit": max(c["max_abs_err"] for c in logits),
            "mean_kl": max(c["mean_kl"] for c in logits), "bound_mean_kl": bound.mean_kl,
            "top1": min(c["top1_agreement"] for c in logits), "bound_top1": bound.top1,
            "greedy": next(c["detail"] for c in checks if c["name"] == "greedy_16"),
            "relative_layer": max(layers) if layers else None, "bound_relative_layer": bound.relative_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--fixtures", action="store_true", help="also the tiny test fixtures (dsedge.testing)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--layouts", default="monolithic,partitioned")
    args = parser.parse_args()
    from dsedge.sources import resolve_checkpoint

    work = Path(tempfile.mkdtemp(prefix="dsedge-tolerances-"))
    models = list(args.checkpoints) or [resolve_checkpoint(n) for n in ("deepseek-v3-tiny", "qwen2-tiny")]
    if args.fixtures:
        from dsedge.testing.tiny import write_checkpoint

        models += [write_checkpoint(work / f"fixture-{v}", v) for v in FIXTURES]
    for model in models:
        for precision in args.precisions.split(","):
            for layout in args.layouts.split(","):
                print(json.dumps(measure(Path(model), precision, work, layout)), flush=True)


if __name__ == "__main__":
    main()
