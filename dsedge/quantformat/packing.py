"""One module's quantized weight packed into, and read back from, the compressed-tensors ``pack-quantized``
tensors (layout: :mod:`dsedge.quantformat.layout`), and regrouping between stored and nominal group sizes.

Torch is imported inside the functions that build tensors: the checkpoint reader imports this module to
list and validate checkpoints without torch.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

from dsedge.errors import CheckpointError
from dsedge.quantformat.layout import packed_shapes, storage_scheme, stored_scheme
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import QuantizedTensor

if TYPE_CHECKING:
    import torch

__all__ = ["pack", "pack_bits", "regroup", "unpack", "unpack_bits"]


# ----------------------------------------------------------------------------- regrouping


def _expand(qt: QuantizedTensor, group: int | None | str = "own") -> QuantizedTensor:
    """``qt`` in a storage layout (its own, or stored ``group`` columns per scale, which must nest in
    its groups): each stored group repeats the scale of the group it lies in."""
    cols = qt.shape[1]
    stored = storage_scheme(qt.scheme, cols, group)
    if stored_scheme(qt.scheme, cols, 1 if stored.group_size is None else cols // stored.group_size) is None:
        raise ValueError(f"groups of {stored.group_size} columns do not nest in {qt.scheme.label}'s groups")
    if stored.group_size == qt.scheme.group_size or (stored.group_size or cols) == qt.group_len:
        return QuantizedTensor(qt.q, qt.scale, qt.zero_point, stored, qt.shape)
    d, g = stored.group_size or cols, qt.group_len
    owner = [(k * d) // g for k in range(cols // d)]  # our group holding stored group k
    zero = None if qt.zero_point is None else qt.zero_point[:, owner].contiguous()
    return QuantizedTensor(qt.q, qt.scale[:, owner].contiguous(), zero, stored, qt.shape)


def regroup(qt: QuantizedTensor, group_size: int | None) -> QuantizedTensor:
    """The same weights with ``group_size`` columns per scale (last group partial), if that is exact.

    Used to restore the recipe's group size after reading a module stored with a smaller one (see
    :mod:`dsedge.quantformat.layout`). Raises ValueError when some group of ``group_size`` would need
    two scales.
    """
    cols = qt.shape[1]
    target = QuantScheme(**{**qt.scheme.to_json(), "group_size": group_size})
    g_old, g_new = qt.group_len, group_size or cols
    if g_old == g_new:
        return QuantizedTensor(qt.q, qt.scale, qt.zero_point, target, qt.shape)
    starts = range(0, cols, g_old)
    if any(c // g_new != (min(c + g_old, cols) - 1) // g_new for c in starts):
        raise ValueError(f"groups of {g_old} columns straddle groups of {g_new}: cannot merge them")
    firsts = [(j * g_new) // g_old for j in range(math.ceil(cols / g_new))]  # old group at each new start
    owner = [c // g_new for c in starts]  # new group holding each old one
    scale = qt.scale[:, firsts].contiguous()
    zero = None if qt.zero_point is None else qt.zero_point[:, firsts].contiguous()
    if not bool((scale[:, owner] == qt.scale).all()) or (
            zero is not None and not bool((zero[:, owner] == qt.zero_point).all())):
        raise ValueError(f"groups of {g_old} columns cannot be merged into groups of {g_new} exactly")
    return QuantizedTensor(qt.q, scale, zero, target, qt.shape)


# ----------------------------------------------------------------------------- bit packing


PACK_CHUNK = 1 << 22  # values (un)packed at once, through int64 temporaries: rows are independent


def pack_bits(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit int8 values of a 2-D tensor → int32 words along ``dim`` (compressed-tensors'
    ``pack_to_int32``, for bit widths that divide 32)."""
    import torch  # here, not at the top: the checkpoint reader imports this module without torch

    _check_bits(bits)
    if dim == 0:
        return pack_bits(values.T, bits).T.contiguous()
    rows, cols = values.shape
    if rows > 1 and rows * cols > PACK_CHUNK:  # int64 working copies of a whole LM head: GBs
        step = max(1, PACK_CHUNK // cols)
        return torch.cat([pack_bits(values[r:r + step], bits) for r in range(0, rows, step)])
    per_word = 32 // bits
    words = math.ceil(cols / per_word)
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, words * per_word - cols)).view(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    packed = (unsigned << shifts).sum(-1)  # < 2^32, exact in int64
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # same bits, as signed int32
    return packed.to(torch.int32).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``size`` signed int8 values per row (per column for ``dim=0``)."""
    import torch  # here, not at the top: the checkpoint reader imports this module without torch

    _check_bits(bits)
    if dim == 0:
        return unpack_bits(packed.T, bits, size).T.contiguous()
    rows, words = packed.shape
    per_word = 32 // bits
    if words != math.ceil(size / per_word):
        raise ValueError(f"{words} int32 words cannot hold exactly {size} {bits}-bit values")
    if rows > 1 and rows * words * per_word > PACK_CHUNK:
        step = max(1, PACK_CHUNK // (words * per_word))
        return torch.cat([unpack_bits(packed[r:r + step], bits, size) for r in range(0, rows, step)])
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    unsigned = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return (unsigned.reshape(rows, -1)[:, :size] - (1 << (bits - 1))).to(torch.int8).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports bit widths that divide 32 (2, 4, 8), got {bits}")


# ----------------------------------------------------------------------------- modules


def pack(name_prefix: str, qt: QuantizedTensor, *, stored_group: int | None | str = "own",
         scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized module ``name_prefix`` (e.g. ``model.layers.0.mlp.down_proj``).

    ``stored_group``: columns per stored scale (default: the module's own, :func:`~.layout.storage_group`;
    a family's shared one from :func:`~.layout.family_storage_group`). ``scale_dtype``: float16 (default)
    or bfloat16, the model's dtype; the scales must be representable in it (quantize with that dtype).
    """
    import torch  # here, not at the top: the checkpoint reader imports this module without torch

    scale_dtype = scale_dtype or torch.float16
    stored = _expand(qt, stored_group)
    bits = qt.scheme.bits
    tensors = {"weight_packed": pack_bits(stored.q, bits), "weight_scale": stored.scale.to(scale_dtype),
               "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64, device=qt.q.device)}
    if not torch.equal(tensors["weight_scale"].float(), stored.scale):
        raise ValueError(f"{name_prefix}: scales are not {scale_dtype}-representable; quantize with "
                         "dsedge.compress.quant and the same scale_dtype")
    if stored.zero_point is not None:
        tensors["weight_zero_point"] = pack_bits(stored.zero_point, bits, dim=0)
    return {f"{name_prefix}.{k}": v for k, v in tensors.items()}


def unpack(tensors: dict[str, torch.Tensor], scheme: QuantScheme | None = None, *,
           stored: QuantScheme | None = None, where: str = "") -> QuantizedTensor:
    """A :class:`QuantizedTensor` from one module's packed tensors (keys with or without the module prefix).

    ``scheme`` is the module's scheme from :func:`read_quantization_config` (nominal or stored group
    size); without it, bits, symmetry and group size are inferred from the shapes. The result has the
    nominal group size when ``scheme`` has one the stored layout can be merged into exactly. ``stored``: the
    layout config.json declares (its ``weights`` args); without it, the scales' shape decides.
    """
    parts = _by_param(tensors, where)
    shape = _weight_shape(parts["weight_shape"], where)
    scheme = scheme or _infer_scheme(parts, shape, where)
    declared = stored
    stored = _stored_layout(scheme, stored, shape[1], _scale_columns(parts["weight_scale"]), where)
    expected = packed_shapes(stored, shape)
    for key, want in expected.items():
        got = tuple(parts[key].shape) if key in parts else None
        if got != want:
            raise CheckpointError(f"{key} has shape {list(got) if got else None}, expected {list(want)} for a "
                                  f"{stored.label} {list(shape)} weight", where=where,
                                  hint="config.json's quantization_config and the tensors disagree")
    q = unpack_bits(parts["weight_packed"], scheme.bits, shape[1])
    zero = None
    if not scheme.symmetric:
        zero = unpack_bits(parts["weight_zero_point"], scheme.bits, shape[0], dim=0)
    qt = QuantizedTensor(q, parts["weight_scale"].float(), zero, stored, shape)
    if stored.group_size != scheme.group_size:
        if declared is None and stored != storage_scheme(scheme, shape[1]):
            # Inferred from the scales' shape alone: only a layout that is exactly ``scheme`` is accepted.
            try:
                return regroup(qt, scheme.group_size)
            except ValueError:
                raise CheckpointError(f"weight_scale has {qt.n_groups} groups that are not {scheme.label}'s",
                                      where=where, hint="pass the stored scheme from config.json") from None
        # A checkpoint whose scales are not repeats keeps its stored (equally valid) layout.
        with contextlib.suppress(ValueError):
            qt = regroup(qt, scheme.group_size)
    return qt


def _stored_layout(scheme: QuantScheme, declared: QuantScheme | None, cols: int, n_scales: int,
                   where: str) -> QuantScheme:
    if declared is None:
        return stored_scheme(scheme, cols, n_scales) or storage_scheme(scheme, cols)
    g = declared.group_size
    n = 1 if g is None or g >= cols else (cols // g if cols % g == 0 else -1)
    layout = stored_scheme(scheme, cols, n)
    if layout is None:
        raise CheckpointError(f"stored as {declared.label}, which does not hold {scheme.label}'s groups of a "
                              f"{cols}-column weight exactly", where=where,
                              hint="config.json's quantization_config and the tensors disagree")
    return layout


def _scale_columns(scale: torch.Tensor) -> int:
    return int(scale.shape[-1]) if scale.dim() == 2 else -1


def _by_param(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    parts = {name.rpartition(".")[2] if "." in name else name: t for name, t in tensors.items()}
    missing = [k for k in ("weight_packed", "weight_scale", "weight_shape") if k not in parts]
    if missing:
        raise CheckpointError(f"packed module lacks {', '.join(missing)}", where=where,
                              hint="a pack-quantized module needs weight_packed, weight_scale and weight_shape")
    return parts


def _weight_shape(t: torch.Tensor, where: str) -> tuple[int, int]:
    values = [int(v) for v in t.reshape(-1).tolist()] if not t.is_floating_point() else []
    if len(values) != 2 or min(values) <= 0:
        raise CheckpointError(f"weight_shape must hold two positive integers, got {t.tolist()}", where=where)
    return values[0], values[1]


def _infer_scheme(parts: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> QuantScheme:
    out, cols = shape
    words = parts["weight_packed"].shape[-1]
    bits = [b for b in (4, 8) if math.ceil(cols * b / 32) == words]
    n = parts["weight_scale"].shape[-1]
    if len(bits) != 1 or n <= 0 or cols % n:
        raise CheckpointError(f"cannot infer the scheme of a {list(shape)} weight from its packed shapes",
                              where=where, hint="pass the scheme from config.json's quantization_config")
    return QuantScheme(bits[0], None if n == 1 else cols // n, "weight_zero_point" not in parts)
