"""Engine for partitioned bundles: trunk graphs layer by layer, routed rows sent to expert partitions.

A layer whose partitions are all resident runs its "layer_experts" graph instead (one QMoE over every
expert, over the same bytes the partitions reference), where the bundle has one: one kernel call per layer
instead of one per touched partition (V2-Lite: 6 of 64 per token), and the kernel spreads the experts over
the threads. Under a budget, misses run from the bundle's file where the dsedge-kernels library takes them
(dsedge.runtime.streamed), else they load the partition's session."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

import numpy as np

from dsedge.contract import (
    DECODER,
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
    TensorSpec,
    present_name,
)
from dsedge.manifest import GraphEntry, Manifest
from dsedge.runtime.bundle import DeclaredSession, verified_graph_path
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.compose import Composer, NotComposable, Stage, stage_prefix
from dsedge.runtime.engine import Engine
from dsedge.runtime.experts import ExpertCache
from dsedge.runtime.session import SessionConfig
from dsedge.runtime.streamed import StreamedPartitions, kernel_library

log = logging.getLogger(__name__)


class PartitionedEngine(Engine):
    layout = "partitioned"

    def __init__(self, manifest: Manifest, session_config: SessionConfig, memory_budget_bytes: int | None = None,
                 prefetch: bool = False, fuse_layers: bool = True, whole_config: SessionConfig | None = None):
        super().__init__(manifest, session_config)
        # Prefetch predicts a layer's partitions from the ones it used at the previous step: routing of
        # consecutive tokens is strongly correlated (the "temporal locality" MoE offloading systems use).
        self.prefetch = prefetch
        self.recent: dict[int, list[str]] = {}
        self.trace: list[np.ndarray] | None = None  # a list: each layer's output hidden state is appended
        self.presents = [[present_name(i, t) for t in self.cache_layout["tensors"]] for i in range(self.layers)]
        parts = {g.name: g for g in self.graph(EXPERTS)}
        self.partitions_by_layer: dict[int, list[GraphEntry]] = {}
        for part in parts.values():
            self.partitions_by_layer.setdefault(part.layer, []).append(part)
        for group in self.partitions_by_layer.values():
            group.sort(key=lambda p: p.experts[0])
        # expert id → index of its partition in partitions_by_layer[layer]: which partitions a step touches
        self.partition_of = {layer: _owners(group) for layer, group in self.partitions_by_layer.items()}
        resident = self._resident(memory_budget_bytes) if parts else []
        # Everything resident (no budget evicts anything): the whole forward pass as one composed graph
        # (dsedge.runtime.compose), one session run per token instead of ~2 per layer.
        self.decoder = None
        if whole_config is not None and set(resident) == set(parts):
            try:
                self.decoder = self._composed(fuse_layers, whole_config)
            except (NotComposable, ValueError, UnicodeDecodeError) as exc:  # not what export writes: graph by graph
                log.warning("running the bundle graph by graph: %s", exc)
        if self.decoder is not None:
            self.session_config = whole_config  # later sessions (the MTP draft) too
            self.fused = {}
            # no partition session: the composed graph holds them all (resident), the cache only counts hits
            self.experts = ExpertCache(parts, self.session, [], None)
            self.experts.resident = set(parts)
            return
        self.prelude = self.session(self.graph(PRELUDE)[0])
        self.layer_sessions = [self.session(self.graph(LAYER, layer=i)[0]) for i in range(self.layers)]
        self.head = self.session(self.graph(HEAD)[0])
        self.fused = self._fused_layers(resident) if fuse_layers else {}
        fused_parts = {p.name for layer in self.fused for p in self.partitions_by_layer[layer]}
        fused_bytes = sum(parts[name].bytes for name in fused_parts)
        library = kernel_library() if set(resident) != set(parts) else None
        left_out = sum(g.bytes for n, g in parts.items() if n not in resident)
        streamer = None if library is None else \
            StreamedPartitions(manifest, self.session_config, library, self.timers, left_out).session
        self.experts = ExpertCache({n: g for n, g in parts.items() if n not in fused_parts}, self.session,
                                   [n for n in resident if n not in fused_parts],
                                   None if memory_budget_bytes is None else memory_budget_bytes - fused_bytes,
                                   streamer)

    @property
    def traces_layers(self) -> bool:
        """Layer by layer (not composed): each layer's output can be recorded (``trace``)."""
        return self.decoder is None

    def _composed(self, fuse_layers: bool, config: SessionConfig) -> DeclaredSession:
        """The prelude, every layer with its experts (the fused layer_experts graph where the bundle has one and
        ``fuse_layers``, else its partitions in order) and the head, as one session (dsedge.runtime.compose)."""
        head = self.graph(HEAD)[0]
        self.routing: dict[int, str] = {}  # MoE layer → the composed graph's output of its chosen expert ids
        composer = Composer({name for names in self.presents for name in names} | set(head.output_names))
        entries = [self.graph(PRELUDE)[0]]
        composer.add(self._stage(entries[0], PRELUDE))
        exposed = []
        for i in range(self.layers):
            layer = self.graph(LAYER, layer=i)[0]
            entries.append(layer)
            out = composer.add(self._stage(layer, LAYER))
            hidden = out[RESIDUAL]
            if EXPERT_IDS in out:
                whole = self.graph(LAYER_EXPERTS, layer=i) if fuse_layers else []
                experts = whole[:1] or self.partitions_by_layer[i]
                entries += experts
                routed = [composer.add(self._stage(g, EXPERTS))[ROUTED] for g in experts]
                hidden = composer.residual_sum(stage_prefix(LAYER, i), hidden, routed)
                spec = next(t for t in layer.outputs if t.name == EXPERT_IDS)
                exposed.append(TensorSpec(out[EXPERT_IDS], spec.dtype, spec.dims))
                composer.expose(out[EXPERT_IDS])
                self.routing[i] = out[EXPERT_IDS]
            composer.values[HIDDEN] = hidden
        entries.append(head)
        composer.add(self._stage(head, HEAD))
        by_name = {t.name: t for g in entries for t in (*g.inputs, *g.outputs)}
        outputs = tuple(by_name[name] for names in self.presents for name in names) + head.outputs
        entry = GraphEntry("decoder (composed)", DECODER, "(composed from the bundle's graphs)", (),
                           sum(g.bytes for g in entries), tuple(by_name[n] for n in composer.input_names),
                           outputs + tuple(exposed))
        return self.session(entry, composer.model(), config)

    def _stage(self, graph: GraphEntry, role: str) -> Stage:
        """A graph of the bundle, verified (as a session of it would be) and read without its external data."""
        path = verified_graph_path(self.manifest, graph)
        prefix = stage_prefix(role, graph.layer, graph.experts if graph.role == EXPERTS else None)
        return Stage(prefix, path.read_bytes(), str(PurePosixPath(graph.file).parent))

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
        if self.decoder is not None:
            result = self.decoder.run_with(values, in_place)
            for layer, ids in self.routing.items():  # the hit counters profile and serve report
                self.experts.count_resident(self._touched(layer, result[ids]))
            return result
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

    def _touched(self, layer: int, expert_ids: np.ndarray) -> list[str]:
        """The partitions of ``layer`` holding at least one of the chosen ``expert_ids`` [rows, top_k], in
        order (both paths report routing here: the serve benchmark's traffic tally observes it)."""
        group = self.partitions_by_layer.get(layer, [])
        return [group[i].name for i in np.unique(self.partition_of[layer][expert_ids])] if group else []

    def _routed(self, layer: int, result: dict[str, np.ndarray]) -> np.ndarray:
        """Sum of the partitions that hold at least one chosen expert; the others are never touched. A fused
        layer runs its one graph (counted as hits on the partitions it stands for)."""
        used = self._touched(layer, result[EXPERT_IDS])
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

