"""Closed directories (bundles, indexes): every file read is listed with its sha256 and opened through one function.

Stdlib only (the runtime imports it). A bundle or an index is a directory plus a manifest whose ``files`` table
lists every file with its sha256 and size. :class:`VerifiedFiles` is the one door to those files:
``path(rel)`` returns a path only when ``rel`` is listed, is a relative path inside the directory with no
symbolic link on the way (each component is ``lstat``-ed), names a regular file (never a FIFO, device or
directory), and its content matched the listed sha256 — hashed the first time it is asked for in this process,
or skipped when the :class:`VerificationRecord` says this very file (same size, mtime, ctime, inode and device)
already matched. ``scan_tree`` refuses a symbolic link or special file anywhere under the root, at write time
(``write_manifest``, an index's manifest) and when the directory is opened.

Fast start (issue #13 item 3): a start stats every listed file and hashes only files that are not recorded as
verified. The record lives outside the directory, in ``$DSEDGE_CACHE/verified/`` (default
``~/.cache/dsedge/verified/``), one JSON file per (real path, manifest sha256), because

- a bundle stays byte-for-byte what export wrote (it may sit on read-only media, or belong to another user);
- a record copied along with a bundle would be meaningless (inodes differ) — outside, it never travels;
- the key binds the record to this manifest's exact bytes: an edited manifest has no record and is hashed.

The record is a cache, not a trust anchor: whoever can write ``~/.cache`` can also edit the installed
package. A recorded file whose stat changed (size, mtime_ns, ctime_ns, inode or device) makes the whole record
void, so every file is hashed again as it is opened ("full verification whenever a recorded file changed");
``mode="full"`` (``--verify``) hashes every file at open, ignoring the record. A file changed less than
``RACY_NS`` before it was hashed is not recorded, since a write within the same clock tick could keep its
timestamps (git's "racily clean" entries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from dsedge.errors import UserError
from dsedge.onnx_refs import external_data_ranges

log = logging.getLogger(__name__)

MODES = ("full", "recorded", "off")
RECORD_SCHEMA = 1
RACY_NS = 20_000_000  # 20 ms: above the kernel's coarse clock tick (≤ 10 ms at HZ=100)
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_mode(verify: bool | str) -> str:
    """``load_bundle``/``Index.open``'s ``verify`` as a mode: True → "recorded", False → "off", or a mode."""
    if verify is True:
        return "recorded"
    if verify is False:
        return "off"
    if verify not in MODES:
        raise UserError(f"verify must be True, False or one of {', '.join(MODES)} (got {verify!r})", where="verify")
    return verify


def cache_dir() -> Path:
    """``$DSEDGE_CACHE`` or ``~/.cache/dsedge``."""
    return Path(os.environ.get("DSEDGE_CACHE") or Path.home() / ".cache" / "dsedge")


# --- paths -------------------------------------------------------------------------------------------


def _parts(rel: str) -> tuple[str, ...] | None:
    """The components of a relative, normalized POSIX path, or None for anything else."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in rel.split("/")):
        return None
    return pure.parts


def regular_path(root: Path, rel: str, *, what: str, error: type[UserError] = UserError, hint: str,
                 kind: str = "file", label: str = "directory") -> Path:
    """``root / rel`` when it is inside ``root`` with no symbolic link on the way, and a regular file (or, with
    ``kind="dir"``, a directory). ``root`` itself may be a link (the user's own choice of where it lives)."""
    parts = _parts(rel)
    if parts is None:
        raise error(f"{what} {rel!r} is not a relative path inside the {label}", where=str(root), hint=hint)
    path = Path(os.path.realpath(root))
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise error(f"{what} {rel} is missing", where=str(root), hint=hint) from None
        except OSError as exc:
            raise error(f"{what} {rel} cannot be read: {exc.strerror}", where=str(path), hint=hint) from None
        if stat.S_ISLNK(mode):
            raise error(f"{what} {rel} goes through a symbolic link ({'/'.join(parts[:i + 1])}); links are refused "
                        "inside a bundle or index", where=str(root), hint=hint)
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(mode):
            raise error(f"{what} {rel}: {'/'.join(parts[:i + 1])} is not a directory", where=str(root), hint=hint)
        if last and kind == "file" and not stat.S_ISREG(mode):
            raise error(f"{what} {rel} is not a regular file ({_kind(mode)})", where=str(path), hint=hint)
        if last and kind == "dir" and not stat.S_ISDIR(mode):
            raise error(f"{what} {rel} is not a directory ({_kind(mode)})", where=str(path), hint=hint)
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


def scan_tree(root: Path, *, error: type[UserError] = UserError, hint: str) -> list[str]:
    """Relative POSIX paths of every regular file under ``root``, sorted; a symbolic link or a special file
    (FIFO, socket, device) anywhere under it is refused — the same walk at write time and at open."""
    root = Path(os.path.realpath(root))
    found: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise error(f"{rel} is a symbolic link; links are refused inside a bundle or index",
                            where=str(root), hint=hint)
            if stat.S_ISREG(mode):
                found.append(rel)
            elif not stat.S_ISDIR(mode):
                raise error(f"{rel} is not a regular file ({_kind(mode)})", where=str(root), hint=hint)
    return sorted(found)


def check_table(table: Any, *, where: str, error: type[UserError], hint: str) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table, its shape checked: {relative path: {"sha256": hex, "bytes": int ≥ 0}}."""
    if not isinstance(table, dict):
        raise error(f"manifest key 'files' must be an object, got {type(table).__name__}", where=where, hint=hint)
    for rel, entry in table.items():
        if not isinstance(entry, dict):
            raise error(f"manifest key files[{rel!r}] must be an object, got {type(entry).__name__}", where=where,
                        hint=hint)
        for key in ("sha256", "bytes"):
            if key not in entry:
                raise error(f"manifest lacks key files[{rel!r}].{key}", where=where, hint=hint)
        digest, size = entry["sha256"], entry["bytes"]
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise error(f"manifest key files[{rel!r}].sha256 must be 64 lowercase hex digits", where=where, hint=hint)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error(f"manifest key files[{rel!r}].bytes must be an integer ≥ 0", where=where, hint=hint)
        if _parts(rel) is None:
            raise error(f"manifest lists {rel!r}, which is not a relative path inside the directory", where=where,
                        hint=hint)
    return table


def read_regular(path: Path, *, what: str, max_bytes: int, error: type[UserError] = UserError,
                 hint: str | None = None) -> bytes:
    """The bytes of a file the user named (outside any bundle): a regular file no larger than ``max_bytes``.
    A FIFO would block forever and a device never ends, so both are refused before opening."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror}", where=str(path), hint=hint) from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} is not a regular file ({_kind(info.st_mode)})", where=str(path), hint=hint)
    if info.st_size > max_bytes:
        raise error(f"{what} is {info.st_size} bytes, more than the {max_bytes} allowed", where=str(path), hint=hint)
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)[:max_bytes]


# --- the record --------------------------------------------------------------------------------------


def _stat_key(info: os.stat_result) -> list[int]:
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


class VerificationRecord:
    """Files of one directory that matched their sha256, with their stat at that time (see the module doc)."""

    def __init__(self, root: Path, manifest_sha256: str):
        self.root, self.manifest_sha256 = str(root), manifest_sha256
        key = hashlib.sha256(f"{self.root}\0{manifest_sha256}".encode()).hexdigest()
        self.file = cache_dir() / "verified" / f"{key}.json"
        self.entries: dict[str, dict[str, Any]] = {}  # rel -> {"sha256": …, "stat": [size, mtime, ctime, ino, dev]}

    def _digest(self) -> str:
        body = json.dumps([RECORD_SCHEMA, self.root, self.manifest_sha256, self.entries], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def load(self) -> None:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
            entries = data["entries"]
            self.entries = entries if isinstance(entries, dict) else {}
            fits = (data.get("schema") == RECORD_SCHEMA and data.get("root") == self.root
                    and data.get("manifest_sha256") == self.manifest_sha256 and data.get("digest") == self._digest())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            fits = False
        if not fits:
            self.entries = {}

    def save(self) -> None:
        """Write atomically; a cache that cannot be written only costs the next start its hashing."""
        data = {"schema": RECORD_SCHEMA, "root": self.root, "manifest_sha256": self.manifest_sha256,
                "entries": self.entries, "digest": self._digest()}
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.file)
        except OSError as exc:
            log.info("verification record not written (%s): the next start hashes again", exc)
            tmp.unlink(missing_ok=True)

    def matches(self, rel: str, sha256: str, info: os.stat_result) -> bool:
        entry = self.entries.get(rel)
        return bool(entry) and entry.get("sha256") == sha256 and entry.get("stat") == _stat_key(info)

    def changed(self, rel: str, info: os.stat_result) -> bool:
        entry = self.entries.get(rel)
        return bool(entry) and entry.get("stat") != _stat_key(info)

    def add(self, rel: str, sha256: str, info: os.stat_result, hashed_at_ns: int) -> None:
        if hashed_at_ns - max(info.st_mtime_ns, info.st_ctime_ns) < RACY_NS:
            return  # racily clean: a write in the same clock tick could keep these timestamps
        self.entries[rel] = {"sha256": sha256, "stat": _stat_key(info)}


# --- the one door ------------------------------------------------------------------------------------


class VerifiedFiles:
    """The listed files of a bundle or an index; ``path(rel)`` is the only way the code reaches one of them.

    ``mode``: "recorded" (default: hash a file the first time it is opened unless the record vouches for it),
    "full" (hash every file now, ignoring the record) or "off" (paths, links and file kinds still checked;
    contents not). ``manifest_bytes`` keys the record. At construction the tree is scanned (links and special
    files refused), every listed file must exist with its listed size, and unlisted files are logged: they are
    never opened.
    """

    def __init__(self, root: Path, table: dict[str, dict[str, Any]], manifest_bytes: bytes, *,
                 mode: str = "recorded", label: str = "bundle", error: type[UserError] = UserError, hint: str = "",
                 ignore: tuple[str, ...] = ()):
        self.root, self.table, self.mode, self.label = Path(root), table, verify_mode(mode), label
        self.error, self.hint = error, hint
        self.hashed = 0  # files hashed in this process (the fast-start test counts them)
        self._checked: set[str] = set()
        self._lock = threading.Lock()
        self._record = VerificationRecord(Path(os.path.realpath(root)), hashlib.sha256(manifest_bytes).hexdigest())
        present = set(scan_tree(self.root, error=error, hint=hint))
        unlisted = sorted(present - set(table) - set(ignore))
        if unlisted:
            log.warning("%s %s: %d unlisted file(s) ignored (never opened): %s", label, root, len(unlisted),
                        ", ".join(unlisted[:5]))
        self._check_sizes(present)
        if self.mode == "off":
            return
        if self.mode == "recorded":
            self._load_record()
        else:
            self.verify_all()

    def _check_sizes(self, present: set[str]) -> None:
        for rel, entry in self.table.items():
            if rel not in present:
                raise self.error(f"{self.label} file {rel} is missing", where=str(self.root),
                                 hint=f"copy the whole {self.label} directory again; {self.hint}")
            size = os.lstat(self.root / rel).st_size
            if size != entry["bytes"]:
                raise self.error(f"{self.label} file {rel} does not match its manifest entry (sha256 and size): {size} "
                                 f"bytes, the manifest says {entry['bytes']} (modified, truncated or corrupted)",
                                 where=str(self.root / rel), hint=self.hint)

    def _load_record(self) -> None:
        self._record.load()
        changed = [rel for rel in self.table if self._record.changed(rel, os.lstat(self.root / rel))]
        if changed:
            log.warning("%s %s: %s changed since it was verified: every file is hashed again as it is opened",
                        self.label, self.root, ", ".join(changed[:5]))
            self._record.entries = {}

    def path(self, rel: str, *, what: str = "file") -> Path:
        """The verified path of a listed file (the one door: listed, inside, no link, regular, sha256 matched)."""
        if _parts(rel) is None:
            raise self.error(f"{what} {rel!r} is not a relative path inside the {self.label}", where=str(self.root),
                             hint=self.hint)
        if rel not in self.table:
            raise self.error(f"{what} {rel!r} is not listed in the {self.label}'s manifest", where=str(self.root),
                             hint=f"every file a {self.label} uses must be listed with its sha256; {self.hint}")
        path = regular_path(self.root, rel, what=what, error=self.error, hint=self.hint, label=self.label)
        if self.mode != "off":
            with self._lock:
                if rel not in self._checked:
                    self._verify(rel, path)
        return path

    def directory(self, rel: str, *, what: str = "directory") -> Path:
        """A folder of listed files (the index's embedder/, a bundle's retriever/): inside, no link on the way."""
        return regular_path(self.root, rel, what=what, error=self.error, hint=self.hint, kind="dir", label=self.label)

    def files_under(self, folder: str) -> list[str]:
        return [rel for rel in self.table if rel.startswith(folder.rstrip("/") + "/")]

    def verify_all(self) -> None:
        """Hash every listed file now (``--verify``), then record them."""
        with self._lock:
            self._checked.clear()
            self._record.entries = {}
            for rel in self.table:
                self._verify(rel, regular_path(self.root, rel, what="file", error=self.error, hint=self.hint),
                             save=False)
            self._record.save()

    def _verify(self, rel: str, path: Path, *, save: bool = True) -> None:
        expected = self.table[rel]["sha256"]
        before = os.lstat(path)
        if self.mode == "recorded" and self._record.matches(rel, expected, before):
            self._checked.add(rel)
            return
        digest = sha256_file(path)
        self.hashed += 1
        if digest != expected:
            raise self.error(f"{self.label} file {rel} does not match its sha256 in the manifest (modified or "
                             "corrupted)", where=str(path), hint=self.hint)
        after = os.lstat(path)
        if _stat_key(after) == _stat_key(before):  # not written to while we hashed it
            self._record.add(rel, digest, after, time.time_ns())
            if save:
                self._record.save()
        self._checked.add(rel)


Opener = Callable[..., Path]  # rel (, what=) -> a checked path: VerifiedFiles.path, or local_files(root)


def local_files(root: Path, *, error: type[UserError] = UserError, hint: str = "") -> Opener:
    """An opener for a directory without a files table (a standalone embedder): inside, no link, regular."""
    def opener(rel: str, *, what: str = "file") -> Path:
        return regular_path(Path(root), rel, what=what, error=error, hint=hint)

    return opener


# --- ONNX graphs -------------------------------------------------------------------------------------


@contextmanager
def mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes, memory-mapped (an embedder's model.onnx is ~90 MB: no second copy in memory)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


def checked_graph(opener: Opener, rel: str, *, what: str, error: type[UserError] = UserError,
                  hint: str = "", inspect: Callable[[Any], None] | None = None) -> Path:
    """The verified path of an ONNX file whose every external-data location (any tensor: initializers, sparse
    initializers, attribute tensors, subgraphs, functions — ``dsedge.onnx_refs``) is itself a file the
    ``opener`` lets through (listed, inside, no link, regular, sha256 matched). onnxruntime's own check is not
    relied on: the versions ``pyproject.toml`` allows do not all have one. ``inspect`` gets the mapped bytes
    (the bundle reads the RoPE table's size there)."""
    path = opener(rel, what=what)
    problem = None
    with mapped(path) as buf:
        try:
            ranges = external_data_ranges(buf)
            if inspect is not None:
                inspect(buf)
        except ValueError as exc:  # the walker's "malformed protobuf"; released here, before the unmap
            problem = str(exc)
    if problem is not None:
        raise error(f"{what} {rel} is not a valid ONNX file ({problem})", where=str(path), hint=hint)
    folder = PurePosixPath(rel).parent
    sizes: dict[str, int] = {}
    for location in sorted({r.location for r in ranges}):
        target = location if folder == PurePosixPath(".") else f"{folder.as_posix()}/{location}"
        sizes[location] = opener(target, what=f"external data of {rel}").stat().st_size
    for r in ranges:  # within the file: onnxruntime would fail deep inside session creation otherwise
        end = r.offset + (r.length or 0)
        if r.offset > sizes[r.location] or end > sizes[r.location]:
            raise error(f"{what} {rel}: tensor {r.tensor!r} reads bytes [{r.offset}, {end}) of {r.location}, "
                        f"which has {sizes[r.location]}", where=str(path), hint=hint)
    return path
