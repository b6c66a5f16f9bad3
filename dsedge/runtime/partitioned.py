"""Engine for partitioned bundles: trunk graphs layer by layer, routed rows sent to expert partitions."""

from __future__ import annotations

import numpy as np

from dsedge.manifest import Manifest
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.engine import Engine
from dsedge.runtime.experts import ExpertCache
from dsedge.runtime.session import SessionConfig


class PartitionedEngine(Engine):
    layout = "partitioned"

    def __init__(self, manifest: Manifest, session_config: SessionConfig, memory_budget_bytes: int | None = None,
                 prefetch: bool = False):
        super().__init__(manifest, session_config)
        # Prefetch predicts a layer's partitions from the ones it used at the previous step: routing of
        # consecutive tokens is strongly correlated (the "temporal locality" MoE offloading systems use).
        self.prefetch = prefetch
        self.recent: dict[int, list[str]] = {}
        self.prelude = self.session(self.graph("prelude")[0])
        self.layer_sessions = [self.session(self.graph("layer", layer=i)[0]) for i in range(self.layers)]
        self.layer_outputs = [[o.name for o in s.get_outputs()] for s in self.layer_sessions]
        self.head = self.session(self.graph("head")[0])
        parts = {g["name"]: g for g in self.graph("experts")}
        self.partitions_by_layer: dict[int, list[dict]] = {}
        for part in parts.values():
            self.partitions_by_layer.setdefault(part["layer"], []).append(part)
        placement = manifest.data.get("placement", {}).get("partitions", {})
        resident = {n for n, where in placement.items() if where == "resident"}
        if memory_budget_bytes is not None and parts:
            # An explicit budget overrides the exported plan; keep room for one on-demand partition.
            largest = max(p["bytes"] for p in parts.values())
            resident = _fit(parts, resident, memory_budget_bytes - largest)
        self.experts = ExpertCache(parts, self.session, resident, memory_budget_bytes)

    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        hidden, cos, sin, allowed = self.prelude.run(["hidden", "cos", "sin", "allowed"], feeds)
        past = cache.past()
        outputs: dict[str, np.ndarray] = {}
        for i, (session, names) in enumerate(zip(self.layer_sessions, self.layer_outputs, strict=True)):
            if self.prefetch and i + 1 in self.recent:
                self.experts.prefetch(self.recent[i + 1])  # loads overlap this layer's compute
            layer_feeds = {"hidden": hidden, "cos": cos, "sin": sin, "allowed": allowed,
                           **{k: v for k, v in past.items() if k.startswith(f"past.{i}.")}}
            result = dict(zip(names, session.run(names, layer_feeds), strict=True))
            outputs.update({k: v for k, v in result.items() if k.startswith("present.")})
            hidden = result["residual"]
            if "expert_ids" in result:  # experts summed in fp32, added in the graph's precision
                hidden = (hidden + self._routed(i, result).reshape(hidden.shape)).astype(hidden.dtype)
        outputs["logits"] = self.head.run(["logits"], {"hidden": hidden})[0]
        return outputs

    def _routed(self, layer: int, result: dict[str, np.ndarray]) -> np.ndarray:
        """Sum of the partitions that hold at least one chosen expert; the others are never touched."""
        chosen = np.unique(result["expert_ids"])
        feeds = {k: result[k] for k in ("moe_input", "expert_ids", "expert_weights")}
        total = np.zeros(result["moe_input"].shape, np.float32)
        used = [p["name"] for p in self.partitions_by_layer.get(layer, [])
                if np.any((chosen >= p["experts"][0]) & (chosen < p["experts"][1]))]
        for name in used:
            total += self.experts.get(name).run(["routed"], feeds)[0]
        self.recent[layer] = used
        return total


def _fit(parts: dict[str, dict], preferred: set[str], budget: int) -> set[str]:
    """The exported resident set, trimmed (in name order) to what ``budget`` holds."""
    kept, used = set(), 0
    for name in sorted(preferred):
        if used + parts[name]["bytes"] <= budget:
            kept.add(name)
            used += parts[name]["bytes"]
    return kept
