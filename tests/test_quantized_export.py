"""MatMulNBits repacking: the ONNX node computes x · dequantize(W)ᵀ from the stored codes, bit for bit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from dsedge.export.graph import FLOAT, GraphBuilder
from dsedge.export.quantized import QuantizedWeight, matmul_nbits_arrays, take_rows


def _random_weight(bits: int, out: int, cols: int, group: int | None, asym: bool, level: int = 0,
                   seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group is None else -(-cols // group)
    zero = rng.integers(lo, hi + 1, size=(out, groups)).astype(np.int8) if asym else None
    return QuantizedWeight(rng.integers(lo, hi + 1, size=(out, cols)).astype(np.int8),
                           (rng.random((out, groups)) * 0.01 + 1e-3).astype(np.float32), zero, bits, group, level)


def _run_linear(weight: QuantizedWeight, x: np.ndarray) -> np.ndarray:
    g = GraphBuilder("q")
    g.output(g.linear(g.input("x", FLOAT, ["N", weight.shape[1]]), weight, "w"), "y", FLOAT, ["N", weight.shape[0]])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(g.model().SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("asym", [False, True])
def test_matmul_nbits_matches_dequantized_weight(bits, group, asym):
    weight = _random_weight(bits, 36, 100, group, asym)  # 100 columns: a partial last block for every group
    x = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    want = x @ weight.dequantize().T
    got = _run_linear(weight, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_accuracy_level_4_stays_close(bits):
    """int8 activations inside the kernel: ~0.5% relative error on random data (measured), bounded at 2%."""
    weight = _random_weight(bits, 64, 224, 32, False, level=4)
    x = np.random.default_rng(2).standard_normal((3, 224)).astype(np.float32)
    want = x @ weight.dequantize().T
    assert np.abs(_run_linear(weight, x) - want).max() <= 0.02 * np.abs(want).max()


def test_codes_pass_through_unchanged():
    """Unpacking the node's B reproduces the stored signed codes: nothing is re-quantized."""
    weight = _random_weight(4, 8, 64, 32, False)
    arrays, attrs = matmul_nbits_arrays(weight)
    packed = arrays["B"].reshape(8, -1)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(8, -1).astype(np.int16) - 8
    assert attrs == {"K": 64, "N": 8, "bits": 4, "block_size": 32}
    np.testing.assert_array_equal(codes, weight.q)


def test_row_permutation_keeps_codes_and_scales_aligned():
    weight = _random_weight(4, 12, 40, 32, True)
    perm = np.random.default_rng(3).permutation(12)
    np.testing.assert_array_equal(take_rows(weight, perm).dequantize(), weight.dequantize()[perm])


def test_group_not_a_power_of_two_is_refused():
    weight = _random_weight(4, 4, 48, 48, False)
    with pytest.raises(ValueError, match="power of two"):
        matmul_nbits_arrays(weight)


@pytest.mark.parametrize("asym", [False, True], ids=["no-zero-points", "zero-points"])
def test_bias_is_the_kernels_own_input(asym):
    """A projection's bias (Qwen2's q/k/v) goes into MatMulNBits' input 5 (g_idx left empty), not an Add node."""
    weight = _random_weight(4, 36, 100, 32, asym)
    bias = np.random.default_rng(4).standard_normal(36).astype(np.float32)
    g = GraphBuilder("q")
    g.output(g.linear(g.input("x", FLOAT, ["N", 100]), weight, "w", bias), "y", FLOAT, ["N", 36])
    model = g.model()
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and node.input[4] == "" and node.input[5] == "w.bias"
    assert (node.input[3] != "") == asym
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    want = x @ weight.dequantize().T + bias
    assert np.abs(session.run(None, {"x": x})[0] - want).max() <= 1e-5 * np.abs(want).max()


def test_graph_outputs_are_named_at_their_producer():
    """A computed value becomes the output in place (no Identity kernel per step), also when a later node reads
    it; an input passed through, or one value bound to two outputs, still needs an Identity."""
    g = GraphBuilder("names")
    x = g.input("x", FLOAT, ["N", 4])
    doubled = g.op("Add", x, x)
    g.output(doubled, "first", FLOAT, ["N", 4])
    g.output(g.op("Mul", doubled, doubled), "square", FLOAT, ["N", 4])  # reads the renamed value
    g.output(doubled, "again", FLOAT, ["N", 4])
    g.output(x, "echo", FLOAT, ["N", 4])
    model = g.model()
    ops = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert ops == [("Add", ["x", "x"], ["first"]), ("Mul", ["first", "first"], ["square"]),
                   ("Identity", ["first"], ["again"]), ("Identity", ["x"], ["echo"])]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = np.arange(8, dtype=np.float32).reshape(2, 4)
    first, square, again, echo = session.run(["first", "square", "again", "echo"], {"x": feed})
    np.testing.assert_array_equal(first, 2 * feed)
    np.testing.assert_array_equal(square, 4 * feed * feed)
    np.testing.assert_array_equal(again, 2 * feed)
    np.testing.assert_array_equal(echo, feed)
