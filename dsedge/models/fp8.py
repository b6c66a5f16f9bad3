"""FP8 e4m3 block-scaled weights, as DeepSeek-V3/R1 ship them.

Each 2-D weight W [out, in] is stored as e4m3 values q plus ``weight_scale_inv`` s of shape
[ceil(out/B), ceil(in/B)] (B = 128 in the release), and W = q × s block-wise — multiplied, despite the
name (DeepSeek-V3 ``inference/kernel.py`` ``weight_dequant``). Edge blocks are partial: V3's
kv_a_proj_with_mqa is 576 × 7168 with a 5 × 56 scale grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dsedge.errors import CheckpointError

if TYPE_CHECKING:
    import torch


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale tensor for a weight of ``shape`` (partial edge blocks included)."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          *, where: str = "") -> torch.Tensor:
    """fp8 [O, I] × block scales → float32 [O, I], on the CPU."""
    if weight.dim() != 2:
        raise CheckpointError(f"FP8 weight must be 2-D, got shape {list(weight.shape)}", where=where)
    grid = scale_grid(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(grid)} for "
                              f"a {list(weight.shape)} weight in {block[0]}×{block[1]} blocks", where=where)
    rows, cols = weight.shape
    # Expand the grid to one scale per element, cropping the partial last blocks.
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    scale = scale.repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * scale
