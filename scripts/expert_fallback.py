"""Which statistics should quantize a routed expert that calibration rarely routes to? A measurement.

On a trained MoE (default: the shipped deepseek-v3-tiny), for every routed expert of every MoE layer, quantize
its gate/up/down (int4 g128 by default) three ways — RTN; GPTQ with the Hessian of the calibration tokens
routed to it; GPTQ with the Hessian of *all* calibration tokens (each expert computed on every token) — and
measure the relative output error ‖y_q − y‖² / ‖y‖² of the expert on *held-out* tokens routed to it by the
original router. Calibration and held-out tokens are disjoint slices of the built-in calibration text.

    nice -n 10 .venv/bin/python scripts/expert_fallback.py [--model deepseek-v3-tiny] [--calib-tokens 8192]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def moe_inputs(model, ids):
    """Per MoE layer: (MoE input rows [T, H], top-k index [T, k]) of the original model on ``ids``."""
    captured = {}

    def hook(name):
        def record(module, args):
            captured.setdefault(name, []).append((args[0].detach().clone(), args[1].detach().clone()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None], use_cache=False)
    for h in handles:
        h.remove()
    return {n: (torch.cat([x for x, _ in v]), torch.cat([i for _, i in v])) for n, v in captured.items()}


def expert_error(gate_up, down, act, q_gate_up, q_down, x) -> float:
    from dsedge.compress.calibration import expert_forward

    _, want = expert_forward(gate_up, down, x, act)
    _, got = expert_forward(q_gate_up, q_down, x, act)
    return float((got - want).pow(2).sum() / want.pow(2).sum())


def quantize_expert(gate_up, down, act, x, scheme):
    """(gate_up, down) dequantized after GPTQ on inputs ``x`` (RTN when ``x`` is None)."""
    from dsedge.compress.calibration import expert_forward
    from dsedge.compress.quant import HessianAccumulator, quantize
    from dsedge.quantformat.tensor import dequantize

    if x is None:
        rtn = scheme.with_method("rtn")
        return dequantize(quantize(gate_up, rtn)), dequantize(quantize(down, rtn))
    h_in, h_down = HessianAccumulator(x.shape[1]), HessianAccumulator(down.shape[1])
    h_in.add(x)
    with torch.no_grad():
        h_down.add(expert_forward(gate_up, down, x, act)[0])
    return dequantize(quantize(gate_up, scheme, h_in)), dequantize(quantize(down, scheme, h_down))


def main() -> None:
    from dsedge.compress.calibration import load_calibration
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import load_reference_model
    from dsedge.quantformat.scheme import QuantScheme
    from dsedge.sources import resolve_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v3-tiny")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    ckpt = Checkpoint(resolve_checkpoint(args.model))
    calibset = load_calibration(ckpt.path / "tokenizer.json", None, calib_tokens=args.calib_tokens,
                                heldout_tokens=4096, seq_len=512)
    model = load_reference_model(ckpt.path)
    calib, heldout = moe_inputs(model, calibset.calib), moe_inputs(model, calibset.heldout)
    scheme = QuantScheme(bits=4, group_size=args.group_size, method="gptq")
    rows = []
    for name, (x, index) in calib.items():
        experts = dict(model.named_modules())[name]
        hx, hindex = heldout[name]
        for e in range(experts.gate_up_proj.shape[0]):
            w = (experts.gate_up_proj[e].detach(), experts.down_proj[e].detach())
            test = hx[(hindex == e).any(-1)]
            if len(test) == 0:
                continue
            routed = x[(index == e).any(-1)]
            errors = {}
            for label, inputs in (("rtn", None), ("gptq_routed", routed), ("gptq_all", x)):
                quantized = quantize_expert(*w, experts.act_fn, inputs, scheme)
                errors[label] = expert_error(*w, experts.act_fn, *quantized, test)
            rows.append({"layer": name, "expert": e, "routed": len(routed), "heldout": len(test), **errors})
    print(f"{'routed calibration tokens':>26} {'experts':>8} {'RTN':>8} {'GPTQ routed':>12} {'GPTQ all':>9}")
    for low, high in ((0, 16), (16, 64), (64, 256), (256, 10**9)):
        sel = [r for r in rows if low <= r["routed"] < high]
        if sel:
            med = {k: statistics.median(r[k] for r in sel) for k in ("rtn", "gptq_routed", "gptq_all")}
            print(f"{f'[{low}, {high})':>26} {len(sel):>8} {med['rtn']:>8.4f} {med['gptq_routed']:>12.4f} "
                  f"{med['gptq_all']:>9.4f}")
    print("(median relative output error of the expert on held-out tokens routed to it)")


if __name__ == "__main__":
    main()
