"""Load a bundle: verify the manifest, every file's sha256 and every graph's external-data paths."""

from __future__ import annotations

import logging
from pathlib import Path

from dsedge.manifest import BundleError, Manifest, read_manifest, resolve_inside
from dsedge.onnx_refs import external_data_locations

log = logging.getLogger(__name__)


def verified_graph_path(manifest: Manifest, graph: dict) -> Path:
    """The graph file, after checking that each external-data location is a listed file inside the bundle."""
    path = manifest.path(graph["file"], what=f"graph {graph['name']}")
    try:
        locations = external_data_locations(path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"graph {graph['file']} is not a valid ONNX file ({exc})", where=str(path)) from exc
    graph_dir = Path(graph["file"]).parent
    for location in locations:
        rel = (graph_dir / location).as_posix()
        resolve_inside(manifest.root, rel, what=f"external data of {graph['file']}")
        manifest.path(rel, what=f"external data of {graph['file']}")
    return path


def open_manifest(path: str | Path, *, verify: bool = True) -> Manifest:
    manifest = read_manifest(path)
    if verify:
        manifest.verify()
    else:
        log.warning("bundle %s loaded without sha256 verification", path)
    return manifest
