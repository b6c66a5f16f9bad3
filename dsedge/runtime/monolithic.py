"""Engine for monolithic bundles: one decoder graph for the whole forward pass."""

from __future__ import annotations

import numpy as np

from dsedge.contract import DECODER, INPUT_IDS, LOGITS, LOGITS_FROM
from dsedge.manifest import Manifest
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.engine import Engine
from dsedge.runtime.session import SessionConfig


class MonolithicEngine(Engine):
    """One decoder graph for everything."""

    layout = "monolithic"

    def __init__(self, manifest: Manifest, session_config: SessionConfig):
        super().__init__(manifest, session_config)
        self.decoder = self.session(self.graph(DECODER)[0])
        graph = self.decoder.graph
        self._logits = next((t for t in graph.outputs if t.name == LOGITS), None)
        self._logits_from = LOGITS_FROM in graph.input_names

    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        in_place = cache.in_place_outputs()
        if in_place and self._logits is not None:  # the cache is bound: the logits too, into an array of ours
            in_place[LOGITS] = self._logits_buffer(feeds)
        return self.decoder.run_with({**feeds, **cache.past()}, in_place)

    def _logits_buffer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """[B, T − logits_from, V]: what the graph computes (bundles without ``logits_from``: every position)."""
        batch, new_tokens = feeds[INPUT_IDS].shape
        rows = new_tokens - int(feeds[LOGITS_FROM][0]) if self._logits_from else new_tokens
        vocab = self._logits.dims[-1]
        return np.empty((batch, rows, vocab if isinstance(vocab, int) else int(self.spec["vocab_size"])),
                        np.dtype(self._logits.dtype))
