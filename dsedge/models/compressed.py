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
from dsedge.quantformat.layout import PACKED_PARAMS, packed_shapes, stored_scheme
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import dequantize

if TYPE_CHECKING:
    from dsedge.models.spec import TensorSpec

PACKED_DTYPES = {"weight_packed": ("I32",), "weight_scale": ("F16", "BF16", "F32"),
                 "weight_zero_point": ("I32",), "weight_shape": ("I64", "I32")}


def read_schemes(config: dict[str, Any], tensors: dict[str, TensorInfo], where: str, *,
                 stored: bool = False) -> dict[str, QuantScheme]:
    """Module → scheme of every quantized module (``{}`` for a plain checkpoint): the recipe's (nominal), or
    with ``stored`` the layout its tensors are stored in (a routed expert family shares one group size)."""
    return read_quantization_config(config, _packed_modules(tensors), where=where, stored=stored)


def _packed_modules(tensors: dict[str, TensorInfo]) -> list[str]:
    # Modules holding any packed tensor: ``re:`` targets resolve against them, so a module that lost one
    # of its tensors is still reported as quantized (and its missing tensor named).
    return list(dict.fromkeys(module for module, param in map(split, tensors) if param in PACKED_PARAMS))


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


def check_packed(t: TensorSpec, scheme: QuantScheme, tensors: dict[str, TensorInfo],
                 stored: QuantScheme | None = None) -> list[str]:
    """Problems with the packed tensors of the module whose logical weight is ``t``; ``stored``: the layout
    config.json declares for them (default: inferred from the scales' shape)."""
    module = t.name.removesuffix(".weight")
    if len(t.shape) != 2:
        return [f"{module}: quantization_config quantizes it, but {t.name} is not a 2-D weight"]
    problems = []
    layout = _layout(scheme, stored, t.shape[1], tensors.get(f"{module}.weight_scale"))
    if layout is None:
        return [f"{module}: config.json stores it as {stored.label}, which does not hold {scheme.label}'s "
                "groups exactly"]
    scheme = layout
    for param, shape in packed_shapes(scheme, t.shape).items():
        info = tensors.get(f"{module}.{param}")
        if info is None:
            problems.append(f"missing tensor {module}.{param} (expected shape {list(shape)}: "
                            f"{scheme.label} of a {list(t.shape)} weight)")
        elif info.shape != shape or info.dtype not in PACKED_DTYPES[param]:
            problems.append(f"{info.name}: {info.dtype}{list(info.shape)} in {info.file.name}, expected "
                            f"{'/'.join(PACKED_DTYPES[param])}{list(shape)} ({scheme.label} of {list(t.shape)})")
    return problems


def _layout(scheme: QuantScheme, stored: QuantScheme | None, in_features: int, scale: TensorInfo | None):
    """The stored scheme the tensors must follow: config.json's (if it nests the nominal groups; else None),
    or without one the scales' own (a fused family shares one group size, see quantformat.layout)."""
    if stored is not None:
        n = 1 if stored.group_size is None or stored.group_size >= in_features else in_features // stored.group_size
        if stored.group_size is not None and in_features % stored.group_size and n > 1:
            return None
        return stored_scheme(scheme, in_features, n)
    n_groups = scale.shape[-1] if scale is not None and len(scale.shape) == 2 else -1
    return stored_scheme(scheme, in_features, n_groups) or scheme


def dequantized(ckpt, module: str, dtype):
    """The float weight of a quantized module (``(q - zero_point) · scale``) in ``dtype``."""
    return dequantize(ckpt.quantized(module)).to(dtype)
