"""Safetensors headers parsed with the stdlib, with bounds checks that name the file and tensor.

Format (huggingface/safetensors, format spec in its README): 8-byte little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the
data buffer; offsets are relative to the buffer. We parse it ourselves so that listing and validating a
671B checkpoint touches only the headers, and so that a truncated or corrupt file gets an error
that says which tensor is cut off, before any data is read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dsedge.errors import CheckpointError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit

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
    size = _file_size(path)
    with open(path, "rb") as f:
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
    data_start, data_size = 8 + header_len, size - 8 - header_len
    return {name: _tensor_info(name, entry, path, data_start, data_size)
            for name, entry in header.items() if name != "__metadata__"}


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointError("safetensors file not found", where=str(path),
                              hint="the checkpoint is incomplete: copy the missing shard") from None


def _parse_json(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"safetensors header is not valid JSON ({exc})", where=str(path),
                              hint=_REDOWNLOAD) from exc
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", where=str(path), hint=_REDOWNLOAD)
    return header


def _tensor_info(name: str, entry: dict, path: Path, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: {name}"
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("malformed tensor entry in safetensors header", where=where,
                              hint=_REDOWNLOAD) from None
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"unsupported dtype {dtype!r}", where=where,
                              hint=f"supported: {', '.join(DTYPE_BYTES)}")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
        raise CheckpointError(f"invalid shape {list(shape)} or offsets [{begin}, {end}]", where=where,
                              hint=_REDOWNLOAD)
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(f"{dtype}{list(shape)} needs {math.prod(shape) * DTYPE_BYTES[dtype]} bytes "
                              f"but its offsets span {end - begin}", where=where, hint=_REDOWNLOAD)
    if end > data_size:
        raise CheckpointError(f"tensor data ends at byte {end} of the data section, but the file holds "
                              f"only {data_size} bytes of data", where=where, hint=_REDOWNLOAD)
    return TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
