"""The compressed-tensors ``pack-quantized`` storage layout of one module: stored group size, shapes, bytes.

Format (vllm-project/compressed-tensors 0.20.1, ``compressors/pack_quantized``; what vLLM's
``CompressedTensorsWNA16`` and SGLang load), per quantized module ``X``:

* ``X.weight_packed`` int32 ``[out, ceil(in·b/32)]``: each value stored as ``q + 2^(b-1)`` (unsigned),
  value ``i`` of a row at bits ``i·b`` … ``i·b+b-1`` of the row's bit stream, 32 bits per word, low
  bits first. int8 weights use the same layout (4 per word): compressed-tensors infers
  ``pack-quantized`` for every weight-only int scheme of 1–8 bits, and vLLM's WNA16 loader takes 4 and 8;
* ``X.weight_scale`` ``[out, n_groups]`` (``[out, 1]`` per channel), in the model's float dtype (bfloat16
  for the DeepSeek checkpoints, float16 for float16 ones): vLLM allocates its scale parameters in the model's
  ``params_dtype`` and copies the stored ones in, so scales of another 16-bit dtype would be rounded again;
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
A *family* of modules that a loader fuses (the routed experts of a layer: transformers' and vLLM's fused-MoE
paths take one config group, one stored group size, for gate, up and down) is stored with the one group size
``gcd(g, in₁, in₂, …)`` over the family's input widths (:func:`family_storage_group`): for DeepSeek-V3 at
g128 that is 128 (hidden 7168, moe_intermediate 2048), for the demo model 16 (224, 144).
The reader takes the stored group size from the scales' shape (:func:`stored_scheme`), so any exact
storage of the nominal groups reads back. The nominal group size is recorded in an extra ``dsedge`` entry of
``quantization_config``
(:mod:`.config`), so the reader returns the recipe's schemes and :func:`~.packing.regroup` restores the
nominal layout for the exporter.
"""

from __future__ import annotations

import math

from dsedge.quantformat.scheme import QuantScheme

PACKED_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_BYTES_PER_ELEMENT = {"weight_packed": 4, "weight_scale": 2, "weight_zero_point": 4, "weight_shape": 8}


def storage_group(scheme: QuantScheme, in_features: int) -> int | None:
    """Group size as stored for a module with ``in_features`` columns; None = ``channel`` strategy."""
    g = scheme.group_size
    if g is None or g >= in_features:
        return None
    return g if in_features % g == 0 else math.gcd(g, in_features)


def family_storage_group(scheme: QuantScheme, widths) -> int | None:
    """One stored group size for modules of input widths ``widths`` quantized with ``scheme``, exact for each
    (every stored group lies inside one nominal group); None = ``channel`` strategy for all of them."""
    g = scheme.group_size
    widths = list(widths)
    if g is None or all(g >= w for w in widths):
        return None
    return math.gcd(g, *widths)


def storage_scheme(scheme: QuantScheme, in_features: int, group: int | None | str = "own") -> QuantScheme:
    """``scheme`` with the stored group size: the module's own (``"own"``, :func:`storage_group`) or ``group``."""
    group = storage_group(scheme, in_features) if group == "own" else group
    return scheme if group == scheme.group_size else QuantScheme(**{**scheme.to_json(), "group_size": group})


def stored_scheme(scheme: QuantScheme, in_features: int, n_scale_groups: int) -> QuantScheme | None:
    """The stored scheme of a module whose ``weight_scale`` has ``n_scale_groups`` columns, if that storage
    holds ``scheme``'s groups exactly (each stored group inside one nominal group); else None."""
    g = scheme.group_size
    if n_scale_groups == 1:
        return storage_scheme(scheme, in_features, None) if g is None or g >= in_features else None
    if n_scale_groups <= 0 or in_features % n_scale_groups:
        return None
    d = in_features // n_scale_groups
    if g is not None and g < in_features and g % d:
        return None
    return storage_scheme(scheme, in_features, d)


def packed_shapes(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors :func:`~.packing.pack` writes for a ``[out, in]`` weight stored with ``scheme``'s
    own layout (``weight_zero_point`` only if asymmetric); pass a :func:`storage_scheme` for another."""
    out, cols = shape
    group = storage_group(scheme, cols)
    n = 1 if group is None else cols // group
    shapes = {"weight_packed": (out, math.ceil(cols * scheme.bits / 32)), "weight_scale": (out, n),
              "weight_shape": (2,)}
    if not scheme.symmetric:
        shapes["weight_zero_point"] = (math.ceil(out * scheme.bits / 32), n)
    return shapes


def packed_nbytes(scheme: QuantScheme, shape: tuple[int, int]) -> int:
    """Bytes :func:`~.packing.pack` writes for a ``[out, in]`` weight: int32 words, 16-bit scales,
    packed zero points, the shape."""
    return sum(math.prod(s) * _BYTES_PER_ELEMENT[k] for k, s in packed_shapes(scheme, shape).items())
