"""DeepSeek MoE: exact routing for every variant, and sparse expert dispatch.

Routing follows DeepSeek's reference code (deepseek-ai/DeepSeek-V3 ``inference/model.py`` Gate and the
V2 checkpoints' ``MoEGate``):
- greedy (V2-Lite): softmax, top-k.
- group_limited_greedy (V2): softmax; a group's score is its max; keep ``topk_group`` groups; top-k.
- noaux_tc (V3/R1): sigmoid; selection on score + e_score_correction_bias; a group's score is the sum of
  its top-2 biased scores; other groups masked with −inf; weights are the *unbiased* sigmoid scores.
Then optional renormalisation (honoured for V2 too, though V2's reference ignores the flag; every
released V2 config sets it false) and × routed_scaling_factor.

Experts: quantized routed experts in a layout onnxruntime's ``com.microsoft::QMoE`` runs on its fast kernels
(``qmoe_scheme``) are one QMoE per layer, which runs DeepSeek's top-k itself on our biased, group-masked
scores, or one per expert partition, fed our exact selection. Float experts of
a renormalising router (V3/R1) in a monolithic bundle are one ``com.microsoft::MoE`` per layer, fed the same
selection as log-weights (``_moe_op_experts``; the export default picks it, dsedge.export.bundle). Otherwise
dispatch: each expert gathers the rows routed to it (NonZero → Gather), runs its SwiGLU MLP and scatter-adds the
weighted result. Either way only routed rows are computed, and nothing about routing is fixed at export time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from dsedge.export.graph import MS_DOMAIN, GraphBuilder
from dsedge.export.quantized import FAST_LEVEL, MIN_BLOCK, QuantizedWeight, packed_rows
from dsedge.models.spec import ModelSpec, MoESpec

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Selection:
    """The exact expert choice of a router: what both the weights and the fused QMoE path start from."""

    idx: str  # int64 [N, k]: the chosen experts
    values: str  # [N, k]: the selection scores of the chosen (finite: biased for noaux_tc, masked otherwise)
    scores: str  # fp32 [N, E]: the unbiased, unmasked scores the aggregation weights are taken from
    finite: bool  # whether every chosen value is finite (k ≤ the experts the group limit keeps)


def select_experts(g: GraphBuilder, moe: MoESpec, logits: str, bias: np.ndarray | None, prefix: str) -> Selection:
    """Router logits [N, E] → the chosen experts (DeepSeek's selection, ties to the lower index like its sort)."""
    scores, choice = selection_scores(g, moe, logits, bias, prefix)
    values, idx = g.op("TopK", choice, g.const([moe.num_experts_per_tok]), outputs=2, axis=-1)
    return Selection(idx, values, scores, selection_finite(moe))


def selection_scores(g: GraphBuilder, moe: MoESpec, logits: str, bias: np.ndarray | None,
                     prefix: str) -> tuple[str, str]:
    """Router logits [N, E] → (unbiased scores, the scores the top-k selects on)."""
    if moe.routing == "noaux_tc":
        scores = g.op("Sigmoid", logits)
        choice = g.op("Add", scores, g.weight(prefix + "e_score_correction_bias", bias.astype(np.float32),
                                              keep_fp32=True))
        choice = _limit_groups(g, moe, choice, group_score="top2_sum")
    else:
        scores = g.op("Softmax", logits, axis=-1)
        choice = _limit_groups(g, moe, scores, group_score="max") if moe.routing == "group_limited_greedy" else scores
    return scores, choice


def selection_finite(moe: MoESpec) -> bool:
    """Whether every chosen expert has a finite selection score: k ≤ the experts the group limit keeps."""
    kept = moe.topk_group * (moe.n_routed_experts // moe.n_group) if moe.n_group > 1 else moe.n_routed_experts
    return moe.routing not in ("noaux_tc", "group_limited_greedy") or moe.num_experts_per_tok <= kept


def route(g: GraphBuilder, moe: MoESpec, logits: str, bias: np.ndarray | None, prefix: str) -> tuple[str, str]:
    """Router logits [N, E] → (expert indices [N, k] int64, aggregation weights [N, k])."""
    chosen = select_experts(g, moe, logits, bias, prefix)
    return chosen.idx, aggregation_weights(g, moe, chosen)


def aggregation_weights(g: GraphBuilder, moe: MoESpec, chosen: Selection) -> str:
    """DeepSeek's weights [N, k] of the chosen experts: unbiased scores, optionally renormalised, × the scale."""
    # softmax routings select on the (masked) scores themselves: the chosen values are the weights
    weights = (g.op("GatherElements", chosen.scores, chosen.idx, axis=1) if moe.routing == "noaux_tc"
               else chosen.values)
    if _normalized(moe):
        total = g.op("ReduceSum", weights, g.const([-1]), keepdims=1)
        weights = g.op("Div", weights, g.op("Add", total, g.const(1e-20, np.float32)))
    if moe.routed_scaling_factor != 1.0:
        weights = g.op("Mul", weights, g.const(moe.routed_scaling_factor, np.float32))
    return weights


def _normalized(moe: MoESpec) -> bool:
    return moe.norm_topk_prob and moe.num_experts_per_tok > 1


def _limit_groups(g: GraphBuilder, moe: MoESpec, scores: str, group_score: str) -> str:
    """Mask (−inf) every expert outside the ``topk_group`` best groups.

    Kept 3-D ([N, G, E/G], group scores [N, G, 1]) so the group choice broadcasts over its experts without
    Unsqueeze/Expand/Shape glue: 9 nodes (8 for ``max``) where the 2-D form took 13. TopK breaks ties by
    the lower index, as the reference's stable sort does, so the groups kept are the same ones.
    """
    if moe.n_group <= 1:
        return scores
    per_group = moe.n_routed_experts // moe.n_group
    grouped = g.op("Reshape", scores, g.const([0, moe.n_group, per_group]))  # [N, G, E/G]
    if group_score == "max":
        group_scores = g.op("ReduceMax", grouped, g.const([-1]), keepdims=1)
    else:
        top2, _ = g.op("TopK", grouped, g.const([2]), outputs=2, axis=-1)
        group_scores = g.op("ReduceSum", top2, g.const([-1]), keepdims=1)  # [N, G, 1]
    _, best = g.op("TopK", group_scores, g.const([moe.topk_group]), outputs=2, axis=1)  # [N, topk_group, 1]
    one_hot = g.op("OneHot", best, g.const(moe.n_group), g.const([0.0, 1.0], np.float32), axis=1)  # [N, G, tg, 1]
    chosen = g.op("Cast", g.op("ReduceSum", one_hot, g.const([2]), keepdims=0), to=9)  # bool [N, G, 1]
    masked = g.op("Where", chosen, grouped, g.const(NEG_INF, np.float32))
    return g.op("Reshape", masked, g.const([0, moe.n_routed_experts]))


def moe_block(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, h: str,
              expert_path: str = "dispatch") -> str:
    """Shared experts + routed experts for hidden states h [B, T, H].

    ``expert_path="dense"`` runs every expert on every row and zeroes the unchosen: exact too, but it
    reads all experts' weights per token; it exists only as the baseline the benchmark compares against.
    """
    layout = qmoe_scheme(spec, w, prefix) if expert_path == "dispatch" else None
    flat = g.op("Reshape", h, g.const([-1, spec.hidden_size]))  # [N, H]
    logits, bias = router_logits(g, w, prefix, flat), w.get(prefix + "gate.e_score_correction_bias")
    if layout is not None and selection_finite(spec.moe):
        scores, choice = selection_scores(g, spec.moe, logits, bias, prefix + "gate.")
        out = qmoe_layer(g, spec, w, prefix, flat, scores, choice, layout)
    else:
        chosen = select_experts(g, spec.moe, logits, bias, prefix + "gate.")
        idx, weights = chosen.idx, aggregation_weights(g, spec.moe, chosen)
        if layout is not None:
            out = qmoe_experts(g, spec, w, prefix, flat, idx, weights, layout)
        elif expert_path == "dense":
            out = _dense_experts(g, spec.moe, w, prefix, flat, idx, weights, range(spec.moe.n_routed_experts))
        elif expert_path == "moe_op":
            out = _moe_op_experts(g, spec.moe, w, prefix, flat, idx, weights)
        else:
            out = dispatch_experts(g, spec.moe, w, prefix, flat, idx, weights, range(spec.moe.n_routed_experts))
    shared = shared_experts(g, spec, w, prefix, flat)
    if shared is not None:
        out = g.op("Add", out, shared)
    return g.op("Reshape", out, g.op("Shape", h))


def router_logits(g: GraphBuilder, w: dict, prefix: str, flat: str) -> str:
    """fp32 router logits [N, E] (the router stays fp32, as DeepSeek runs it)."""
    return g.linear(g.to_float(flat), w[prefix + "gate.weight"], prefix + "gate", keep_fp32=True)


def shared_experts(g: GraphBuilder, spec: ModelSpec, w: dict, prefix: str, flat: str) -> str | None:
    if not spec.moe.n_shared_experts:
        return None
    p = prefix + "shared_experts."
    return g.swiglu_mlp(flat, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])


def moe_router_and_shared(g: GraphBuilder, spec: ModelSpec, w: dict[str, np.ndarray], prefix: str, h: str,
                          ) -> tuple[str, str, str, str | None]:
    """Everything of a MoE layer but the routed experts: rows [N, H], routing, shared-expert output [N, H]."""
    flat = g.op("Reshape", h, g.const([-1, spec.hidden_size]))  # [N, H]
    idx, weights = route(g, spec.moe, router_logits(g, w, prefix, flat),
                         w.get(prefix + "gate.e_score_correction_bias"), prefix + "gate.")
    return flat, idx, weights, shared_experts(g, spec, w, prefix, flat)


def dense_routing_weights(g: GraphBuilder, n_experts: int, idx: str, weights: str) -> tuple[str, str]:
    """[N, k] choices → selection mask [N, E] (0/1) and aggregation weights [N, E] (0 where not chosen)."""
    one_hot = g.op("OneHot", idx, g.const(n_experts), g.const([0.0, 1.0], np.float32), axis=-1)  # [N, k, E]
    selected = g.op("ReduceSum", one_hot, g.const([1]), keepdims=0)
    dense = g.op("ReduceSum", g.op("Mul", one_hot, g.op("Unsqueeze", weights, g.const([-1]))), g.const([1]),
                 keepdims=0)
    return selected, dense


def qmoe_scheme(spec: ModelSpec, w: dict, prefix: str, experts: range | None = None) -> tuple[int, int] | None:
    """(bits, block) when the routed experts (all, or ``experts``) are quantized alike in a layout
    ``com.microsoft::QMoE`` runs on its fast CPU kernels: symmetric, 4 or 8 bits, even widths, and scale
    groups that a power-of-two block of at least 16 tiles exactly (see ``qmoe_block``). One scale per row
    (per channel) is tiled the same way, its scale repeated over every block of the row: the kernel's own
    per-row path (block 0) dequantizes to fp32 and runs SGEMM, 4–12× slower for one token on ds3bench's
    experts (`benchmarks/quantized_ops_bench.py`). 8-bit block-wise experts run with int8 activations in the
    kernel at every level, so they take QMoE only at accuracy level 4 (a lower level keeps per-expert
    MatMulNBits when grouped, and the exact per-row path when per channel)."""
    experts = range(spec.moe.n_routed_experts) if experts is None else experts
    kinds = [w[f"{prefix}experts.{e}.{k}.weight"] for e in experts for k in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(q, QuantizedWeight) and q.zero_point is None for q in kinds):
        return None
    layouts = {(q.bits, q.group_size, q.accuracy_level) for q in kinds}
    if len(layouts) != 1:
        return None
    bits, group, level = layouts.pop()
    widths = (spec.hidden_size, spec.moe.moe_intermediate_size)
    if bits not in (4, 8) or any(d % 2 for d in widths):
        return None
    int8_activations_allowed = bits == 4 or level == FAST_LEVEL
    if group is None:
        block = qmoe_block(QMOE_MAX_BLOCK, widths)
        return (bits, block) if block is not None and int8_activations_allowed else (bits, 0)
    block = qmoe_block(group, widths)
    if block is None or not int8_activations_allowed:
        return None
    return bits, block


# The fast kernels take blocks of 16–256; a block of 512 falls back to dequantize + SGEMM (measured: 10–20×
# slower for one token on ds3bench's experts). 128 runs as fast as 256 and quantizes activations in smaller
# blocks (int8 activations at level 4), so a group wider than 128 is tiled by blocks of 128, its scale repeated.
QMOE_MAX_BLOCK = 128


def qmoe_block(group: int, widths: tuple[int, ...]) -> int | None:
    """The QMoE block for ``group``-wide scale groups: the largest power of two (≥ 16, ≤ QMOE_MAX_BLOCK) that
    divides the group and every input width, the group's scale repeated over its blocks (exact). A partial
    last group (a width the group does not divide) is tiled too when such a block exists; without one (or with
    blocks that do not divide the widths) the kernel would fall back to dequantize + SGEMM, an order of
    magnitude slower than per-expert MatMulNBits, so there is no QMoE then."""
    common = math.gcd(group, *widths)
    block = min(common & -common, QMOE_MAX_BLOCK)  # largest power of two dividing all of them
    return block if block >= MIN_BLOCK else None


def qmoe_experts(g: GraphBuilder, spec: ModelSpec, w: dict, prefix: str, flat: str, idx: str, weights: str,
                 layout: tuple[int, int], experts: range | None = None) -> str:
    """The routed experts of a layer (all, or a partition's ``experts``) as one ``com.microsoft::QMoE``.

    The op picks top-k from ``router_probs`` and weights outputs by ``router_weights`` when given; both get
    DeepSeek's aggregation weights scattered over the experts (0 elsewhere, V2's unnormalised weights
    included), so the op's top-k holds exactly the experts our exact router chose — every other expert has
    weight 0, and the kernel skips routes of weight ≤ 1e-8. For a partition the columns are its experts and
    k is capped at their number: a row's experts elsewhere simply do not appear, and the slots they leave
    pick weight-0 experts that are skipped. Gate and up rows are interleaved (swiglu_fusion=1, the CPU
    kernel's layout); SwiGLU with alpha 1, beta 0 is silu(g)·u. 3.3× faster than per-expert MatMulNBits
    dispatch for one token on ds3bench shapes, 2.5× for 8 tokens (`benchmarks/quantized_ops_bench.py`).
    """
    moe = spec.moe
    experts = range(moe.n_routed_experts) if experts is None else experts
    dense = g.to_act(scattered_weights(g, moe.n_routed_experts, idx, weights, experts))
    return _qmoe_node(g, w, prefix, flat, dense, dense, layout, experts, k=min(moe.num_experts_per_tok, len(experts)),
                      normalize=False, fc2_factor=1.0)


def qmoe_layer(g: GraphBuilder, spec: ModelSpec, w: dict, prefix: str, flat: str, scores: str, choice: str,
               layout: tuple[int, int]) -> str:
    """A whole layer's routed experts as one QMoE that also selects them and computes DeepSeek's weights.

    ``router_probs`` is what our top-k would select on (``choice``: biased for noaux_tc, −inf outside the kept
    groups), so the op's own top-k makes DeepSeek's choice; ``router_weights`` are the unbiased scores [N, E],
    which the op gathers at those experts and, with normalize_routing_weights, divides by their sum — the
    reference's renormalisation; routed_scaling_factor is folded into the down projection's scales (fp32
    graphs). Replaces the TopK, the weight chain and a scatter: 5 nodes per layer fewer than handing the op
    our own top-k. The op's top-k and ONNX TopK can differ only on exactly equal scores (the reference's
    torch.topk does not fix that order either). In half precision the scores would be rounded to fp16 before
    the op's top-k, which makes near-ties real ties and can change the choice, so there our fp32 top-k is
    scattered over −inf instead (only the k chosen are finite: any tie-breaking keeps them) and the scale is one
    Mul after the op, so the scales are not rounded twice.
    """
    moe = spec.moe
    experts = range(moe.n_routed_experts)
    probs = choice
    if g.half:
        values, idx = g.op("TopK", choice, g.const([moe.num_experts_per_tok]), outputs=2, axis=-1)
        floor = g.op("ConstantOfShape", g.op("Shape", scores),
                     value=helper.make_tensor("floor", TensorProto.FLOAT, [1], [NEG_INF]))
        probs = g.op("ScatterElements", floor, idx, values, axis=1)
    scale = moe.routed_scaling_factor
    out = _qmoe_node(g, w, prefix, flat, g.to_act(probs), g.to_act(scores), layout, experts,
                     k=moe.num_experts_per_tok, normalize=_normalized(moe), fc2_factor=1.0 if g.half else scale)
    if g.half and scale != 1.0:
        out = g.op("Mul", out, g.const(np.array(scale, np.float16), np.float16))
    return out


def _qmoe_node(g: GraphBuilder, w: dict, prefix: str, flat: str, probs: str, weights: str, layout: tuple[int, int],
               experts: range, *, k: int, normalize: bool, fc2_factor: float) -> str:
    """One QMoE over ``experts``' stored codes (gate/up rows interleaved: swiglu_fusion=1, the CPU kernel's
    layout; SwiGLU with alpha 1, beta 0 is silu(g)·u)."""
    bits, block = layout  # from qmoe_scheme
    fc1, fc1_scales, fc2, fc2_scales = _qmoe_weights(w, prefix, experts, block)
    if fc2_factor != 1.0:
        fc2_scales = fc2_scales * np.float32(fc2_factor)
    level = w[f"{prefix}experts.{experts[0]}.down_proj.weight"].accuracy_level
    tag = f"{prefix}experts"  # one QMoE per layer in a graph (a partition's graph holds only its experts)
    fc1_in = (g._initializer(tag + ".fc1.qweight", fc1), g.weight(tag + ".fc1.scales", fc1_scales), None)
    fc2_in = (g._initializer(tag + ".fc2.qweight", fc2), g.weight(tag + ".fc2.scales", fc2_scales), None)
    return g.op("QMoE", flat, probs, *fc1_in, *fc2_in, None, None, None, None, None, None, weights, domain=MS_DOMAIN,
                k=k, activation_type="swiglu", swiglu_fusion=1, expert_weight_bits=bits,
                normalize_routing_weights=int(normalize), activation_alpha=1.0, activation_beta=0.0,
                accuracy_level=level, **({"block_size": block} if block else {}))


def scattered_weights(g: GraphBuilder, n_experts: int, idx: str, weights: str, experts: range) -> str:
    """[N, k] choices → fp32 [N, len(experts)]: each chosen expert's weight in its column, 0 elsewhere
    (one ScatterElements over zeros; a partition then keeps its own columns)."""
    rows = g.shape_dim(idx, 0)
    zeros = g.op("ConstantOfShape", g.op("Concat", rows, g.const([n_experts]), axis=0),
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    dense = g.op("ScatterElements", zeros, idx, weights, axis=1)
    if len(experts) == n_experts:
        return dense
    return g.op("Slice", dense, g.const([experts[0]]), g.const([experts[-1] + 1]), g.const([1]))


def _qmoe_weights(w: dict, prefix: str, experts: range, block: int) -> tuple[np.ndarray, ...]:
    """Stacked [E, 2I, H·b/8] interleaved gate/up codes, [E, H, I·b/8] down codes, and their scales
    ([E, rows, blocks] with each group's scale repeated over its blocks; per-channel: [E, rows])."""
    fc1, fc1_scales, fc2, fc2_scales = [], [], [], []
    for e in experts:
        p = f"{prefix}experts.{e}."
        (gate, gate_s), (up, up_s), (down, down_s) = (_qmoe_rows(w[p + k + ".weight"], block)
                                                      for k in ("gate_proj", "up_proj", "down_proj"))
        fc1.append(np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], -1))  # rows g0, u0, g1, u1, …
        fc1_scales.append(np.stack([gate_s, up_s], axis=1).reshape(2 * gate.shape[0], -1))
        fc2.append(down)
        fc2_scales.append(down_s)
    stack = (lambda arrays: np.stack(arrays)[..., 0]) if not block else np.stack  # per-channel: [E, N]
    return np.stack(fc1), stack(fc1_scales), np.stack(fc2), stack(fc2_scales)


def _qmoe_rows(weight: QuantizedWeight, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes and [N, K/block] scales: group g's scale on every block it covers."""
    codes, scales = packed_rows(weight)
    if block and weight.group != block:  # per channel: one group spanning the row, repeated over its blocks
        starts = np.arange(0, weight.shape[1], block)
        scales = scales[:, starts // weight.group]
    return codes, np.ascontiguousarray(scales)


def routed_experts(g: GraphBuilder, spec: ModelSpec, w: dict, prefix: str, flat: str, idx: str, weights: str,
                   experts: range) -> str:
    """A partition's (or a layer's) routed experts: one QMoE when their layout allows it, else dispatch."""
    layout = qmoe_scheme(spec, w, prefix, experts)
    if layout is not None:
        return qmoe_experts(g, spec, w, prefix, flat, idx, weights, layout, experts)
    return dispatch_experts(g, spec.moe, w, prefix, flat, idx, weights, experts)


def dispatch_experts(g: GraphBuilder, moe: MoESpec, w: dict[str, np.ndarray], prefix: str, flat: str, idx: str,
                     weights: str, experts: range) -> str:
    """Σ over the chosen experts among ``experts`` of weight · expert(x), each on its routed rows only."""
    selected, dense = dense_routing_weights(g, moe.n_routed_experts, idx, weights)
    acc = g.op("Mul", g.to_float(flat), g.const(0.0, np.float32))  # zeros [N, H]; sums in fp32
    for e in experts:
        p = f"{prefix}experts.{e}."
        rows = g.op("Reshape", g.op("NonZero", g.op("Gather", selected, g.const(e), axis=1)), g.const([-1]))
        x_e = g.op("Gather", flat, rows, axis=0)  # [n_e, H]
        y_e = g.swiglu_mlp(x_e, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])
        w_e = g.op("Gather", g.op("Gather", dense, g.const(e), axis=1), rows, axis=0)  # [n_e]
        y_e = g.op("Mul", g.to_float(y_e), g.op("Unsqueeze", w_e, g.const([-1])))
        acc = g.op("ScatterND", acc, g.op("Unsqueeze", rows, g.const([-1])), y_e, reduction="add")
    return g.to_act(acc)


def _dense_experts(g: GraphBuilder, moe: MoESpec, w: dict[str, np.ndarray], prefix: str, flat: str, idx: str,
                   weights: str, experts: range) -> str:
    _, dense = dense_routing_weights(g, moe.n_routed_experts, idx, weights)
    acc = g.op("Mul", g.to_float(flat), g.const(0.0, np.float32))
    for e in experts:
        p = f"{prefix}experts.{e}."
        y = g.swiglu_mlp(flat, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], p[:-1])
        acc = g.op("Add", acc, g.op("Mul", g.to_float(y), g.op("Gather", dense, g.const([e]), axis=1)))
    return g.to_act(acc)


MOE_OP_SPLIT = 2  # sub-experts per float expert in com.microsoft::MoE (see _moe_op_experts)


def _moe_op_experts(g: GraphBuilder, moe: MoESpec, w: dict[str, np.ndarray], prefix: str, flat: str, idx: str,
                    weights: str) -> str:
    """onnxruntime's ``com.microsoft::MoE`` fed so that it reproduces DeepSeek's routing.

    The op softmaxes ``router_probs`` and takes its top-k. We pass log(weight) for the experts our exact
    router chose and −inf elsewhere, so it picks the same experts and, with normalize_routing_weights=1,
    weights w/Σw — DeepSeek's weights when ``norm_topk_prob`` (V3/R1); routed_scaling_factor is folded into
    fc2. V2's unnormalised weights cannot be expressed this way (the float op has no ``router_weights``).
    The CPU kernel needs fc1 as interleaved gate/up rows [E, 2I, H] (swiglu_fusion=1).

    Each expert is stored as ``MOE_OP_SPLIT`` sub-experts, each a slice of its intermediate units (a SwiGLU
    MLP is the sum of its slices' outputs), slice s of expert e at slot s·E + e, the log-weights repeated per
    slice block and k multiplied alike. Why: the CPU kernel splits the expert slots into contiguous ranges,
    one per thread, and runs each expert's GEMMs on one thread (contrib_ops/cpu/moe/moe_cpu.cc,
    ``PartitionWork`` over experts); whole experts left 4 chosen ones split 2–2, 3–1 or 4–0 over 2 threads,
    the slices split evenly: 1081 → 942 µs a ds3bench-shaped layer at decode (benchmarks/moe_split_probe.py,
    benchmarks/README.md session 14). Normalising over the k·S chosen slices halves each weight, so fc2
    carries the factor S (exact).
    """
    if not moe.norm_topk_prob:
        raise ValueError("the MoE-op path reproduces DeepSeek routing only with norm_topk_prob")
    selected, dense = dense_routing_weights(g, moe.n_routed_experts, idx, weights)
    probs = g.to_act(g.op("Where", g.op("Cast", selected, to=9), g.op("Log", dense),
                          g.const(float("-inf"), np.float32)))
    width = w[f"{prefix}experts.0.gate_proj.weight"].shape[0]
    split = MOE_OP_SPLIT if width % MOE_OP_SPLIT == 0 else 1  # equal slices only
    probs = g.op("Concat", *[probs] * split, axis=1)  # [N, S·E]: slot s·E + e is slice s of expert e
    fc1, fc2 = [], []
    for part in range(split):
        for e in range(moe.n_routed_experts):
            p = f"{prefix}experts.{e}."
            gate, up, down = (w[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            units = slice(part * width // split, (part + 1) * width // split)
            fc1.append(np.stack([gate[units], up[units]], axis=1).reshape(-1, gate.shape[1]))  # rows g0, u0, g1, …
            fc2.append(down[:, units] * np.float32(moe.routed_scaling_factor) * np.float32(split))
    return g.op("MoE", flat, probs, g.weight(prefix + "experts.fc1", np.stack(fc1).astype(np.float32)), None,
                g.weight(prefix + "experts.fc2", np.stack(fc2).astype(np.float32)), domain=MS_DOMAIN,
                k=moe.num_experts_per_tok * split, activation_type="swiglu", swiglu_fusion=1,
                normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)
