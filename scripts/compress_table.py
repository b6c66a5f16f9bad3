"""The recipe table of docs/compress.md: held-out perplexity and size of the shipped demo models per recipe.

Each row compresses a demo model with `dsedge.compress.compress` (default calibration: the built-in text,
8192 tokens) and scores the result on the demo held-out text (`dsedge/demo/data/heldout.txt`, pages neither
the models nor the calibration text contain) with `dsedge.evaluation`, through transformers' own model
class holding the weights as dsedge's reader returns them (quantized weights dequantized).

    nice -n 10 .venv/bin/python scripts/compress_table.py --out /tmp/compress-table [--max-tokens 16384]

Prints a Markdown table and writes table.json next to the compressed checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (label, recipe, method, prune fraction); None recipe = the original checkpoint.
ROWS = [
    ("original (bf16 on disk, fp32 compute)", None, None, 0.0),
    ("int8 (RTN, per channel)", "int8", "rtn", 0.0),
    ("int4-g128 RTN", "int4-g128", "rtn", 0.0),
    ("int4-g128 GPTQ", "int4-g128", "gptq", 0.0),
    ("int4-g32 GPTQ", "int4-g32", "gptq", 0.0),
    ("int4-experts (experts int4-g128 GPTQ, rest int8)", "int4-experts", None, 0.0),
]
PRUNE = 0.25
MODELS = ("deepseek-v3-tiny", "qwen2-tiny")


def rows_for(model: str) -> list[tuple]:
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.sources import resolve_checkpoint

    rows = list(ROWS)
    if Checkpoint(resolve_checkpoint(model)).spec.moe is not None:
        pruned = [("none" if recipe is None else recipe, method, label) for label, recipe, method, _ in ROWS]
        rows += [(f"{label} + {PRUNE:.0%} experts pruned", recipe, method, PRUNE) for recipe, method, label in pruned]
    return rows


def heldout_quality(path: Path, max_tokens: int) -> dict:
    from dsedge.demo import heldout_path
    from dsedge.evaluation import encode_text_file, evaluate_perplexity, torch_logits_fn
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model

    ckpt = Checkpoint(path)
    ids = encode_text_file(ckpt.path / "tokenizer.json", heldout_path())[:max_tokens]
    model = reference_model(ckpt)
    return evaluate_perplexity(torch_logits_fn(model), ids, window=512, batch_size=8).to_json()


def run_row(model: str, row: tuple, out: Path, max_tokens: int) -> dict:
    from dsedge.compress.pipeline import compress
    from dsedge.sources import resolve_checkpoint

    label, recipe, method, prune = row
    started = time.perf_counter()
    if recipe is None:
        path, report = resolve_checkpoint(model), None
    else:
        path = out / f"{model}--{recipe}-{method or 'default'}-p{int(prune * 100)}"
        report = compress(model, path, recipe=recipe, method=method, prune_experts=prune, overwrite=True)
    quality = heldout_quality(path, max_tokens)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"model": model, "row": label, "recipe": recipe, "method": method, "prune": prune, "bytes": size,
            "heldout": quality, "compress_seconds": report.elapsed_s if report else None,
            "calib_text_ppl": report.quality if report else None, "seconds": time.perf_counter() - started}


def markdown(results: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        base = rows[0]
        lines += [f"\n**{model}**\n", "| recipe | size (MiB) | vs original | held-out ppl | Δ ppl | top-1 acc |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            ppl = r["heldout"]["perplexity"]
            lines.append(f"| {r['row']} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base['bytes']:.0%} | {ppl:.2f} | "
                         f"{ppl - base['heldout']['perplexity']:+.2f} | {r['heldout']['top1_accuracy']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens scored (from the start)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        for row in rows_for(model):
            results.append(run_row(model, row, args.out, args.max_tokens))
            print(f"{model}: {row[0]}: ppl {results[-1]['heldout']['perplexity']:.3f}, "
                  f"{results[-1]['bytes'] / 2**20:.2f} MiB", flush=True)
            (args.out / "table.json").write_text(json.dumps(results, indent=2) + "\n")  # after every row
    print(markdown(results))


if __name__ == "__main__":
    main()
