"""The sentence embedder at run time: tokenizers + onnxruntime + numpy (never torch).

An embedder is a directory holding ``model.onnx`` (mean pooling and L2 normalization inside the graph, see
``convert.py``), ``tokenizer.json`` and ``embedder.json`` (id, dim, max_tokens, the model's sha256). Every
index stores a copy under ``INDEX/embedder/``; the converted default model is also cached under
``$DSEDGE_CACHE`` (default ``~/.cache/dsedge``) so a second index is built without converting again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsedge import safe_json
from dsedge.errors import UserError
from dsedge.runtime.session import SessionConfig, make_session
from dsedge.verified import Opener, cache_dir, checked_graph, local_files, read_regular, sha256_file

log = logging.getLogger(__name__)
CONVERTER_VERSION = 1  # bump when the converted graph changes: cached conversions are keyed by it

MODEL_FILE, TOKENIZER_FILE, INFO_FILE = "model.onnx", "tokenizer.json", "embedder.json"
DEFAULT_NAME = "all-MiniLM-L6-v2"
DEFAULT_BATCH = 64
DEFAULT_BATCH_TOKENS = 2048
_REBUILD = "delete this embedder directory and convert it again (or rebuild the index)"


@dataclass
class EmbedStats:
    """Counters over every ``embed`` call: texts, tokens (real and padded) and seconds in onnxruntime."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    batches: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (rows, padded length)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "seconds": self.seconds, "texts_per_s": self.texts_per_s}


class Embedder:
    """An ONNX sentence embedder: ``embed(texts) -> float32 [N, dim]`` rows of unit length."""

    def __init__(self, root: Path, info: dict, threads: int | None = None, opener: Opener | None = None):
        opener = opener or local_files(root, hint=_REBUILD)
        self.root, self.info = root, info
        self.id: str = info["id"]
        self.dim: int = int(info["dim"])
        self.max_tokens: int = int(info["max_tokens"])
        model = checked_graph(opener, MODEL_FILE, what="embedder model", hint=_REBUILD)
        self.session = make_session(model, SessionConfig(threads=threads))
        tokenizer_file = opener(TOKENIZER_FILE, what="embedder tokenizer")
        self.tokenizer = _tokenizer(tokenizer_file)
        self.tokenizer.no_padding()  # we pad per length-sorted batch ourselves
        self.tokenizer.enable_truncation(self.max_tokens)
        self._counter = _tokenizer(tokenizer_file)  # untruncated, for chunk budgets
        self._counter.no_padding()
        self._counter.no_truncation()
        self.stats = EmbedStats()

    @classmethod
    def open(cls, root: str | Path, *, threads: int | None = None, verify: bool = True,
             opener: Opener | None = None) -> Embedder:
        """Open an embedder directory. ``opener`` (an index's verified door for its ``embedder/``) checks every
        file against the index's manifest; without one (a standalone embedder) files must be regular, inside
        and unlinked, and ``verify`` checks the model's sha256 against ``embedder.json``."""
        root = Path(root)
        info = read_info(root, opener)
        if opener is None and verify:
            model = local_files(root, hint=_REBUILD)(MODEL_FILE, what="embedder model")
            if sha256_file(model) != info.get("model_sha256"):
                raise UserError(f"embedder {MODEL_FILE} does not match the sha256 in {INFO_FILE}",
                                where=str(root / MODEL_FILE), hint="delete this embedder directory and rebuild")
        return cls(root, info, threads, opener)

    # --- tokens ---------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Word pieces in ``text`` without [CLS]/[SEP] and without truncation."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def token_starts(self, text: str) -> list[int]:
        """Character offset where each word piece of ``text`` starts (for chunk budgets)."""
        return [start for start, _ in self._counter.encode(text, add_special_tokens=False).offsets]

    # --- embeddings -----------------------------------------------------------------------------
    def embed(self, texts: list[str], *, batch_size: int = DEFAULT_BATCH,
              batch_tokens: int = DEFAULT_BATCH_TOKENS, on_batch=None) -> np.ndarray:
        """Embed ``texts`` → [N, dim] float32, unit rows, in input order.

        Texts are sorted by token length and batched so each batch pads only to its own longest text, with
        at most ``batch_size`` rows and ``batch_tokens`` padded tokens per batch: beyond ~2k tokens the
        activations (and the [B, 12, T, T] attention scores) fall out of cache and throughput drops (here:
        ~6k tokens/s at 8 x 200 tokens vs ~5k at 32 x 200, 2 cores). ``on_batch(rows)`` follows each batch
        (progress: ``dsedge.progress.Bar.advance``).
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts)) if texts else []
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for rows in _batches(order, [len(e.ids) for e in encodings], batch_size, batch_tokens):
            out[rows] = self._run([encodings[i].ids for i in rows])
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def embed_query(self, text: str) -> np.ndarray:
        """One text → [dim]."""
        return self.embed([text])[0]

    def _run(self, sequences: list[list[int]]) -> np.ndarray:
        length = max(len(s) for s in sequences)
        ids = np.zeros((len(sequences), length), dtype=np.int64)  # [PAD] is id 0
        mask = np.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        started = time.perf_counter()
        (vectors,) = self.session.run(["embeddings"], {"input_ids": ids, "attention_mask": mask})
        self._account(sequences, length, time.perf_counter() - started)
        return vectors

    def _account(self, sequences: list[list[int]], length: int, seconds: float) -> None:
        s = self.stats
        s.texts += len(sequences)
        s.tokens += sum(len(q) for q in sequences)
        s.padded_tokens += len(sequences) * length
        s.seconds += seconds
        s.batches.append((len(sequences), length))

    def describe(self) -> dict:
        """What an index records about the embedder it was built with."""
        return {k: self.info[k] for k in ("id", "dim", "max_tokens", "model_sha256")}


def _batches(order: list[int], lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Consecutive runs of the length-sorted ``order`` within the row and padded-token limits."""
    out: list[list[int]] = []
    for i in order:  # ascending length: the newest text is the longest of its batch
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[i] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        raise UserError(f"embedder {TOKENIZER_FILE} cannot be loaded by tokenizers: {str(exc)[:200]}",
                        where=str(path), hint=_REBUILD) from None


def read_info(root: Path, opener: Opener | None = None) -> dict:
    """Parse ``embedder.json`` strictly; missing or non-regular files are a UserError naming the directory."""
    opener = opener or local_files(root, hint=_REBUILD)
    for name in (MODEL_FILE, TOKENIZER_FILE, INFO_FILE):
        if not (root / name).exists():
            raise UserError(f"embedder file {name} is missing", where=str(root),
                            hint="an embedder directory holds model.onnx, tokenizer.json and embedder.json")
    path = opener(INFO_FILE, what="embedder description")
    try:
        info = safe_json.loads(read_regular(path, what=INFO_FILE, max_bytes=1 << 20).decode("utf-8"), max_depth=16)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{INFO_FILE} is not valid JSON: {exc}", where=str(path), hint=_REBUILD) from exc
    missing = [k for k in ("id", "dim", "max_tokens", "model_sha256") if not isinstance(info, dict) or k not in info]
    if not isinstance(info, dict) or info.get("schema_version") != 1 or missing:
        raise UserError(f"{INFO_FILE} is not a dsedge embedder description (schema 1; missing {missing})",
                        where=str(path), hint="delete this embedder directory and rebuild it")
    bad = [k for k in ("dim", "max_tokens") if not isinstance(info[k], int) or isinstance(info[k], bool) or info[k] < 1]
    if bad or not isinstance(info["id"], str) or not isinstance(info["model_sha256"], str):
        raise UserError(f"{INFO_FILE} has mistyped fields ({', '.join(bad) or 'id/model_sha256'})", where=str(path),
                        hint="delete this embedder directory and rebuild it")
    return info


# --- the cached default embedder ---------------------------------------------------------------------

def default_embedder_dir(*, validate: bool = True) -> Path:
    """The converted all-MiniLM-L6-v2, converting it into the cache the first time (needs the
    ``embedder`` extra then; later calls only read the cache and stay torch-free)."""
    target = cache_dir() / "embedders" / f"{DEFAULT_NAME}-v{CONVERTER_VERSION}"
    if (target / INFO_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("embedder: converting %s to ONNX once, into %s", DEFAULT_NAME, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        from dsedge.retrieval.convert import convert_minilm  # the embedder extra (torch), needed only here

        convert_minilm(tmp, validate=validate)
        os.replace(tmp, target)  # atomic; a concurrent converter that won the race leaves its copy
    except OSError:
        if not (target / INFO_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
