"""Load a bundle: its manifest, and every graph through the verified door (sha256, links, external data)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dsedge.manifest import TAMPERED, BundleError, GraphEntry, Manifest, read_manifest
from dsedge.onnx_refs import initializer_dims
from dsedge.runtime.session import BoundRuns
from dsedge.verified import checked_graph, verify_mode

log = logging.getLogger(__name__)
ROPE_TABLE = "rope.cos"  # the initializer dsedge.export.decoder.rope_lookup bakes: [max_context, rope_dim / 2]


def verified_graph_path(manifest: Manifest, graph: GraphEntry) -> Path:
    """The graph file, verified, after checking that each of its external-data locations is a listed, verified
    file of the bundle, and that a graph holding the RoPE tables has a row for every position of max_context.

    Called right before the graph's session is created, so an expert partition is verified when it is first
    loaded (fast start: ``dsedge.verified``)."""
    return checked_graph(manifest.path, graph.file, what=f"graph {graph.name}", error=BundleError, hint=TAMPERED,
                         inspect=lambda buf: _check_rope_rows(manifest, graph, buf))


def _check_rope_rows(manifest: Manifest, graph: GraphEntry, model_bytes) -> None:
    # An edited max_context beyond the baked tables would gather past their end mid-generation.
    dims = initializer_dims(model_bytes, ROPE_TABLE)
    if not dims:
        return
    context = manifest.contract.max_context
    if dims[0] < context:
        raise BundleError(f"manifest.json says max_context {context}, but graph {graph.file} holds RoPE tables for "
                          f"{dims[0]} positions (the manifest was edited)", where=str(manifest.root),
                          hint=f"restore max_context {dims[0]}, or re-export with --max-context {context}")


def open_manifest(path: str | Path, *, verify: bool | str = True) -> Manifest:
    """Read a bundle's manifest with its files behind the one verified door (``dsedge.verified``): ``verify``
    True (fast start: files hashed as first opened unless recorded as verified), "full" (hash every file now)
    or False (paths, links and file kinds still checked)."""
    manifest = read_manifest(path, verify=verify_mode(verify))
    if manifest.mode == "off":
        log.warning("bundle %s loaded without sha256 verification", path)
    return manifest


class DeclaredSession:
    """A session run by its manifest entry: feeds are the declared inputs, picked by name from the values at
    hand, and the result maps every declared output to its array. Other attributes go to the session."""

    def __init__(self, session, graph: GraphEntry):
        self._session, self.graph = session, graph
        self._inputs, self._outputs = graph.input_names, graph.output_names
        self._bound = BoundRuns(session, self._inputs, self._outputs)

    def run_with(self, values: dict[str, np.ndarray], in_place: dict[str, np.ndarray] | None = None,
                 ) -> dict[str, np.ndarray]:
        """``in_place``: outputs written into these arrays (cache buffers, bound in place; see session.BoundRuns)."""
        missing = [name for name in self._inputs if name not in values]
        if missing:
            raise BundleError(f"graph {self.graph.name} declares input(s) {', '.join(missing)} that no earlier "
                              "graph of the bundle produces", where=self.graph.file,
                              hint="the manifest does not match this runtime; re-export the bundle")
        bound = {name: array for name, array in (in_place or {}).items() if name in self._outputs}
        if bound:
            return self._bound.run(values, bound)
        arrays = self._session.run(self._outputs, {name: values[name] for name in self._inputs})
        return dict(zip(self._outputs, arrays, strict=True))

    def __getattr__(self, attr):
        return getattr(self._session, attr)
