"""Attention subgraphs with an explicit cache: absorbed MLA (DeepSeek) and GQA (Qwen2/Llama).

MLA attends over [past | new] without concatenating the cache: scores against the past and the new tokens
are computed separately and only the small score matrices are concatenated, so a decode step never copies
the cache inside the graph; it returns only the new tokens' latent entries, which the runtime writes into
its buffers (a batch-1 prefix of a [B, M, W] buffer is contiguous, so onnxruntime reads it in place).

GQA is one ``com.microsoft::GroupQueryAttention`` node over the whole [B, KV, M, d] key/value buffers (M: the
cache's full length): the kernel reads the first S+T positions (``seqlens_k``) and writes the new tokens'
entries at S. The runtime binds past and present to the same buffer (IO binding), so nothing is copied; a
[B, KV, S, d] prefix view of a longer buffer would not be contiguous, and onnxruntime would copy it every
step (decode time growing with the context). RoPE is one ``com.microsoft::RotaryEmbedding`` per tensor,
outside the attention op: the op's own rotary assumes contiguous positions per row, left padding breaks that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsedge.export.graph import MS_DOMAIN, GraphBuilder
from dsedge.export.quantized import absorbed_products_int8, as_float, int8_per_column, stack_rows, take_rows
from dsedge.models.spec import ModelSpec

NEG = float(np.finfo(np.float32).min)  # masked score: finite, so a fully masked (padding) row stays NaN-free
INT_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Positional:
    """Per-call tensors every layer shares."""

    positions: str  # int64 [B, T]: rows of the rope tables for each new token
    cos_table: str  # [P, r/2] (act dtype)
    sin_table: str
    allowed: str  # bool [B, 1, T, S+T]: causal and not padding
    past_len: str  # int64 [1]
    attention_bias: str | None = None  # GQA: [B, 1, T, S+T] 0 where allowed, the dtype's lowest elsewhere
    seqlens_k: str | None = None  # GQA: int32 [B], S+T−1 for every row (left padding is in the bias)
    total_len: str | None = None  # GQA: int32 scalar S+T


def rotate(g: GraphBuilder, x: str, pos: Positional) -> str:
    """Rotate-half RoPE of x ([B, T, n·r] or [B, n, T, r]) as one ``com.microsoft::RotaryEmbedding``.

    DeepSeek rotates interleaved pairs (2i, 2i+1); the exporter permutes those weight rows into halves
    first, which makes the same rotation exact for it too (dot products are permutation-invariant).
    """
    return g.op("RotaryEmbedding", x, pos.positions, pos.cos_table, pos.sin_table, domain=MS_DOMAIN, interleaved=0)


def interleaved_to_halves(dim: int) -> np.ndarray:
    """Row permutation taking (x0, x1, x2, x3, …) to (x0, x2, …, x1, x3, …)."""
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def attend(g: GraphBuilder, q: str, past: str, new: str, values: tuple[str, str] | None, pos: Positional,
           scale: float, allowed: str) -> str:
    """softmax(q·[past|new]ᵀ·scale, masked) · [past|new] values, without concatenating the cache."""
    s_past = g.op("FusedMatMul", q, past, domain=MS_DOMAIN, transB=1, alpha=scale)
    s_new = g.op("FusedMatMul", q, new, domain=MS_DOMAIN, transB=1, alpha=scale)
    scores = g.to_float(g.op("Concat", s_past, s_new, axis=-1))  # softmax in fp32, as the reference
    prob = g.to_act(g.op("Softmax", g.op("Where", allowed, scores, g.const(NEG, np.float32)), axis=-1))
    last = g.const([-1])
    p_past = g.op("Slice", prob, g.const([0]), pos.past_len, last)
    p_new = g.op("Slice", prob, pos.past_len, g.const([INT_MAX]), last)
    v_past, v_new = values or (past, new)
    return g.op("Add", g.op("MatMul", p_past, v_past), g.op("MatMul", p_new, v_new))


def mla_attention(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, h: str, past: str,
                  pos: Positional) -> tuple[str, str]:
    """Absorbed MLA (DeepSeek-V2 paper, appendix C). Cache per token: [norm(c_kv) | rotated k_pe]."""
    mla, heads = spec.mla, spec.num_attention_heads
    nope, rope, kv, v, qk = (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank, mla.v_head_dim,
                             mla.qk_head_dim)
    kv_a = take_rows(w[prefix + "kv_a_proj_with_mqa.weight"],
                     np.concatenate([np.arange(kv), kv + interleaved_to_halves(rope)]))
    q, latent, k_pe = _mla_query(g, spec, w, prefix, h, kv_a)  # [B, T, H·qk], [B, T, kv], [B, T, rope]
    q = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, heads, qk])), perm=[0, 2, 1, 3])  # [B, H, T, qk]
    q_pe = rotate(g, g.slice_last(q, nope, qk), pos)

    latent = g.rms_norm(latent, w[prefix + "kv_a_layernorm.weight"], prefix + "kv_a_layernorm", spec.rms_norm_eps)
    k_pe = rotate(g, k_pe, pos)
    new = g.op("Concat", latent, k_pe, axis=-1)  # [B, T, kv + rope]: what the cache keeps

    # Absorption multiplies kv_b into the query and output per head, so it is needed as a matrix: a quantized
    # kv_b is dequantized here (heads·(nope+v)·kv_lora: 9% of a V3 layer's attention weights) and, where
    # its accuracy level allows int8 activations, re-quantized int8 per head and column (head_matmul).
    int8 = absorbed_products_int8(w[prefix + "kv_b_proj.weight"], g.half)
    kv_b = as_float(w[prefix + "kv_b_proj.weight"]).reshape(heads, nope + v, kv)
    w_uk, w_uv = kv_b[:, :nope, :], kv_b[:, nope:, :]  # [H, nope, kv], [H, v, kv]
    q_absorbed = head_matmul(g, g.slice_last(q, 0, nope), w_uk, prefix + "w_uk", int8)
    q_full = g.op("Concat", q_absorbed, q_pe, axis=-1)  # [B, H, T, kv + rope]
    axis1 = g.const([1])
    mixed = attend(g, q_full, g.op("Unsqueeze", past, axis1), g.op("Unsqueeze", new, axis1), None, pos,
                   spec.softmax_scale, pos.allowed)  # [B, H, T, kv + rope]
    out = head_matmul(g, g.slice_last(mixed, 0, kv), w_uv.transpose(0, 2, 1), prefix + "w_uv_t", int8)  # [B,H,T,v]
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * v]))
    return g.linear(out, w[prefix + "o_proj.weight"], prefix + "o_proj"), new


# Weight codes in [-63, 63], not [-127, 127]: on x86 CPUs without VNNI (AVX2 only), MLAS' uint8 × int8 kernel
# multiplies byte pairs with vpmaddubsw, whose int16 sum saturates above 32767. The raw uint8 codes sit near
# 128 even for small activations, so 8-bit weights saturate often there (measured on an AVX2 EPYC: 8–32% of
# the largest product wrong, mla_products_bench.py int8-rowq); 255 × 63 × 2 = 32130 never does. This is the
# remedy onnxruntime's quantization docs give for U8S8 on such CPUs (reduce_range, 7-bit weights). VNNI
# (vpdpbusd) and ARM's dot products accumulate in int32 and were exact with 8 bits; 7 bits keeps one bundle
# right on every CPU at the same kernel speed (the u8 × u8 kernel, exact at 8 bits, ran 10–20% slower on
# AVX2): benchmarks/README.md, session 23.
HEAD_WEIGHT_LEVELS = 63


def head_matmul(g: GraphBuilder, x: str, weight: np.ndarray, name: str, int8: bool) -> str:
    """x [B, H, T, K] times one matrix per head, ``weight`` [H, K, N]: fp32 MatMul, or 7-bit weight codes in
    int8 (a scale per head and column; ``HEAD_WEIGHT_LEVELS``) times 8-bit activations (a scale per row) in
    ``com.microsoft::MatMulIntegerToFloat``.

    Why int8: the fp32 products were a fifth of the bytes a ds3bench int4 step reads (a sixth of a real
    V2-Lite layer's), and of the stock ops only the integer matmuls take a quantized matrix per head
    (MatMulNBits takes one 2-D matrix). Why a scale per row: ``DynamicQuantizeMatMul`` quantizes its input
    with one range for the whole tensor, so a row's rounding would depend on the other heads, rows and
    batch-mates of the call, and a speculative verify would not reproduce a decode step (measured: a window
    alone vs in a batch of two, mean KL 8.1e-4; tests/test_mtp_compressed.py failed). Here each row is
    quantized symmetrically by its own largest |value| (opset 21's blocked ``QuantizeLinear``, one block per
    row), so its codes and its product are the same bit for bit whatever it is batched with. A row of zeros
    has scale 0: its codes are whatever 0/0 saturates to, and its product is 0 after the final Mul.
    Speed and quality against fp32 products: benchmarks/README.md, docs/compress.md.
    """
    if not int8:
        return g.op("MatMul", x, g.weight(name, np.ascontiguousarray(weight)))
    row_scale = g.op("Mul", g.op("ReduceMax", g.op("Abs", x), g.const([-1]), keepdims=1),
                     g.const(1 / 127, np.float32))  # [B, H, T, 1]
    # uint8 codes around 128, not int8: onnxruntime's int8 × int8 path runs ~4× slower than uint8 × int8
    # (mla_products_bench.py int8-rowq-s8 vs int8-rowq); a blocked zero point has the scale's shape, built
    # once per graph.
    zero = g.once("row_zero_point_u8", lambda: g.op("Expand", g.const(128, np.uint8), g.op("Shape", row_scale)))
    codes = g.op("QuantizeLinear", x, row_scale, zero, axis=-1, block_size=int(weight.shape[-2]))
    w_codes, w_scale = int8_per_column(weight, HEAD_WEIGHT_LEVELS)
    products = g.op("MatMulIntegerToFloat", codes, g.weight(name, w_codes), g.const(1.0, np.float32),
                    g.weight(name + "_scale", w_scale), g.const(128, np.uint8), domain=MS_DOMAIN)
    return g.op("Mul", products, row_scale)


def _mla_query(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, h: str, kv_a,
               ) -> tuple[str, str, str]:
    """The query [B, T, H·qk] and the compressed KV's latent [B, T, kv] and rope part [B, T, rope]. With a
    q LoRA, q_a_proj and kv_a_proj_with_mqa read the same input: one product whose Split also separates the
    latent from the rope part, when both are stored alike."""
    mla, heads = spec.mla, spec.num_attention_heads
    kv = mla.kv_lora_rank
    name = "q_proj" if mla.q_lora_rank is None else "q_b_proj"
    per_head = np.concatenate([np.arange(mla.qk_nope_head_dim),
                               mla.qk_nope_head_dim + interleaved_to_halves(mla.qk_rope_head_dim)])
    rows = (np.arange(heads)[:, None] * mla.qk_head_dim + per_head).reshape(-1)
    weight = take_rows(w[prefix + name + ".weight"], rows)
    q_a_weight = w.get(prefix + "q_a_proj.weight")
    stacked = None if mla.q_lora_rank is None else stack_rows([q_a_weight, kv_a])
    if stacked is not None:
        fused = g.linear(h, stacked, prefix + "qkv_a_proj")
        q_a, latent, k_pe = g.op("Split", fused, g.const([mla.q_lora_rank, kv, mla.qk_rope_head_dim]), axis=-1,
                                 outputs=3)
    else:
        compressed = g.linear(h, kv_a, prefix + "kv_a_proj_with_mqa")
        latent, k_pe = g.slice_last(compressed, 0, kv), g.slice_last(compressed, kv, kv + mla.qk_rope_head_dim)
        if mla.q_lora_rank is None:
            return g.linear(h, weight, prefix + name), latent, k_pe
        q_a = g.linear(h, q_a_weight, prefix + "q_a_proj")
    q_a = g.rms_norm(q_a, w[prefix + "q_a_layernorm.weight"], prefix + "q_a_layernorm", spec.rms_norm_eps)
    return g.linear(q_a, weight, prefix + name), latent, k_pe


GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention's CPU kernel needs head_size % 8 == 0


def fused_gqa(spec: ModelSpec) -> bool:
    """Whether this dense model's attention is one GroupQueryAttention node (else the explicit subgraph)."""
    return spec.mla is None and spec.head_dim % GQA_HEAD_MULTIPLE == 0


def gqa_attention(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, h: str,
                  past_k: str, past_v: str, pos: Positional) -> tuple[str, str, str]:
    """Grouped-query attention as one GroupQueryAttention node over the [B, KV, M, d] cache buffers.

    Returns the attention output and the present key/value buffers (the same buffers as past, when bound).
    Head sizes the kernel does not take run the explicit subgraph over a [B, KV, S, d] cache instead.
    """
    heads, kv_heads = spec.num_attention_heads, spec.num_key_value_heads

    names = ("q_proj", "k_proj", "v_proj")
    q, k, v = g.fused_linears(h, [w[f"{prefix}{n}.weight"] for n in names],
                            [w.get(f"{prefix}{n}.bias") for n in names], [prefix + n for n in names],
                            prefix + "qkv_proj")  # [B, T, n·d] each
    q, k = rotate(g, q, pos), rotate(g, k, pos)
    if not fused_gqa(spec):
        return _gqa_subgraph(g, spec, w, prefix, q, k, v, past_k, past_v, pos)
    out, present_k, present_v = g.op(
        "GroupQueryAttention", q, k, v, past_k, past_v, pos.seqlens_k, pos.total_len, None, None,
        None, pos.attention_bias, outputs=3, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
        scale=spec.softmax_scale)
    o_bias = w.get(prefix + "o_proj.bias")
    return g.linear(out, w[prefix + "o_proj.weight"], prefix + "o_proj", o_bias), present_k, present_v


def _gqa_subgraph(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, q: str, k: str, v: str,
                  past_k: str, past_v: str, pos: Positional) -> tuple[str, str, str]:
    """GQA as explicit nodes, queries grouped per KV head so the cache is never repeated; returns the new
    tokens' keys/values [B, KV, T, d]."""
    heads, kv_heads, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    group = heads // kv_heads

    def heads_first(x: str, n: int) -> str:  # [B, T, n·d] → [B, n, T, d]
        return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, d])), perm=[0, 2, 1, 3])

    q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
    q5 = g.op("Reshape", q, g.const([0, kv_heads, group, -1, d]))  # [B, KV, G, T, d]
    axis2 = g.const([2])
    keys = (g.op("Unsqueeze", past_k, axis2), g.op("Unsqueeze", k, axis2))
    values = (g.op("Unsqueeze", past_v, axis2), g.op("Unsqueeze", v, axis2))
    allowed = g.op("Unsqueeze", pos.allowed, g.const([1]))  # [B, 1, 1, T, S+T]
    out = attend(g, q5, *keys, values, pos, spec.softmax_scale, allowed)  # [B, KV, G, T, d]
    out = g.op("Reshape", out, g.const([0, heads, -1, d]))
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * d]))
    o_bias = w.get(prefix + "o_proj.bias")
    return g.linear(out, w[prefix + "o_proj.weight"], prefix + "o_proj", o_bias), k, v
