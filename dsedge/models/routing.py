"""Measured routing: how often calibration text picked each routed expert, written by compress and read by
export to rank the expert partitions (the hottest stay resident under a memory budget).

``expert_frequencies.json`` in a compressed checkpoint: per MoE layer, each (kept) expert's share of that
layer's routed picks (top-k slots), from the calibration tokens. Shares are comparable across layers: every
MoE layer makes the same number of picks per token. Stdlib only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsedge.errors import CheckpointError

FREQUENCIES_FILE = "expert_frequencies.json"
SCHEMA_VERSION = 1


def shares(counts: list[int]) -> list[float]:
    """Each expert's share of the layer's picks (all zero when nothing was routed)."""
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def write_frequencies(directory: Path, layers: dict[int, list[int]], *, source: str, tokens: int) -> Path:
    """Write the routed-token counts per MoE layer (index = expert id in the written checkpoint)."""
    data = {"schema_version": SCHEMA_VERSION, "source": source, "calibration_tokens": tokens,
            "layers": {str(i): {"routed_tokens": counts, "share": [round(s, 6) for s in shares(counts)]}
                       for i, counts in sorted(layers.items())}}
    path = Path(directory) / FREQUENCIES_FILE
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def read_frequencies(directory: Path, moe_layers: list[int], n_experts: int) -> dict[int, list[float]] | None:
    """Per MoE layer, each expert's share of picks; None when the checkpoint carries no measurement."""
    path = Path(directory) / FREQUENCIES_FILE
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        layers = {int(k): [int(c) for c in v["routed_tokens"]] for k, v in data["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"unreadable routing measurements ({exc})", where=str(path),
                              hint=f"delete {FREQUENCIES_FILE} (placement then ranks experts uniformly) or "
                                   "compress the checkpoint again") from exc
    wrong = [i for i in moe_layers if len(layers.get(i, [])) != n_experts]
    if wrong or set(layers) - set(moe_layers):
        raise CheckpointError(f"routing measurements do not match the model's MoE layers ({n_experts} experts "
                              f"each; layer {wrong[0] if wrong else sorted(set(layers) - set(moe_layers))[0]})",
                              where=str(path), hint=f"{FREQUENCIES_FILE} belongs to another checkpoint; delete it "
                                                    "or compress again")
    return {i: shares(counts) for i, counts in layers.items()}
