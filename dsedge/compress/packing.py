"""Quantized weights in the compressed-tensors ``pack-quantized`` layout, and its ``quantization_config``.

Format (vllm-project/compressed-tensors 0.20.1, ``compressors/pack_quantized``; what vLLM's
``CompressedTensorsWNA16`` and SGLang load), per quantized module ``X``:

* ``X.weight_packed`` int32 ``[out, ceil(in·b/32)]``: each value stored as ``q + 2^(b-1)`` (unsigned),
  value ``i`` of a row at bits ``i·b`` … ``i·b+b-1`` of the row's bit stream, 32 bits per word, low
  bits first. int8 weights use the same layout (4 per word): compressed-tensors infers
  ``pack-quantized`` for every weight-only int scheme of 1–8 bits, and vLLM's WNA16 loader takes 4 and 8;
* ``X.weight_scale`` ``[out, n_groups]`` (``[out, 1]`` per channel), float16 here;
* ``X.weight_zero_point`` (asymmetric only) int32 ``[ceil(out·b/32), n_groups]``: the int8 zero points
  packed the same way along the *output* dimension;
* ``X.weight_shape`` int64 ``[2]`` = ``[out, in]``.

Partial last groups: compressed-tensors allocates ``ceil(in/g)`` scales for a group size that does not
divide ``in`` (with a warning), but its decompressor refuses them (``_process_group`` raises "tensor
column shape must be divisble by the given group_size") and vLLM sizes scales as ``in // g``. So a
module whose ``in`` is not a multiple of its group size is stored *exactly* with the group size
``d = gcd(g, in)``: every stored group of ``d`` columns lies inside one of our groups and repeats its
scale (and zero point). The dequantized weights are bit-identical; the scales take ``g/d`` times the
space. A single group covering the whole row (``g >= in``) is stored as the ``channel`` strategy.
The nominal group size is recorded in an extra ``dsedge`` entry of ``quantization_config``
(compressed-tensors' config model ignores extra keys), so :func:`read_quantization_config` returns the
recipe's schemes and :func:`regroup` restores the nominal layout for the exporter.

Torch is imported lazily: the checkpoint reader imports this module.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import TYPE_CHECKING, Any

from dsedge.compress.scheme import QuantScheme
from dsedge.errors import CheckpointError, UserError

if TYPE_CHECKING:
    import torch

    from dsedge.compress.quant import QuantizedTensor
    from dsedge.compress.recipes import Recipe

__all__ = ["PACKED_PARAMS", "pack", "pack_bits", "packed_nbytes", "packed_shapes", "quantization_config",
           "read_quantization_config", "regroup", "storage_group", "storage_scheme", "unpack", "unpack_bits"]

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
PACKED_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
EXTRA_KEY = "dsedge"  # our own entry in quantization_config: nominal schemes per config group
EXTRA_SCHEMA = 1


# ----------------------------------------------------------------------------- storage layout


def storage_group(scheme: QuantScheme, in_features: int) -> int | None:
    """Group size as stored for a module with ``in_features`` columns; None = ``channel`` strategy."""
    g = scheme.group_size
    if g is None or g >= in_features:
        return None
    return g if in_features % g == 0 else math.gcd(g, in_features)


def storage_scheme(scheme: QuantScheme, in_features: int) -> QuantScheme:
    group = storage_group(scheme, in_features)
    return scheme if group == scheme.group_size else QuantScheme(**{**scheme.to_json(), "group_size": group})


def packed_shapes(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors :func:`pack` writes for a ``[out, in]`` weight (``weight_zero_point`` if asym)."""
    out, cols = shape
    group = storage_group(scheme, cols)
    n = 1 if group is None else cols // group
    shapes = {"weight_packed": (out, math.ceil(cols * scheme.bits / 32)), "weight_scale": (out, n),
              "weight_shape": (2,)}
    if not scheme.symmetric:
        shapes["weight_zero_point"] = (math.ceil(out * scheme.bits / 32), n)
    return shapes


def packed_nbytes(qt: QuantizedTensor) -> int:
    """Bytes :func:`pack` writes for ``qt``: int32 words, float16 scales, packed zero points, the shape."""
    shapes = packed_shapes(qt.scheme, qt.shape)
    per_element = {"weight_packed": 4, "weight_scale": 2, "weight_zero_point": 4, "weight_shape": 8}
    return sum(math.prod(s) * per_element[k] for k, s in shapes.items())


def _expand(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` in its storage layout: each stored group repeats the scale of the group it lies in."""
    from dsedge.compress.quant import QuantizedTensor

    cols = qt.shape[1]
    stored = storage_scheme(qt.scheme, cols)
    if stored.group_size == qt.scheme.group_size:
        return qt
    d, g = stored.group_size or cols, qt.group_len
    owner = [(k * d) // g for k in range(cols // d)]  # our group holding stored group k
    zero = None if qt.zero_point is None else qt.zero_point[:, owner].contiguous()
    return QuantizedTensor(qt.q, qt.scale[:, owner].contiguous(), zero, stored, qt.shape)


def regroup(qt: QuantizedTensor, group_size: int | None) -> QuantizedTensor:
    """The same weights with ``group_size`` columns per scale (last group partial), if that is exact.

    Used to restore the recipe's group size after reading a module stored with a smaller one (see the
    module docstring). Raises ValueError when some group of ``group_size`` would need two scales.
    """
    from dsedge.compress.quant import QuantizedTensor

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


def pack_bits(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit int8 values of a 2-D tensor → int32 words along ``dim`` (compressed-tensors'
    ``pack_to_int32``, for bit widths that divide 32)."""
    import torch

    _check_bits(bits)
    if dim == 0:
        return pack_bits(values.T, bits).T.contiguous()
    rows, cols = values.shape
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
    import torch

    _check_bits(bits)
    if dim == 0:
        return unpack_bits(packed.T, bits, size).T.contiguous()
    rows, words = packed.shape
    per_word = 32 // bits
    if words != math.ceil(size / per_word):
        raise ValueError(f"{words} int32 words cannot hold exactly {size} {bits}-bit values")
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    unsigned = (packed.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return (unsigned.reshape(rows, -1)[:, :size] - (1 << (bits - 1))).to(torch.int8).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports bit widths that divide 32 (2, 4, 8), got {bits}")


# ----------------------------------------------------------------------------- modules


def pack(name_prefix: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The safetensors entries of one quantized module ``name_prefix`` (e.g. ``model.layers.0.mlp.down_proj``)."""
    import torch

    stored = _expand(qt)
    bits = qt.scheme.bits
    tensors = {"weight_packed": pack_bits(stored.q, bits), "weight_scale": stored.scale.to(torch.float16),
               "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64, device=qt.q.device)}
    if not torch.equal(tensors["weight_scale"].float(), stored.scale):
        raise ValueError(f"{name_prefix}: scales are not float16-representable; quantize with dsedge.compress.quant")
    if stored.zero_point is not None:
        tensors["weight_zero_point"] = pack_bits(stored.zero_point, bits, dim=0)
    return {f"{name_prefix}.{k}": v for k, v in tensors.items()}


def unpack(tensors: dict[str, torch.Tensor], scheme: QuantScheme | None = None, *,
           where: str = "") -> QuantizedTensor:
    """A :class:`QuantizedTensor` from one module's packed tensors (keys with or without the module prefix).

    ``scheme`` is the module's scheme from :func:`read_quantization_config` (nominal or stored group
    size); without it, bits, symmetry and group size are inferred from the shapes. The result has the
    nominal group size when ``scheme`` has one the stored layout can be merged into exactly.
    """
    from dsedge.compress.quant import QuantizedTensor

    parts = _by_param(tensors, where)
    shape = _weight_shape(parts["weight_shape"], where)
    scheme = scheme or _infer_scheme(parts, shape, where)
    stored = storage_scheme(scheme, shape[1])
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
        # A checkpoint whose scales are not repeats keeps its stored (equally valid) layout.
        with contextlib.suppress(ValueError):
            qt = regroup(qt, scheme.group_size)
    return qt


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


# ----------------------------------------------------------------------------- quantization_config


def _weights_args(scheme: QuantScheme, group: int | None) -> dict[str, Any]:
    # The QuantizationArgs fields vLLM and compressed-tensors read; observer/actorder describe how
    # llm-compressor would calibrate and do not affect loading, so they are left out.
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": "channel" if group is None else "group", "group_size": group, "dynamic": False}


def quantization_config(recipe: Recipe | None, module_schemes: dict[str, Any], ignore: list[str], *,
                        shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for the modules in ``module_schemes``.

    Values are :class:`QuantScheme` (then a grouped scheme needs its module's ``[out, in]`` in
    ``shapes``, because a group size that does not divide ``in`` is stored differently) or
    :class:`~dsedge.compress.quant.QuantizedTensor`. One config group per distinct (scheme, stored
    group size), targeting exact module names; ``ignore`` lists the linears left unquantized.
    """
    groups: dict[tuple, list[str]] = {}
    for name, value in module_schemes.items():
        scheme, shape = _scheme_and_shape(name, value, shapes)
        stored = None if scheme.group_size is None else storage_group(scheme, shape[1])
        groups.setdefault((scheme, stored), []).append(name)
    config_groups, nominal = {}, {}
    for i, ((scheme, stored), names) in enumerate(groups.items()):
        key = f"group_{i}"
        config_groups[key] = {"targets": names, "weights": _weights_args(scheme, stored),
                              "input_activations": None, "output_activations": None, "format": FORMAT}
        nominal[key] = scheme.to_json()
    extra = {"schema_version": EXTRA_SCHEMA, "recipe": None if recipe is None else recipe.name,
             "schemes": nominal}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            EXTRA_KEY: extra}


def _scheme_and_shape(name: str, value: Any, shapes: dict | None) -> tuple[QuantScheme, tuple[int, int]]:
    if isinstance(value, QuantScheme):
        shape = (shapes or {}).get(name)
        if shape is None and value.group_size is not None:
            raise ValueError(f"{name}: pass its [out, in] shape (shapes=...) for a grouped scheme")
        return value, tuple(shape) if shape else (0, 0)
    return value.scheme, tuple(value.shape)


def read_quantization_config(config: dict[str, Any], module_names: list[str] | None = None, *,
                             where: str = "config.json") -> dict[str, QuantScheme]:
    """Module name → scheme from a config.json dict (``{}`` when it is not a compressed-tensors one).

    Schemes are the recipe's (nominal group size, method) when dsedge wrote the file, else built from
    the ``weights`` args. ``re:`` targets (written by other tools) are resolved against ``module_names``
    with compressed-tensors' semantics (``re.match``); ``ignore`` wins over targets.
    """
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return {}
    if qc.get("format", FORMAT) != FORMAT:
        raise UserError(f"compressed-tensors format {qc.get('format')!r} is not supported", where=where,
                        hint=f"dsedge reads the {FORMAT!r} format (weight-only int4/int8)")
    nominal = (qc.get(EXTRA_KEY) or {}).get("schemes", {}) if isinstance(qc.get(EXTRA_KEY), dict) else {}
    ignore = list(qc.get("ignore") or [])
    out: dict[str, QuantScheme] = {}
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):
        raise UserError("quantization_config.config_groups must be an object", where=where)
    for key, group in groups.items():
        scheme = _group_scheme(key, group, nominal.get(key), f"{where}: config_groups.{key}")
        for name in _targets(group.get("targets"), module_names, f"{where}: config_groups.{key}"):
            if not any(_ct_match(name, pattern) for pattern in ignore):
                out.setdefault(name, scheme)
    return out


def _group_scheme(key: str, group: Any, nominal: Any, where: str) -> QuantScheme:
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise UserError(f"config group {key!r} has no 'weights' quantization args", where=where)
    if group.get("input_activations") or group.get("output_activations"):
        raise UserError("activation quantization is not supported", where=where,
                        hint="dsedge reads weight-only (WNA16) compressed-tensors checkpoints")
    if nominal is not None:
        return QuantScheme.from_json(nominal, where)
    w = group["weights"]
    if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8) or w.get("dynamic"):
        raise UserError(f"unsupported weight quantization {w}", where=where,
                        hint="dsedge reads static int4/int8 weights")
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or -1) > 0 else "channel")
    if strategy not in ("group", "channel"):
        raise UserError(f"unsupported weight strategy {strategy!r}", where=where,
                        hint="dsedge reads 'group' and 'channel' strategies")
    group_size = w.get("group_size") if strategy == "group" else None
    return QuantScheme(w["num_bits"], group_size, bool(w.get("symmetric", True)))


def _targets(targets: Any, module_names: list[str] | None, where: str) -> list[str]:
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UserError("config group 'targets' must be a list of module names", where=where)
    names: list[str] = []
    for target in targets:
        if target.startswith("re:") or target == "Linear":
            if module_names is None:
                raise UserError(f"target {target!r} needs the checkpoint's module names to resolve", where=where)
            names += [n for n in module_names if target == "Linear" or _ct_match(n, target)]
        else:
            names.append(target)
    return names


def _ct_match(name: str, pattern: str) -> bool:
    # compressed-tensors' match_name: "re:" patterns use re.match (anchored at the start only).
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern
