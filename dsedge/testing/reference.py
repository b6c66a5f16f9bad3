"""transformers as the reference: load a checkpoint with its own classes, in on-disk tensor names."""

from __future__ import annotations

import re
from pathlib import Path

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def load_reference_model(path: str | Path, dtype: str = "float32"):
    """transformers' own model class for a checkpoint (never remote code), in eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP layer is reported as "unexpected": that is expected
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                              trust_remote_code=False)
    return model.eval()


def on_disk_state_dict(model) -> dict:
    """The model's tensors under checkpoint names: transformers 5 fuses experts only in memory."""
    out = {}
    for name, tensor in model.state_dict().items():
        match = _FUSED.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix = match["prefix"]
        for j, expert in enumerate(tensor):
            if match["kind"] == "down_proj":
                out[f"{prefix}.{j}.down_proj.weight"] = expert
            else:  # gate rows then up rows
                gate, up = expert.chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.{j}.up_proj.weight"] = up
    return out
