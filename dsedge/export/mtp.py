"""DeepSeek-V3's multi-token-prediction (MTP) module as the bundle's draft graph (role ``draft``).

The module (technical report §2.2; README_WEIGHTS.md) is layer ``num_hidden_layers`` of the checkpoint: at
position i, eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]) with h_i the main model's final hidden state (the
decoder's FINAL_HIDDEN output), one decoder layer with MLA and its own MoE — built by the same code as the
main layers, so its cache is the same latent layout — then shared_head.norm and the output head. Its I/O is
``contract.draft_io``; dsedge.testing.mtp_reference is the independent PyTorch reference it is validated
against. The graph holds its own copy of the embedding and head (the module's checkpoint stores them too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from dsedge.contract import (
    ATTENTION_MASK,
    DRAFT,
    DRAFT_HIDDEN,
    FINAL_HIDDEN,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    draft_io,
    past_name,
    present_name,
)
from dsedge.export.decoder import (
    WeightsFn,
    allowed_mask,
    attention_block,
    cache_spec,
    graph_shapes,
    positional,
)
from dsedge.export.graph import GraphBuilder, save_graph
from dsedge.export.moe import moe_block
from dsedge.manifest import GraphEntry
from dsedge.models.rope import cos_sin_tables
from dsedge.models.spec import ModelSpec


def build_draft(spec: ModelSpec, weights: WeightsFn, *, max_positions: int, name: str = DRAFT,
                data_path: Path | None = None, half: bool = False) -> onnx.ModelProto:
    """The first MTP module as one graph; ``weights(num_hidden_layers)`` gives its tensors."""
    g = GraphBuilder(name, data_path, half)
    signature = draft_io(graph_shapes(spec, half))
    g.declare_inputs(signature)
    cache = cache_spec(spec)
    layer = spec.num_hidden_layers
    p = f"model.layers.{layer}."
    w, top = weights(layer), weights(None)
    embed = w.get(p + "embed_tokens.weight", top["model.embed_tokens.weight"])
    head = w.get(p + "shared_head.head.weight",
                 top["model.embed_tokens.weight"] if spec.tie_word_embeddings else top["lm_head.weight"])
    eps = spec.rms_norm_eps
    emb = g.rms_norm(g.op("Gather", g.weight(p + "embed_tokens.weight", embed), INPUT_IDS, axis=0),
                     w[p + "enorm.weight"], p + "enorm", eps)
    hid = g.rms_norm(FINAL_HIDDEN, w[p + "hnorm.weight"], p + "hnorm", eps)
    x = g.linear(g.op("Concat", emb, hid, axis=-1), w[p + "eh_proj.weight"], p + "eh_proj")
    past = [past_name(0, t) for t in cache.names]
    cos, sin = cos_sin_tables(spec, max_positions)
    past_len = g.shape_dim(past[0], cache.shape.index("S"))
    allowed = allowed_mask(g, POSITION_IDS, ATTENTION_MASK, past_len)
    pos = positional(g, spec, POSITION_IDS, g.weight("rope.cos", cos), g.weight("rope.sin", sin), allowed, past_len)
    g.scope = "mtp/"
    x, h, presents = attention_block(g, spec, w, layer, x, past, pos)
    mlp = moe_block(g, spec, w, p + "mlp.", h, "dispatch") if spec.is_moe_layer(layer) else g.swiglu_mlp(
        h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"], p + "mlp")
    x = g.op("Add", x, mlp)
    g.scope = ""
    normed = g.rms_norm(x, w[p + "shared_head.norm.weight"], p + "shared_head.norm", eps)
    values = {present_name(0, t): v for t, v in zip(cache.names, presents, strict=True)}
    values |= {LOGITS: g.to_float(g.linear(normed, head, p + "shared_head.head")), DRAFT_HIDDEN: x}
    g.declare_outputs(signature, values)
    return g.model()


def write_draft(spec: ModelSpec, weights: WeightsFn, root: Path, folder: str, *, max_positions: int,
                half: bool = False) -> GraphEntry:
    """Build and save the draft graph; its manifest entry (role ``draft``, layer = the MTP layer's index)."""
    def build(data: Path):
        return build_draft(spec, weights, max_positions=max_positions, data_path=data, half=half)

    return save_graph(build, draft_io(graph_shapes(spec, half)), root, folder, DRAFT, DRAFT,
                      layer=spec.num_hidden_layers)


def draft_feeds(next_ids: np.ndarray, hidden: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Validation helper: the token inputs of a cache-less draft run (mask all ones)."""
    return {INPUT_IDS: next_ids.astype(np.int64), FINAL_HIDDEN: hidden, POSITION_IDS: positions.astype(np.int64),
            ATTENTION_MASK: np.ones_like(next_ids, dtype=np.int64)}
