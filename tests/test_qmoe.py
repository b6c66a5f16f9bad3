"""QMoE for block-wise int4/int8 experts, monolithic and per expert partition, against numpy and the reference.

The tiny fixtures' widths (72, 40) fit no QMoE block, so the end-to-end cases use a small checkpoint of the
ds3bench shape family (DeepSeek-V3, noaux_tc, widths on the 32-grid) built here through transformers.
"""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_routing import moe_spec, reference_gate

from dsedge.export.graph import FLOAT, GraphBuilder
from dsedge.export.moe import qmoe_block, qmoe_experts, qmoe_layer, qmoe_scheme, selection_finite, selection_scores
from dsedge.export.quantized import QuantizedWeight

# ds3bench's config (dsedge.testing.bench) scaled down: same routing and MLA structure, widths on the 32-grid.
SMALL_DS3 = {"hidden_size": 64, "intermediate_size": 96, "kv_lora_rank": 32, "moe_intermediate_size": 32,
             "n_group": 4, "n_routed_experts": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
             "num_experts_per_tok": 2, "topk_group": 2, "num_hidden_layers": 3, "q_lora_rank": 48,
             "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 256}
G32 = {"name": "g32", "method": "rtn", "rules": [{"match": "re:.*", "quant": {"bits": 4, "group_size": 32}}]}
# The bench int8 layout: every linear int8 per channel (QMoE tiles one scale per row into blocks).
INT8 = {"name": "int8", "method": "rtn", "rules": [{"match": "re:.*", "quant": {"bits": 8}}]}


@pytest.mark.parametrize(("group", "widths", "block"), [
    (32, (1024, 512), 32), (128, (1024, 512), 128), (64, (7168, 2048), 64),
    (32, (80, 48), 16),  # partial last group (80 = 2·32 + 16): blocks of 16 tile it
    (96, (192, 96), 32),  # a group that is no power of two: three blocks of 32 per group
    (32, (72, 40), None),  # the tiny fixtures: no block ≥ 16 divides them
    (512, (1024, 512), 128), (256, (7168, 2048), 128),  # wider groups: blocks of 128 (512 runs dequantize+SGEMM)
])
def test_qmoe_block_tiles_the_groups(group, widths, block):
    assert qmoe_block(group, widths) == block


def _weight(rng, bits, out, cols, group, level):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = -(-cols // (group or cols))
    return QuantizedWeight(rng.integers(lo, hi + 1, size=(out, cols)).astype(np.int8),
                           (rng.random((out, groups)) * 0.01 + 5e-3).astype(np.float32), None, bits, group, level)


class _Moe:
    n_routed_experts, num_experts_per_tok = 8, 3

    def __init__(self, inter):
        self.moe_intermediate_size = inter


class _Spec:
    def __init__(self, hidden, inter):
        self.hidden_size, self.moe = hidden, _Moe(inter)


def _experts(bits, hidden, inter, group, level=0, seed=0):
    rng = np.random.default_rng(seed)
    return {f"experts.{e}.{n}.weight": _weight(rng, bits, *shape, group, level) for e in range(8)
            for n, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                             ("down_proj", (hidden, inter)))}


def _reference(w, x, idx, wt, experts):
    out = np.zeros_like(x, dtype=np.float64)
    for r in range(len(x)):
        for e, weight in zip(idx[r], wt[r], strict=True):
            if e in experts:
                gate, up, down = (w[f"experts.{e}.{n}.weight"].dequantize().astype(np.float64)
                                  for n in ("gate_proj", "up_proj", "down_proj"))
                a = gate @ x[r]
                out[r] += weight * (down @ (a / (1 + np.exp(-a)) * (up @ x[r])))
    return out


def _run_qmoe(spec, w, experts, feeds):
    layout = qmoe_scheme(spec, w, "", experts)
    assert layout is not None
    g = GraphBuilder("qmoe")
    h, k = spec.hidden_size, spec.moe.num_experts_per_tok
    x, idx, wt = g.input("x", FLOAT, ["N", h]), g.input("idx", 7, ["N", k]), g.input("w", FLOAT, ["N", k])
    g.output(qmoe_experts(g, spec, w, "", x, idx, wt, layout, experts), "y", FLOAT, ["N", h])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize(("hidden", "inter", "group"), [(64, 32, 32), (128, 64, 64), (256, 128, 128), (80, 48, 32)],
                         ids=["g32", "g64", "g128", "g32-partial"])
def test_qmoe_matches_dequantized_experts_whole_and_per_partition(hidden, inter, group):
    spec, w = _Spec(hidden, inter), _experts(4, hidden, inter, group)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((6, hidden)).astype(np.float32),
             "idx": np.stack([rng.choice(8, 3, replace=False) for _ in range(6)]).astype(np.int64),
             "w": rng.random((6, 3)).astype(np.float32)}
    whole = _run_qmoe(spec, w, range(8), feeds)
    want = _reference(w, feeds["x"], feeds["idx"], feeds["w"], range(8))
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Partitions (one holding a single expert, so k is capped at 1) sum to the whole layer.
    parts = [range(0, 3), range(3, 7), range(7, 8)]
    total = sum(_run_qmoe(spec, w, part, feeds) for part in parts)
    np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for part in parts:
        np.testing.assert_allclose(_run_qmoe(spec, w, part, feeds),
                                   _reference(w, feeds["x"], feeds["idx"], feeds["w"], part),
                                   rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("moe", [
    moe_spec("greedy", groups=1, topk_group=1, k=3),
    moe_spec("group_limited_greedy", scale=16.0, k=3),  # V2: unnormalised weights × 16
    moe_spec("noaux_tc", norm=True, scale=2.5, k=3),
], ids=["v2-lite", "v2", "v3"])
def test_fused_layer_qmoe_reproduces_reference_routing(moe, half):
    """The monolithic QMoE makes DeepSeek's selection itself from the (biased, group-masked) scores and computes
    its weights (renormalisation in the op, routed_scaling_factor in the down projection's scales); in half
    precision it is handed our fp32 top-k instead. Checked on rows whose chosen and unchosen scores lie close."""
    moe = dataclasses.replace(moe, moe_intermediate_size=32)
    spec, w = _Spec(64, 32), _experts(4, 64, 32, 32)
    spec.moe = moe
    rng = np.random.default_rng(2)
    bias = (rng.standard_normal(8) * 0.3).astype(np.float32)
    g = GraphBuilder("layer", half=half)
    act = onnx.TensorProto.FLOAT16 if half else FLOAT
    x, logits = g.input("x", act, ["N", 64]), g.input("logits", FLOAT, ["N", 8])
    assert selection_finite(moe)
    scores, choice = selection_scores(g, moe, logits, bias if moe.routing == "noaux_tc" else None, "gate.")
    g.output(qmoe_layer(g, spec, w, "", x, scores, choice, qmoe_scheme(spec, w, "")), "y", act, ["N", 64])
    nodes = [n.op_type for n in g.model().graph.node]
    assert ("ScatterElements" in nodes) == half and ("TopK" in nodes) == (half or moe.n_group > 1)
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    logits = rng.standard_normal((64, 8)).astype(np.float32)
    logits[:32, 1] = logits[:32, 0] + 1e-3  # near-ties that fp16 scores could not tell apart
    feeds = {"x": rng.standard_normal((64, 64)).astype(np.float16 if half else np.float32), "logits": logits}
    idx, weights = reference_gate(feeds["logits"], moe, bias if moe.routing == "noaux_tc" else None)
    want = _reference(w, feeds["x"].astype(np.float32), idx, weights, range(8))
    tol = 3e-3 if half else 1e-4
    np.testing.assert_allclose(session.run(None, feeds)[0].astype(np.float32), want, rtol=tol,
                               atol=tol * np.abs(want).max())


def test_8bit_block_wise_experts_take_qmoe_only_at_level_4():
    """The kernel runs 8-bit block-wise experts with int8 activations at every level; level 0 means float."""
    spec = _Spec(64, 32)
    assert qmoe_scheme(spec, _experts(8, 64, 32, 32, level=0), "") is None
    assert qmoe_scheme(spec, _experts(8, 64, 32, 32, level=4), "") == (8, 32)
    assert qmoe_scheme(spec, _experts(8, 64, 32, None, level=0), "") == (8, 0)  # per-channel: float compute


def test_per_channel_experts_are_tiled_into_blocks():
    """One scale per row runs on the block kernels with the scale repeated (the per-row path dequantizes to
    fp32 and runs SGEMM); 8-bit only at level 4, 4-bit at any level; no block for widths off the 16-grid."""
    assert qmoe_scheme(_Spec(1024, 512), _experts(8, 1024, 512, None, level=4), "") == (8, 128)
    assert qmoe_scheme(_Spec(64, 32), _experts(8, 64, 32, None, level=4), "") == (8, 32)
    assert qmoe_scheme(_Spec(64, 32), _experts(4, 64, 32, None, level=0), "") == (4, 32)
    assert qmoe_scheme(_Spec(72, 40), _experts(8, 72, 40, None, level=4), "") == (8, 0)


@pytest.mark.parametrize(("bits", "level", "rtol"), [(4, 0, 1e-4), (8, 4, 3e-2)], ids=["int4-level0", "int8-level4"])
def test_per_channel_qmoe_matches_dequantized_experts(bits, level, rtol):
    """Exact weights (the repeated scale); at level 4 the kernel quantizes activations to int8 per block, the
    error MatMulNBits at level 4 has too."""
    spec, w = _Spec(256, 128), _experts(bits, 256, 128, None, level=level)
    assert qmoe_scheme(spec, w, "")[1] == 128
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((5, 256)).astype(np.float32),
             "idx": np.stack([rng.choice(8, 3, replace=False) for _ in range(5)]).astype(np.int64),
             "w": rng.random((5, 3)).astype(np.float32)}
    want = _reference(w, feeds["x"], feeds["idx"], feeds["w"], range(8))
    got = _run_qmoe(spec, w, range(8), feeds)
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()


@pytest.mark.parametrize("group", [None, 16, 32, 64, 128, 256, 512, 96])
@pytest.mark.parametrize("widths", [(1024, 512), (7168, 2048), (64, 32), (80, 48), (72, 40), (2048, 1408)])
def test_plan_mirrors_the_qmoe_block(group, widths):
    """planning.qmoe_layout (plan cannot import export) agrees with the block export writes."""
    from dsedge.planning import qmoe_layout

    hidden, inter = widths
    layout_only = QuantizedWeight(np.zeros((1, 1), np.int8), np.ones((1, 1), np.float32), None, 4, group, 4)
    w = {f"experts.{e}.{n}.weight": layout_only for e in range(8) for n in ("gate_proj", "up_proj", "down_proj")}
    scheme = qmoe_scheme(_Spec(hidden, inter), w, "")  # reads the layout, not the codes
    spec = _Spec(hidden, inter)
    spec.moe = dataclasses.replace(moe_spec("greedy", groups=1, topk_group=1, k=3), moe_intermediate_size=inter)
    assert qmoe_layout(spec, (4, group)) == (None if scheme is None else scheme[1])


def test_mixed_layouts_keep_dispatch():
    spec, w = _Spec(64, 32), _experts(4, 64, 32, 32)
    w["experts.5.up_proj.weight"] = _experts(4, 64, 32, 64)["experts.5.up_proj.weight"]
    assert qmoe_scheme(spec, w, "") is None
    assert qmoe_scheme(spec, w, "", range(0, 4)) == (4, 32)  # a partition without expert 5 still fuses


@pytest.fixture(scope="module")
def small_ds3(tmp_path_factory):
    """A DeepSeek-V3-shaped checkpoint compressed int4 g32 and int8 per channel (the bench layouts, head
    included): {recipe name: compressed checkpoint}."""
    import torch
    import transformers

    from dsedge.compress.pipeline import compress
    from dsedge.testing.bench import BENCH_CONFIGS, add_tokenizer
    from dsedge.testing.tokenizer import VOCAB_SIZE

    root = tmp_path_factory.mktemp("small-ds3")
    config = transformers.AutoConfig.for_model(**{**BENCH_CONFIGS["ds3bench"], **SMALL_DS3, "vocab_size": VOCAB_SIZE})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.01)
    model.to(torch.bfloat16).save_pretrained(root / "ckpt")
    add_tokenizer(root / "ckpt")
    for recipe in (G32, INT8):
        path = root / f"{recipe['name']}.json"
        path.write_text(json.dumps(recipe))
        compress(root / "ckpt", root / recipe["name"], recipe=path, calib_tokens=64, evaluate=False)
    return {name: root / name for name in ("g32", "int8")}



def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _qmoe_blocks(path):
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return [next((a.i for a in n.attribute if a.name == "block_size"), 0) for n in nodes if n.op_type == "QMoE"]


@pytest.mark.parametrize("layout", ["monolithic", "partitioned"])
@pytest.mark.parametrize(("recipe", "block"), [("g32", 32), ("int8", 32)])  # int8: widths 64/32 cap the block
def test_bench_layouts_run_qmoe_and_validate(layout, recipe, block, small_ds3, tmp_path):
    from dsedge.export.bundle import export_bundle

    report = export_bundle(small_ds3[recipe], tmp_path / "b", max_context=64, layout=layout,
                           experts_per_partition=3)
    assert all(c["passed"] for c in report.validation)  # validation's stated tolerances, unchanged
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    moe_layers = 2  # first_k_dense_replace = 1 of 3 layers
    assert {b for g in manifest["graphs"] for b in _qmoe_blocks(tmp_path / "b" / g["file"])} == {block}
    if layout == "monolithic":
        ops = _ops(tmp_path / "b" / manifest["graphs"][0]["file"])
        assert ops.count("QMoE") == moe_layers
    else:
        parts = [g for g in manifest["graphs"] if g["role"] == "experts"]
        assert len(parts) == moe_layers * 3  # experts [0, 3), [3, 6), [6, 8) per layer
        for part in parts:
            ops = _ops(tmp_path / "b" / part["file"])
            assert ops.count("QMoE") == 1 and "MatMulNBits" not in ops and "NonZero" not in ops
        fused = [g for g in manifest["graphs"] if g["role"] == "layer_experts"]  # each layer's experts, once
        assert [g["experts"] for g in fused] == [[0, 8]] * moe_layers
        assert all(_ops(tmp_path / "b" / g["file"]).count("QMoE") == 1 for g in fused)
        assert {f for p in parts for f in p["data_files"]} == {f for g in fused for f in g["data_files"]}
        assert any(c["name"] == "partitions.prefill" for c in report.validation)
