"""Load a bundle: verify the manifest, every file's sha256 and every graph's external-data paths."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dsedge.manifest import BundleError, GraphEntry, Manifest, read_manifest, resolve_inside
from dsedge.onnx_refs import external_data_locations
from dsedge.runtime.session import run_bound

log = logging.getLogger(__name__)


def verified_graph_path(manifest: Manifest, graph: GraphEntry) -> Path:
    """The graph file, after checking that each external-data location is a listed file inside the bundle."""
    path = manifest.path(graph.file, what=f"graph {graph.name}")
    try:
        locations = external_data_locations(path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"graph {graph.file} is not a valid ONNX file ({exc})", where=str(path)) from exc
    graph_dir = Path(graph.file).parent
    for location in locations:
        rel = (graph_dir / location).as_posix()
        resolve_inside(manifest.root, rel, what=f"external data of {graph.file}")
        manifest.path(rel, what=f"external data of {graph.file}")
    return path


def open_manifest(path: str | Path, *, verify: bool = True) -> Manifest:
    manifest = read_manifest(path)
    if verify:
        manifest.verify()
    else:
        log.warning("bundle %s loaded without sha256 verification", path)
    return manifest


class DeclaredSession:
    """A session run by its manifest entry: feeds are the declared inputs, picked by name from the values at
    hand, and the result maps every declared output to its array. Other attributes go to the session."""

    def __init__(self, session, graph: GraphEntry):
        self._session, self.graph = session, graph
        self._inputs, self._outputs = graph.input_names, graph.output_names

    def run_with(self, values: dict[str, np.ndarray], in_place: dict[str, np.ndarray] | None = None,
                 ) -> dict[str, np.ndarray]:
        """``in_place``: outputs written into these arrays (cache buffers, bound in place; see session.run_bound)."""
        missing = [name for name in self._inputs if name not in values]
        if missing:
            raise BundleError(f"graph {self.graph.name} declares input(s) {', '.join(missing)} that no earlier "
                              "graph of the bundle produces", where=self.graph.file,
                              hint="the manifest does not match this runtime; re-export the bundle")
        bound = {name: array for name, array in (in_place or {}).items() if name in self._outputs}
        if bound:
            return run_bound(self._session, self._inputs, self._outputs, values, bound)
        arrays = self._session.run(self._outputs, {name: values[name] for name in self._inputs})
        return dict(zip(self._outputs, arrays, strict=True))

    def __getattr__(self, attr):
        return getattr(self._session, attr)
