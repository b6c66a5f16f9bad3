"""The PyTorch reference for validation: transformers' own class, loaded with weights from our reader.

Loading through our reader (rather than ``from_pretrained``) gives the same reference for bf16 and FP8
checkpoints: FP8 blocks are dequantized exactly as the export sees them, and MTP tensors are skipped.
"""

from __future__ import annotations

import copy
import re

from dsedge.models.checkpoint import Checkpoint

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$")
_DROP_KEYS = ("quantization_config", "auto_map")


def reference_model(ckpt: Checkpoint):
    """transformers' model class for the checkpoint's config, weights from ``ckpt`` in float32, eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config_dict = {k: v for k, v in copy.deepcopy(ckpt.spec.config).items() if k not in _DROP_KEYS}
    config = transformers.AutoConfig.for_model(**config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True swaps our tensors in instead of copying them, so the reference costs one model, not two.
    result = model.load_state_dict(fuse_experts(ckpt.state_dict()), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"reference weights do not fit transformers' {type(model).__name__}: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def fuse_experts(state: dict) -> dict:
    """Per-expert checkpoint tensors → transformers 5's fused in-memory experts (gate rows, then up rows)."""
    import torch

    out, experts = {}, {}
    for name in list(state):
        tensor = state.pop(name)  # drop our reference as we go: per-expert tensors are freed once stacked
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m["prefix"], {})[(int(m["e"]), m["kind"])] = tensor
        else:
            out[name] = tensor
    for prefix in list(experts):
        parts = experts.pop(prefix)
        count = 1 + max(e for e, _ in parts)
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(count)])
        out[prefix + ".down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(count)])
        del parts
    return out
