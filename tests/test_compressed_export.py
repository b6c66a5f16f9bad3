"""Compressed checkpoints export as MatMulNBits over their stored integers and match the dequantized reference.

Measured on the fixtures (int8 and int4-g32, RTN, 24-token prompt): accuracy_level 0 → max |Δlogit| ≤ 2.4e-7
(float rounding: the operator dequantizes exactly what the reference dequantizes); accuracy_level 4 (int8
activations inside the kernel) → 0.43–0.87 % of the largest logit, top-1 agreement 0.96–1.0; validate.py
checks the mean KL divergence and top-1 agreement there (validate.TOLERANCES; docs/validation.md).
"""

import json

import numpy as np
import onnx
import pytest
from test_contract import assert_declared_io_matches_onnx

from dsedge.compress.pipeline import compress
from dsedge.export.bundle import export_bundle
from dsedge.models.checkpoint import Checkpoint
from dsedge.runtime import load_bundle
from dsedge.testing.tiny import VARIANTS


@pytest.fixture(scope="module")
def compressed(tiny_checkpoint, tmp_path_factory):
    built = {}

    def build(variant: str, recipe: str, method: str = "rtn", **kwargs):
        key = (variant, recipe, method, tuple(sorted(kwargs.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"{variant}-{recipe}-{method}") / "ckpt"
            compress(tiny_checkpoint(variant, **kwargs), out, recipe=recipe, method=method, calib_tokens=64,
                     evaluate=False)
            built[key] = out
        return built[key]

    return build


def _quantized_nodes(bundle) -> list[onnx.NodeProto]:
    nodes = []
    for path in sorted((bundle / "graphs").glob("*.onnx")):
        nodes += [n for n in onnx.load(str(path), load_external_data=False).graph.node
                  if n.op_type in ("MatMulNBits", "QMoE")]
    return nodes


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("recipe", "method"), [("int8", "rtn"), ("int4-g32", "gptq")])
def test_compressed_export_validates_exactly_at_accuracy_level_0(variant, recipe, method, compressed, tmp_path):
    ckpt = compressed(variant, recipe, method)
    # 8-bit weights reach level 0 only when named by bit width (a plain 0 keeps them at 4: see quantized.py)
    report = export_bundle(ckpt, tmp_path / "b", max_context=64, accuracy_level={4: 0, 8: 0})  # validates inside
    assert all(c["passed"] for c in report.validation)
    worst = max(c["max_abs_err"] for c in report.validation if c["max_abs_err"] is not None)
    assert worst <= 1e-4
    assert_declared_io_matches_onnx(tmp_path / "b")
    nodes = _quantized_nodes(tmp_path / "b")
    reader = Checkpoint(ckpt)
    stored = reader.quantization
    kv_b = [name for name in stored if name.endswith("kv_b_proj")]  # absorbed MLA: dequantized (see attention.py)
    # One QMoE node carries a layer's routed experts (gate, up, down each) when their layout allows it.
    experts = 3 * reader.spec.moe.n_routed_experts if reader.spec.moe else 0
    # Projections of one input share a node: q_a + kv_a (MLA), q + k + v (GQA), gate + up (SwiGLU MLPs).
    fused = {"qkv_a_proj": 2, "qkv_proj": 3, "gate_up_proj": 2}
    covered = sum(experts if n.op_type == "QMoE" else fused.get(n.input[1].split(".")[-2], 1) for n in nodes)
    assert covered == len(stored) - len(kv_b) and nodes
    bits = {int(a.i) for n in nodes for a in n.attribute if a.name in ("bits", "expert_weight_bits")}
    assert bits == {8 if recipe == "int8" else 4}
    # The fixture's widths (72, 40) are not multiples of 32: int4-g32 experts stay per-expert MatMulNBits.
    assert any(n.op_type == "QMoE" for n in nodes) == (recipe == "int8" and reader.spec.moe is not None)


def test_plain_accuracy_level_0_keeps_8bit_weights_at_4(compressed, tmp_path):
    """int8 MatMulNBits at level 0 dequantizes the whole matrix per call: only {8: 0} asks for it."""
    ckpt = compressed("qwen2", "int8")
    report = export_bundle(ckpt, tmp_path / "b", max_context=64, accuracy_level=0)
    assert all(c["passed"] for c in report.validation)
    levels = {int(a.i) for n in _quantized_nodes(tmp_path / "b") for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["validation"]["accuracy_level"] == 4  # validated at the tolerance of what runs


@pytest.mark.parametrize("layout", ["monolithic", "partitioned"])
def test_accuracy_level_4_stays_within_the_stated_tolerance(layout, compressed, tmp_path):
    ckpt = compressed("v3", "int4-experts", "rtn", fp8=True, mtp=True)
    report = export_bundle(ckpt, tmp_path / "b", max_context=64, layout=layout, experts_per_partition=2)
    checks = {c["name"]: c for c in report.validation}
    assert checks["prefill"]["passed"] and checks["prefill"]["max_abs_err"] > 1e-6  # activations really quantized
    assert "mean KL" in checks["prefill"]["detail"] and checks["batch2_left_padding"]["passed"]
    assert_declared_io_matches_onnx(tmp_path / "b")
    manifest = load_bundle(tmp_path / "b").manifest.data
    assert manifest["quantization"]["accuracy_level"] == 4
    assert set(manifest["quantization"]["modules_by_scheme"]) == {"int4-g128-sym", "int8-channel-sym"}


def test_stored_codes_reach_the_graph_unchanged(compressed, tmp_path):
    ckpt_path = compressed("qwen2", "int4-g32")
    export_bundle(ckpt_path, tmp_path / "b", max_context=32, validate=False)
    model = onnx.load(str(tmp_path / "b" / "graphs" / "decoder.onnx"), load_external_data=True)
    init = {i.name: i for i in model.graph.initializer}
    name = "model.layers.1.mlp.down_proj"
    packed = onnx.numpy_helper.to_array(init[name + ".qweight"])  # [N, blocks, 16]
    stored = Checkpoint(ckpt_path).quantized(name)
    n, k = stored.shape
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.int16) - 8
    np.testing.assert_array_equal(codes, stored.q.numpy())


def test_moe_op_path_refuses_quantized_experts(compressed, tmp_path):
    from dsedge.errors import UserError

    with pytest.raises(UserError, match="quantized"):
        export_bundle(compressed("v3", "int4-g32"), tmp_path / "b", expert_path="moe_op", validate=False)


def test_inspect_describes_a_compressed_checkpoint(compressed, tiny_checkpoint):
    from dsedge.inspection import inspect_checkpoint

    original = inspect_checkpoint(tiny_checkpoint("v3"))
    report = inspect_checkpoint(compressed("v3", "int4-g32"))
    assert report.params_on_disk == original.params_on_disk  # packed words count as the weights they hold
    assert sum(report.quantized_modules.values()) == len(Checkpoint(compressed("v3", "int4-g32")).quantization)
    assert set(report.quantized_modules) == {"int4-g32"} and not original.quantized_modules


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_absorbed_mla_products_are_int8_only_where_activations_may_be(variant, compressed, tmp_path):
    """Level 4 in an fp32 graph: w_uk and w_uv run as MatMulIntegerToFloat over int8 codes (attention.py's
    head_matmul); level 0 and fp16 graphs keep them float MatMul, and the manifest says which."""
    ckpt = compressed(variant, "int4-g32")
    layers = Checkpoint(ckpt).spec.num_hidden_layers
    for name, kwargs, int8 in [("l4", {}, True), ("l0", {"accuracy_level": {4: 0, 8: 0}}, False),
                               ("half", {"dtype": "fp16"}, False)]:
        report = export_bundle(ckpt, tmp_path / name, max_context=64, **kwargs)  # validates inside
        assert all(c["passed"] for c in report.validation)
        model = onnx.load(str(tmp_path / name / "graphs" / "decoder.onnx"), load_external_data=False)
        products = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
        assert len(products) == (2 * layers if int8 else 0)
        weights = {t.name: t for t in model.graph.initializer}
        assert {weights[n.input[1]].data_type for n in products} <= {onnx.TensorProto.INT8}
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert ("mla_products" in manifest["quantization"]) == int8
