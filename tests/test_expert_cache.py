"""The expert cache's byte count (kept as partitions come and go) always equals what it holds."""

import random

from dsedge.manifest import GraphEntry
from dsedge.runtime.experts import ExpertCache


def _parts(n):
    return {f"p{i}": GraphEntry(name=f"p{i}", role="experts", file=f"p{i}.onnx", data_files=(),
                                bytes=100 + 7 * i, inputs=(), outputs=(), layer=1, experts=(i, i + 1))
            for i in range(n)}


def test_held_bytes_follow_loads_prefetches_and_evictions():
    parts = _parts(40)
    budget = 1500
    cache = ExpertCache(parts, lambda graph: object(), ["p0", "p1"], budget)
    rng = random.Random(0)
    for step in range(2000):
        names = [f"p{rng.randrange(40)}" for _ in range(rng.randint(1, 3))]
        if step % 3 == 0:
            cache.prefetch(names)
        else:
            for name in names:
                assert cache.get(name) is not None
        held = sum(parts[n].bytes for n in (*cache.loaded, *cache.pending))
        assert cache.loaded_bytes == held
    assert cache.stats.evictions > 0 and cache.stats.prefetches > 0


def test_misses_stay_within_the_budget():
    """Without prefetch (whose in-flight loads count but cannot be evicted until they land), every miss makes
    room first: what is held never passes the budget."""
    parts = _parts(40)
    budget = 1500
    cache = ExpertCache(parts, lambda graph: object(), ["p0", "p1"], budget)
    rng = random.Random(1)
    for _ in range(2000):
        cache.get(f"p{rng.randrange(40)}")
        assert cache.loaded_bytes == sum(parts[n].bytes for n in cache.loaded) <= budget
    assert {"p0", "p1"} <= set(cache.loaded)  # resident partitions are never evicted
    assert cache.stats.evictions > 0 and cache.stats.misses > 0
