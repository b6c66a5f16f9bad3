"""Expert partitions under a memory budget: resident ones pinned, the rest loaded on demand, LRU evicted."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import onnxruntime as ort

log = logging.getLogger(__name__)


@dataclass
class ExpertCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)  # partition name → times it ran

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def to_json(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "evictions": self.evictions,
                "bytes_loaded": self.bytes_loaded, "load_seconds": round(self.load_seconds, 4), "calls": self.calls}


class ExpertCache:
    """Sessions of expert partitions, held within ``budget_bytes`` of partition weights."""

    def __init__(self, partitions: dict[str, dict], loader: Callable[[dict], ort.InferenceSession],
                 resident: set[str], budget_bytes: int | None):
        self.partitions = partitions
        self.loader = loader
        self.budget = budget_bytes
        self.resident = resident
        self.loaded: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self.stats = ExpertCacheStats()
        self._warned = False
        for name in sorted(resident):
            self._load(name)

    def reset_stats(self) -> None:
        """Start counting afresh (after a warm-up); what is loaded stays loaded."""
        self.stats = ExpertCacheStats()

    @property
    def loaded_bytes(self) -> int:
        return sum(self.partitions[n]["bytes"] for n in self.loaded)

    def get(self, name: str) -> ort.InferenceSession:
        self.stats.calls[name] = self.stats.calls.get(name, 0) + 1
        session = self.loaded.get(name)
        if session is not None:
            self.stats.hits += 1
            self.loaded.move_to_end(name)
            return session
        self.stats.misses += 1
        self._make_room(self.partitions[name]["bytes"])
        return self._load(name)

    def _load(self, name: str) -> ort.InferenceSession:
        started = time.perf_counter()
        session = self.loader(self.partitions[name])
        self.stats.load_seconds += time.perf_counter() - started
        self.stats.bytes_loaded += self.partitions[name]["bytes"]
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
                self.stats.evictions += 1
        if self.loaded_bytes + needed > self.budget and not self._warned:
            self._warned = True
            log.warning("expert partitions need %d bytes, over the %d-byte budget: running over it "
                        "(pinned partitions or one partition larger than the budget)",
                        self.loaded_bytes + needed, self.budget)
