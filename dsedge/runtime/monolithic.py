"""Engine for monolithic bundles: one decoder graph for the whole forward pass."""

from __future__ import annotations

import numpy as np

from dsedge.contract import DECODER
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

    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        return self.decoder.run_with({**feeds, **cache.past()}, cache.in_place_outputs())
