"""Held-out perplexity of the demo models per preset with the LM head (and the token embedding) quantized.

For each model and preset: the preset as shipped (the int8 head the presets write; the embedding float, as the
checkpoint keeps it for export to quantize), then with the source's float LM head quantized round-to-nearest
at int4 (groups of 128, 64, 32) and at int8 per channel (exactly what a rule
``{"match": "lm_head", "quant": {..., "method": "rtn"}}`` writes: the head is quantized after every layer, so
the layers are the same), and with the embedding quantized as ``dsedge export --quantize-embedding`` does —
both by swapping the dequantized matrices into the reference model of the one compressed checkpoint. Scored
on the named slice ``heldout-all`` (all of
``dsedge/demo/data/heldout.txt``, 512-token windows) as the model card and scripts/compress_table.py do.

    nice -n 10 .venv/bin/python scripts/head_quant_table.py --out /tmp/head-table [--max-tokens 1000000]

Writes head_table.json (one object per row) in --out (rerunning resumes) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODELS = ("deepseek-v3-tiny", "qwen2-tiny")
PRESETS = {"deepseek-v3-tiny": ("int8", "int4-g128", "int4-experts"),
           "qwen2-tiny": ("int8", "int4-g128")}  # a dense model's int4-experts is int8 everywhere
# (label, head scheme, embedding scheme) per preset; None = the source checkpoint's float weights. Head and
# embedding are round-to-nearest, except a head scheme ending in "gptq": that preset compressed again with its
# lm_head rule replaced (GPTQ needs the final-norm calibration states, which only compress has).
VARIANTS = {
    "int8": [("head int8", (8, None), None), ("head int8 + embedding int8", (8, None), (8, None))],
    "int4-g128": [("head float", None, None), ("head int4-g128", (4, 128), None), ("head int4-g64", (4, 64), None),
                  ("head int4-g32", (4, 32), None), ("head int4-g128 GPTQ", (4, 128, "gptq"), None),
                  ("head int4-g64 GPTQ", (4, 64, "gptq"), None), ("head int4-g32 GPTQ", (4, 32, "gptq"), None),
                  ("head int8", (8, None), None),
                  ("head int8 + embedding int8", (8, None), (8, None)),
                  ("head int8 + embedding int4-g32", (8, None), (4, 32))],
    "int4-experts": [("head int8", (8, None), None), ("head int8 + embedding int8", (8, None), (8, None)),
                     ("head int8 + embedding int4-g32", (8, None), (4, 32))],
}


def score(model, ids: list[int]) -> dict:
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn

    return evaluate_perplexity(torch_logits_fn(model), ids, window=512, batch_size=8).to_json()


def rtn(weight, scheme: tuple[int, int | None], scale_dtype):
    """What a ``{"bits": b, "group_size": g, "method": "rtn"}`` rule writes (the head: scales in the checkpoint's
    16-bit dtype) and what export's --quantize-embedding computes (the embedding: float16 scales), dequantized."""
    from dsedge.compress.quant import quantize_rtn
    from dsedge.quantformat.scheme import QuantScheme
    from dsedge.quantformat.tensor import dequantize

    return dequantize(quantize_rtn(weight.detach().float(), QuantScheme(*scheme), scale_dtype=scale_dtype))


def gptq_compressed_head(model_name: str, preset_name: str, head_scheme: tuple, out: Path):
    """The dequantized LM head of the preset compressed with ``{"match": "lm_head", "quant": {bits, group,
    "gptq"}}`` in place of its own head rule (the layers, compressed before the head, come out the same)."""
    import copy

    from dsedge.compress.pipeline import compress
    from dsedge.compress.recipes import _PRESET_DATA
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model

    bits, group, method = head_scheme
    tag = f"head-int{bits}-g{group}-{method}"
    path = out / f"{model_name}--{preset_name}--{tag}"
    if not (path / "config.json").exists():
        data = copy.deepcopy(_PRESET_DATA[preset_name][1])
        data["rules"] = [r for r in data["rules"] if r["match"] != "lm_head"]
        data["rules"].insert(0, {"match": "lm_head", "quant": {"bits": bits, "group_size": group, "method": method}})
        recipe = out / f"{preset_name}--{tag}.json"
        recipe.write_text(json.dumps(data))
        compress(model_name, path, recipe=recipe, evaluate=False, overwrite=True)
    return reference_model(Checkpoint(path)).get_output_embeddings().weight.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=1_000_000)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--presets", nargs="*", help="only these presets (default: every one of a model's)")
    ap.add_argument("--variants", nargs="*", help="only these variant labels (default: every one)")
    args = ap.parse_args()
    import torch

    from dsedge.compress.pipeline import compress
    from dsedge.demo import heldout_path
    from dsedge.evaluation import encode_text_file
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model
    from dsedge.sources import resolve_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "head_table.json"
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    done = {(r["model"], r["preset"], r["variant"]) for r in rows}

    def record(row: dict) -> None:
        rows.append(row)
        rows_file.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)

    for model_name in args.models:
        tokenizer = Path(resolve_checkpoint(model_name)) / "tokenizer.json"
        every_id = encode_text_file(tokenizer, heldout_path())
        ids = every_id[:args.max_tokens]
        # the model card's named slices: all of it, or the first 16,384 tokens (docs/compress.md's table)
        slice_name = "heldout-all" if len(ids) == len(every_id) else f"heldout-first-{len(ids)}"
        # the presets quantize the head (int8) in the checkpoint: every variant starts from the source's float
        # head and embedding, not from the shipped ones
        source = reference_model(Checkpoint(resolve_checkpoint(model_name)))
        float_head = source.get_output_embeddings().weight.detach().clone()
        float_embed = source.get_input_embeddings().weight.detach().clone()
        del source
        for preset_name in [p for p in PRESETS[model_name] if not args.presets or p in args.presets]:
            started = time.perf_counter()
            path = args.out / f"{model_name}--{preset_name}"
            if not (path / "config.json").exists():
                compress(model_name, path, recipe=preset_name, evaluate=False, overwrite=True)
            model = reference_model(Checkpoint(path))
            head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            if (model_name, preset_name, "as shipped") not in done:
                record({"model": model_name, "preset": preset_name, "variant": "as shipped",
                        "slice": slice_name, "heldout": score(model, ids),
                        "seconds": round(time.perf_counter() - started, 1)})
            for label, head_scheme, embed_scheme in VARIANTS[preset_name]:
                if (model_name, preset_name, label) in done or (args.variants and label not in args.variants):
                    continue
                gptq_head = head_scheme is not None and head_scheme[-1] == "gptq"
                with torch.no_grad():
                    if gptq_head:
                        head.copy_(gptq_compressed_head(model_name, preset_name, head_scheme, args.out))
                    else:
                        head.copy_(float_head if head_scheme is None else rtn(float_head, head_scheme, torch.bfloat16))
                    embed.copy_(float_embed if embed_scheme is None else rtn(float_embed, embed_scheme, torch.float16))
                record({"model": model_name, "preset": preset_name, "variant": label,
                        "slice": slice_name, "heldout": score(model, ids),
                        "seconds": round(time.perf_counter() - started, 1)})
    print(markdown(rows))


def _heldout(row: dict) -> dict:
    return row.get("heldout") or row["heldout_all"]  # rows of the first runs, which named the key for the slice


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | head / embedding | held-out ppl | Δ vs as shipped | top-1 |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["preset"] == r["preset"]
                    and b["variant"] == "as shipped")
        got, ref = _heldout(r), _heldout(base)
        lines.append(f"| {r['model']} | {r['preset']} | {r['variant']} | {got['perplexity']:.3f} | "
                     f"{100 * (got['perplexity'] / ref['perplexity'] - 1):+.2f}% | {100 * got['top1_accuracy']:.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
