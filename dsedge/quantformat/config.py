"""The compressed-tensors ``quantization_config`` block of config.json: written for our checkpoints, read
for ours and other tools' (module name → :class:`~dsedge.quantformat.scheme.QuantScheme`).

Each config group is stored with the group size of the stored layout (:mod:`.layout`); the nominal
schemes (the recipe's group size and method) go in an extra ``dsedge`` entry, which compressed-tensors'
config model ignores. Stdlib only.
"""

from __future__ import annotations

import re
from typing import Any

from dsedge.errors import UserError
from dsedge.quantformat.layout import storage_group
from dsedge.quantformat.scheme import QuantScheme

__all__ = ["FORMAT", "QUANT_METHOD", "quantization_config", "read_quantization_config"]

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
EXTRA_KEY = "dsedge"  # our own entry in quantization_config: nominal schemes per config group
EXTRA_SCHEMA = 1


def _weights_args(scheme: QuantScheme, group: int | None) -> dict[str, Any]:
    # The QuantizationArgs fields vLLM and compressed-tensors read; observer/actorder describe how
    # llm-compressor would calibrate and do not affect loading, so they are left out.
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": "channel" if group is None else "group", "group_size": group, "dynamic": False}


def quantization_config(recipe_name: str | None, module_schemes: dict[str, Any], ignore: list[str], *,
                        shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for the modules in ``module_schemes``.

    Values are :class:`QuantScheme` (then a grouped scheme needs its module's ``[out, in]`` in
    ``shapes``, because a group size that does not divide ``in`` is stored differently) or
    :class:`~dsedge.quantformat.tensor.QuantizedTensor`. One config group per distinct (scheme, stored
    group size), targeting exact module names; ``ignore`` lists the linears left unquantized;
    ``recipe_name`` is recorded in the ``dsedge`` entry.
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
    extra = {"schema_version": EXTRA_SCHEMA, "recipe": recipe_name, "schemes": nominal}
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
