"""Engine for monolithic bundles: one decoder graph for the whole forward pass."""

from __future__ import annotations

import numpy as np

from dsedge.manifest import Manifest
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.engine import Engine
from dsedge.runtime.session import SessionConfig


class MonolithicEngine(Engine):
    """One decoder graph for everything."""

    layout = "monolithic"

    def __init__(self, manifest: Manifest, session_config: SessionConfig):
        super().__init__(manifest, session_config)
        self.decoder = self.session(self.graph("decoder")[0])
        self.output_names = [o.name for o in self.decoder.get_outputs()]

    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        outputs = self.decoder.run(self.output_names, {**feeds, **cache.past()})
        return dict(zip(self.output_names, outputs, strict=True))
