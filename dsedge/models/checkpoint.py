"""Streamed reading of Hugging Face safetensors checkpoints (single file or sharded).

Only headers are read up front; each tensor's bytes are read on demand with a plain positioned read
into a fresh buffer. We do not memory-map shards (safetensors' ``safe_open`` does): mapped pages of
every shard touched stay in the process's resident set, while a read holds only the tensors the caller
keeps, so peak memory follows one decoder layer, not the model. Pickle files are never loaded.

Compressed checkpoints (compressed-tensors pack-quantized, as ``dsedge compress`` writes) are read
through their logical names: ``X.weight`` of a quantized module is listed, validated against the
spec and read (dequantized) like any other weight; :meth:`Checkpoint.quantized` returns its integers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsedge.errors import CheckpointError
from dsedge.models import compressed
from dsedge.models.fp8 import dequantize_fp8_blocks, scale_grid
from dsedge.models.memory import return_large_frees_to_os
from dsedge.models.registry import load_spec
from dsedge.models.safetensors_file import TensorInfo, read_header
from dsedge.models.spec import ModelSpec, TensorSpec
from dsedge.quantformat.packing import unpack
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import QuantizedTensor, dequantize

if TYPE_CHECKING:  # torch is imported on first read, so listing/validating works without it
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = {"F32", "F16", "BF16"}
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"  # weight_scale_inv next to each FP8 weight
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")  # buffers some old exports saved; recomputed anyway
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MTP_SHARED = (".embed_tokens.weight", ".shared_head.head.weight")  # an MTP layer's copies of the main tensors


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    import torch  # optional heavy dependency: listing and validating need no torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}[safetensors_dtype]


ROW_BLOCK_ELEMENTS = 1 << 22  # row_blocks: values per float32 block (16 MiB; int64 unpacking: 32 MiB)


@dataclass(frozen=True)
class ValidationReport:
    tensors_checked: int
    fp8_tensors: int
    has_mtp: bool
    quantized_modules: int = 0


class Checkpoint:
    """A checkpoint directory: its spec, its tensors' locations, and streamed reads of them."""

    def __init__(self, path: str | Path, spec: ModelSpec | None = None):
        """``path`` is a checkpoint directory; callers that take demo model names resolve them first
        (:func:`dsedge.sources.resolve_checkpoint`)."""
        self.path = _checkpoint_dir(path)
        self.spec = spec or load_spec(self.path)
        self.files = _shard_files(self.path)
        self.tensors: dict[str, TensorInfo] = _read_headers(self.path, self.files)
        # module name -> scheme of each quantized module; {} for a plain (float or FP8) checkpoint
        self.quantization: dict[str, QuantScheme] = compressed.read_schemes(
            self.spec.config, self.tensors, str(self.path / "config.json"))
        # ... and the layout its tensors are stored in (config.json's weights args; may differ in group size)
        self.storage: dict[str, QuantScheme] = compressed.read_schemes(
            self.spec.config, self.tensors, str(self.path / "config.json"), stored=True)

    # --- what is there ----------------------------------------------------------------------------
    @property
    def has_mtp(self) -> bool:
        first_mtp = f"model.layers.{self.spec.num_hidden_layers}."
        return any(name.startswith(first_mtp) for name in self.tensors)

    @property
    def is_fp8(self) -> bool:
        return any(t.dtype == FP8_DTYPE for t in self.tensors.values())

    @property
    def is_compressed(self) -> bool:
        return bool(self.quantization)

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out

    def layer_names(self, layer: int) -> list[str]:
        """Tensor names of one decoder (or MTP) layer, FP8 scales excluded, in on-disk order.

        A quantized module appears as its logical ``X.weight`` (see :meth:`read`).
        """
        prefix = f"model.layers.{layer}."
        return [n for n in self._names() if n.startswith(prefix)]

    def non_layer_names(self) -> list[str]:
        return [n for n in self._names() if not _LAYER.match(n)]

    # --- reading ------------------------------------------------------------------------------------
    def read_raw(self, name: str) -> torch.Tensor:
        """A tensor exactly as stored (dtype included)."""
        import torch  # optional heavy dependency: only reads need torch

        return_large_frees_to_os()
        info = self._info(name)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)  # read straight into the tensor: no copy, no memset
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(raw.numpy()) if info.nbytes else 0
        if got != info.nbytes:
            raise CheckpointError(f"read {got} of {info.nbytes} bytes", where=f"{info.file}: {name}",
                                  hint="the file changed or is truncated; copy it again")
        return raw.view(torch_dtype(info.dtype)).reshape(info.shape)

    def read(self, name: str, dtype: torch.dtype | None = None, *, check_finite: bool = True) -> torch.Tensor:
        """A tensor in ``dtype`` (default float32), FP8 blocks and quantized weights dequantized;
        NaN/Inf weights are refused."""
        import torch  # optional heavy dependency: only reads need torch

        dtype = dtype or torch.float32
        module = self._quantized_module(name)
        if module is not None:
            return compressed.dequantized(self, module, dtype)
        info = self._info(name)
        tensor = self.read_raw(name)
        if info.dtype == FP8_DTYPE:
            block = self._block(name)  # checks the scale exists before reading it
            tensor = dequantize_fp8_blocks(tensor, self.read_raw(name + SCALE_SUFFIX), block,
                                           where=f"{info.file}: {name}")
        tensor = tensor.to(dtype)
        if check_finite and tensor.is_floating_point():
            _check_finite(tensor, info)
        return tensor

    def row_blocks(self, name: str, elements: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """A 2-D weight as float32 blocks of whole rows (``(first row, block)``, about ``elements`` values
        each): a vocabulary-sized matrix (embedding, LM head: 0.9 GB in float32 for 151936 × 1536) without
        its whole float copy. Plain tensors are read a byte range at a time; a quantized module's integers
        are read once and dequantized a block at a time; FP8 is dequantized whole, then sliced."""
        import torch  # optional heavy dependency: only reads need torch

        elements = elements or ROW_BLOCK_ELEMENTS
        module = self._quantized_module(name)
        if module is not None:
            yield from self._quantized_blocks(module, elements)
            return
        info = self._info(name)
        rows, cols = info.shape[0], math.prod(info.shape[1:])
        step = max(1, elements // max(cols, 1))
        whole = self.read(name) if info.dtype == FP8_DTYPE else None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if whole is not None:
                block = whole[start:stop]
            else:
                block = self._read_rows(info, start, stop).to(torch.float32)
                _check_finite(block, info)
            yield start, block

    def _quantized_blocks(self, module: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """row_blocks of a quantized module: its packed rows (int32 words along each row) unpacked and
        dequantized a block at a time. Zero points are packed along the rows (8 per word at int4), so an
        asymmetric module is unpacked whole."""
        import torch  # optional heavy dependency: only reads need torch

        if f"{module}.weight_zero_point" in self.tensors:
            qt = self.quantized(module)
            step = max(1, elements // max(qt.shape[1], 1))
            for start in range(0, qt.shape[0], step):
                part = slice(start, start + step)
                yield start, dequantize(QuantizedTensor(qt.q[part], qt.scale[part], qt.zero_point[part], qt.scheme,
                                                        (qt.q[part].shape[0], qt.shape[1])))
            return
        packed, scale = (self.read_raw(f"{module}.{p}") for p in ("weight_packed", "weight_scale"))
        rows, cols = (int(v) for v in self.read_raw(f"{module}.weight_shape"))
        scale_info = self._info(module + ".weight_scale")
        _check_finite(scale.float(), scale_info)
        step = max(1, elements // max(cols, 1))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            parts = {"weight_packed": packed[start:stop], "weight_scale": scale[start:stop],
                     "weight_shape": torch.tensor([stop - start, cols])}
            qt = unpack(parts, self.quantization[module], stored=self.storage.get(module),
                        where=f"{scale_info.file}: {module}")
            yield start, dequantize(qt)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        import torch  # optional heavy dependency: only reads need torch

        row_bytes = info.nbytes // info.shape[0]
        raw = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.offset + start * row_bytes)
            got = f.readinto(raw.numpy()) if raw.numel() else 0
        if got != raw.numel():
            raise CheckpointError(f"read {got} of {raw.numel()} bytes", where=f"{info.file}: {info.name}",
                                  hint="the file changed or is truncated; copy it again")
        return raw.view(torch_dtype(info.dtype)).reshape(stop - start, *info.shape[1:])

    def read_stored(self, name: str) -> StoredTensor:
        """A weight as stored (bf16/fp16/fp32, or FP8 with its block scales), upcast later by
        :meth:`StoredTensor.float` to exactly what :meth:`read` returns — so a layer can be held at its
        on-disk size and upcast one module at a time. A quantized module of a compressed checkpoint is
        held dequantized (float32): re-compressing one is not what this saves memory for."""
        info = self._info(name) if self._quantized_module(name) is None else None
        if info is None:
            return StoredTensor(name, self.read(name), None, None, None)
        scale, block = None, None
        if info.dtype == FP8_DTYPE:
            block = self._block(name)
            scale = self.read_raw(name + SCALE_SUFFIX)
        return StoredTensor(name, self.read_raw(name), scale, block, info)

    def quantized(self, name: str) -> QuantizedTensor | None:
        """The stored integers, scales and zero points of a quantized module (``X`` or ``X.weight``),
        None for an unquantized tensor. Scales are checked finite; shapes against config.json."""
        module = name.removesuffix(".weight")
        scheme = self.quantization.get(module)
        if scheme is None:
            self._info(name if name in self.tensors else module + ".weight")  # unknown names are errors
            return None
        parts = {p: self.read_raw(f"{module}.{p}") for p in ("weight_packed", "weight_scale", "weight_shape",
                                                             "weight_zero_point")
                 if f"{module}.{p}" in self.tensors}
        scale_info = self._info(module + ".weight_scale")
        _check_finite(parts["weight_scale"].float(), scale_info)
        return unpack(parts, scheme, stored=self.storage.get(module), where=f"{scale_info.file}: {module}")

    def read_many(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: self.read(n, dtype) for n in names}

    def read_layer(self, layer: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors — the unit compress and export stream by."""
        return self.read_many(self.layer_names(layer), dtype)

    def iter_layers(self, dtype: torch.dtype | None = None, *, include_mtp: bool = False,
                    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Decoder layers in order, one at a time; the MTP layer(s) only when asked for."""
        layers = list(range(self.spec.num_hidden_layers))
        if include_mtp and self.has_mtp:
            layers += self.spec.mtp_layers
        for layer in layers:
            yield layer, self.read_layer(layer, dtype)

    def iter_tensors(self, dtype: torch.dtype | None = None, *, include_mtp: bool = False,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor (FP8 and quantized weights dequantized, scales folded in), in file order so reads
        stay sequential."""
        for name in self._names():
            if not include_mtp and self._is_mtp(name):
                continue
            yield name, self.read(name, dtype)

    def state_dict(self, dtype: torch.dtype | None = None, *, include_mtp: bool = False):
        """The whole model in memory — for tiny models and tests only."""
        return dict(self.iter_tensors(dtype, include_mtp=include_mtp))

    # --- validation ---------------------------------------------------------------------------------
    def validate(self) -> ValidationReport:
        """Check every tensor's name, shape and dtype against the spec; raise listing what is wrong."""
        expected = {t.name: t for t in self.spec.expected_tensors(include_mtp=self.has_mtp)}
        problems = [p for name, t in expected.items() for p in self._check_expected(name, t)]
        problems += [f"quantization_config quantizes {m}, which is not a weight of this model"
                     for m in self.quantization if m + ".weight" not in expected]
        allowed = {n for n in expected if n.removesuffix(".weight") not in self.quantization}
        allowed |= compressed.packed_names(self.quantization)
        problems += [f"unexpected tensor {n} ({self.tensors[n].file.name})" for n in self.tensors
                     if n not in allowed and not IGNORED.match(n) and not self._is_paired_scale(n)]
        if problems:
            listed = "\n    ".join(problems[:12]) + (f"\n    ... and {len(problems) - 12} more"
                                                       if len(problems) > 12 else "")
            raise CheckpointError(f"checkpoint does not match its config.json ({len(problems)} problems):"
                                  f"\n    {listed}", where=str(self.path),
                                  hint="check that config.json belongs to these weights and that no "
                                       "shard is missing or from another model")
        fp8 = sum(1 for t in self.tensors.values() if t.dtype == FP8_DTYPE)
        return ValidationReport(len(expected), fp8, self.has_mtp, len(self.quantization))

    def _check_expected(self, name: str, t: TensorSpec) -> list[str]:
        scheme = self.quantization.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if scheme is not None:
            return compressed.check_packed(t, scheme, self.tensors, self.storage.get(name.removesuffix(".weight")))
        info = self.tensors.get(name)
        if info is None and t.component == "mtp" and name.endswith(MTP_SHARED):
            return []  # the MTP module shares the main embedding/head; `dsedge compress` does not store copies
        if info is None:
            return [f"missing tensor {name} (expected shape {list(t.shape)})"]
        if info.shape != t.shape:
            return [f"{name}: shape {list(info.shape)} in {info.file.name}, expected {list(t.shape)}"]
        if info.dtype == FP8_DTYPE and t.linear:
            return self._check_fp8(name, info)
        if info.dtype not in FLOAT_DTYPES:
            return [f"{name}: dtype {info.dtype} in {info.file.name}, expected one of "
                    f"{sorted(FLOAT_DTYPES)}" + (" or F8_E4M3" if t.linear else "")]
        return []

    def _check_fp8(self, name: str, info: TensorInfo) -> list[str]:
        scale = self.tensors.get(name + SCALE_SUFFIX)
        if scale is None:
            return [f"{name}: FP8 weight in {info.file.name} without its {name + SCALE_SUFFIX}"]
        if self.spec.fp8_block_size is None:
            return [f"{name}: FP8 weight but config.json has no quantization_config.weight_block_size"]
        grid = scale_grid(info.shape, self.spec.fp8_block_size)
        if scale.shape != grid or scale.dtype not in FLOAT_DTYPES:
            return [f"{scale.name}: {scale.dtype}{list(scale.shape)}, expected a float scale of shape {list(grid)}"]
        return []

    # --- helpers ------------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        """Logical tensor names in file order: FP8 scales dropped, packed modules as ``X.weight``."""
        names = [n for n in self._ordered(self.tensors) if not _is_scale(n)]
        return compressed.logical_names(names, self.quantization) if self.quantization else names

    def _quantized_module(self, name: str) -> str | None:
        module = name.removesuffix(".weight")
        return module if name.endswith(".weight") and module in self.quantization else None

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not in checkpoint", where=str(self.path)) from None

    def _block(self, name: str) -> tuple[int, int]:
        if self.spec.fp8_block_size is None:
            raise CheckpointError(f"{name} is FP8 but config.json has no quantization_config",
                                  where=str(self.path / "config.json"),
                                  hint="add the checkpoint's original quantization_config (weight_block_size)")
        if name + SCALE_SUFFIX not in self.tensors:
            raise CheckpointError(f"FP8 weight {name} has no {name + SCALE_SUFFIX}",
                                  where=str(self.tensors[name].file),
                                  hint="the shard holding the scales is missing or from another export")
        return self.spec.fp8_block_size

    def _is_mtp(self, name: str) -> bool:
        m = _LAYER.match(name)
        return bool(m) and int(m.group(1)) >= self.spec.num_hidden_layers

    def _is_paired_scale(self, name: str) -> bool:
        if not _is_scale(name):
            return False
        weight = self.tensors.get(name[: -len(SCALE_SUFFIX)])
        return weight is not None and weight.dtype == FP8_DTYPE

    @staticmethod
    def _ordered(tensors: dict[str, TensorInfo]) -> list[str]:
        return sorted(tensors, key=lambda n: (str(tensors[n].file), tensors[n].offset))


class StoredTensor:
    """One tensor's stored bytes (and FP8 block scales); ``.float()`` is :meth:`Checkpoint.read`'s float32.

    NaN/Inf are refused on the first upcast (as :meth:`Checkpoint.read` refuses them on read)."""

    def __init__(self, name: str, stored: torch.Tensor, scale_inv: torch.Tensor | None,
                 block: tuple[int, int] | None, info: TensorInfo | None):
        self.name, self.stored, self.scale_inv, self.block, self.info = name, stored, scale_inv, block, info
        self.shape = tuple(stored.shape)
        self._checked = info is None  # a tensor read through Checkpoint.read was checked there

    @property
    def nbytes(self) -> int:
        scale = 0 if self.scale_inv is None else self.scale_inv.numel() * self.scale_inv.element_size()
        return self.stored.numel() * self.stored.element_size() + scale

    def float(self) -> torch.Tensor:
        import torch  # optional heavy dependency: only reads need torch

        if self.scale_inv is not None:
            tensor = dequantize_fp8_blocks(self.stored, self.scale_inv, self.block,
                                           where=f"{self.info.file}: {self.name}")
        else:
            tensor = self.stored.to(torch.float32)
        if not self._checked and tensor.is_floating_point():
            _check_finite(tensor, self.info)
            self._checked = True
        return tensor


def _is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def _check_finite(tensor: torch.Tensor, info: TensorInfo) -> None:
    import torch  # optional heavy dependency: only reads need torch

    # Fast path, one read pass: NaN or Inf anywhere makes the sum non-finite. Only a non-finite sum
    # (or a finite-value overflow, rare) pays for the exact element-wise check.
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count:
        first = [int(i) for i in torch.nonzero(bad)[0]]
        raise CheckpointError(f"tensor {info.name} has {count} NaN/Inf values (first at index {first})",
                              where=str(info.file),
                              hint="the weights are corrupt (a bad conversion or a damaged download)")


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("checkpoint directory not found", where=str(path),
                              hint="pass a checkpoint directory (commands also take a demo model name, "
                                   "e.g. deepseek-v3-tiny)")
    return path


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        return sorted({path / f for f in _read_index(index).values()})
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = ("dsedge never loads pickle files (they can run code); convert them to safetensors first"
            if pickles else "pass a Hugging Face checkpoint directory with *.safetensors weights")
    raise CheckpointError("no safetensors weights found" + (f" (found {', '.join(pickles)})" if pickles else ""),
                          where=str(path), hint=hint)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"invalid index file ({exc})", where=str(index),
                              hint="it must be JSON with a 'weight_map' of tensor name → shard file") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("'weight_map' must map tensor names to file names", where=str(index))
    for name, file in weight_map.items():
        if Path(file).name != file:  # a shard name with a directory part could point outside the checkpoint
            raise CheckpointError(f"shard path {file!r} for {name} is not a plain file name", where=str(index))
    return weight_map


def _read_headers(path: Path, files: list[Path]) -> dict[str, TensorInfo]:
    index = path / INDEX_FILE
    weight_map = _read_index(index) if index.is_file() else None
    missing = [f for f in files if not f.is_file()]
    if missing and weight_map is not None:
        held = [n for n, f in weight_map.items() if path / f == missing[0]]
        raise CheckpointError(f"shard {missing[0].name} is missing ({len(missing)} of {len(files)} shards "
                              f"missing); it should hold {len(held)} tensors, e.g. {held[0]}",
                              where=str(path), hint="copy the missing shard(s) listed in " + INDEX_FILE)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(read_header(f))
    if weight_map is not None:
        _check_index_agrees(weight_map, tensors, path)
    return tensors


def _check_index_agrees(weight_map: dict[str, str], tensors: dict[str, TensorInfo], path: Path) -> None:
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != file:
            found = f"found in {info.file.name}" if info else "not found in any shard"
            raise CheckpointError(f"{INDEX_FILE} places {name} in {file}, but it is {found}",
                                  where=str(path), hint="the index and shards come from different exports")
