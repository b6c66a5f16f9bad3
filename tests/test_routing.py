"""Routing pinned against an independent numpy transcription of DeepSeek's reference gates.

DeepSeek-V3 ``inference/model.py`` Gate and the V2 checkpoints' MoEGate are the truth; these tests pin
the points where simpler implementations differ (−inf group masking with negative biased scores,
bias used for selection only, V2's norm_topk_prob honoured, group score = max vs sum of top-2).
"""

import numpy as np
import onnxruntime as ort
import pytest

from dsedge.export.graph import FLOAT, GraphBuilder
from dsedge.export.moe import dispatch_experts, route
from dsedge.models.spec import MoESpec


def moe_spec(routing, *, experts=8, k=2, groups=4, topk_group=2, norm=False, scale=1.0):
    scoring = "sigmoid" if routing == "noaux_tc" else "softmax"
    return MoESpec(experts, 1, k, 6, routing, scoring, groups, topk_group, scale, norm, 0, 1)


def reference_gate(logits, moe, bias=None):
    """DeepSeek's gate, per token, in numpy float64."""
    out_idx, out_w = [], []
    for row in logits.astype(np.float64):
        if moe.scoring_func == "softmax":
            scores = np.exp(row - row.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-row))
        choice = scores + (bias if bias is not None else 0)
        if moe.routing != "greedy" and moe.n_group > 1:
            grouped = choice.reshape(moe.n_group, -1)
            if moe.routing == "group_limited_greedy":
                group_score = grouped.max(1)
            else:
                group_score = np.sort(grouped, 1)[:, -2:].sum(1)
            keep = np.argsort(-group_score, kind="stable")[: moe.topk_group]
            mask = np.full(moe.n_group, -np.inf)
            mask[keep] = 0
            choice = (grouped + mask[:, None]).reshape(-1)  # −inf, not 0.0
        idx = np.argsort(-choice, kind="stable")[: moe.num_experts_per_tok]
        w = scores[idx]  # unbiased
        if moe.norm_topk_prob:
            w = w / w.sum()
        out_idx.append(idx)
        out_w.append(w * moe.routed_scaling_factor)
    return np.array(out_idx), np.array(out_w)


def run_route(logits, moe, bias=None):
    g = GraphBuilder("route")
    x = g.input("logits", FLOAT, ["N", moe.n_routed_experts])
    idx, w = route(g, moe, x, bias, "gate.")
    g.output(idx, "idx", 7, ["N", moe.num_experts_per_tok])
    g.output(w, "w", FLOAT, ["N", moe.num_experts_per_tok])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"logits": logits.astype(np.float32)})


def assert_same_routing(got, want):
    (g_idx, g_w), (w_idx, w_w) = got, want
    for row in range(len(g_idx)):
        order_g, order_w = np.argsort(g_idx[row]), np.argsort(w_idx[row])
        assert list(g_idx[row][order_g]) == list(w_idx[row][order_w]), row
        np.testing.assert_allclose(g_w[row][order_g], w_w[row][order_w], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("moe", [
    moe_spec("greedy", groups=1, topk_group=1),
    moe_spec("group_limited_greedy", scale=16.0),
    moe_spec("group_limited_greedy", norm=True),  # V2's reference ignores the flag; we honour it
    moe_spec("noaux_tc", norm=True, scale=2.5, experts=16, k=4),
], ids=["v2-lite", "v2", "v2-renorm", "v3"])
def test_routing_matches_reference(moe):
    logits = np.random.default_rng(0).normal(size=(64, moe.n_routed_experts)) * 2
    bias = np.random.default_rng(1).normal(size=moe.n_routed_experts) * 0.5 if moe.routing == "noaux_tc" else None
    assert_same_routing(run_route(logits, moe, bias), reference_gate(logits, moe, bias))


def test_noaux_tc_masks_dropped_groups_with_minus_inf():
    """With negative biased scores, masking dropped groups with 0.0 (transformers 4.x) would pick an
    expert from a dropped group; −inf (DeepSeek's reference) never does."""
    moe = moe_spec("noaux_tc", experts=8, k=4, groups=4, topk_group=2, norm=True, scale=2.5)
    bias = np.array([-2.0, -2.0, -2.0, -2.0, 0.0, 0.0, -3.0, -3.0])  # groups 0 and 3 all negative after bias
    logits = np.array([[3.0, 2.5, 2.0, 1.8, 0.0, 0.1, -4.0, -4.0]])
    idx, w = run_route(logits, moe, bias)
    want_idx, want_w = reference_gate(logits, moe, bias)
    assert_same_routing((idx, w), (want_idx, want_w))
    kept_groups = {int(e) // 2 for e in idx[0]}
    assert len(kept_groups) <= 2  # all four experts come from the two kept groups
    np.testing.assert_allclose(w.sum(), 2.5, rtol=1e-6)  # renormalised unbiased weights × 2.5


def test_dispatch_handles_experts_with_no_tokens():
    moe = moe_spec("greedy", experts=6, k=1, groups=1, topk_group=1)
    rng = np.random.default_rng(0)
    weights = {f"e.experts.{e}.{n}.weight": rng.normal(size=s).astype(np.float32)
               for e in range(6) for n, s in (("gate_proj", (5, 3)), ("up_proj", (5, 3)), ("down_proj", (3, 5)))}
    g = GraphBuilder("dispatch")
    x = g.input("x", FLOAT, ["N", 3])
    logits = g.input("logits", FLOAT, ["N", 6])
    idx, w = route(g, moe, logits, None, "gate.")
    g.output(dispatch_experts(g, moe, weights, "e.", x, idx, w, range(6)), "y", FLOAT, ["N", 3])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    xs = rng.normal(size=(4, 3)).astype(np.float32)
    logit = np.full((4, 6), -5.0, np.float32)
    logit[:, 2] = 5.0  # every token goes to expert 2; the other five experts get none
    y = session.run(None, {"x": xs, "logits": logit})[0]
    p = np.exp(logit[0]) / np.exp(logit[0]).sum()
    gate, up, down = (weights[f"e.experts.2.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    h = xs @ gate.T
    want = p[2] * ((h / (1 + np.exp(-h))) * (xs @ up.T)) @ down.T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
