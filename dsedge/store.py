"""The local bundle store: models by name, exported once (``dsedge run deepseek-v3-tiny``, like ``ollama run``).

Bundles live in ``$DSEDGE_HOME/bundles`` (default ``~/.cache/dsedge/bundles``, under ``$XDG_CACHE_HOME`` when
set), one directory per name: ``deepseek-v3-tiny``, ``deepseek-ai--DeepSeek-V2-Lite`` (a repo id's ``/``
becomes ``--``, as in the Hugging Face cache). A name not in the store that names a checkpoint (a demo model,
a repo id in the local Hugging Face cache) is exported into it on first use, with the export defaults for
this machine (``--target auto``), through the same staged, validated export as ``dsedge export``.

Stdlib at import time: the export (torch, onnx) is imported only when a bundle has to be written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dsedge.errors import UserError
from dsedge.sources import resolve_checkpoint, unknown_name_error

log = logging.getLogger(__name__)

__all__ = ["StoredBundle", "list_bundles", "remove_bundle", "resolve_bundle", "store_dir", "stored_path"]

MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def store_dir() -> Path:
    """Where stored bundles live: $DSEDGE_HOME/bundles, else $XDG_CACHE_HOME (or ~/.cache)/dsedge/bundles."""
    if os.environ.get("DSEDGE_HOME"):
        return Path(os.environ["DSEDGE_HOME"]).expanduser() / "bundles"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dsedge" / "bundles"


def stored_path(name: str) -> Path:
    """The store directory for ``name`` (which need not exist yet); a name that could leave the store is refused."""
    if not _NAME.match(name) or ".." in name:
        raise UserError(f"{name!r} is not a model name", where=name,
                        hint="names look like deepseek-v3-tiny or org/model (letters, digits, . _ - :)")
    return store_dir() / name.replace("/", "--")


@dataclass(frozen=True)
class StoredBundle:
    name: str
    path: str
    size_bytes: int
    model_type: str
    layout: str
    max_context: int | None
    source: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def list_bundles() -> list[StoredBundle]:
    """Every bundle in the store, by name."""
    root = store_dir()
    try:
        entries = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    except OSError:
        return []
    return [_describe(p) for p in entries]


def _describe(path: Path) -> StoredBundle:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return StoredBundle(path.name.replace("--", "/"), str(path), size, str(model.get("model_type", "?")),
                        str(manifest.get("layout", "?")), manifest.get("max_context"),
                        str(manifest.get("source_checkpoint", "?")))


def remove_bundle(name: str) -> StoredBundle:
    """Delete the stored bundle ``name``; what was removed."""
    path = stored_path(name)
    if not (path / MANIFEST).is_file():
        stored = [b.name for b in list_bundles()]
        raise UserError(f"no stored bundle {name!r}", where=str(store_dir()),
                        hint=f"stored: {', '.join(stored) if stored else '(none)'} (see `dsedge list`)")
    removed = _describe(path)
    shutil.rmtree(path)
    return removed


def resolve_bundle(name_or_path: str | Path, *, export: bool = True) -> Path:
    """A bundle directory for ``name_or_path``: a directory holding manifest.json as given, else the stored
    bundle of that name, else (``export``) the checkpoint of that name exported into the store now.

    A directory without a manifest is refused with a hint (it may be a checkpoint: export it first).
    """
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise UserError("no manifest.json found: not a bundle", where=str(path),
                            hint=f"export it first: `dsedge export {path} -o BUNDLE`, or pass its name to "
                                 "`dsedge run` to export it into the store once")
        return path
    name = str(name_or_path)
    stored = stored_path(name) if _NAME.match(name) and ".." not in name else None
    if stored is not None and (stored / MANIFEST).is_file():
        return stored
    stored_names = {"bundle store": [b.name for b in list_bundles()]}
    try:
        checkpoint = resolve_checkpoint(name)
    except UserError:
        raise unknown_name_error(name, what="bundle", extra=stored_names) from None
    if not export or stored is None:
        raise unknown_name_error(name, what="bundle", extra=stored_names)
    return _export_into_store(checkpoint, stored)


def _export_into_store(checkpoint: Path, out: Path) -> Path:
    from dsedge.export.bundle import export_bundle  # the export extra (torch, onnx), needed only to write a bundle

    log.info("%s is not in the store yet: exporting %s to %s (once; `dsedge rm %s` removes it)", out.name,
             checkpoint, out, out.name.replace("--", "/"))
    out.parent.mkdir(parents=True, exist_ok=True)
    export_bundle(checkpoint, out, target="auto")
    return out
