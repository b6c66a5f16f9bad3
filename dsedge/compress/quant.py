"""Weight-only int4/int8 quantization: round-to-nearest (RTN) and GPTQ, with a partial last group.

Conventions follow compressed-tensors (vllm-project/compressed-tensors, ``calculate_qparams`` and
``quantize``), so the integers we compute are the integers its ``pack-quantized`` format stores:

* stored values are signed, ``q ∈ [-2^(b-1), 2^(b-1) - 1]``; ``w ≈ (q - zero_point) · scale``;
* symmetric: ``scale = amax / ((qmax - qmin) / 2)`` (amax/7.5 for int4, as GPTQ's reference quantizer
  also does: the most negative level is used, the most positive value clips by half a step);
* asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = round(qmin - min / scale)``,
  with 0 always inside [min, max] so that zero is exactly representable;
* ``n_groups = ceil(in / group_size)``; the last group may be shorter (see :mod:`dsedge.quantformat.layout`
  for how it is stored in a layout the library can decompress).

The stored format itself — :class:`~dsedge.quantformat.tensor.QuantizedTensor`, dequantization, packing —
is :mod:`dsedge.quantformat`; this module only chooses the integers.

Scales are rounded to the stored scale dtype (``scale_dtype``: float16 by default, bfloat16 for bfloat16
models, as vLLM and compressed-tensors keep scales in the model's dtype) *before* the integers are computed:
the stored integers are then exactly the ones that minimize error for the stored scales.

GPTQ is Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323), Algorithm 1, following the authors' reference code
(IST-DASLab/gptq, ``GPTQ.fasterquant``). We implement it ourselves because the library paths measured
in DESIGN.md §5 do not work for these models: neural-compressor 3.10 quantizes ``nn.Linear`` only
(transformers-5 fused experts stay fp32 silently) and its GPTQ crashes on MLA's 4-D ``kv_b_proj``
input; onnxruntime's ``MatMulNBitsQuantizer`` GPTQ writes RTN's weights (error propagation is lost to
an indexing bug). Our GPTQ works on one 2-D weight and a Hessian, so it applies to any linear —
attention, dense MLP, shared or routed expert — and tests show it beats RTN on held-out data.
"""

from __future__ import annotations

import logging
import math

import torch

from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import QuantizedTensor, group_len, qrange

__all__ = ["HessianAccumulator", "quantize", "quantize_gptq", "quantize_rtn", "sqnr_db"]

log = logging.getLogger(__name__)

GPTQ_BLOCK = 128  # columns per lazy-update block (the paper's B = 128)
DAMP_RETRIES = 4  # damp, 10·damp, 100·damp, 1000·damp; then RTN
SCALE_MIN = 2.0 ** -24  # smallest positive float16 (subnormal): scales are stored as float16
SCALE_MAX = 65504.0  # largest finite float16


# ----------------------------------------------------------------------------- RTN


def quantize(w: torch.Tensor, scheme: QuantScheme, hessian=None, *, name: str = "",
             scale_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """Dispatch on ``scheme.method``: GPTQ when asked for and a Hessian is given, else RTN.

    ``name`` (the module's) only labels GPTQ's log messages (fallbacks to RTN, extra damping);
    ``scale_dtype`` is the dtype the scales will be stored in (float16 or bfloat16).
    """
    if scheme.method == "gptq" and hessian is not None:
        return quantize_gptq(w, hessian, scheme, name=name, scale_dtype=scale_dtype)
    return quantize_rtn(w, scheme, scale_dtype=scale_dtype)


ROW_BLOCK_ELEMENTS = 1 << 22  # quantize_by_rows: weights quantized at once (16 MiB of float32)


def quantize_by_rows(w: torch.Tensor, scheme: QuantScheme, hessian=None, *, name: str = "",
                     scale_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """:func:`quantize` of a tall matrix (an LM head, an embedding: 151936 rows) a block of rows at a time.
    RTN and GPTQ treat rows independently (GPTQ's Hessian is over the inputs), so only one block's float
    temporaries exist at once; the result is the integers, scales and zero points of all blocks stacked."""
    rows = max(1, ROW_BLOCK_ELEMENTS // max(w.shape[1], 1))
    if w.shape[0] <= rows:
        return quantize(w, scheme, hessian, name=name, scale_dtype=scale_dtype)
    prepared = None
    if scheme.method == "gptq" and hessian is not None:
        # one factorisation for every block: H is [in, in] (V3's head: 7168², a minute of float64 each time)
        prepared = gptq_factor(hessian, scheme, _as_matrix(w).shape[1], name or f"{list(w.shape)} weight",
                               device=w.device)
        if prepared is None:
            hessian = None  # logged: RTN for every block
    if prepared is not None:
        u, perm = prepared
        return stack_rows([_gptq_columns(_as_matrix(w[start:start + rows]), u, scheme, perm, GPTQ_BLOCK, scale_dtype)
                           for start in range(0, w.shape[0], rows)])
    return stack_rows([quantize(w[start:start + rows], scheme, hessian, name=name, scale_dtype=scale_dtype)
                       for start in range(0, w.shape[0], rows)])


def stack_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Row blocks quantized with one scheme as one QuantizedTensor (integers, scales, zero points stacked)."""
    if len(parts) == 1:
        return parts[0]
    zero = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    return QuantizedTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero,
                           parts[0].scheme, shape)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype = torch.float16
                 ) -> QuantizedTensor:
    """Round-to-nearest with min/max scales per group (per output channel when ``group_size`` is None)."""
    w = _as_matrix(w)
    out, cols = w.shape
    g = group_len(scheme, cols)
    groups = _padded_groups(w, g)  # [out, n_groups, g]; zero padding cannot change a range that contains 0
    scale, zero = qparams(groups.amin(-1), groups.amax(-1), scheme, scale_dtype)
    q = _round(groups, scale[..., None], None if zero is None else zero[..., None], scheme.bits)
    q = q.reshape(out, -1)[:, :cols].contiguous()
    return QuantizedTensor(q, scale, zero, scheme, (out, cols))


def qparams(wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float16,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32, ``scale_dtype``-representable) and int8 zero point (asymmetric only) from ranges."""
    qmin, qmax = qrange(scheme.bits)
    wmin = wmin.float().clamp(max=0)
    wmax = wmax.float().clamp(min=0)
    half_range = (qmax - qmin) / 2
    scale = torch.maximum(-wmin, wmax) / half_range if scheme.symmetric else (wmax - wmin) / (qmax - qmin)
    # An all-zero group gets scale 1 (its integers are 0 anyway): never 0, never NaN downstream.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(SCALE_MIN, SCALE_MAX).to(scale_dtype).float()  # the float16 range fits bfloat16 too
    if scheme.symmetric:
        return scale, None
    zero = torch.round(qmin - wmin / scale).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    x = w / scale
    if zero is not None:
        x = x + zero.float()
    return torch.round(x).clamp(qmin, qmax).to(torch.int8)


def _padded_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    out, cols = w.shape
    n = math.ceil(cols / g)
    return torch.nn.functional.pad(w, (0, n * g - cols)).reshape(out, n, g)


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {list(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN/Inf values")
    return w


# ----------------------------------------------------------------------------- metrics


SQNR_CHUNK = 1 << 22  # elements upcast to float64 at once: a 151936 x 1536 head whole was 1.9 GB per copy


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` when identical), summed in float64 a chunk at a time."""
    reference, approx = reference.reshape(-1), approx.reshape(-1)
    return sqnr_db_of_blocks((reference[start:start + SQNR_CHUNK], approx[start:start + SQNR_CHUNK])
                             for start in range(0, reference.numel(), SQNR_CHUNK))


def sqnr_db_of_blocks(blocks) -> float:
    """:func:`sqnr_db` over ``(reference, approx)`` blocks of one weight, accumulated in float64."""
    noise = signal = 0.0
    for reference, approx in blocks:
        ref = reference.double()
        noise += (ref - approx.double()).pow(2).sum().item()
        signal += ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


# ----------------------------------------------------------------------------- Hessians


class HessianAccumulator:
    """Running ``H = Σ xᵀx`` over calibration inputs of one linear, with the number of rows seen.

    GPTQ needs H only up to a positive factor (damping is relative to its mean diagonal), so we keep the
    plain sum; float64 by default so a long calibration run does not lose small contributions.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, device=None):
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_samples = 0

    @property
    def in_features(self) -> int:
        return self.hessian.shape[0]

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` of shape ``[..., in]`` (every leading index is one sample)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.hessian.dtype)
        if x.shape[0]:
            self.hessian.addmm_(x.T, x)
            self.n_samples += x.shape[0]


# ----------------------------------------------------------------------------- GPTQ


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor | HessianAccumulator, scheme: QuantScheme, *,
                  block_size: int = GPTQ_BLOCK, name: str = "", scale_dtype: torch.dtype = torch.float16,
                  ) -> QuantizedTensor:
    """GPTQ (arXiv:2210.17323, Alg. 1): quantize column by column, folding each column's error into the
    columns not yet quantized through the Cholesky factor of ``H⁻¹``, with lazy block updates.

    ``hessian`` is ``Σ xᵀx`` (or any positive multiple) of the layer's inputs, ``[in, in]``, or a
    :class:`HessianAccumulator`. No samples, an all-zero or non-finite Hessian, or a Hessian that stays
    singular after raising the damping fall back to RTN (logged). Dead input columns (zero diagonal:
    the input feature was always 0, e.g. an expert no token was routed to) keep their RTN values —
    unlike the reference code, which zeroes them (DESIGN.md §5: an unrouted expert is never wiped).
    """
    w = _as_matrix(w)
    prepared = gptq_factor(hessian, scheme, w.shape[1], name or f"{list(w.shape)} weight", device=w.device)
    if prepared is None:
        return quantize_rtn(w, scheme, scale_dtype=scale_dtype)
    u, perm = prepared
    return _gptq_columns(w, u, scheme, perm, block_size, scale_dtype)


def gptq_factor(hessian: torch.Tensor | HessianAccumulator, scheme: QuantScheme, in_features: int, label: str,
                device=None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """GPTQ's per-Hessian work, shared by every row of the weight: the upper Cholesky factor of the damped
    ``H⁻¹`` and act-order's column permutation; None (logged) when GPTQ must fall back to RTN."""
    H, n_samples = (hessian.hessian, hessian.n_samples) if isinstance(hessian, HessianAccumulator) else (hessian, None)
    if H.shape != (in_features, in_features):
        raise ValueError(f"Hessian shape {list(H.shape)} does not match weight {label} with {in_features} inputs")
    H = H.detach().to(device=device, dtype=torch.float64).clone()
    if n_samples == 0 or not bool(H.diagonal().any()):
        log.info("%s: no calibration inputs, using RTN", label)
        return None
    if not bool(torch.isfinite(H).all()):
        log.warning("%s: Hessian has NaN/Inf values, falling back to RTN", label)
        return None
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # decouples the column: its error then propagates nowhere, so it stays RTN
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if scheme.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    u = _inverse_hessian_cholesky(H, scheme.damp, label)
    return None if u is None else (u, perm)


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, label: str) -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``), raising λ tenfold on failure."""
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(DAMP_RETRIES):
        lam = damp * 10 ** attempt * mean_diag
        chol, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    log.info("%s: Hessian needed damping %.3g", label, damp * 10 ** attempt)
                return u.float()
    log.warning("%s: Hessian is not positive definite even with damping %.3g; falling back to RTN",
                label, damp * 10 ** (DAMP_RETRIES - 1))
    return None


def _gptq_columns(w: torch.Tensor, u: torch.Tensor, scheme: QuantScheme, perm: torch.Tensor | None,
                  block_size: int, scale_dtype: torch.dtype) -> QuantizedTensor:
    out, cols = w.shape
    g = group_len(scheme, cols)
    # Groups whose scales are fixed before any update: per-channel (one group), and act-order, where we
    # use "static groups" (as AutoGPTQ's static_groups): scales from the original weights in the
    # original column order. Act-order then only changes the order errors are propagated in, and the
    # stored layout stays the standard contiguous-group one (no g_idx, which vLLM's pack-quantized
    # loader and ONNX MatMulNBits cannot take).
    static = scheme.group_size is None or perm is not None
    if static:
        fixed = quantize_rtn(w, scheme, scale_dtype=scale_dtype)
        scale, zero = fixed.scale.clone(), None if fixed.zero_point is None else fixed.zero_point.clone()
    else:
        n = math.ceil(cols / g)
        scale = torch.empty(out, n, device=w.device)
        zero = None if scheme.symmetric else torch.empty(out, n, dtype=torch.int8, device=w.device)
        # Blocks hold whole groups, so a group's scale is always computed on fully updated weights.
        block_size = g * max(1, block_size // g)
    order = perm if perm is not None else torch.arange(cols, device=w.device)
    order_list = order.tolist()  # one host copy, not a device sync per column
    W = w[:, order].clone()
    Q = torch.empty(out, cols, dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = order_list[i1 + i]
            grp = col // g
            if not static and col % g == 0:  # a group starts: its scale from the updated weights
                span = W1[:, i:i + g]
                s, z = qparams(span.amin(1), span.amax(1), scheme, scale_dtype)
                scale[:, grp] = s
                if zero is not None:
                    zero[:, grp] = z
            s = scale[:, grp]
            z = None if zero is None else zero[:, grp]
            q = _round(W1[:, i], s, z, scheme.bits)
            Q[:, i1 + i] = q
            deq = (q.float() - (0 if z is None else z.float())) * s
            err[:, i] = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]
        W[:, i2:] -= err @ u[i1:i2, i2:]  # the lazy batch update of the columns after the block
    q_orig = torch.empty_like(Q)
    q_orig[:, order] = Q
    return QuantizedTensor(q_orig, scale, zero, scheme, (out, cols))
