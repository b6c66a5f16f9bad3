"""One quantized ``[out, in]`` weight as the compressed-tensors format holds it, and its dequantization.

Conventions (compressed-tensors' ``calculate_qparams``/``quantize``, which :mod:`dsedge.compress.quant`
follows): stored integers are signed, ``q ∈ [-2^(b-1), 2^(b-1) - 1]``, and ``w ≈ (q - zero_point) · scale``
per group of ``group_size`` consecutive input columns (the last group may be shorter).

No torch import here: the type only holds tensors, and dequantization uses their methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsedge.quantformat.layout import packed_nbytes
from dsedge.quantformat.scheme import QuantScheme

if TYPE_CHECKING:
    import torch


@dataclass
class QuantizedTensor:
    """Integers, scales and zero points of one quantized ``[out, in]`` weight (compressed-tensors layout)."""

    q: torch.Tensor  # int8 [out, in], signed stored values
    scale: torch.Tensor  # float32 [out, n_groups], float16-representable values
    zero_point: torch.Tensor | None  # int8 [out, n_groups] if asymmetric, else None
    scheme: QuantScheme
    shape: tuple[int, int]

    @property
    def group_len(self) -> int:
        """Columns per group (the whole row for per-channel)."""
        return group_len(self.scheme, self.shape[1])

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def nbytes_packed(self) -> int:
        """Bytes on disk in the pack-quantized layout :func:`dsedge.quantformat.packing.pack` writes."""
        return packed_nbytes(self.scheme, self.shape)


def group_len(scheme: QuantScheme, in_features: int) -> int:
    return scheme.group_size or in_features


def qrange(bits: int) -> tuple[int, int]:
    """Signed range of ``bits``-bit integers, as compressed-tensors' ``calculate_range``."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """float32 ``[out, in]``: ``(q - zero_point) · scale`` per group."""
    cols = qt.shape[1]
    x = qt.q.float()
    if qt.zero_point is not None:
        x = x - _per_column(qt.zero_point.float(), qt.group_len, cols)
    return x * _per_column(qt.scale, qt.group_len, cols)


def _per_column(per_group: torch.Tensor, g: int, cols: int) -> torch.Tensor:
    return per_group.repeat_interleave(g, dim=1)[:, :cols]
