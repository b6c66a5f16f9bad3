"""Compressed checkpoints (``quantization_config.quant_method == "compressed-tensors"``, pack-quantized).

A quantized module ``X`` stores ``X.weight_packed``, ``X.weight_scale``, ``X.weight_shape`` (and
``X.weight_zero_point`` if asymmetric) instead of ``X.weight`` (layout: :mod:`dsedge.quantformat.layout`).
The checkpoint reader presents the logical ``X.weight`` everywhere — listings, validation, reads
(dequantized) — so the reference model, evaluation and export work on a compressed checkpoint
unchanged; :meth:`Checkpoint.quantized` gives the stored integers to code that repacks them.

Torch-free at import, like the rest of the reader.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dsedge.models.safetensors_file import TensorInfo
from dsedge.quantformat.config import read_quantization_config
from dsedge.quantformat.layout import PACKED_PARAMS, packed_shapes
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import dequantize

if TYPE_CHECKING:
    from dsedge.models.spec import TensorSpec

PACKED_DTYPES = {"weight_packed": ("I32",), "weight_scale": ("F16", "BF16", "F32"),
                 "weight_zero_point": ("I32",), "weight_shape": ("I64", "I32")}


def read_schemes(config: dict[str, Any], tensors: dict[str, TensorInfo], where: str) -> dict[str, QuantScheme]:
    """Module → scheme of every quantized module (``{}`` for a plain checkpoint)."""
    packed = [n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")]
    return read_quantization_config(config, packed, where=where)


def split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def logical_names(names: Iterable[str], quantized: dict[str, QuantScheme]) -> list[str]:
    """Stored names with each quantized module's packed tensors replaced by its ``X.weight`` (in place of
    ``X.weight_packed``, so file order is kept)."""
    out = []
    for name in names:
        module, param = split(name)
        if module in quantized and param in PACKED_PARAMS:
            if param == "weight_packed":
                out.append(module + ".weight")
            continue
        out.append(name)
    return out


def packed_names(quantized: dict[str, QuantScheme]) -> set[str]:
    return {f"{module}.{param}" for module, scheme in quantized.items() for param in PACKED_PARAMS
            if param != "weight_zero_point" or not scheme.symmetric}


def check_packed(t: TensorSpec, scheme: QuantScheme, tensors: dict[str, TensorInfo]) -> list[str]:
    """Problems with the packed tensors of the module whose logical weight is ``t``."""
    module = t.name.removesuffix(".weight")
    if len(t.shape) != 2:
        return [f"{module}: quantization_config quantizes it, but {t.name} is not a 2-D weight"]
    problems = []
    for param, shape in packed_shapes(scheme, t.shape).items():
        info = tensors.get(f"{module}.{param}")
        if info is None:
            problems.append(f"missing tensor {module}.{param} (expected shape {list(shape)}: "
                            f"{scheme.label} of a {list(t.shape)} weight)")
        elif info.shape != shape or info.dtype not in PACKED_DTYPES[param]:
            problems.append(f"{info.name}: {info.dtype}{list(info.shape)} in {info.file.name}, expected "
                            f"{'/'.join(PACKED_DTYPES[param])}{list(shape)} ({scheme.label} of {list(t.shape)})")
    return problems


def dequantized(ckpt, module: str, dtype):
    """The float weight of a quantized module (``(q - zero_point) · scale``) in ``dtype``."""
    return dequantize(ckpt.quantized(module)).to(dtype)
