"""Nodes per layer, by operator, of every exported graph of the tiny fixtures (deterministic; no timing).

Each variant is exported (monolithic and partitioned, fp32, and int4 for v3/qwen2) from ``dsedge.testing.tiny``
checkpoints; a decoder's nodes are attributed to layers by their ``layers.{i}/`` name scope, a partitioned
bundle's by graph file. Prints one JSON object: variant → graph kind → {total, by_op}.

    .venv/bin/python benchmarks/node_counts.py [--out DIR] [--variants v2_lite v2 v3 qwen2 llama]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoints and bundles")
    parser.add_argument("--variants", nargs="+", default=["v2_lite", "v2", "v3", "qwen2", "llama"])
    args = parser.parse_args()
    from dsedge.export.bundle import export_bundle
    from dsedge.testing.tiny import write_checkpoint

    root = args.out or Path(tempfile.mkdtemp(prefix="dsedge-nodes-"))
    result = {}
    for variant in args.variants:
        ckpt = write_checkpoint(root / f"{variant}.ckpt", variant)
        for layout in ("monolithic", "partitioned"):
            bundle = root / f"{variant}.{layout}"
            export_bundle(ckpt, bundle, max_context=64, layout=layout, validate=False)  # counts only
            result[f"{variant}/{layout}"] = bundle_counts(bundle)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
