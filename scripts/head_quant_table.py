"""Held-out perplexity of the demo models per preset with the LM head (and the token embedding) quantized.

For each model and preset: the preset as shipped, then with a rule naming ``lm_head`` at the preset's own
bits (and group size) and at int8 per channel; for each of those, the embedding quantized round-to-nearest at
the same bits the head got (what ``dsedge export --quantize-embedding`` does) is scored too, by swapping the
dequantized embedding into the reference model. Scored on the named slice ``heldout-all`` (all of
``dsedge/demo/data/heldout.txt``, 512-token windows) as the model card and scripts/compress_table.py do.

    nice -n 10 .venv/bin/python scripts/head_quant_table.py --out /tmp/head-table [--max-tokens 1000000]

Writes head_table.json (one object per row) in --out and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODELS = ("deepseek-v3-tiny", "qwen2-tiny")
PRESETS = ("int8", "int4-g128", "int4-experts")
# the head's scheme per preset: (label, scheme JSON or None = as the preset has it, kept float)
HEAD_VARIANTS = {"int8": [("float head", None), ("head int8", {"bits": 8})],
                 "int4-g128": [("float head", None), ("head int4-g128", {"bits": 4, "group_size": 128}),
                               ("head int8", {"bits": 8})],
                 "int4-experts": [("float head", None), ("head int8", {"bits": 8})]}


def recipe_with_head(preset_name: str, head: dict | None, directory: Path) -> str:
    from dsedge.compress.recipes import preset

    recipe = preset(preset_name).to_json()
    if head is None:
        return preset_name
    recipe["name"] = f"{preset_name}+head"
    recipe["rules"] = [{"match": "lm_head", "quant": {**head, "method": recipe["method"]}}, *recipe["rules"]]
    path = directory / f"{preset_name}-head{head['bits']}.json"
    path.write_text(json.dumps(recipe))
    return str(path)


def score(model, ids: list[int]) -> dict:
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn

    return evaluate_perplexity(torch_logits_fn(model), ids, window=512, batch_size=8).to_json()


def quantized_embedding(weight, bits: int, group: int | None):
    from dsedge.compress.quant import quantize_rtn
    from dsedge.quantformat.scheme import QuantScheme
    from dsedge.quantformat.tensor import dequantize

    return dequantize(quantize_rtn(weight.float(), QuantScheme(bits, group)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=1_000_000)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
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
    done = {(r["model"], r["preset"], r["head"], r["embedding"]) for r in rows}
    for model_name in args.models:
        src = resolve_checkpoint(model_name)
        ids = encode_text_file(Path(src) / "tokenizer.json", heldout_path())[:args.max_tokens]
        for preset_name in PRESETS:
            for label, head in HEAD_VARIANTS[preset_name]:
                embeddings = ["float"] + ([f"int{head['bits']}"] if head else [])
                if all((model_name, preset_name, label, e) in done for e in embeddings):
                    continue
                started = time.perf_counter()
                path = args.out / f"{model_name}--{preset_name}--{label.replace(' ', '-')}"
                compress(model_name, path, recipe=recipe_with_head(preset_name, head, args.out), overwrite=True)
                model = reference_model(Checkpoint(path))
                size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
                for embedding in embeddings:
                    if embedding != "float":
                        emb = model.get_input_embeddings()
                        with torch.no_grad():
                            emb.weight.copy_(quantized_embedding(emb.weight, head["bits"], head.get("group_size")))
                    row = {"model": model_name, "preset": preset_name, "head": label, "embedding": embedding,
                           "bytes": size, "heldout_all": score(model, ids),
                           "seconds": round(time.perf_counter() - started, 1)}
                    rows.append(row)
                    rows_file.write_text(json.dumps(rows, indent=1))
                    print(json.dumps(row), flush=True)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | head | embedding | `heldout-all` ppl | Δ vs preset | top-1 |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["preset"] == r["preset"]
                    and b["head"] == "float head" and b["embedding"] == "float")
        ppl, ref = r["heldout_all"]["perplexity"], base["heldout_all"]["perplexity"]
        lines.append(f"| {r['model']} | {r['preset']} | {r['head']} | {r['embedding']} | {ppl:.3f} | "
                     f"{100 * (ppl / ref - 1):+.2f}% | {100 * r['heldout_all']['top1_accuracy']:.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
