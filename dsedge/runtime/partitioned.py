"""Engine for partitioned bundles: trunk graphs layer by layer, routed rows sent to expert partitions.

A layer whose partitions are all resident runs its "layer_experts" graph instead (one QMoE over every
expert, over the same bytes the partitions reference), where the bundle has one: one kernel call per layer
instead of one per touched partition (V2-Lite: 6 of 64 per token), and the kernel spreads the experts over
the threads."""

from __future__ import annotations

import logging

import numpy as np

from dsedge.contract import (
    EXPERT_IDS,
    EXPERTS,
    HEAD,
    HIDDEN,
    LAYER,
    LAYER_EXPERTS,
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
                 prefetch: bool = False, fuse_layers: bool = True):
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
        # expert id → index of its partition in partitions_by_layer[layer]: which partitions a step touches
        self.partition_of = {layer: _owners(group) for layer, group in self.partitions_by_layer.items()}
        resident = self._resident(memory_budget_bytes) if parts else []
        self.fused = self._fused_layers(resident) if fuse_layers else {}
        fused_parts = {p.name for layer in self.fused for p in self.partitions_by_layer[layer]}
        fused_bytes = sum(parts[name].bytes for name in fused_parts)
        self.experts = ExpertCache({n: g for n, g in parts.items() if n not in fused_parts}, self.session,
                                   [n for n in resident if n not in fused_parts],
                                   None if memory_budget_bytes is None else memory_budget_bytes - fused_bytes)

    def _fused_layers(self, resident: list[str]) -> dict:
        """Sessions of the layer_experts graphs of layers whose partitions are all resident (their bytes are
        the partitions' bytes: the budget holds either way)."""
        chosen = set(resident)
        return {g.layer: self.session(g) for g in self.graph(LAYER_EXPERTS)
                if self.partitions_by_layer.get(g.layer)
                and all(p.name in chosen for p in self.partitions_by_layer[g.layer])}

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
        """Sum of the partitions that hold at least one chosen expert; the others are never touched. A fused
        layer runs its one graph (counted as hits on the partitions it stands for)."""
        group = self.partitions_by_layer.get(layer, [])
        used = [group[i].name for i in np.unique(self.partition_of[layer][result[EXPERT_IDS]])] if group else []
        fused = self.fused.get(layer)
        if fused is not None:
            self.experts.count_resident(used)
            return fused.run_with(result)[ROUTED]
        total = np.zeros(result[MOE_INPUT].shape, np.float32)
        for name in used:
            total += self.experts.get(name).run_with(result)[ROUTED]
        self.recent[layer] = used
        return total


def _owners(partitions: list[GraphEntry]) -> np.ndarray:
    """For each expert id of the layer, the index of the partition holding it."""
    owner = np.zeros(max(p.experts[1] for p in partitions), np.int64)
    for i, p in enumerate(partitions):
        owner[p.experts[0]:p.experts[1]] = i
    return owner
