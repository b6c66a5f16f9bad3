"""The partitioned layout: a trunk (prelude, one graph per layer, head) plus routed-expert partitions.

The runtime runs the trunk layer by layer; after a MoE layer's graph it sends the rows to the expert
partitions the router chose (and only those), adds their outputs to the residual stream, and moves on.
Each partition has its own external-data file, so a device can keep the trunk and only some experts
resident and load the rest on demand. Each layer's graphs are built from one layer's weights at a
time, so partitioned export streams the checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dsedge.export.decoder import (
    WeightsFn,
    allowed_mask,
    attention_block,
    cache_spec,
    positional,
    rope_lookup,
    rope_table_dim,
)
from dsedge.export.graph import BOOL, FLOAT, INT64, GraphBuilder
from dsedge.export.moe import dispatch_experts, moe_router_and_shared
from dsedge.models.spec import ModelSpec
from dsedge.planning import RUNTIME_OVERHEAD_BYTES  # the same allowance `plan` uses

log = logging.getLogger(__name__)

DEFAULT_PARTITION_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class Partition:
    layer: int
    first: int  # expert ids [first, last)
    last: int

    @property
    def name(self) -> str:
        return f"layer.{self.layer}.experts.{self.first}-{self.last - 1}"


def experts_per_partition(spec: ModelSpec, target_budget: int | None) -> int:
    """Experts grouped so one partition stays small next to the budget (1/64 of it, else 64 MiB)."""
    moe = spec.moe
    expert_bytes = 3 * moe.moe_intermediate_size * spec.hidden_size * 4  # fp32 gate, up, down
    cap = target_budget // 64 if target_budget else DEFAULT_PARTITION_BYTES
    return max(1, min(moe.n_routed_experts, cap // expert_bytes))


def partitions_for(spec: ModelSpec, per_partition: int) -> list[Partition]:
    out = []
    for layer in spec.moe_layers:
        for first in range(0, spec.moe.n_routed_experts, per_partition):
            out.append(Partition(layer, first, min(first + per_partition, spec.moe.n_routed_experts)))
    return out


def build_prelude(spec: ModelSpec, top: dict[str, np.ndarray], max_positions: int,
                  data_path: Path | None = None, half: bool = False) -> onnx.ModelProto:
    """input_ids, position_ids, attention_mask → hidden [B,T,H], cos/sin [B,T,r/2], allowed [B,1,T,S+T]."""
    g = GraphBuilder("prelude", data_path, half)
    ids = g.input("input_ids", INT64, ["B", "T"])
    position_ids = g.input("position_ids", INT64, ["B", "T"])
    mask = g.input("attention_mask", INT64, ["B", "S_plus_T"])
    hidden = g.op("Gather", g.weight("model.embed_tokens.weight", top["model.embed_tokens.weight"]), ids, axis=0)
    cos, sin = rope_lookup(g, spec, position_ids, max_positions)
    past_len = g.op("Sub", g.shape_dim(mask, 1), g.shape_dim(ids, 1))
    dim = rope_table_dim(spec)
    g.output(hidden, "hidden", g.act, ["B", "T", spec.hidden_size])
    g.output(cos, "cos", g.act, ["B", "T", dim])
    g.output(sin, "sin", g.act, ["B", "T", dim])
    g.output(allowed_mask(g, position_ids, mask, past_len), "allowed", BOOL, ["B", 1, "T", "S_plus_T"])
    return g.model()


def build_layer(spec: ModelSpec, w: dict[str, np.ndarray], i: int, data_path: Path | None = None,
                half: bool = False) -> onnx.ModelProto:
    """One decoder layer without its routed experts."""
    g = GraphBuilder(f"layer.{i}", data_path, half)
    cache = cache_spec(spec)
    dim = rope_table_dim(spec)
    x = g.input("hidden", g.act, ["B", "T", spec.hidden_size])
    cos, sin = g.input("cos", g.act, ["B", "T", dim]), g.input("sin", g.act, ["B", "T", dim])
    allowed = g.input("allowed", BOOL, ["B", 1, "T", "S_plus_T"])
    past = [g.input(f"past.{i}.{t}", g.act, cache.shape) for t in cache.names]
    pos = positional(g, cos, sin, allowed, g.shape_dim(past[0], cache.shape.index("S")))
    x, h, presents = attention_block(g, spec, w, i, x, past, pos)
    for t, value in zip(cache.names, presents, strict=True):
        g.output(value, f"present.{i}.{t}", g.act, [s if s != "S" else "T" for s in cache.shape])
    p = f"model.layers.{i}.mlp."
    if not spec.is_moe_layer(i):
        mlp = g.swiglu_mlp(h, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])
        g.output(g.op("Add", x, mlp), "residual", g.act, ["B", "T", spec.hidden_size])
        return g.model()
    flat, idx, weights, shared = moe_router_and_shared(g, spec, w, p, h)
    if shared is not None:
        x = g.op("Add", x, g.op("Reshape", shared, g.op("Shape", x)))
    k = spec.moe.num_experts_per_tok
    g.output(x, "residual", g.act, ["B", "T", spec.hidden_size])
    g.output(flat, "moe_input", g.act, ["N", spec.hidden_size])
    g.output(idx, "expert_ids", INT64, ["N", k])
    g.output(weights, "expert_weights", FLOAT, ["N", k])
    return g.model()


def build_head(spec: ModelSpec, top: dict[str, np.ndarray], data_path: Path | None = None,
               half: bool = False) -> onnx.ModelProto:
    g = GraphBuilder("head", data_path, half)
    x = g.input("hidden", g.act, ["B", "T", spec.hidden_size])
    x = g.rms_norm(x, top["model.norm.weight"], "model.norm", spec.rms_norm_eps)
    head = top["model.embed_tokens.weight"] if spec.tie_word_embeddings else top["lm_head.weight"]
    g.output(g.to_float(g.linear(x, head, "lm_head")), "logits", FLOAT, ["B", "T", spec.vocab_size])
    return g.model()


def build_partition(spec: ModelSpec, w: dict[str, np.ndarray], part: Partition,
                    data_path: Path | None = None, half: bool = False) -> onnx.ModelProto:
    """Σ over this partition's chosen experts; rows routed elsewhere contribute nothing."""
    g = GraphBuilder(part.name, data_path, half)
    k = spec.moe.num_experts_per_tok
    flat = g.input("moe_input", g.act, ["N", spec.hidden_size])
    idx = g.input("expert_ids", INT64, ["N", k])
    weights = g.input("expert_weights", FLOAT, ["N", k])
    routed = dispatch_experts(g, spec.moe, w, f"model.layers.{part.layer}.mlp.", flat, idx, weights,
                              range(part.first, part.last))
    g.output(g.to_float(routed), "routed", FLOAT, ["N", spec.hidden_size])  # summed by the runtime in fp32
    return g.model()


def write_partitioned(spec: ModelSpec, weights: WeightsFn, root: Path, graph_dir: str, *, max_positions: int,
                      target_budget: int | None, per_partition: int | None = None, half: bool = False,
                      ) -> list[dict[str, Any]]:
    """Write every graph of the partitioned layout; returns their manifest entries."""
    top = weights(None)
    graphs = [_save(lambda data: build_prelude(spec, top, max_positions, data, half), root, graph_dir, "prelude",
                    "prelude")]
    parts = []
    if spec.moe:
        parts = partitions_for(spec, per_partition or experts_per_partition(spec, target_budget))
    for i in range(spec.num_hidden_layers):
        w = weights(i)
        graphs.append(_save(lambda data, w=w, i=i: build_layer(spec, w, i, data, half), root, graph_dir, f"layer.{i}",
                            "layer", layer=i))
        for part in (p for p in parts if p.layer == i):
            graphs.append(_save(lambda data, w=w, part=part: build_partition(spec, w, part, data, half), root,
                                f"{graph_dir}/experts", part.name, "experts", layer=i, experts=[part.first, part.last]))
    graphs.append(_save(lambda data: build_head(spec, top, data, half), root, graph_dir, "head", "head"))
    return graphs


def _save(build, root: Path, folder: str, name: str, kind: str, **extra) -> dict[str, Any]:
    """Build a graph with its weights streamed to ``name.onnx.data``, save it, return its manifest entry."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    rel = f"{folder}/{name}.onnx"
    data = root / (rel + ".data")
    model = build(data)
    onnx.save_model(model, root / rel)
    if data.exists() and data.stat().st_size == 0:
        data.unlink()  # every weight was small enough to stay inline
    return {"name": name, "kind": kind, "file": rel, "data_files": [rel + ".data"] if data.exists() else [],
            "bytes": (root / rel).stat().st_size + (data.stat().st_size if data.exists() else 0),
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output], **extra}


def placement_plan(graphs: list[dict[str, Any]], *, budget: int | None, kv_bytes: int,
                   frequencies: dict[str, float] | None = None) -> dict[str, Any]:
    """Resident vs on-demand expert partitions: the most used partitions first, until the budget is spent.

    Without measured frequencies (from compress calibration) every partition counts the same and the
    order is by layer. The trunk, the cache and a fixed runtime allowance come off the budget first.
    """
    trunk = sum(g["bytes"] for g in graphs if g["kind"] != "experts")
    parts = [g for g in graphs if g["kind"] == "experts"]
    frequencies = frequencies or {}
    parts.sort(key=lambda g: -frequencies.get(g["name"], 0.0))
    room = math.inf if budget is None else budget - trunk - kv_bytes - RUNTIME_OVERHEAD_BYTES
    placement, used = {}, 0
    for part in parts:
        fits = used + part["bytes"] <= room
        placement[part["name"]] = "resident" if fits else "on_demand"
        used += part["bytes"] if fits else 0
    return {"budget_bytes": budget, "trunk_bytes": trunk, "kv_cache_bytes": kv_bytes,
            "expert_bytes": sum(p["bytes"] for p in parts), "resident_expert_bytes": used,
            "frequencies": "measured" if frequencies else "uniform (no calibration data)", "partitions": placement}
