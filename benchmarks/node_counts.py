"""Nodes per layer, by operator, of every exported graph (deterministic; no timing).

Variants: the tiny fixtures (``dsedge.testing.tiny``) and ``ds3bench-shape`` / ``qwen2bench-shape``: the bench
models' configs (``dsedge.testing.bench``) with their expert count, top-k, groups and layer structure but small
widths on the 32-grid — node counts do not depend on widths, so these are ds3bench's and qwen2bench's per-layer
counts, and at int4 g32 their experts take the same operator (QMoE) as the bench models'. Precisions: fp32, and
int4 = the decode benchmark's int4 recipe (``benchmarks/recipes/bench-int4.json``: every linear int4 g32
symmetric, the head int8; RTN). Each is exported monolithic and partitioned; a decoder's nodes are attributed to
layers by their ``layers.{i}/`` name scope, a partitioned bundle's by graph file. Prints one JSON object:
variant/precision/layout → graph → {total, by_op}; ``--table`` prints the per-layer totals as markdown instead.

    .venv/bin/python benchmarks/node_counts.py [--out DIR] [--variants v3 ds3bench-shape ...]
        [--precisions fp32 int4] [--table]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx

INT4_RECIPE = Path(__file__).parent / "recipes" / "bench-int4.json"
SMALL_WIDTHS = {  # the bench configs' widths scaled down, every one a multiple of 32
    "ds3bench": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "kv_lora_rank": 64,
                 "q_lora_rank": 96, "num_attention_heads": 4, "num_key_value_heads": 4, "qk_nope_head_dim": 32,
                 "qk_rope_head_dim": 32, "v_head_dim": 32, "num_hidden_layers": 3, "max_position_embeddings": 256},
    "qwen2bench": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "num_hidden_layers": 2, "max_position_embeddings": 256},
}
BENCH_SHAPES = {f"{name}-shape": name for name in SMALL_WIDTHS}


def layer_counts(model: onnx.ModelProto) -> dict[str, Counter]:
    """Node counts by op type per ``layers.{i}/`` scope (and ``outside`` for embedding, positions, head)."""
    counts: dict[str, Counter] = {}
    for node in model.graph.node:
        scope = node.name.split("/")[0] if node.name.startswith("layers.") else "outside"
        counts.setdefault(scope, Counter())[node.op_type] += 1
    return counts


def summarize(counter: Counter) -> dict:
    return {"total": sum(counter.values()), "by_op": dict(sorted(counter.items()))}


def bundle_counts(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    out = {}
    for graph in manifest["graphs"]:
        model = onnx.load(str(bundle / graph["file"]), load_external_data=False)
        if graph["role"] == "decoder":
            for scope, counter in layer_counts(model).items():
                out[f"decoder:{scope}"] = summarize(counter)
        elif graph["role"] in ("layer", "experts") and graph["layer"] in (0, 1) or graph["role"] in ("prelude", "head"):
            out[f"{graph['role']}:{graph['name']}"] = summarize(Counter(n.op_type for n in model.graph.node))
    return out


def write_bench_shaped(out: Path, bench: str) -> Path:
    """A bench model's config at small widths, random weights (transformers' init), the fixtures' tokenizer."""
    import torch
    import transformers

    from dsedge.testing.bench import BENCH_CONFIGS, add_tokenizer
    from dsedge.testing.tokenizer import VOCAB_SIZE

    if (out / "config.json").exists():
        return out
    config = transformers.AutoConfig.for_model(**{**BENCH_CONFIGS[bench], **SMALL_WIDTHS[bench],
                                                  "vocab_size": VOCAB_SIZE})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    add_tokenizer(out)
    return out


def checkpoint(root: Path, variant: str, precision: str) -> Path:
    from dsedge.compress.pipeline import compress
    from dsedge.testing.tiny import write_checkpoint

    source = root / f"{variant}.ckpt"
    if variant in BENCH_SHAPES:
        write_bench_shaped(source, BENCH_SHAPES[variant])
    elif not (source / "config.json").exists():
        write_checkpoint(source, variant)
    if precision == "fp32":
        return source
    out = root / f"{variant}.{precision}.ckpt"
    if not (out / "config.json").exists():
        compress(source, out, recipe=INT4_RECIPE, method="rtn", calib_tokens=64, evaluate=False)
    return out


def table(result: dict) -> str:
    """Per-layer totals: monolithic layer 0 (dense) and 1 (MoE where there is one), partitioned layer graphs and
    the nodes of one MoE layer's expert partitions (all partitions of layer 1 summed)."""
    rows = ["| variant / precision | mono layer 0 | mono layer 1 | part. layer 0 | part. layer 1 | layer-1 experts "
            "(partitions) |", "|---|---|---|---|---|---|"]
    for key in sorted({k.rsplit("/", 1)[0] for k in result}):
        mono, part = result.get(f"{key}/monolithic", {}), result.get(f"{key}/partitioned", {})

        def total(counts: dict, name: str) -> str:
            return str(counts[name]["total"]) if name in counts else "–"

        layers = sorted(k for k in part if k.startswith("layer:"))
        experts = [v["total"] for k, v in part.items() if k.startswith("experts:")]  # bundle_counts: layer 1
        rows.append(f"| {key} | {total(mono, 'decoder:layers.0')} | {total(mono, 'decoder:layers.1')} | "
                    f"{part[layers[0]]['total'] if layers else '–'} | "
                    f"{part[layers[1]]['total'] if len(layers) > 1 else '–'} | "
                    f"{sum(experts) if experts else '–'} ({len(experts)}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoints and bundles")
    parser.add_argument("--variants", nargs="+",
                        default=["v2_lite", "v2", "v3", "qwen2", "llama", *BENCH_SHAPES])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    parser.add_argument("--experts-per-partition", type=int, default=8)
    parser.add_argument("--table", action="store_true", help="print markdown per-layer totals, not JSON")
    args = parser.parse_args()
    from dsedge.export.bundle import export_bundle

    root = args.out or Path(tempfile.mkdtemp(prefix="dsedge-nodes-"))
    result = {}
    for variant in args.variants:
        for precision in args.precisions:
            ckpt = checkpoint(root, variant, precision)
            for layout in ("monolithic", "partitioned"):
                bundle = root / f"{variant}.{precision}.{layout}"
                if not (bundle / "manifest.json").exists():
                    export_bundle(ckpt, bundle, max_context=64, layout=layout, validate=False,  # counts only
                                  experts_per_partition=args.experts_per_partition)
                result[f"{variant}/{precision}/{layout}"] = bundle_counts(bundle)
    print(table(result) if args.table else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
