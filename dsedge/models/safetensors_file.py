"""Safetensors headers parsed with the stdlib, with bounds checks that name the file and tensor.

Format (huggingface/safetensors, format spec in its README): 8-byte little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the
data buffer; offsets are relative to the buffer. We parse it ourselves so that listing and validating a
671B checkpoint touches only the headers, and so that a truncated or corrupt file gets an error
that says which tensor is cut off, before any data is read.

We accept exactly the files the reference implementation accepts (``Metadata::validate`` and
``SafeTensors::read_metadata`` in safetensors/src/tensor.rs @ 24b0b285): offsets and shape entries are
non-negative integers; sorted by offsets, the tensors tile the data buffer from byte 0 with no overlap
and no gap, each spanning exactly dtype size × elements, and the last one ends where the file ends.
Overlapping tensors would let two names alias the same bytes, so a tampered file could change a
tensor that a check already read under another name.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dsedge import safe_json
from dsedge.errors import CheckpointError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
# {name: {"shape": [...]}} nests 3 deep; the slack is for unknown keys in an entry, which the reference ignores.
MAX_HEADER_DEPTH = 8
METADATA_KEY = "__metadata__"

_REDOWNLOAD = "the file is truncated or corrupt; download or copy it again"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, size, and its dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """All tensors of one .safetensors file; raises CheckpointError naming the file and tensor."""
    with _open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"file is {size} bytes, too short for a safetensors header",
                                  where=str(path), hint=_REDOWNLOAD)
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"header length {header_len} does not fit a {size}-byte file",
                                  where=str(path), hint=_REDOWNLOAD)
        raw = f.read(header_len)
    header = _parse_json(raw, path)
    _check_metadata(header.get(METADATA_KEY), path)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {name: _tensor_info(name, entry, path, data_start, data_size)
               for name, entry in header.items() if name != METADATA_KEY}
    _check_tiling(tensors, path, data_start, data_size)
    return tensors


def _open_regular_file(path: Path) -> BinaryIO:
    """Open for reading, refusing anything but a regular file (links followed) before it can block.

    Opening a FIFO for reading waits for a writer forever, and a device can be endless; so stat first,
    open non-blocking, and check the opened file again (it could have been swapped in between).
    """
    try:
        _require_regular(os.stat(path).st_mode, path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError("safetensors file not found", where=str(path),
                              hint="the checkpoint is incomplete: copy the missing shard") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file ({exc.strerror or exc})", where=str(path),
                              hint="check the file's permissions") from None
    f = os.fdopen(fd, "rb")
    try:
        _require_regular(os.fstat(fd).st_mode, path)
    except CheckpointError:
        f.close()
        raise
    return f


def _require_regular(mode: int, path: Path) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise CheckpointError(f"safetensors shard is {kind}, not a regular file", where=str(path),
                          hint="a shard must be a plain file (or a link to one); replace it with the real file")


def _parse_json(raw: bytes, path: Path) -> dict:
    try:
        header = safe_json.loads(raw.decode("utf-8"), max_depth=MAX_HEADER_DEPTH, reject_duplicates=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"safetensors header is not valid JSON ({exc})", where=str(path),
                              hint=_REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", where=str(path), hint=_REDOWNLOAD)
    return header


def _check_metadata(metadata: Any, path: Path) -> None:
    """``__metadata__`` is absent, null, or an object of strings (as the reference deserializes it)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{METADATA_KEY} must map strings to strings", where=f"{path}: {METADATA_KEY}",
                              hint=_REDOWNLOAD)


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (a bool is not one, nor is 2.0: the reference reads these as usize)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(name: str, entry: Any, path: Path, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError("malformed tensor entry in safetensors header (needs dtype, shape, data_offsets)",
                              where=where, hint=_REDOWNLOAD)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"unsupported dtype {dtype!r}", where=where,
                              hint=f"supported: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"invalid shape {shape!r}: it must be a list of non-negative integers",
                              where=where, hint=_REDOWNLOAD)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"invalid data_offsets {offsets!r}: they must be [begin, end], non-negative "
                              "integers", where=where, hint=_REDOWNLOAD)
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"invalid offsets [{begin}, {end}]: begin is after end", where=where,
                              hint=_REDOWNLOAD)
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != needed:
        raise CheckpointError(f"{dtype}{shape} needs {needed} bytes but its offsets span {end - begin}",
                              where=where, hint=_REDOWNLOAD)
    if end > data_size:
        raise CheckpointError(f"tensor data ends at byte {end} of the data section, but the file holds "
                              f"only {data_size} bytes of data", where=where, hint=_REDOWNLOAD)
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _check_tiling(tensors: dict[str, TensorInfo], path: Path, data_start: int, data_size: int) -> None:
    """Sorted by offsets, each tensor starts where the previous one ended, and the last ends the file."""
    expected, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        begin = info.offset - data_start
        if begin < expected:
            raise CheckpointError(f"data_offsets [{begin}, {begin + info.nbytes}] overlap tensor {previous} "
                                  f"(which ends at {expected})", where=f"{path}: {info.name}", hint=_REDOWNLOAD)
        if begin > expected:
            after = f"after tensor {previous}" if previous else "at the start of the data section"
            raise CheckpointError(f"{begin - expected} unused bytes {after}: tensors must be stored back to back",
                                  where=f"{path}: {info.name}", hint=_REDOWNLOAD)
        expected, previous = begin + info.nbytes, info.name
    if expected != data_size:
        raise CheckpointError(f"{data_size - expected} bytes after the last tensor's data are not covered by "
                              "the header", where=str(path), hint=_REDOWNLOAD)
