"""Weight-only quantized linears as onnxruntime's ``com.microsoft::MatMulNBits``, repacked, never re-quantized.

A compressed checkpoint (compressed-tensors ``pack-quantized``) stores signed integers q, per-group scales
and, when asymmetric, signed zero points; the weight is ``(q − z) · s``. MatMulNBits stores unsigned
codes u = q + 2^(b−1) with the same per-block scale and an unsigned zero point (default 2^(b−1), i.e. a
symmetric code), and computes ``(u − z_u) · s`` — the same numbers. So export only shifts and packs bits;
the stored integers pass through unchanged. Operator spec: onnxruntime docs/ContribOperators.md#MatMulNBits.

On CPU the fast kernels need ``accuracy_level=4`` (activations quantized to int8 per block inside the
kernel): for one 2048×2048 g32 product 2.3× faster than level 0 at int4 and ~110× at int8, whose level-0
kernel dequantizes the whole matrix (`benchmarks/quantized_ops_bench.py`), at under 2 % relative error per
matmul (tests/test_quantized_export.py). Level 0 computes in float and matches the dequantized reference to
float rounding; validation tolerances are stated per level in ``validate.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from dsedge.planning import per_channel_block

MIN_BLOCK = 16  # MatMulNBits: block_size is a power of two, at least 16
FAST_LEVEL = 4  # int8 activations: the fast CPU kernels
LEVELS = (0, 1, 2, 3, 4)
# An accuracy level for the whole export (int) or per weight bit width ({bits: level}, other widths: 4).
AccuracyLevel = int | Mapping[int, int]


def accuracy_level_for(bits: int, requested: AccuracyLevel) -> int:
    """The MatMulNBits level of a ``bits``-wide weight. A single level below 4 applies to 4-bit weights only:
    8-bit MatMulNBits below level 4 dequantizes the whole matrix on every call (0.2–0.3 GB/s; a bundle then
    decodes at ~4 tokens/s), so 8-bit weights get a lower level only when asked by bit width ({8: 0})."""
    if isinstance(requested, Mapping):
        return int(requested.get(bits, FAST_LEVEL))
    return FAST_LEVEL if bits == 8 and requested < FAST_LEVEL else int(requested)


def valid_accuracy_level(requested) -> bool:
    if isinstance(requested, Mapping):
        return all(isinstance(b, int) and v in LEVELS for b, v in requested.items())
    return requested in LEVELS


def effective_accuracy_level(requested: AccuracyLevel, bit_widths: Iterable[int]) -> int:
    """The loosest level any weight of these widths runs at (what validation's tolerance must allow)."""
    return max((accuracy_level_for(b, requested) for b in set(bit_widths)), default=FAST_LEVEL)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight-only quantized ``[out, in]`` matrix as the checkpoint stores it (numpy, signed codes)."""

    q: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # float32 [out, groups]
    zero_point: np.ndarray | None  # int8 [out, groups], None when symmetric
    bits: int
    group_size: int | None  # None = one scale per output channel
    accuracy_level: int = 4  # MatMulNBits compute precision: 0 = float, 4 = int8 activations (fast on CPU)

    @classmethod
    def from_tensor(cls, qt, accuracy_level: AccuracyLevel = FAST_LEVEL) -> QuantizedWeight:
        """From ``dsedge.quantformat.tensor.QuantizedTensor`` (torch), as ``Checkpoint.quantized`` returns it;
        the level per bit width as ``accuracy_level_for`` resolves it."""
        zero = None if qt.zero_point is None else qt.zero_point.numpy().astype(np.int8, copy=False)
        bits = int(qt.scheme.bits)  # the codes as they are (no copy: a vocabulary-sized head is 0.2 GB of them)
        return cls(qt.q.numpy().astype(np.int8, copy=False), qt.scale.float().numpy(), zero, bits,
                   qt.scheme.group_size, accuracy_level_for(bits, accuracy_level))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        return self.group_size or self.q.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 ``[out, in]``: what the reference model computes with."""
        cols = self.q.shape[1]
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q -= np.repeat(self.zero_point.astype(np.float32), self.group, axis=1)[:, :cols]
        return q * np.repeat(self.scale, self.group, axis=1)[:, :cols]

    def take_rows(self, index: np.ndarray) -> QuantizedWeight:
        """Output rows reordered or selected (RoPE de-interleaving, splits); codes are untouched."""
        zero = None if self.zero_point is None else self.zero_point[index]
        return replace(self, q=self.q[index], scale=self.scale[index], zero_point=zero)


def take_rows(weight, index: np.ndarray):
    """Row selection for float arrays and quantized weights alike."""
    return weight.take_rows(index) if isinstance(weight, QuantizedWeight) else weight[index]


def stack_rows(weights: list) -> np.ndarray | QuantizedWeight | None:
    """Matrices sharing an input as one [Σout, in] matrix (their outputs are then a Split of one product),
    or None when they are stored differently: float with quantized, or quantized with different bits,
    groups, zero-point presence or accuracy level (one MatMulNBits node has one of each)."""
    if all(isinstance(w, np.ndarray) for w in weights):
        return np.concatenate(weights, axis=0)
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        return None
    first = weights[0]
    if any((w.bits, w.group_size, w.zero_point is None, w.accuracy_level, w.shape[1])
           != (first.bits, first.group_size, first.zero_point is None, first.accuracy_level, first.shape[1])
           for w in weights):
        return None
    zero = None if first.zero_point is None else np.concatenate([w.zero_point for w in weights])
    return replace(first, q=np.concatenate([w.q for w in weights]), scale=np.concatenate([w.scale for w in weights]),
                   zero_point=zero)


def as_float(weight) -> np.ndarray:
    """A float view for the few places that need the matrix itself (absorbed MLA's kv_b per head)."""
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def absorbed_products_int8(kv_b, half: bool) -> bool:
    """Whether absorbed MLA's per-head products run as int8 (``head_matmul``): when kv_b is quantized, its
    compute precision lets activations be int8 (level 4) and the graph is fp32 (MatMulIntegerToFloat
    computes float32 only on CPU). At level 0 the products stay fp32, as that level asks of every quantized weight."""
    return isinstance(kv_b, QuantizedWeight) and products_int8_at(kv_b.accuracy_level, half)


MLA_PRODUCTS_INT8 = ("int8 per head and column (7-bit codes, +-63), uint8 activations per row "
                     "(MatMulIntegerToFloat)")  # what the manifest says; export.attention.HEAD_WEIGHT_LEVELS


def products_int8_at(accuracy_level: int, half: bool) -> bool:
    """The rule itself, for a quantized kv_b at ``accuracy_level`` (also what the manifest reports)."""
    return accuracy_level == FAST_LEVEL and not half


def int8_per_column(weight: np.ndarray, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes in [-levels, levels] of a batch of matrices ``weight`` [..., K, N] and one float32
    scale per matrix and output column [..., 1, N] (the reduction runs over K, so a column's scale factors out
    of its sums)."""
    peak = np.abs(weight).max(axis=-2, keepdims=True)
    scale = np.where(peak > 0, peak / levels, 1).astype(np.float32)  # an all-zero column: codes 0, any scale
    return np.clip(np.rint(weight / scale), -levels, levels).astype(np.int8), scale


def block_size(weight: QuantizedWeight) -> int:
    """MatMulNBits block for this weight: its group size, or a fixed block for per-channel scales."""
    if weight.group_size is None:  # the scale repeated over each block (exact): see planning.per_channel_block
        return per_channel_block(weight.shape[1])
    g = weight.group_size
    if g < MIN_BLOCK or g & (g - 1):
        raise ValueError(f"group size {g} cannot be expressed as a MatMulNBits block (a power of two >= 16)")
    return g


def matmul_nbits_arrays(weight: QuantizedWeight) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Initializers (B, scales, zero_points?) and attributes for one MatMulNBits node."""
    n, k = weight.shape
    block = block_size(weight)
    blocks = -(-k // block)
    scales, zeros = _block_params(weight, blocks)
    arrays = {"B": _packed_blocks(weight, blocks, block), "scales": np.ascontiguousarray(scales.reshape(-1))}
    if zeros is not None:
        arrays["zero_points"] = _pack_zero_points(zeros, weight.bits)
    return arrays, {"K": k, "N": n, "bits": weight.bits, "block_size": block}


ROWS_ELEMENTS = 1 << 22  # codes converted at once: the int16/uint8 temporaries of a whole LM head are GBs


def _packed_blocks(weight: QuantizedWeight, blocks: int, block: int) -> np.ndarray:
    """MatMulNBits' ``B`` [N, blocks, block·b/8], converted a block of rows at a time (rows are independent)."""
    n, k = weight.shape
    out = np.empty((n, blocks, block * weight.bits // 8), np.uint8)
    step = max(1, ROWS_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        codes = _padded(_unsigned(weight.q[start:start + step], weight.bits), blocks * block)
        out[start:start + step] = _pack(codes, weight.bits).reshape(-1, blocks, block * weight.bits // 8)
    return out


def packed_rows(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes packed along each row ([N, K·b/8], no block padding) and the [N, groups] scales:
    the per-expert layout of ``com.microsoft::QMoE`` (which requires K to be a multiple of the group)."""
    return _pack(_unsigned(weight.q, weight.bits), weight.bits), weight.scale.astype(np.float32)


def _block_params(weight: QuantizedWeight, blocks: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scales (and unsigned zero points); per-channel values repeat over the row's blocks."""
    scales = weight.scale if weight.group_size else np.repeat(weight.scale, blocks, axis=1)
    zeros = weight.zero_point
    if zeros is not None:
        zeros = zeros if weight.group_size else np.repeat(zeros, blocks, axis=1)
        zeros = _unsigned(zeros, weight.bits)
    return scales.astype(np.float32), zeros


def _unsigned(signed: np.ndarray, bits: int) -> np.ndarray:
    """Signed stored values → the operators' unsigned codes (+2^(b−1)), as uint8."""
    return (signed.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)


def _padded(codes: np.ndarray, cols: int) -> np.ndarray:
    """Pad the last partial block; padded columns meet no input (K is the true width), so any code works."""
    if codes.shape[1] == cols:
        return codes
    return np.pad(codes, ((0, 0), (0, cols - codes.shape[1])), constant_values=0)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes → bytes: 4-bit pairs with the even column in the low nibble (MatMulNBits' order)."""
    if bits == 8:
        return codes
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"MatMulNBits export supports 4 and 8 bits, not {bits}")


def _pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points: one byte each for 8 bits; two per byte per row (row padded to even) for 4 bits."""
    if bits == 4 and zeros.shape[1] % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)), constant_values=8)
    return np.ascontiguousarray(_pack(zeros, bits).reshape(-1))
