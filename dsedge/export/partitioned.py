"""The partitioned layout: a trunk (prelude, one graph per layer, head) plus routed-expert partitions.

The runtime runs the trunk layer by layer; after a MoE layer's graph it sends the rows to the expert
partitions the router chose (and only those), adds their outputs to the residual stream, and moves on.
Each partition is its own graph, so a device can keep the trunk and only some experts resident and load
the rest on demand. Where a layer's experts fuse into one QMoE, that layer also gets a "layer_experts" graph
over all of them, whose file holds the experts' codes once; the partitions reference their rows of it
(``dsedge.export.shared_rows``), and the runtime runs the fused graph when the whole layer is resident.
Each layer's graphs are built from one layer's weights at a time, so partitioned export streams the
checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from dsedge.contract import (
    ALLOWED,
    ATTENTION_MASK,
    COS,
    EXPERT_IDS,
    EXPERT_ROLES,
    EXPERT_WEIGHTS,
    EXPERTS,
    FINAL_HIDDEN,
    HEAD,
    HIDDEN,
    INPUT_IDS,
    LAYER,
    LAYER_EXPERTS,
    LOGITS,
    MOE_INPUT,
    POSITION_IDS,
    PRELUDE,
    RESIDUAL,
    ROUTED,
    SIN,
    experts_io,
    head_io,
    layer_experts_name,
    layer_graph_name,
    layer_io,
    partition_name,
    past_name,
    prelude_io,
    present_name,
)
from dsedge.export.decoder import (
    WeightsFn,
    allowed_mask,
    attention_block,
    cache_spec,
    graph_shapes,
    lm_head,
    logit_positions,
    per_token_tables,
    positional,
    rope_lookup,
)
from dsedge.export.embedding import EMBEDDING, embedding_initializers, embedding_lookup
from dsedge.export.graph import GraphBuilder, save_graph
from dsedge.export.moe import moe_router_and_shared, qmoe_scheme, routed_experts
from dsedge.export.mtp import graph_initializer, write_draft
from dsedge.export.shared_rows import FusedRows, RowSharingBuilder
from dsedge.manifest import GraphEntry, Placement, RankedPartition, longest_prefix
from dsedge.models.spec import ModelSpec
from dsedge.planning import RUNTIME_OVERHEAD_BYTES  # the same allowance `plan` uses

log = logging.getLogger(__name__)

DEFAULT_PARTITION_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class Partition:
    layer: int
    first: int  # expert ids [first, last)
    last: int
    layers: int  # the model's layer and routed-expert counts, which set the zero-padding of the name
    experts: int

    @property
    def name(self) -> str:
        return partition_name(self.layer, self.first, self.last, self.layers, self.experts)


def experts_per_partition(spec: ModelSpec, target_budget: int | None) -> int:
    """Experts grouped so one partition stays small next to the budget (1/64 of it, else 64 MiB)."""
    moe = spec.moe
    expert_bytes = 3 * moe.moe_intermediate_size * spec.hidden_size * 4  # fp32 gate, up, down
    cap = target_budget // 64 if target_budget else DEFAULT_PARTITION_BYTES
    return max(1, min(moe.n_routed_experts, cap // expert_bytes))


def partitions_for(spec: ModelSpec, per_partition: int) -> list[Partition]:
    out = []
    total = spec.moe.n_routed_experts
    for layer in spec.moe_layers:
        for first in range(0, total, per_partition):
            out.append(Partition(layer, first, min(first + per_partition, total), spec.num_hidden_layers, total))
    return out


def build_prelude(spec: ModelSpec, top: dict[str, np.ndarray], max_positions: int,
                  data_path: Path | None = None, half: bool = False) -> onnx.ModelProto:
    """Token ids, positions and mask → the embeddings and the positional tensors every layer reads."""
    g = GraphBuilder(PRELUDE, data_path, half)
    g.declare_inputs(prelude_io(graph_shapes(spec, half)))
    hidden = embedding_lookup(g, top[EMBEDDING], INPUT_IDS)
    cos, sin = rope_lookup(g, spec, POSITION_IDS, max_positions)
    past_len = g.op("Sub", g.shape_dim(ATTENTION_MASK, 1), g.shape_dim(INPUT_IDS, 1))
    g.declare_outputs(prelude_io(graph_shapes(spec, half)), {
        HIDDEN: hidden, COS: cos, SIN: sin, ALLOWED: allowed_mask(g, POSITION_IDS, ATTENTION_MASK, past_len)})
    return g.model()


def build_layer(spec: ModelSpec, w: dict[str, np.ndarray], i: int, data_path: Path | None = None,
                half: bool = False) -> onnx.ModelProto:
    """One decoder layer without its routed experts."""
    g = GraphBuilder(layer_graph_name(i, spec.num_hidden_layers), data_path, half)
    cache = cache_spec(spec)
    signature = layer_io(graph_shapes(spec, half), i, spec.is_moe_layer(i))
    g.declare_inputs(signature)
    past = [past_name(i, t) for t in cache.names]
    past_len = g.op("Sub", g.shape_dim(ALLOWED, 3), g.shape_dim(ALLOWED, 2))  # S = (S+T) − T
    pos = positional(g, spec, *per_token_tables(g, COS, SIN), ALLOWED, past_len)
    x, h, presents = attention_block(g, spec, w, i, HIDDEN, past, pos)
    values = {present_name(i, t): value for t, value in zip(cache.names, presents, strict=True)}
    p = f"model.layers.{i}.mlp."
    if not spec.is_moe_layer(i):
        mlp = g.swiglu_mlp(h, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])
        g.declare_outputs(signature, values | {RESIDUAL: g.op("Add", x, mlp)})
        return g.model()
    flat, idx, weights, shared = moe_router_and_shared(g, spec, w, p, h)
    if shared is not None:
        x = g.op("Add", x, g.op("Reshape", shared, g.op("Shape", x)))
    g.declare_outputs(signature, values | {RESIDUAL: x, MOE_INPUT: flat, EXPERT_IDS: idx, EXPERT_WEIGHTS: weights})
    return g.model()


def build_head(spec: ModelSpec, top: dict[str, np.ndarray], data_path: Path | None = None,
               half: bool = False, shared_embedding: onnx.TensorProto | None = None) -> onnx.ModelProto:
    """Final norm and LM head. A tied head reads ``shared_embedding``: the prelude's embedding initializer,
    whose external data (file, offset, length) it references instead of writing the matrix again."""
    g = GraphBuilder(HEAD, data_path, half)
    signature = head_io(graph_shapes(spec, half))
    g.declare_inputs(signature)
    values = {}
    if any(t.name == FINAL_HIDDEN for t in signature.outputs):  # the MTP draft reads every position's, normed
        values[FINAL_HIDDEN] = g.rms_norm(HIDDEN, top["model.norm.weight"], "model.norm", spec.rms_norm_eps)
        x = logit_positions(g, values[FINAL_HIDDEN])
    else:  # slice first: the norm and the head run for the logit positions alone
        x = g.rms_norm(logit_positions(g, HIDDEN), top["model.norm.weight"], "model.norm", spec.rms_norm_eps)
    embed = None
    if spec.tie_word_embeddings:
        g.initializers.append(shared_embedding)
        embed = shared_embedding.name
    g.declare_outputs(signature, values | {LOGITS: g.to_float(lm_head(g, spec, x, top, embed))})
    return g.model()


def prelude_embedding(root: Path, prelude: GraphEntry) -> tuple[onnx.TensorProto, tuple[str, ...]]:
    """The prelude's embedding initializer (a reference only: its data stays in the prelude's file) and the
    bundle files it lives in, for a tied head to point at."""
    names = [t.name for t in onnx.load_model(str(root / prelude.file), load_external_data=False).graph.initializer]
    return graph_initializer(root, prelude, embedding_initializers(names)[0])


def build_partition(spec: ModelSpec, w: dict[str, np.ndarray], part: Partition,
                    data_path: Path | None = None, half: bool = False, rows: FusedRows | None = None,
                    ) -> onnx.ModelProto:
    """Σ over this partition's chosen experts (one QMoE when quantized in a layout it takes); rows routed
    elsewhere contribute nothing. With ``rows`` its weights are references into the layer's fused file."""
    g = GraphBuilder(part.name, data_path, half) if rows is None else \
        RowSharingBuilder(part.name, data_path, half, rows, part.first)
    signature = experts_io(graph_shapes(spec, half))
    g.declare_inputs(signature)
    routed = routed_experts(g, spec, w, f"model.layers.{part.layer}.mlp.", MOE_INPUT, EXPERT_IDS, EXPERT_WEIGHTS,
                            range(part.first, part.last))
    g.declare_outputs(signature, {ROUTED: g.to_float(routed)})  # summed by the runtime in fp32
    return g.model()


def write_partitioned(spec: ModelSpec, weights: WeightsFn, root: Path, graph_dir: str, *, max_positions: int,
                      target_budget: int | None, per_partition: int | None = None, half: bool = False,
                      has_mtp: bool = False) -> list[GraphEntry]:
    """Write every graph of the partitioned layout; returns their manifest entries."""
    shapes = graph_shapes(spec, half)
    top = weights(None)
    graphs = [save_graph(lambda data: build_prelude(spec, top, max_positions, data, half), prelude_io(shapes), root,
                         graph_dir, PRELUDE, PRELUDE)]
    parts = []
    if spec.moe:
        parts = partitions_for(spec, per_partition or experts_per_partition(spec, target_budget))
    for i in range(spec.num_hidden_layers):
        w = weights(i)
        graphs.append(save_graph(lambda data, w=w, i=i: build_layer(spec, w, i, data, half),
                                 layer_io(shapes, i, spec.is_moe_layer(i)), root, graph_dir,
                                 layer_graph_name(i, spec.num_hidden_layers), LAYER, layer=i))
        layer_parts = [p for p in parts if p.layer == i]
        if layer_parts:
            graphs += _expert_graphs(spec, w, i, layer_parts, root, f"{graph_dir}/experts", half)
    shared, shared_files = prelude_embedding(root, graphs[0]) if spec.tie_word_embeddings else (None, ())
    head = save_graph(lambda data: build_head(spec, top, data, half, shared), head_io(shapes), root, graph_dir, HEAD,
                      HEAD)
    # The shared file is listed (hashed, and checked as the head's external data) but its bytes count once,
    # under the prelude: placement's trunk size stays what is on disk.
    graphs.append(replace(head, data_files=head.data_files + shared_files))
    if has_mtp:  # the MTP draft, reading the prelude's embedding and the head's matrix (dsedge.export.mtp)
        graphs.append(write_draft(spec, weights, root, graph_dir, max_positions=max_positions,
                                  half=half, shares=[graphs[0], graphs[-1]]))
    return graphs


def _expert_graphs(spec: ModelSpec, w: dict, layer: int, parts: list[Partition], root: Path, folder: str,
                   half: bool) -> list[GraphEntry]:
    """A MoE layer's expert partitions, preceded (when its experts fuse into one QMoE and there is more than
    one partition) by its layer_experts graph, which holds the codes the partitions reference."""
    shapes = experts_io(graph_shapes(spec, half))
    everything = range(spec.moe.n_routed_experts)
    rows, out = None, []
    if len(parts) > 1 and qmoe_scheme(spec, w, f"model.layers.{layer}.mlp.", everything) is not None:
        whole = Partition(layer, 0, len(everything), spec.num_hidden_layers, len(everything))
        fused = save_graph(lambda data: build_partition(spec, w, whole, data, half), shapes, root, folder,
                           layer_experts_name(layer, spec.num_hidden_layers), LAYER_EXPERTS, layer=layer,
                           experts=(0, len(everything)))
        rows = FusedRows(root, fused)
        out.append(fused)
    for part in parts:
        if rows is not None:
            rows.start()
        entry = save_graph(lambda data, part=part: build_partition(spec, w, part, data, half, rows), shapes, root,
                           folder, part.name, EXPERTS, layer=layer, experts=(part.first, part.last))
        if rows is not None and rows.used:  # its share of the fused file: what loading it reads and holds
            entry = replace(entry, data_files=entry.data_files + tuple(sorted(rows.used - set(entry.data_files))),
                            bytes=entry.bytes + rows.borrowed_bytes)
        out.append(entry)
    return out


def placement_plan(graphs: list[GraphEntry], *, budget: int | None, kv_bytes: int,
                   frequencies: dict[str, float] | None = None) -> Placement:
    """Export's ranking of the expert partitions (hottest first) and the resident prefix under ``budget``.

    Without measured frequencies (from compress calibration) every partition counts the same and the
    order is by layer. The trunk, the cache and a fixed runtime allowance come off the budget first. The
    runtime reads the ranking: under an explicit budget it keeps the longest prefix that fits there.
    """
    trunk = sum(g.bytes for g in graphs if g.role not in EXPERT_ROLES)
    parts = [g for g in graphs if g.role == EXPERTS]
    frequencies = frequencies or {}
    parts.sort(key=lambda g: -frequencies.get(g.name, 0.0))  # stable: layer order among equals
    room = math.inf if budget is None else budget - trunk - kv_bytes - RUNTIME_OVERHEAD_BYTES
    resident = set(longest_prefix(((p.name, p.bytes) for p in parts), room))
    return Placement(budget_bytes=budget, trunk_bytes=trunk, kv_cache_bytes=kv_bytes,
                     expert_bytes=sum(p.bytes for p in parts),
                     resident_expert_bytes=sum(p.bytes for p in parts if p.name in resident),
                     frequencies="measured" if frequencies else "uniform (no calibration data)",
                     ranking=tuple(RankedPartition(p.name, p.bytes, p.name in resident) for p in parts))
