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
from dsedge.quantformat.layout import family_storage_group, storage_group
from dsedge.quantformat.scheme import QuantScheme

__all__ = ["EXPORT_EMBEDDING_KEY", "FORMAT", "QUANT_METHOD", "compact_targets", "export_embedding_scheme",
           "quantization_config", "read_quantization_config", "stored_group"]

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
FORMAT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this follows
EXTRA_KEY = "dsedge"  # our own entry in quantization_config: nominal schemes per config group
EXTRA_SCHEMA = 1
ROUTED_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj$")
# config.json key (beside quantization_config) holding the scheme a recipe asked for the token embedding. The
# checkpoint keeps the embedding float: compressed-tensors 0.20.1 packs Embedding modules, but transformers 5.24's
# from_pretrained then fails before decompressing (its _init_weights reads the replaced Embedding.weight), so the
# embedding is quantized where it runs — the ONNX bundle (dsedge.export.embedding, GatherBlockQuantized).
EXPORT_EMBEDDING_KEY = "dsedge_export_embedding"
# Numbered parts of a module name: a family is the modules equal up to these numbers.
_NUMBERED = re.compile(r"(?<=\.)(layers|experts)\.\d+(?=\.)")


def _weights_args(scheme: QuantScheme, group: int | None) -> dict[str, Any]:
    # The QuantizationArgs fields vLLM and compressed-tensors read. actorder as recorded: our act-order GPTQ
    # keeps contiguous groups with scales fixed up front ("static" in compressed-tensors' ActivationOrdering),
    # so no g_idx is stored, which vLLM's fused-MoE kernels require (they refuse "group"/"dynamic").
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": "channel" if group is None else "group", "group_size": group, "dynamic": False,
            "actorder": "static" if scheme.method == "gptq" and scheme.act_order else None,
            "observer": "minmax"}


def quantization_config(recipe_name: str | None, module_schemes: dict[str, Any], ignore: list[str], *,
                        shapes: dict[str, tuple[int, int]] | None = None,
                        stored_groups: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for the modules in ``module_schemes``.

    Values are :class:`QuantScheme` (then a grouped scheme needs its module's ``[out, in]`` in
    ``shapes``, because a group size that does not divide ``in`` is stored differently) or
    :class:`~dsedge.quantformat.tensor.QuantizedTensor`. ``stored_groups``: a module's stored group size
    when it is not its own (:func:`stored_group`). One config group per distinct (scheme, stored
    group size), routed experts first; ``ignore`` lists the linears left unquantized. Targets and ignore
    entries are written compactly (:func:`compact_targets`) over the modules named in ``module_schemes``
    and ``ignore``, which must together be every linear of the model. ``recipe_name`` is recorded in the
    ``dsedge`` entry.
    """
    groups: dict[tuple, list[str]] = {}
    for name, value in module_schemes.items():
        scheme, shape = _scheme_and_shape(name, value, shapes)
        stored = (stored_groups or {}).get(name, "own")
        if stored == "own":
            stored = None if scheme.group_size is None else storage_group(scheme, shape[1])
        groups.setdefault((scheme, stored), []).append(name)
    # transformers' fused-MoE loader takes the first group whose re: targets name experts: routed ones first.
    ordered = sorted(groups.items(), key=lambda item: not any(ROUTED_EXPERT.match(n) for n in item[1]))
    universe = [*module_schemes, *ignore]
    config_groups, nominal = {}, {}
    for i, ((scheme, stored), names) in enumerate(ordered):
        key = f"group_{i}"
        config_groups[key] = {"targets": compact_targets(names, universe), "weights": _weights_args(scheme, stored),
                              "input_activations": None, "output_activations": None, "format": FORMAT}
        nominal[key] = scheme.to_json()
    extra = {"schema_version": EXTRA_SCHEMA, "recipe": recipe_name, "schemes": nominal}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "version": FORMAT_VERSION, "config_groups": config_groups,
            "ignore": compact_targets(sorted(ignore), universe), "kv_cache_scheme": None, EXTRA_KEY: extra}


def stored_group(name: str, scheme: QuantScheme, expert_widths: tuple[int, ...] | None) -> int | None | str:
    """How module ``name`` is stored: ``"own"`` (its own layout, :func:`~.layout.storage_group`), or for a
    routed expert projection the group size its whole family shares (gate, up and down of every layer, one
    per scheme; :func:`~.layout.family_storage_group` over ``expert_widths`` = (hidden, moe_intermediate)),
    because transformers' and vLLM's fused-MoE loaders read a layer's experts with one config group."""
    if expert_widths and ROUTED_EXPERT.match(name):
        return family_storage_group(scheme, expert_widths)
    return "own"


def compact_targets(names: list[str], universe: list[str]) -> list[str]:
    """``names`` as compressed-tensors targets: one anchored ``re:`` pattern per family (modules equal up to
    their layer and expert numbers) whose every member in ``universe`` is in ``names``, exact names for the
    rest. Keeps the block small for V3 (58 MoE layers × 256 experts × 3 projections) and gives loaders the
    family patterns they look for."""
    wanted = set(names)
    families: dict[str, list[str]] = {}
    for name in universe:
        families.setdefault(_family(name), []).append(name)
    out: list[str] = []
    for family in dict.fromkeys(_family(n) for n in names):
        members = families[family]
        if len(members) > 1 and all(m in wanted for m in members):
            out.append("re:" + family)
        else:
            out += [m for m in members if m in wanted]
    return out


def _family(name: str) -> str:
    """The anchored regex of ``name``'s family, e.g. ``model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.up_proj$``."""
    parts = _NUMBERED.split(name)
    pattern = "".join(re.escape(p) if i % 2 == 0 else p + r"\.\d+" for i, p in enumerate(parts))
    # transformers 5.x picks the experts' config group as the first whose re: targets contain "experts";
    # shared experts are plain linears, so their pattern spells the word without that substring.
    return pattern.replace("shared_experts", "shared_[e]xperts") + "$"


def _scheme_and_shape(name: str, value: Any, shapes: dict | None) -> tuple[QuantScheme, tuple[int, int]]:
    if isinstance(value, QuantScheme):
        shape = (shapes or {}).get(name)
        if shape is None and value.group_size is not None:
            raise ValueError(f"{name}: pass its [out, in] shape (shapes=...) for a grouped scheme")
        return value, tuple(shape) if shape else (0, 0)
    return value.scheme, tuple(value.shape)


def read_quantization_config(config: dict[str, Any], module_names: list[str] | None = None, *,
                             where: str = "config.json", stored: bool = False) -> dict[str, QuantScheme]:
    """Module name → scheme from a config.json dict (``{}`` when it is not a compressed-tensors one).

    Schemes are the recipe's (nominal group size, method) when dsedge wrote the file, else built from
    the ``weights`` args; with ``stored``, always the ``weights`` args (the layout the tensors are in).
    ``re:`` targets are resolved against ``module_names``
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
        scheme = _group_scheme(key, group, None if stored else nominal.get(key), f"{where}: config_groups.{key}")
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


def export_embedding_scheme(config: dict[str, Any], where: str = "config.json") -> QuantScheme | None:
    """The token embedding's scheme a recipe recorded for export (:data:`EXPORT_EMBEDDING_KEY`), or None."""
    data = config.get(EXPORT_EMBEDDING_KEY) if isinstance(config, dict) else None
    return None if data is None else QuantScheme.from_json(data, f"{where}: {EXPORT_EMBEDDING_KEY}")
