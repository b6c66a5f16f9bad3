"""Rotary position tables (default, YaRN, Llama-3) in numpy, for export and the runtime.

Frequencies follow the YaRN paper (arXiv 2309.00071) as DeepSeek-V2/V3 configure it and Meta's Llama-3.1
scaling; arithmetic is float32 throughout, as transformers' reference does it, so exported tables match the
reference's cos/sin to the last bit or two.
"""

from __future__ import annotations

import math

import numpy as np

from dsedge.models.spec import ModelSpec, yarn_mscale


def rope_dim(spec: ModelSpec) -> int:
    """Dimensions rotated per head: DeepSeek rotates only the rope part of q/k."""
    return spec.mla.qk_rope_head_dim if spec.mla is not None else spec.head_dim


def inv_freq(spec: ModelSpec) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (float32) and the factor cos/sin are multiplied by."""
    rope, dim = spec.rope, rope_dim(spec)
    base = _theta_powers(rope.theta, dim)
    if rope.type == "yarn":
        return _yarn(spec, base, dim)
    if rope.type == "llama3":
        return _llama3(spec, (1.0 / base).astype(np.float32)), 1.0
    if rope.type in ("linear",):
        return (1.0 / base / np.float32(rope.factor)).astype(np.float32), 1.0
    return (1.0 / base).astype(np.float32), 1.0


def _theta_powers(theta: float, dim: int) -> np.ndarray:
    """theta ** (2i/dim) in float32. With torch present (export time) we evaluate the very expression
    transformers uses, because float32 pow differs by an ulp between libraries and that ulp grows into
    ~2e-4 of cos/sin error by position 5000."""
    try:
        import torch  # optional: without torch the numpy expression below is used
    except ImportError:
        return (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    return (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)).numpy()


def _yarn(spec: ModelSpec, pos_freqs: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    rope = spec.rope
    factor = rope.factor
    original = rope.original_max_position or spec.max_position_embeddings
    if rope.mscale and rope.mscale_all_dim:
        attention = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = yarn_mscale(factor, 1.0)
    low, high = _yarn_correction_range(rope.beta_fast or 32, rope.beta_slow or 1, dim, rope.theta, original)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    freqs = (1.0 / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freqs.astype(np.float32), float(attention)


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original: int):
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), dim - 1)


def _llama3(spec: ModelSpec, freqs: np.ndarray) -> np.ndarray:
    rope = spec.rope
    factor, low, high = rope.factor, rope.low_freq_factor or 1.0, rope.high_freq_factor or 4.0
    original = rope.original_max_position or 8192
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > original / low, freqs / factor, freqs)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin_tables(spec: ModelSpec, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, dim/2] (float32), attention factor applied."""
    freqs, attention = inv_freq(spec)
    angles = np.arange(positions, dtype=np.float32)[:, None] * freqs[None, :]
    return ((np.cos(angles) * np.float32(attention)).astype(np.float32),
            (np.sin(angles) * np.float32(attention)).astype(np.float32))
