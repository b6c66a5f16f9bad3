"""A retrieval index: an hnswlib HNSW graph over chunk embeddings plus a metadata store, as one directory.

HNSW (Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using Hierarchical
Navigable Small World graphs", arXiv:1603.09320) via hnswlib (github.com/nmslib/hnswlib). Embeddings are
unit length, so the inner-product space ranks by cosine similarity; a hit's score is the cosine.

Layout (every file listed with its sha256 in ``manifest.json``, like a bundle)::

    INDEX/manifest.json        schema, embedder id/dim/sha256, HNSW M / ef_construction / ef, counts, files
    INDEX/hnsw.bin             hnswlib's save_index (it does not store ef: we keep it in the manifest)
    INDEX/chunks.json          documents (path, sha256, chunk ids) and chunks (text, source, offsets)
    INDEX/embedder/            the ONNX embedder the index was built with (model.onnx, tokenizer.json, ...)

Writes go through ``dsedge.staging`` (a temporary sibling that replaces the index when complete, under the
index's lock: an update holds it from reading the index to renaming the new one in). Updates replace changed
documents: their old chunks are marked deleted in hnswlib (never returned by a query) and their slots are
reused by later insertions (``allow_replace_deleted``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dsedge import __version__, safe_json
from dsedge.errors import UserError
from dsedge.manifest import MANIFEST_FILE, file_entry
from dsedge.progress import progress
from dsedge.retrieval.chunking import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_OVERLAP,
    chunk_text,
    collect_documents,
    read_document,
)
from dsedge.retrieval.embedder import Embedder, default_embedder_dir
from dsedge.staging import Artifact, check_output, output_lock, staged_output
from dsedge.verified import VerifiedFiles, check_table, read_regular, regular_path, scan_tree, verify_mode

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_JSON_DEPTH = 32  # index metadata nests a few levels deep
KIND = "dsedge-index"
HNSW_FILE, CHUNKS_FILE, EMBEDDER_DIR = "hnsw.bin", "chunks.json", "embedder"
SPACE = "ip"  # unit vectors: inner product = cosine; hnswlib's distance is 1 - ip
SEED = 100  # hnswlib's default level generator seed, recorded so a build can be repeated
REBUILD_HINT = "rebuild it with `dsedge index build DOCS... -o INDEX --overwrite`"
MAX_MANIFEST_BYTES = 64 << 20
# Every file an index reads (the verified door refuses any other; the embedder's model may add external data).
REQUIRED_FILES = (HNSW_FILE, CHUNKS_FILE, *(f"{EMBEDDER_DIR}/{name}" for name in ("model.onnx", "tokenizer.json",
                                                                                    "embedder.json")))


def _is_index(root: Path) -> bool:
    if not (root / MANIFEST_FILE).is_file():  # a FIFO named manifest.json would block the read
        return False
    try:
        return json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


# What `--overwrite` (and an in-place update) may replace (dsedge.staging): only an index.
INDEX_ARTIFACT = Artifact("dsedge index (manifest.json of kind dsedge-index)", _is_index)


class IndexError_(UserError):  # noqa: N801 — not the builtin IndexError
    """An index directory is missing, corrupt, or does not match its embedder."""


@dataclass(frozen=True)
class IndexParams:
    """Chunking and HNSW parameters, recorded in the manifest.

    M: graph degree (memory ~ M·8 bytes per vector; recall rises with it). ef_construction: candidate list
    while inserting (build time vs graph quality). ef: candidate list at query time (≥ k; latency vs recall).
    """

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap: int = DEFAULT_OVERLAP
    M: int = 16
    ef_construction: int = 200
    ef: int = 64

    def check(self) -> None:
        for name, low in (("M", 2), ("ef_construction", 1), ("ef", 1)):
            if getattr(self, name) < low:
                raise UserError(f"{name} must be at least {low}", hint=f"pass a larger --{name.replace('_', '-')}")


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: ``text == document(source)[start:end]``; ``score`` is the cosine similarity."""

    rank: int
    score: float
    chunk_id: int
    source: str
    start: int
    end: int
    text: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


# --- the in-memory index ------------------------------------------------------------------------------

@dataclass
class Index:
    """An open index: the hnswlib graph, the metadata store and the embedder."""

    root: Path | None
    params: IndexParams
    embedder: Embedder
    hnsw: Any
    documents: dict[str, dict] = field(default_factory=dict)  # abs path -> {sha256, bytes, chars, chunks}
    chunks: dict[int, dict] = field(default_factory=dict)  # id -> {source, start, end, tokens, text}
    next_id: int = 0
    created: str = ""

    @classmethod
    def open(cls, root: str | Path, *, verify: bool | str = True, threads: int | None = None) -> Index:
        """Open an index directory. Every file is reached through one verified door (``dsedge.verified``): listed
        in the manifest, inside, no link, regular. ``verify``: True hashes each file when first read unless the
        verification record vouches for it, "full" hashes every file now, False checks paths and kinds only."""
        root = Path(root)
        raw, manifest = _read_manifest_raw(root)
        files = VerifiedFiles(root, check_table(manifest["files"], where=str(root / MANIFEST_FILE), error=IndexError_,
                                                hint=REBUILD_HINT),
                              raw, mode=verify_mode(verify), label="index", error=IndexError_, hint=REBUILD_HINT,
                              ignore=(MANIFEST_FILE,))
        _check_listed(root, manifest)
        embedder_dir = files.directory(EMBEDDER_DIR, what="embedder")
        embedder = Embedder.open(embedder_dir, threads=threads,
                                 opener=lambda rel, what="file": files.path(f"{EMBEDDER_DIR}/{rel}", what=what))
        _check_embedder(root, manifest["embedder"], embedder)
        params = _params(root, manifest["params"])
        store = _read_store(files.path(CHUNKS_FILE, what="index metadata"))
        hnsw = _load_hnsw(files.path(HNSW_FILE, what="HNSW graph"), embedder.dim, manifest, params)
        _check_counts(root, manifest, store, hnsw)
        return cls(root, params, embedder, hnsw, store["documents"], {c["id"]: c for c in store["chunks"]},
                   store["next_id"], manifest.get("created", ""))

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def deleted(self) -> int:
        """Slots marked deleted and not yet reused."""
        return self.hnsw.get_current_count() - len(self.chunks)

    def summary(self) -> dict:
        """What a bundle manifest or a report records about the index."""
        return {"documents": len(self.documents), "chunks": len(self.chunks), "params": dict(self.params.__dict__),
                "embedder": self.embedder.describe(), "created": self.created}

    # --- search -------------------------------------------------------------------------------
    def search_vectors(self, vectors: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest live chunks of each query vector: (ids [Q, k'], cosine scores [Q, k']), k' = min(k, live)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, vectors.shape[-1])
        if vectors.shape[1] != self.dim:
            raise IndexError_(f"query vectors have dimension {vectors.shape[1]}, the index {self.dim}",
                              where=str(self.root), hint="embed queries with the index's own embedder")
        if not self.chunks:  # zero hits reported as success would look like "nothing relevant", not "empty"
            raise IndexError_("the index holds no chunks: there is nothing to retrieve from", where=str(self.root),
                              hint="add documents (`dsedge index add INDEX DOCS...`) or " + REBUILD_HINT)
        k = min(k, len(self.chunks))
        ef = max(ef or self.params.ef, k)
        while True:  # with many deleted slots a small ef can find fewer than k live ones: widen and retry
            self.hnsw.set_ef(ef)
            try:
                labels, distances = self.hnsw.knn_query(vectors, k=k)
                return labels, 1.0 - distances
            except RuntimeError:
                if ef >= self.hnsw.get_current_count():
                    raise
                ef *= 2

    def hits(self, labels: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """One query's labels/scores as Hits, best first."""
        return [Hit(rank, float(score), int(label), *self._chunk_fields(int(label)))
                for rank, (label, score) in enumerate(zip(labels, scores, strict=True), 1)]

    def _chunk_fields(self, label: int) -> tuple[str, int, int, str]:
        c = self.chunks[label]
        return c["source"], c["start"], c["end"], c["text"]

    # --- changes ------------------------------------------------------------------------------
    def add_documents(self, texts: dict[str, tuple[str, bytes]], timer: dict) -> int:
        """Chunk, embed (one length-sorted pass over all chunks) and insert documents, replacing older
        versions of them. ``texts``: path -> (text, raw bytes). Returns the number of chunks added."""
        for path in texts:
            self.remove_document(path)
        pieces = [(path, c) for path, (text, _) in texts.items()
                  for c in chunk_text(text, self.embedder.token_starts, max_tokens=self.params.chunk_tokens,
                                      overlap=self.params.overlap)]
        ids = list(range(self.next_id, self.next_id + len(pieces)))
        log.info("index: embedding %d chunks (%d tokens) from %d documents", len(pieces),
                 sum(c.tokens for _, c in pieces), len(texts))
        started = time.perf_counter()
        with progress("index", total=len(pieces), unit="chunk") as embedded:
            vectors = self.embedder.embed([c.text for _, c in pieces], on_batch=embedded.advance)  # [N, dim]
        seconds = time.perf_counter() - started
        timer["embed_s"] = timer.get("embed_s", 0.0) + seconds
        if pieces:
            log.info("index: embedded in %.1f s (%.1f chunks/s)", seconds, len(pieces) / seconds)
        self._insert(vectors, ids, timer)
        self.next_id += len(pieces)
        for i, (path, c) in zip(ids, pieces, strict=True):
            self.chunks[i] = {"id": i, "source": path, "start": c.start, "end": c.end, "tokens": c.tokens,
                              "text": c.text}
        for path, (text, raw) in texts.items():
            self.documents[path] = {"sha256": _sha256_bytes(raw), "bytes": len(raw), "chars": len(text),
                                    "chunks": [i for i, (p, _) in zip(ids, pieces, strict=True) if p == path]}
        return len(ids)

    def _insert(self, vectors: np.ndarray, ids: list[int], timer: dict) -> None:
        if not ids:
            return
        started = time.perf_counter()
        current = self.hnsw.get_current_count()
        needed = current + max(0, len(ids) - self.deleted)  # deleted slots are reused first
        if needed > self.hnsw.get_max_elements():
            self.hnsw.resize_index(max(needed, int(self.hnsw.get_max_elements() * 1.25)))
        self.hnsw.add_items(vectors, np.asarray(ids, dtype=np.uint64), replace_deleted=True)
        timer["index_s"] = timer.get("index_s", 0.0) + time.perf_counter() - started

    def remove_document(self, path: str) -> int:
        """Mark a document's chunks deleted (queries never return them). Returns chunks removed."""
        doc = self.documents.pop(path, None)
        for i in doc["chunks"] if doc else ():
            self.hnsw.mark_deleted(i)
            del self.chunks[i]
        return len(doc["chunks"]) if doc else 0

    # --- saving -------------------------------------------------------------------------------
    def save(self, output: Path, *, embedder_from: Path, overwrite: bool = False,
             inputs: Iterable[str | Path] = ()) -> None:
        """Write the index into ``output`` through ``dsedge.staging.staged_output`` (temporary sibling renamed
        in when complete, under the output's lock). ``inputs`` (the documents, the embedder) are refused as
        outputs; ``overwrite`` replaces an existing index (only an index)."""
        output = Path(output)
        with staged_output(output, inputs=inputs, overwrite=overwrite, artifact=INDEX_ARTIFACT) as tmp:
            _copy_embedder(embedder_from, tmp / EMBEDDER_DIR)
            self.hnsw.save_index(str(tmp / HNSW_FILE))
            _write_json(tmp / CHUNKS_FILE, {"schema_version": SCHEMA_VERSION, "next_id": self.next_id,
                                            "documents": self.documents,
                                            "chunks": [self.chunks[i] for i in sorted(self.chunks)]})
            _write_json(tmp / MANIFEST_FILE, self._manifest(tmp))
        self.root = output

    def _manifest(self, tmp: Path) -> dict:
        # the same walk as at open: a link or special file in the new index is refused at write time too
        files = [rel for rel in scan_tree(tmp, error=IndexError_, hint="an index holds plain files only")
                 if rel != MANIFEST_FILE]
        return {"schema_version": SCHEMA_VERSION, "kind": KIND, "dsedge_version": __version__,
                "created": self.created or _now(), "updated": _now(),
                "embedder": self.embedder.describe() | {"path": EMBEDDER_DIR},
                "params": self.params.__dict__,
                "hnsw": {"library": "hnswlib", "space": SPACE, "dim": self.dim, "random_seed": SEED,
                         "max_elements": self.hnsw.get_max_elements(), "elements": self.hnsw.get_current_count(),
                         "deleted": self.deleted},
                "counts": {"documents": len(self.documents), "chunks": len(self.chunks)},
                "files": {rel: file_entry(tmp, rel) for rel in files}}


def _hnswlib():
    try:
        import hnswlib
    except ImportError as exc:
        raise UserError("retrieval needs hnswlib, which is not installed",
                        hint="pip install 'dsedge[retrieval]'") from exc
    return hnswlib


def new_index(params: IndexParams, embedder: Embedder, capacity: int) -> Index:
    """An empty in-memory index for ``embedder``'s vectors with room for ``capacity`` chunks."""
    hnsw = _hnswlib().Index(space=SPACE, dim=embedder.dim)
    hnsw.init_index(max_elements=max(capacity, 1), M=params.M, ef_construction=params.ef_construction,
                    random_seed=SEED, allow_replace_deleted=True)
    hnsw.set_ef(params.ef)
    return Index(None, params, embedder, hnsw, created=_now())


# --- reading and checking ----------------------------------------------------------------------------

def _read_manifest(root: Path) -> dict:
    return _read_manifest_raw(root)[1]


def _read_manifest_raw(root: Path) -> tuple[bytes, dict]:
    """The manifest's bytes (they key the verification record) and its checked JSON."""
    path = root / MANIFEST_FILE
    if not root.is_dir() or not (path.exists() or path.is_symlink()):
        raise IndexError_("not an index directory (no manifest.json)", where=str(root),
                          hint="pass a directory written by `dsedge index build`")
    path = regular_path(root, MANIFEST_FILE, what="index manifest", error=IndexError_, hint=REBUILD_HINT)
    raw = read_regular(path, what="index manifest", max_bytes=MAX_MANIFEST_BYTES, error=IndexError_, hint=REBUILD_HINT)
    try:  # depth-limited: nested brackets are a clear error, not a RecursionError
        data = safe_json.loads(raw.decode("utf-8"), max_depth=MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, too-deep and too-long numbers
        raise IndexError_(f"index manifest is not valid JSON: {exc}", where=str(path), hint=REBUILD_HINT) from exc
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise IndexError_("manifest.json does not describe a dsedge index", where=str(path),
                          hint="pass a directory written by `dsedge index build` (a bundle is not an index)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise IndexError_(f"unsupported index schema_version {data.get('schema_version')!r} (this dsedge reads "
                          f"{SCHEMA_VERSION})", where=str(path), hint=REBUILD_HINT)
    missing = [k for k in ("embedder", "params", "hnsw", "files") if not isinstance(data.get(k), dict)]
    if missing:
        raise IndexError_(f"index manifest lacks {', '.join(missing)}", where=str(path), hint=REBUILD_HINT)
    return raw, data


def _check_listed(root: Path, manifest: dict) -> None:
    """The files an index reads are all in its manifest (the verified door refuses any other)."""
    for rel in REQUIRED_FILES:
        if rel not in manifest["files"]:
            raise IndexError_(f"index file {rel} is not listed in the manifest", where=str(root), hint=REBUILD_HINT)


def _check_counts(root: Path, manifest: dict, store: dict, hnsw) -> None:
    """chunks.json, the HNSW graph and the manifest agree on how many chunks there are, and every chunk is a
    live vector: an emptied or truncated chunks.json (re-hashed into the manifest) is corrupt, not empty."""
    recorded, counts = manifest["hnsw"], manifest.get("counts") or {}
    elements, deleted = recorded.get("elements"), recorded.get("deleted")
    live = elements - deleted if isinstance(elements, int) and isinstance(deleted, int) else None
    problems = []
    if hnsw.get_current_count() != elements:
        problems.append(f"{HNSW_FILE} holds {hnsw.get_current_count()} vectors, the manifest says {elements}")
    if len(store["chunks"]) != live or counts.get("chunks") != live:
        problems.append(f"{CHUNKS_FILE} lists {len(store['chunks'])} chunks, the manifest {counts.get('chunks')} "
                        f"and {live} live vectors")
    try:
        ids = {int(c["id"]) for c in store["chunks"]}
    except (KeyError, TypeError, ValueError):
        ids = None
        problems.append(f"a chunk in {CHUNKS_FILE} lacks an integer id")
    if ids is not None and not ids <= set(int(i) for i in hnsw.get_ids_list()):
        problems.append(f"{CHUNKS_FILE} names chunk ids the HNSW graph does not hold")
    if problems:
        raise IndexError_(f"index files disagree: {'; '.join(problems)}", where=str(root), hint=REBUILD_HINT)


def _check_embedder(root: Path, recorded: dict, embedder: Embedder, *, given: bool = False) -> None:
    """The embedder must be the one the index was built with: same id, dimension and model sha256.

    ``given``: the user passed this embedder (a mismatch is their choice of embedder, not a corrupt index).
    """
    diffs = [f"{key} {recorded.get(key)!r} vs {embedder.info.get(key)!r}" for key in ("id", "dim", "model_sha256")
             if recorded.get(key) != embedder.info.get(key)]
    if diffs and given:
        raise IndexError_(f"embedder mismatch: the index was built with another embedder ({'; '.join(diffs)})",
                          where=str(embedder.root), hint="use the index's own embedder (omit --embedder), or "
                                                         "build a new index with this one")
    if diffs:
        raise IndexError_(f"the index's embedder/ does not match its manifest ({'; '.join(diffs)})",
                          where=str(root / EMBEDDER_DIR), hint=REBUILD_HINT)


def _params(root: Path, recorded: dict) -> IndexParams:
    try:
        return IndexParams(**recorded)
    except TypeError as exc:
        raise IndexError_(f"index manifest has unknown or missing parameters: {exc}", where=str(root / MANIFEST_FILE),
                          hint=REBUILD_HINT) from exc


def _read_store(path: Path) -> dict:
    try:
        store = safe_json.loads(path.read_text(encoding="utf-8"), max_depth=MAX_JSON_DEPTH)
        shaped = (isinstance(store, dict) and store.get("schema_version") == SCHEMA_VERSION
                  and isinstance(store.get("chunks"), list) and isinstance(store.get("documents"), dict)
                  and isinstance(store.get("next_id"), int) and not isinstance(store.get("next_id"), bool))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexError_(f"index metadata {CHUNKS_FILE} is not valid JSON ({exc})", where=str(path),
                          hint=REBUILD_HINT) from exc
    if not shaped:
        raise IndexError_(f"index metadata {CHUNKS_FILE} is corrupt (missing or mistyped schema_version, chunks, "
                          "documents or next_id)", where=str(path), hint=REBUILD_HINT)
    return store


def hnsw_file_dim(path: Path) -> int:
    """Vector dimension recorded in an hnswlib index file's header (float32 vectors).

    hnswlib's saveIndex starts with six size_t fields: offsetLevel0, max_elements, cur_element_count,
    size_data_per_element, label_offset, offsetData; a vector occupies [offsetData, label_offset).
    """
    with open(path, "rb") as f:
        header = f.read(48)
    if len(header) < 48:
        raise IndexError_(f"{HNSW_FILE} is truncated", where=str(path), hint=REBUILD_HINT)
    *_, label_offset, offset_data = struct.unpack("<6Q", header)
    return (label_offset - offset_data) // 4


def _load_hnsw(path: Path, dim: int, manifest: dict, params: IndexParams):
    recorded = manifest["hnsw"].get("dim")
    file_dim = hnsw_file_dim(path)
    if not dim == recorded == file_dim:
        raise IndexError_(f"dimension mismatch: embedder {dim}, manifest {recorded}, {HNSW_FILE} {file_dim}",
                          where=str(path), hint="the index and its embedder come from different builds; "
                                                + REBUILD_HINT)
    hnsw = _hnswlib().Index(space=SPACE, dim=dim)
    try:
        hnsw.load_index(str(path), max_elements=0, allow_replace_deleted=True)
    except RuntimeError as exc:
        raise IndexError_(f"{HNSW_FILE} cannot be read: {exc}", where=str(path), hint=REBUILD_HINT) from exc
    hnsw.set_ef(params.ef)  # hnswlib does not save ef: restore it from the manifest
    return hnsw


# --- writing -----------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def _copy_embedder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in sorted(Path(src).iterdir()):
        if item.is_file():
            _link_or_copy(item, dst / item.name)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (same file system: no copy of the 90 MB model), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sha256_bytes(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the public operations -------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildReport:
    """What `build_index` / `update_index` did, with throughput of the embedder and the index separately."""

    index: str
    documents: int
    chunks: int
    added_chunks: int
    removed_chunks: int
    unchanged_documents: int
    embed_s: float
    index_s: float
    total_s: float
    embed_tokens: int
    params: dict
    embedder: dict

    @property
    def embed_chunks_per_s(self) -> float:
        return self.added_chunks / self.embed_s if self.embed_s else 0.0

    @property
    def index_chunks_per_s(self) -> float:
        return self.added_chunks / self.index_s if self.index_s else 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__) | {"embed_chunks_per_s": self.embed_chunks_per_s,
                                      "index_chunks_per_s": self.index_chunks_per_s}


def build_index(docs: Iterable[str | Path], output: str | Path, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                overlap: int = DEFAULT_OVERLAP, M: int = 16, ef_construction: int = 200, ef: int = 64,  # noqa: N803
                embedder: str | Path | None = None, overwrite: bool = False,
                threads: int | None = None) -> BuildReport:
    """Chunk, embed and index the documents in ``docs`` (files or folders) into the directory ``output``.

    ``embedder``: an embedder directory (default: all-MiniLM-L6-v2, converted once into the cache).
    Refuses an existing ``output`` unless ``overwrite``; an empty corpus is a UserError.
    """
    started = time.perf_counter()
    output = Path(output)
    docs = list(docs)
    source = Path(embedder) if embedder else default_embedder_dir()
    inputs = [*docs, source]  # never written over, around or into
    check_output(output, inputs=inputs, overwrite=overwrite, artifact=INDEX_ARTIFACT)
    params = IndexParams(chunk_tokens, overlap, M, ef_construction, ef)
    params.check()
    texts = _read_all(collect_documents(docs))
    if not texts:
        raise UserError("empty corpus: no documents found", where=", ".join(map(str, docs)),
                        hint="pass .txt, .md, .rst or .html files, or folders holding them")
    emb = Embedder.open(source, threads=threads)
    if chunk_tokens > emb.max_tokens - 2:  # [CLS] and [SEP] take two of the embedder's positions
        raise UserError(f"--chunk-tokens {chunk_tokens} exceeds what the embedder reads ({emb.max_tokens} "
                        "tokens with [CLS]/[SEP])", hint=f"use --chunk-tokens {emb.max_tokens - 2} or less")
    index = new_index(params, emb, capacity=sum(len(t) for t, _ in texts.values()) // 256 + 16)
    timer: dict = {}
    added = index.add_documents(texts, timer)
    if not added:
        raise UserError(f"empty corpus: the {len(texts)} documents hold no text", where=", ".join(map(str, docs)),
                        hint="pass documents with text in them")
    index.save(output, embedder_from=source, overwrite=overwrite, inputs=inputs)
    return _report(index, timer, started, added, 0, 0)


def update_index(index_dir: str | Path, docs: Iterable[str | Path] = (), *, remove: Iterable[str | Path] = (),
                 embedder: str | Path | None = None, threads: int | None = None) -> BuildReport:
    """Add new documents, replace changed ones (by content sha256) and drop ``remove``d ones, in place.

    A folder in ``docs`` is taken as complete: documents indexed from under it that no longer exist are
    removed. Old chunks are marked deleted in hnswlib. ``embedder`` (optional) must match the index's.
    """
    started = time.perf_counter()
    docs = list(docs)
    check_output(index_dir, inputs=docs, overwrite=True, artifact=INDEX_ARTIFACT)
    with output_lock(index_dir):  # held from reading to renaming in: a concurrent update is refused, not lost
        index = Index.open(index_dir, threads=threads)
        if embedder is not None:
            _check_embedder(Path(index_dir), index.embedder.describe(), Embedder.open(embedder, verify=False),
                            given=True)
        texts = _read_all(collect_documents(docs)) if docs else {}
        removed = sum(index.remove_document(p) for p in _stale(index, docs, texts, remove))
        changed = {p: tr for p, tr in texts.items()
                   if index.documents.get(p, {}).get("sha256") != _sha256_bytes(tr[1])}
        removed += sum(len(index.documents[p]["chunks"]) for p in changed if p in index.documents)
        timer: dict = {}
        added = index.add_documents(changed, timer)
        unchanged = len(texts) - len(changed)
        index.save(Path(index_dir), embedder_from=index.embedder.root, overwrite=True, inputs=docs)
    return _report(index, timer, started, added, removed, unchanged)


def _stale(index: Index, docs: list, texts: dict, remove: Iterable) -> list[str]:
    """Indexed documents to drop: listed in ``remove`` (files or folders), or gone from a folder in ``docs``."""
    def under(path: str, folder: Path) -> bool:
        return Path(path) == folder or folder in Path(path).parents

    gone = [Path(d).resolve() for d in docs if Path(d).is_dir()]
    dropped = [Path(r).resolve() for r in remove]
    return [p for p in list(index.documents)
            if any(under(p, f) for f in dropped) or (p not in texts and any(under(p, f) for f in gone))]


def _read_all(paths: list[Path]) -> dict[str, tuple[str, bytes]]:
    out = {}
    for path in paths:
        text, raw = read_document(path)
        out[path.as_posix()] = (text, raw)
    log.info("index: %d documents, %d characters", len(out), sum(len(t) for t, _ in out.values()))
    return out


def _report(index: Index, timer: dict, started: float, added: int, removed: int, unchanged: int) -> BuildReport:
    return BuildReport(str(index.root), len(index.documents), len(index.chunks), added, removed, unchanged,
                       timer.get("embed_s", 0.0), timer.get("index_s", 0.0), time.perf_counter() - started,
                       index.embedder.stats.tokens, index.params.__dict__, index.embedder.describe())


def copy_index(index_dir: str | Path, dest: str | Path, *, verify: bool = True) -> dict:
    """Copy a verified index directory to ``dest`` (which must not exist), hard-linking files where the file
    system allows — e.g. into a bundle's ``retriever/`` folder before its manifest is written. Returns the
    index's ``summary()``."""
    index = Index.open(index_dir, verify=verify)
    dest = Path(dest)
    if dest.exists():
        raise UserError("destination already exists", where=str(dest), hint="copy into a new directory")
    manifest = _read_manifest(Path(index_dir))
    for rel in [MANIFEST_FILE, *manifest["files"]]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(regular_path(Path(index_dir), rel, what="index file", error=IndexError_, hint=REBUILD_HINT),
                      target)
    return index.summary()


@dataclass(frozen=True)
class IndexStats:
    """`dsedge index stats`: counts, parameters, embedder, and bytes on disk / in memory."""

    index: str
    documents: int
    chunks: int
    deleted_slots: int
    capacity: int
    params: dict
    embedder: dict
    created: str
    disk_bytes: dict
    hnsw_memory_bytes: int
    chunk_tokens_mean: float
    sources: list[str]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def index_stats(index_dir: str | Path, *, verify: bool = True) -> IndexStats:
    """Describe an index directory (``verify``: check every file's sha256 first)."""
    index = Index.open(index_dir, verify=verify)
    root = Path(index_dir)
    disk = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    tokens = [c["tokens"] for c in index.chunks.values()]
    return IndexStats(str(root), len(index.documents), len(index.chunks), index.deleted,
                      index.hnsw.get_max_elements(), index.params.__dict__, index.embedder.describe(),
                      index.created, disk, hnsw_memory_bytes(index.hnsw),
                      float(np.mean(tokens)) if tokens else 0.0, sorted(index.documents))


def hnsw_memory_bytes(hnsw) -> int:
    """hnswlib's in-memory size: the level-0 block (vectors + M0 links + label per slot) plus upper levels,
    which is what ``index_file_size`` (the serialized size) measures."""
    return int(hnsw.index_file_size())
