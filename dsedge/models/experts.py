"""transformers 5 keeps a MoE layer's routed experts fused; checkpoints store them one by one.

``EXPERT_WEIGHT`` matches a per-expert checkpoint name; ``fuse_experts`` builds the fused tensors
(``experts.gate_up_proj [E, 2I, H]`` = gate rows then up rows, ``experts.down_proj [E, H, I]``). Shared by the
export's reference model and compress's per-layer modules (compress may not import export).
"""

from __future__ import annotations

import re

EXPERT_WEIGHT = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.experts)\.(?P<e>\d+)\."
                           r"(?P<kind>gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(state: dict) -> dict:
    """Per-expert tensors -> transformers 5's fused ``experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows)
    and ``experts.down_proj [E, H, I]``, consuming ``state`` expert by expert so that each per-expert tensor is
    freed as soon as it is copied (the fused copy and the per-expert originals never coexist in full)."""
    import torch  # optional heavy dependency: the reader lists and validates without torch

    out, experts = {}, {}
    for name in list(state):
        m = EXPERT_WEIGHT.match(name)
        if m:
            experts.setdefault(m["prefix"], {})[(int(m["e"]), m["kind"])] = state.pop(name)
        else:
            out[name] = state.pop(name)
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        inter, hidden = parts[(0, "gate_proj")].shape
        gate_up = torch.empty(count, 2 * inter, hidden, dtype=parts[(0, "gate_proj")].dtype)
        down = torch.empty(count, hidden, inter, dtype=gate_up.dtype)
        for e in range(count):  # popped as copied: the per-expert tensors are freed one by one
            gate_up[e, :inter], gate_up[e, inter:] = parts.pop((e, "gate_proj")), parts.pop((e, "up_proj"))
            down[e] = parts.pop((e, "down_proj"))
        out[prefix + ".gate_up_proj"], out[prefix + ".down_proj"] = gate_up, down
    return out
