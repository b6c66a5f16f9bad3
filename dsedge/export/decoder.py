"""Whole-model decoder graph: embeddings → layers (MLA+MoE or GQA+MLP) → norm → logits, with cache I/O.

One graph serves prefill and decode (dynamic query length T and cache length S, S may be 0). Its inputs
and outputs are the decoder role's in ``dsedge.contract`` (``decoder_io``): token ids, positions, mask and
every layer's cache in; the new tokens' cache entries and the logits out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dsedge.contract import (
    ATTENTION_MASK,
    FINAL_HIDDEN,
    INPUT_IDS,
    LOGITS,
    LOGITS_FROM,
    POSITION_IDS,
    GraphShapes,
    decoder_io,
    past_name,
    present_name,
)
from dsedge.export.attention import Positional, fused_gqa, gqa_attention, mla_attention
from dsedge.export.embedding import EMBEDDING, embedding_lookup, tied_quantized_head
from dsedge.export.graph import GraphBuilder
from dsedge.export.moe import moe_block
from dsedge.export.quantized import QuantizedWeight
from dsedge.manifest import CacheLayout
from dsedge.models.rope import cos_sin_tables, rope_dim
from dsedge.models.spec import ModelSpec

WeightsFn = Callable[[int | None], dict[str, np.ndarray]]  # layer index (None: non-layer tensors) → weights


@dataclass(frozen=True)
class CacheSpec:
    """The cache the graph reads and returns, per layer."""

    kind: str  # "mla_latent" | "kv"
    names: tuple[str, ...]  # per-layer tensor suffixes: ("latent",) or ("key", "value")
    shape: tuple[str | int, ...]  # with symbolic batch "B" and length "S"

    def layout(self, half: bool) -> CacheLayout:
        """The manifest's cache entry (in the bundle's precision)."""
        return CacheLayout(self.kind, self.names, self.shape, "float16" if half else "float32")


def cache_spec(spec: ModelSpec) -> CacheSpec:
    """MLA: the latent, [B, S, W] views of the filled prefix (contiguous at batch 1), new entries returned.
    GQA: whole [B, KV, M, d] buffers (M = the cache's length), written in place by GroupQueryAttention (head
    sizes its kernel does not take: [B, KV, S, d] prefixes and new entries, as MLA)."""
    if spec.mla is not None:
        return CacheSpec("mla_latent", ("latent",), ("B", "S", spec.mla.latent_cache_width))
    length = "M" if fused_gqa(spec) else "S"
    return CacheSpec("kv", ("key", "value"), ("B", spec.num_key_value_heads, length, spec.head_dim))


def graph_shapes(spec: ModelSpec, half: bool) -> GraphShapes:
    """What the contract's signatures need to know about this model and precision."""
    cache = cache_spec(spec)
    return GraphShapes(layers=spec.num_hidden_layers, hidden=spec.hidden_size, vocab=spec.vocab_size,
                       rope_width=rope_table_dim(spec), top_k=spec.moe.num_experts_per_tok if spec.moe else 0,
                       cache_tensors=cache.names, cache_dims=cache.shape, act="float16" if half else "float32",
                       final_hidden=spec.num_mtp_layers > 0)  # the MTP draft reads it (dsedge.export.mtp)


def build_decoder(spec: ModelSpec, weights: WeightsFn, *, max_positions: int, name: str = "decoder",
                  expert_path: str = "dispatch", data_path: Path | None = None, half: bool = False,
                  ) -> onnx.ModelProto:
    """The full decoder as one ONNX graph; ``weights(i)`` streams one layer's float32 tensors at a time.

    With ``data_path`` the weights go straight to that external-data file as they are added.
    """
    g = GraphBuilder(name, data_path, half)
    cache = cache_spec(spec)
    signature = decoder_io(graph_shapes(spec, half))
    g.declare_inputs(signature)
    pasts = [[past_name(i, t) for t in cache.names] for i in range(spec.num_hidden_layers)]
    top = weights(None)
    x = embedding_lookup(g, top[EMBEDDING], INPUT_IDS)
    embed = EMBEDDING  # the lookup's initializer, for a tied float head
    pos = _positional(g, spec, max_positions)
    values: dict[str, str] = {}
    delta = None  # the last layer's MLP output, added to x inside the next norm
    for i in range(spec.num_hidden_layers):
        g.scope = f"layers.{i}/"
        x, delta, presents = _layer(g, spec, weights(i), i, x, delta, pasts[i], pos, expert_path)
        g.scope = ""
        values |= {present_name(i, t): value for t, value in zip(cache.names, presents, strict=True)}
    if any(t.name == FINAL_HIDDEN for t in signature.outputs):
        # The MTP draft reads the normed hidden state at every position; only the head is sliced then.
        x, _ = g.add_rms_norm(x, delta, top["model.norm.weight"], "model.norm", spec.rms_norm_eps)
        values[FINAL_HIDDEN] = x
        x = logit_positions(g, x)
    else:  # slice first: the norm and the head run for the logit positions alone
        x, delta = logit_positions(g, x), delta and logit_positions(g, delta)
        x, _ = g.add_rms_norm(x, delta, top["model.norm.weight"], "model.norm", spec.rms_norm_eps)
    values[LOGITS] = g.to_float(lm_head(g, spec, x, top, embed))
    g.declare_outputs(signature, values)
    return g.model()


def logit_positions(g: GraphBuilder, x: str) -> str:
    """x [B, T, H] from position ``logits_from`` on: only those go through the final norm and the head."""
    return g.op("Slice", x, LOGITS_FROM, g.const([np.iinfo(np.int64).max]), g.const([1]))


def _positional(g: GraphBuilder, spec: ModelSpec, max_positions: int) -> Positional:
    """RoPE tables indexed by the position ids, and the mask, for a whole-model graph."""
    cos, sin = cos_sin_tables(spec, max_positions)
    past_len = g.op("Sub", g.shape_dim(ATTENTION_MASK, 1), g.shape_dim(INPUT_IDS, 1))
    allowed = allowed_mask(g, POSITION_IDS, ATTENTION_MASK, past_len)
    return positional(g, spec, POSITION_IDS, g.weight("rope.cos", cos), g.weight("rope.sin", sin), allowed, past_len)


def lm_head(g: GraphBuilder, spec: ModelSpec, x: str, top: dict[str, np.ndarray], embed: str | None) -> str:
    """Logits [B, T, V]. A tied head (``tie_word_embeddings``) multiplies by the embedding initializer
    ``embed`` itself (Gemm transB over [B·T, H]: no transposed copy), so the bundle stores the matrix once."""
    if not spec.tie_word_embeddings:
        return g.linear(x, top["lm_head.weight"], "lm_head")
    if isinstance(top[EMBEDDING], QuantizedWeight):  # the lookup's codes, read by MatMulNBits (embedding.py)
        return tied_quantized_head(g, x, top[EMBEDDING])
    flat = g.op("Reshape", x, g.const([-1, spec.hidden_size]))
    logits = g.op("Gemm", flat, embed, transB=1)
    batch_time = g.op("Shape", x, start=0, end=2)
    return g.op("Reshape", logits, g.op("Concat", batch_time, g.const([spec.vocab_size]), axis=0))


def rope_lookup(g: GraphBuilder, spec: ModelSpec, position_ids: str, max_positions: int) -> tuple[str, str]:
    """cos, sin [B, T, r/2] for the given positions, from tables baked into the graph."""
    cos, sin = cos_sin_tables(spec, max_positions)
    return (g.op("Gather", g.weight("rope.cos", cos), position_ids, axis=0),
            g.op("Gather", g.weight("rope.sin", sin), position_ids, axis=0))


def positional(g: GraphBuilder, spec: ModelSpec, positions: str, cos_table: str, sin_table: str, allowed: str,
               past_len: str) -> Positional:
    """What every layer's attention reads; GQA also gets its additive mask and lengths (computed once)."""
    if not fused_gqa(spec):
        return Positional(positions, cos_table, sin_table, allowed, past_len)
    lowest = np.finfo(np.float16 if g.half else np.float32).min  # finite: a fully masked pad row stays NaN-free
    act = np.float16 if g.half else np.float32
    bias = g.op("Where", allowed, g.const(0.0, act), g.const(lowest, act))
    total = g.op("Cast", g.shape_dim(allowed, 3), to=onnx.TensorProto.INT32)  # [1] = S+T
    seqlens = g.op("Expand", g.op("Sub", total, g.const([1], np.int32)), g.shape_dim(allowed, 0))
    return Positional(positions, cos_table, sin_table, allowed, past_len, attention_bias=bias, seqlens_k=seqlens,
                      total_len=g.op("Reshape", total, g.const([])))


def per_token_tables(g: GraphBuilder, cos: str, sin: str) -> tuple[str, str, str]:
    """Positions and tables for RotaryEmbedding from already gathered cos/sin [B, T, r/2] (a layer graph):
    the tables become [B·T, r/2] and token (b, t) reads row b·T + t."""
    width = g.shape_dim(cos, 2)
    flat_shape = g.op("Concat", g.const([-1]), width, axis=0)
    rows = g.op("Reshape", g.op("Mul", g.shape_dim(cos, 0), g.shape_dim(cos, 1)), g.const([]))
    positions = g.op("Reshape", g.op("Range", g.const(0), rows, g.const(1)), g.op("Shape", cos, start=0, end=2))
    return positions, g.op("Reshape", cos, flat_shape), g.op("Reshape", sin, flat_shape)


def allowed_mask(g: GraphBuilder, position_ids: str, mask: str, past_len: str) -> str:
    """bool [B, 1, T, S+T]: key j is visible to query t if j ≤ S + t (causal) and j is not padding."""
    scalar = g.const([])  # shape [] for Reshape to a scalar
    new_len = g.shape_dim(position_ids, 1)
    total = g.op("Add", past_len, new_len)
    zero, one = g.const(0), g.const(1)
    keys = g.op("Range", zero, g.op("Reshape", total, scalar), one)  # [S+T]
    queries = g.op("Add", g.op("Range", zero, g.op("Reshape", new_len, scalar), one), past_len)  # [T]
    causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.const([0])), g.op("Unsqueeze", queries, g.const([1])))
    not_pad = g.op("Unsqueeze", g.op("Cast", mask, to=9), g.const([1, 2]))  # [B, 1, 1, S+T]
    return g.op("And", g.op("Unsqueeze", causal, g.const([0, 1])), not_pad)


def _layer(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], i: int, x: str, delta: str | None,
           past: list[str], pos: Positional, expert_path: str) -> tuple[str, str, list[str]]:
    """One layer: (residual stream after attention, the MLP output still to be added to it, new cache)."""
    x, h, presents = attention_block(g, spec, w, i, x, past, pos, delta)
    p = f"model.layers.{i}.mlp."
    if spec.is_moe_layer(i):
        mlp = moe_block(g, spec, w, p, h, expert_path)
    else:
        mlp = g.swiglu_mlp(h, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])
    return x, mlp, presents


def attention_block(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], i: int, x: str, past: list[str],
                    pos: Positional, delta: str | None = None) -> tuple[str, str, list[str]]:
    """Residual stream after attention, the post-attention-normed input of the MLP, and the new cache entries.

    ``delta``: the previous layer's MLP output, not yet added to x (the add is fused into this layer's norm).
    """
    p = f"model.layers.{i}."
    h, x = g.add_rms_norm(x, delta, w[p + "input_layernorm.weight"], p + "input_layernorm", spec.rms_norm_eps)
    if spec.mla is not None:
        attn, new = mla_attention(g, spec, w, p + "self_attn.", h, past[0], pos)
        presents = [new]
    else:
        attn, k, v = gqa_attention(g, spec, w, p + "self_attn.", h, past[0], past[1], pos)
        presents = [k, v]
    h, x = g.add_rms_norm(x, attn, w[p + "post_attention_layernorm.weight"], p + "post_attention_layernorm",
                          spec.rms_norm_eps)
    return x, h, presents


def rope_table_dim(spec: ModelSpec) -> int:
    return rope_dim(spec) // 2
