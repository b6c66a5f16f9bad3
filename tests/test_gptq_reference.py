"""dsedge's GPTQ against the paper's algorithm written out plainly, on correlated inputs.

The reference below is Algorithm 1 of Frantar et al. 2022 (arXiv:2210.17323) without the lazy-batch
trick: columns one at a time, each column's scaled error ``(w - q) / [H⁻¹]_cc`` pushed into every later
column through the row ``c`` of the upper Cholesky factor of ``H⁻¹`` (damped by ``λ = damp · mean diag``);
a group's scale is computed from the weights as they stand when its first column is reached (with
act-order: "static groups", scales from the original weights, columns visited by decreasing ``H_cc``).
dsedge's blocked implementation must give the same integers and the same Hessian-weighted error, and
GPTQ's error ``tr((W-Q) H (W-Q)ᵀ)`` must be well below round-to-nearest's when inputs are correlated.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsedge.compress.quant import quantize_gptq, quantize_rtn
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import dequantize

DAMP = 0.01


def correlated_fixture(out: int, cols: int, samples: int = 2048, seed: int = 0):
    """Weights with per-channel magnitude spread, and inputs ``x = z A`` whose features are strongly
    correlated (a low-rank mixture plus a little independent noise), as hidden states are."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) * torch.linspace(0.5, 2.0, cols)
    mix = torch.randn(cols // 4, cols, generator=gen)
    x = torch.randn(samples, cols // 4, generator=gen) @ mix + 0.1 * torch.randn(samples, cols, generator=gen)
    x = x * torch.linspace(0.2, 3.0, cols)  # uneven feature scales: act-order has something to order
    return w, x.double().T @ x.double()


def hessian_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = w.double() - wq.double()
    return float(torch.einsum("oi,ij,oj->", d, h, d))


def paper_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None, act_order: bool = False):
    """(integers, per-column scales) of GPTQ by the paper's pseudocode, symmetric, float64 throughout."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, cols = w.shape
    g = group or cols
    W = w.double().clone()
    h = h.double()
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    hp = h[order][:, order]
    hp = hp + DAMP * hp.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)

    def scale_of(span):
        amax = span.abs().amax(1)
        s = amax / ((qmax - qmin) / 2)
        return torch.where(s > 0, s, torch.ones_like(s)).float().double()  # float32 scales, as stored below

    static = act_order or group is None
    scales = {k: scale_of(w.double()[:, k * g:(k + 1) * g]) for k in range(math.ceil(cols / g))} if static else {}
    Wp = W[:, order]
    q = torch.empty(out, cols, dtype=torch.int64)
    for j in range(cols):  # position j in processing order is column order[j]
        col = int(order[j])
        if not static and col % g == 0:
            scales[col // g] = scale_of(Wp[:, j:j + g])
        s = scales[col // g]
        qj = torch.round(Wp[:, j] / s).clamp(qmin, qmax)
        q[:, col] = qj.long()
        err = (Wp[:, j] - qj * s) / u[j, j]
        Wp[:, j:] -= err[:, None] * u[j, j:][None, :]
    per_column = torch.stack([scales[c // g] for c in range(cols)], 1)
    return q, per_column


CASES = [  # (out, cols, bits, group, act_order): groups inside a 128-column block, a partial last group,
    (48, 224, 4, 32, False),  # widths that are not multiples of 128 (the demo models' 224/480)
    (40, 200, 4, 128, False),
    (32, 160, 4, 48, False),
    (48, 224, 8, None, False),
    (48, 224, 4, 32, True),
    (32, 160, 4, None, True),
]


@pytest.mark.parametrize("out, cols, bits, group, act_order", CASES)
def test_gptq_equals_the_paper_algorithm(out, cols, bits, group, act_order):
    w, h = correlated_fixture(out, cols)
    scheme = QuantScheme(bits=bits, group_size=group, method="gptq", act_order=act_order, damp=DAMP)
    ours = quantize_gptq(w, h, scheme, scale_dtype=torch.float32)
    q_ref, s_ref = paper_gptq(w, h, bits, group, act_order)
    # Blocked float32 vs plain float64: a rounding tie may flip now and then, nothing more.
    agree = (ours.q.long() == q_ref).float().mean().item()
    assert agree > 0.995, f"only {agree:.2%} of the integers equal the reference's"
    ref_error = hessian_error(w, q_ref.double() * s_ref, h)
    assert hessian_error(w, dequantize(ours), h) == pytest.approx(ref_error, rel=0.01)


@pytest.mark.parametrize("group, act_order", [(32, False), (128, False), (32, True), (None, False)])
def test_gptq_beats_rtn_by_a_margin_on_correlated_inputs(group, act_order):
    w, h = correlated_fixture(64, 224, seed=1)
    scheme = QuantScheme(bits=4, group_size=group, method="gptq", act_order=act_order, damp=DAMP)
    rtn = hessian_error(w, dequantize(quantize_rtn(w, scheme, scale_dtype=torch.float32)), h)
    gptq = hessian_error(w, dequantize(quantize_gptq(w, h, scheme, scale_dtype=torch.float32)), h)
    assert gptq < 0.6 * rtn, f"GPTQ error {gptq:.4g} is not well below RTN's {rtn:.4g}"


def test_act_order_is_not_worse_than_natural_order():
    """Visiting the columns with the largest input energy first (static groups) lowers the error further."""
    w, h = correlated_fixture(64, 224, seed=2)
    errors = {}
    for act_order in (False, True):
        scheme = QuantScheme(bits=4, group_size=32, method="gptq", act_order=act_order, damp=DAMP)
        errors[act_order] = hessian_error(w, dequantize(quantize_gptq(w, h, scheme, scale_dtype=torch.float32)), h)
    assert errors[True] <= errors[False] * 1.02, errors
