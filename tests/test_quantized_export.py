"""MatMulNBits repacking: the ONNX node computes x · dequantize(W)ᵀ from the stored codes, bit for bit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from dsedge.export.attention import HEAD_WEIGHT_LEVELS, head_matmul
from dsedge.export.graph import FLOAT, GraphBuilder
from dsedge.export.quantized import QuantizedWeight, int8_per_column, matmul_nbits_arrays, take_rows


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


@pytest.mark.parametrize("int8", [False, True])
def test_head_matmul_multiplies_each_head_by_its_own_matrix(int8):
    """[B, H, T, K] @ [H, K, N]: exact in fp32; 7-bit codes per head and column times uint8 activations
    quantized per row err ~1.5% of the largest product here (0.8% with 8-bit codes), bounded at 2%.
    Each row's result depends on that row alone: the same row run alone, or with its batch-mates scaled
    1000×, gives the same bits in int8 (what a speculative verify needs to reproduce a decode step). A column of
    zeros stays zero (its scale is 1, not 0/127), and so does a row of zeros (its scale is 0)."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.02, (4, 24, 40)).astype(np.float32)
    weight[1, :, 7] = 0
    x = rng.standard_normal((2, 4, 3, 24)).astype(np.float32)
    x[1, 2, 0] = 0
    g = GraphBuilder("h")
    g.output(head_matmul(g, g.input("x", FLOAT, ["B", 4, "T", 24]), weight, "w", int8), "y", FLOAT,
             ["B", 4, "T", 40])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = session.run(["y"], {"x": x})[0], np.matmul(x, weight)
    assert np.abs(got - want).max() <= (0.02 if int8 else 1e-5) * np.abs(want).max()
    assert np.all(got[:, 1, :, 7] == 0) and np.all(got[1, 2, 0] == 0)
    louder = x.copy()
    louder[1] *= 1000
    louder[0, :, 1:] *= -1000
    alone, batched = session.run(["y"], {"x": x[:1, :, :1]})[0], session.run(["y"], {"x": louder})[0][:1, :, :1]
    if int8:
        np.testing.assert_array_equal(alone, batched)
    else:  # fp32 MatMul sums in an order that depends on the row count: equal to rounding, not in bits
        np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-7)
    codes, scale = int8_per_column(weight)
    assert codes.dtype == np.int8 and scale.shape == (4, 1, 40) and scale[1, 0, 7] == 1
    assert np.abs(int8_per_column(weight, HEAD_WEIGHT_LEVELS)[0]).max() == HEAD_WEIGHT_LEVELS == 63


def test_head_matmul_is_exact_on_its_codes_where_byte_pair_sums_peak():
    """Every weight at its column's peak and every activation at its row's extreme: the uint8 codes are 255 or
    1 and the weight codes ±63, so each byte pair of a uint8 × int8 kernel sums to 255·63·2 = 32130, just
    under int16's 32767. With 8-bit weight codes (±127) those pairs overflow on CPUs whose kernel multiplies
    pairs into int16 (vpmaddubsw, AVX2 without VNNI; measured 32% of the largest product off) — this checks the
    products equal the arithmetic on the codes themselves, whatever the CPU."""
    rng = np.random.default_rng(5)
    heads, k, n = 2, 64, 16
    weight = (np.sign(rng.standard_normal((heads, k, n))) * 0.02).astype(np.float32)
    x = np.sign(rng.standard_normal((1, heads, 3, k))).astype(np.float32)
    x[0, :, 0] = 1.0  # a row of one sign: codes all 255
    g = GraphBuilder("h")
    g.output(head_matmul(g, g.input("x", FLOAT, ["B", heads, "T", k]), weight, "w", True), "y", FLOAT,
             ["B", heads, "T", n])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["y"], {"x": x})[0]
    # activations ±1 are codes 128 ± 127 with scale 1/127; weights ±0.02 are ±63 with scale 0.02/63
    np.testing.assert_allclose(got, np.matmul(x, weight), rtol=1e-5, atol=1e-6)
