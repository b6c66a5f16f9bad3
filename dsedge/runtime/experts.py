"""Expert partitions under a memory budget: resident ones pinned, the rest loaded on demand, LRU evicted."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import onnxruntime as ort

from dsedge.manifest import GraphEntry

log = logging.getLogger(__name__)


@dataclass
class ExpertCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0  # time the decode loop waited for loads (prefetched loads overlap compute)
    prefetches: int = 0
    prefetch_hits: int = 0  # misses served by a load started ahead of time
    streamed: int = 0  # misses run from the file by the kernel library (dsedge.runtime.streamed): nothing loaded
    calls: dict[str, int] = field(default_factory=dict)  # partition name → times it ran

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def to_json(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "evictions": self.evictions,
                "bytes_loaded": self.bytes_loaded, "load_seconds": round(self.load_seconds, 4),
                "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits, "streamed": self.streamed,
                "calls": self.calls}


class ExpertCache:
    """Sessions of expert partitions, held within ``budget_bytes`` of partition weights.

    ``prefetch(names)`` starts loading partitions on a background thread (session creation reads the file
    and builds kernels, mostly outside the GIL) so that it overlaps the layers computed meanwhile; all
    bookkeeping (LRU order, eviction, budget) stays on the calling thread.

    ``streamer`` (a partition → a session that runs it from the bundle's file, or None where it cannot): a miss
    it serves loads nothing and evicts nothing; prefetch skips those partitions.
    """

    def __init__(self, partitions: dict[str, GraphEntry], loader: Callable[[GraphEntry], ort.InferenceSession],
                 resident: list[str], budget_bytes: int | None,
                 streamer: Callable[[GraphEntry], object | None] | None = None):
        self.partitions = partitions
        self.streamer = streamer
        self.pending: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.loader = loader
        self.budget = budget_bytes
        self.resident = set(resident)
        self.loaded: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self.stats = ExpertCacheStats()
        self._warned = False
        # bytes of loaded + pending partitions, kept as they come and go: summing them per eviction step made
        # a miss O(loaded²) (V2-Lite-8 at 25%: ~110 loaded partitions, 1.3 ms of bookkeeping per miss)
        self._held = 0
        for name in resident:  # hottest first
            self._load(name)

    def reset_stats(self) -> None:
        """Start counting afresh (after a warm-up); what is loaded stays loaded."""
        self.stats = ExpertCacheStats()

    @property
    def loaded_bytes(self) -> int:
        """Bytes held: loaded partitions and those being prefetched (they count from the start)."""
        return self._held

    def get(self, name: str) -> ort.InferenceSession:
        self.stats.calls[name] = self.stats.calls.get(name, 0) + 1
        self._harvest()
        session = self.loaded.get(name)
        if session is not None:
            self.stats.hits += 1
            self.loaded.move_to_end(name)
            return session
        self.stats.misses += 1
        streamed = self._streamed(name)
        if streamed is not None:
            self.stats.streamed += 1
            return streamed
        if name in self.pending:
            self.stats.prefetch_hits += 1
            return self._collect(name)
        self._make_room(self.partitions[name].bytes)
        return self._load(name)

    def count_resident(self, names) -> None:
        """Calls served by a layer's fused graph, which stands for these partitions: hits, as they would be."""
        for name in names:
            self.stats.calls[name] = self.stats.calls.get(name, 0) + 1
        self.stats.hits += len(names)

    def prefetch(self, names) -> None:
        """Start loading ``names`` (those not loaded or already on their way) in the background."""
        self._harvest()
        for name in names:
            if name in self.loaded or name in self.pending or self._streamed(name) is not None:
                continue
            self._make_room(self.partitions[name].bytes)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsedge-prefetch")
            self.pending[name] = self._pool.submit(self.loader, self.partitions[name])
            self._held += self.partitions[name].bytes
            self.stats.prefetches += 1

    def _streamed(self, name: str):
        return None if self.streamer is None else self.streamer(self.partitions[name])

    def _harvest(self) -> None:
        """Finished prefetches join the LRU order (least recent first: they have not been used yet)."""
        if not self.pending:  # the common case, on every expert call: nothing in flight
            return
        for name in [n for n, f in self.pending.items() if f.done()]:
            self._insert(name, self.pending.pop(name).result())
            self.loaded.move_to_end(name, last=False)

    def _collect(self, name: str) -> ort.InferenceSession:
        started = time.perf_counter()
        session = self.pending.pop(name).result()
        self.stats.load_seconds += time.perf_counter() - started  # only the wait, not the overlapped part
        return self._insert(name, session)

    def _load(self, name: str) -> ort.InferenceSession:
        started = time.perf_counter()
        session = self.loader(self.partitions[name])
        self.stats.load_seconds += time.perf_counter() - started
        self._held += self.partitions[name].bytes
        return self._insert(name, session)

    def _insert(self, name: str, session: ort.InferenceSession) -> ort.InferenceSession:
        self.stats.bytes_loaded += self.partitions[name].bytes
        self.loaded[name] = session
        return session

    def _make_room(self, needed: int) -> None:
        """Evict least recently used on-demand partitions until ``needed`` fits (resident ones stay)."""
        if self.budget is None:
            return
        for name in list(self.loaded):
            if self.loaded_bytes + needed <= self.budget:
                return
            if name not in self.resident:
                del self.loaded[name]
                self._held -= self.partitions[name].bytes
                self.stats.evictions += 1
        if self.loaded_bytes + needed > self.budget and not self._warned:
            self._warned = True
            log.warning("expert partitions need %d bytes, over the %d-byte budget: running over it "
                        "(pinned partitions or one partition larger than the budget)",
                        self.loaded_bytes + needed, self.budget)
