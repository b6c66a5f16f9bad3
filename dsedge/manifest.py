"""Bundle manifest: read, write, sha256, and path checks. Stdlib only (the runtime imports it).

Every file of a bundle is listed under ``files`` with its sha256 and size; graphs and the tokenizer refer
to those paths. A path must be relative, stay inside the bundle after resolving links, and be listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dsedge.errors import UserError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


class BundleError(UserError):
    """A bundle is missing, tampered with, or points outside itself."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def resolve_inside(root: Path, rel: str, *, what: str = "path") -> Path:
    """``root / rel``, refusing absolute paths, ``..`` and links that lead outside ``root``."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or "\\" in rel or ".." in pure.parts or Path(rel).is_absolute():
        raise BundleError(f"{what} {rel!r} is not a relative path inside the bundle", where=str(root),
                          hint="the manifest was edited or produced by something else; re-export the bundle")
    path = (root / pure).resolve()
    base = root.resolve()
    if path != base and base not in path.parents:
        raise BundleError(f"{what} {rel!r} resolves outside the bundle (to {path})", where=str(root),
                          hint="a link or path in the bundle leaves it; re-export the bundle")
    return path


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    def path(self, rel: str, *, what: str = "file") -> Path:
        if rel not in self.files:
            raise BundleError(f"{what} {rel!r} is not listed in {MANIFEST_FILE}", where=str(self.root),
                              hint="every bundle file must be listed with its sha256; re-export the bundle")
        return resolve_inside(self.root, rel, what=what)

    def verify(self) -> None:
        """Check every listed file exists with its recorded size and sha256."""
        for rel, entry in self.files.items():
            path = resolve_inside(self.root, rel)
            if not path.is_file():
                raise BundleError(f"bundle file {rel} is missing", where=str(self.root),
                                  hint="copy the whole bundle directory again")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST_FILE} "
                                  "(modified or corrupted)", where=str(path),
                                  hint="re-export or re-copy the bundle; never edit bundle files by hand")


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_FILE} found", where=str(root),
                          hint="pass a bundle directory written by `dsedge export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise BundleError(f"unsupported bundle schema_version {found!r} (this dsedge reads {SCHEMA_VERSION})",
                          where=str(path), hint="re-export the bundle with this version of dsedge")
    if not isinstance(data.get("files"), dict):
        raise BundleError(f"{MANIFEST_FILE} has no 'files' table", where=str(path))
    return Manifest(root, data)


def write_manifest(root: Path, data: dict[str, Any]) -> None:
    """Write the manifest after hashing every file under ``root`` (the manifest itself excluded)."""
    files = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()
                   and p.name != MANIFEST_FILE)
    table = {rel: file_entry(root, rel) for rel in files}
    for graph in data.get("graphs", []):  # each graph/partition also carries its own hashes, for readers
        graph["sha256"] = table[graph["file"]]["sha256"]
        graph["data_sha256"] = [table[f]["sha256"] for f in graph.get("data_files", [])]
    data = {"schema_version": SCHEMA_VERSION, **data, "files": table}
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_FILE)
