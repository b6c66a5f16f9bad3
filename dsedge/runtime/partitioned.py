"""Engine for partitioned bundles: trunk graphs layer by layer, routed rows sent to expert partitions."""

from __future__ import annotations

import logging

import numpy as np

from dsedge.contract import (
    EXPERT_IDS,
    EXPERTS,
    HEAD,
    HIDDEN,
    LAYER,
    MOE_INPUT,
    PRELUDE,
    RESIDUAL,
    ROUTED,
    present_name,
)
from dsedge.manifest import GraphEntry, Manifest
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.engine import Engine
from dsedge.runtime.experts import ExpertCache
from dsedge.runtime.session import SessionConfig

log = logging.getLogger(__name__)


class PartitionedEngine(Engine):
    layout = "partitioned"

    def __init__(self, manifest: Manifest, session_config: SessionConfig, memory_budget_bytes: int | None = None,
                 prefetch: bool = False):
        super().__init__(manifest, session_config)
        # Prefetch predicts a layer's partitions from the ones it used at the previous step: routing of
        # consecutive tokens is strongly correlated (the "temporal locality" MoE offloading systems use).
        self.prefetch = prefetch
        self.recent: dict[int, list[str]] = {}
        self.trace: list[np.ndarray] | None = None  # a list: each layer's output hidden state is appended
        self.prelude = self.session(self.graph(PRELUDE)[0])
        self.layer_sessions = [self.session(self.graph(LAYER, layer=i)[0]) for i in range(self.layers)]
        self.presents = [[present_name(i, t) for t in self.cache_layout["tensors"]] for i in range(self.layers)]
        self.head = self.session(self.graph(HEAD)[0])
        parts = {g.name: g for g in self.graph(EXPERTS)}
        self.partitions_by_layer: dict[int, list[GraphEntry]] = {}
        for part in parts.values():
            self.partitions_by_layer.setdefault(part.layer, []).append(part)
        resident = self._resident(memory_budget_bytes) if parts else []
        self.experts = ExpertCache(parts, self.session, resident, memory_budget_bytes)

    def _resident(self, budget: int | None) -> list[str]:
        """Export's resident set, or under an explicit budget the longest prefix of export's ranking (hottest
        first) that fits, leaving room for one on-demand partition."""
        placement = self.manifest.contract.placement
        if placement is None:
            log.warning("bundle has no placement ranking: no expert partition is kept resident")
            return []
        if budget is None:
            return placement.resident
        return placement.resident_within(budget - max(p.bytes for p in placement.ranking))

    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        values = {**feeds, **cache.past()}
        in_place = cache.in_place_outputs()
        values |= self.prelude.run_with(values)
        outputs: dict[str, np.ndarray] = {}
        for i, session in enumerate(self.layer_sessions):
            if self.prefetch and i + 1 in self.recent:
                self.experts.prefetch(self.recent[i + 1])  # loads overlap this layer's compute
            result = session.run_with(values, in_place)
            outputs |= {name: result[name] for name in self.presents[i]}
            hidden = result[RESIDUAL]
            if EXPERT_IDS in result:  # experts summed in fp32, added in the graph's precision
                hidden = (hidden + self._routed(i, result).reshape(hidden.shape)).astype(hidden.dtype)
            values[HIDDEN] = hidden
            if self.trace is not None:  # validation locates a wrong layer from these
                self.trace.append(hidden)
        outputs |= self.head.run_with(values)  # logits, and final_hidden where the bundle has an MTP draft
        return outputs

    def _routed(self, layer: int, result: dict[str, np.ndarray]) -> np.ndarray:
        """Sum of the partitions that hold at least one chosen expert; the others are never touched."""
        chosen = np.unique(result[EXPERT_IDS])
        total = np.zeros(result[MOE_INPUT].shape, np.float32)
        used = [p.name for p in self.partitions_by_layer.get(layer, [])
                if np.any((chosen >= p.experts[0]) & (chosen < p.experts[1]))]
        for name in used:
            total += self.experts.get(name).run_with(result)[ROUTED]
        self.recent[layer] = used
        return total
