"""Compression recipes: which linear gets which quantization scheme (DESIGN.md §5).

A recipe is an ordered list of ``{match, quant}`` rules. ``match`` is an exact module name — the
weight's name without ``.weight``, e.g. ``model.layers.3.mlp.experts.7.down_proj`` — or ``re:<regex>``
matched against the whole name (``re.fullmatch``). The first matching rule wins; ``quant: null``
(``"none"`` in TOML) keeps the module unquantized; a module no rule matches stays unquantized.

Safety rules come before every recipe's own and cannot be overridden: the router (``mlp.gate``, and
with it its ``e_score_correction_bias``), norms, the MTP layer's embedding and ``shared_head.head`` are never
quantized. The LM head (``lm_head``) and the token embedding (``model.embed_tokens``) are kept too unless a
recipe rule names them exactly (``{"match": "lm_head", "quant": {"bits": 8}}``): at int4 an fp32 head is two
thirds of the bytes a small model reads per decoded token, which is why llama.cpp's Q4/Q8 files quantize it
too. The ``int8`` preset quantizes both at int8 (within 0.05%); ``int4`` and ``int4-g128`` quantize the head
int4 g128 by GPTQ (within 0.43%) and the embedding int8 (docs/compress.md). The embedding is always
quantized round-to-nearest (a lookup has no input activations for GPTQ to
weigh); with ``tie_word_embeddings`` the embedding's rule decides the head as well (one matrix is stored).
Only 2-D linear weights are candidates at all
(:meth:`Recipe.plan` takes them from the spec's ``linear`` flag), so biases and buffers never are.

Recipe files (``.json`` or ``.toml``)::

    name = "my-recipe"
    method = "gptq"            # default for rules that do not name one; `--method` overrides all
    [[rules]]
    match = 're:.*\\.mlp\\.experts\\.\\d+\\.(gate|up|down)_proj'
    quant = { bits = 4, group_size = 64 }
    [[rules]]
    match = "re:.*"
    quant = { bits = 8 }       # group_size omitted: per output channel

Torch-free: the CLI's ``--help`` and ``plan`` import this module.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsedge.errors import UserError
from dsedge.quantformat.scheme import METHODS, QuantScheme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = ["EMBEDDING", "HEAD", "PRESETS", "SAFETY_RULES", "Recipe", "Rule", "load_recipe", "parse_recipe", "preset"]

SCHEMA_VERSION = 1
RECIPE_SUFFIXES = (".json", ".toml")
DTYPES = ("float32", "float16", "bfloat16")
_RECIPE_KEYS = ("schema_version", "name", "description", "method", "dtype", "rules")
_RULE_KEYS = ("match", "quant")
_NONE = "none"  # TOML has no null: quant = "none" keeps a module unquantized
_FILE_HINT = ("a recipe is {name, method?, dtype?, rules: [{match, quant}]}; match is a module name or "
              "'re:<regex>', quant an object like {bits: 4, group_size: 128} or null/\"none\"")


@dataclass(frozen=True)
class Rule:
    """``match``: exact module name or ``re:<regex>`` (full match); ``quant``: scheme, or None to keep."""

    match: str
    quant: QuantScheme | None

    def __post_init__(self):
        _check_match(self.match, "rule")

    def matches(self, module_name: str) -> bool:
        if self.match.startswith("re:"):
            return _compiled(self.match[3:]).fullmatch(module_name) is not None
        return module_name == self.match

    def to_json(self) -> dict[str, Any]:
        return {"match": self.match, "quant": None if self.quant is None else self.quant.to_json()}


@dataclass(frozen=True)
class Recipe:
    """A named, ordered rule list with a default method (``rtn``/``gptq``) and optional storage dtype.

    ``dtype`` is the float dtype unquantized tensors are written in (None keeps the checkpoint's).
    """

    name: str
    rules: tuple[Rule, ...]
    method: str = "rtn"
    description: str = ""
    dtype: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"recipe method must be one of {METHODS}, got {self.method!r}", where=self.name)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"recipe dtype must be one of {DTYPES} or null, got {self.dtype!r}", where=self.name)
        if not self.rules:
            raise UserError("recipe has no rules", where=self.name,
                            hint='add at least one rule, e.g. {"match": "re:.*", "quant": {"bits": 8}}')

    def scheme_for(self, module_name: str) -> QuantScheme | None:
        """The scheme for a module (weight name without ``.weight``): safety rules, then first match."""
        rule = self.rule_for(module_name)
        return None if rule is None else rule.quant

    def rule_for(self, module_name: str) -> Rule | None:
        """The rule that decides a module (a safety rule included), or None when none matches."""
        if module_name in NAMED_ONLY:
            named = next((r for r in self.rules if r.match == module_name), None)
            if named is not None:
                return named
        return next((r for r in (*SAFETY_RULES, *self.rules) if r.matches(module_name)), None)

    def plan(self, spec, *, include_mtp: bool = False) -> dict[str, QuantScheme | None]:
        """Every 2-D linear of ``spec`` (a ``ModelSpec``) → its scheme, or None to keep it as is."""
        return {t.name.removesuffix(".weight"): self.scheme_for(t.name.removesuffix(".weight"))
                for t in spec.expected_tensors(include_mtp=include_mtp) if t.linear}

    def with_method(self, method: str) -> Recipe:
        """The same recipe with every quantized rule (and the default) using ``method``."""
        if method not in METHODS:
            raise UserError(f"unknown quantization method {method!r}", hint=f"use one of {', '.join(METHODS)}")
        rules = tuple(Rule(r.match, None if r.quant is None else r.quant.with_method(method)) for r in self.rules)
        return Recipe(self.name, rules, method, self.description, self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "description": self.description,
                "method": self.method, "dtype": self.dtype, "rules": [r.to_json() for r in self.rules]}

    @classmethod
    def from_json(cls, data: Any, where: str = "recipe") -> Recipe:
        return parse_recipe(data, where)


# ----------------------------------------------------------------------------- presets

_EXPERTS = r"re:.*\.mlp\.experts\.\d+\.(gate|up|down)_proj"


def _scheme(bits: int, group: int | None, method: str) -> dict[str, Any]:
    return {"bits": bits, "group_size": group, "method": method}


def _all(bits: int, group: int | None, method: str) -> list[dict[str, Any]]:
    return [{"match": "re:.*", "quant": _scheme(bits, group, method)}]


def _asym(group: int) -> list[dict[str, Any]]:
    # Routed experts stay symmetric: vLLM's fused-MoE WNA16 kernels assert symmetric weights and transformers'
    # fused-experts decompression reads no zero points, so asymmetric experts would not load as they are.
    return [{"match": _EXPERTS, "quant": _scheme(4, group, "gptq")},
            {"match": "re:.*", "quant": {**_scheme(4, group, "gptq"), "symmetric": False}}]


# The LM head and the embedding (int8 per row, quantized at export: GatherBlockQuantized), in the presets where
# held-out perplexity on both demo models stayed within 0.5% of the preset with them float (docs/compress.md,
# "The LM head and the embedding"; scripts/head_quant_table.py). The int8 preset's head is int8 per output
# channel (RTN); the int4 presets' head is int4 g128 by GPTQ on the final-norm calibration states (+0.43% and
# +0.27%, where RTN at any group size cost +0.42–0.71%): the head is a third of an int4 step's bytes.
_HEAD_INT8 = {"match": "lm_head", "quant": {"bits": 8, "group_size": None, "method": "rtn"}}
_HEAD_INT4_GPTQ = {"match": "lm_head", "quant": {"bits": 4, "group_size": 128, "method": "gptq"}}
_EMBEDDING_INT8 = {"match": "model.embed_tokens", "quant": {"bits": 8, "group_size": None, "method": "rtn"}}


def _with_head_and_embedding(rules: list[dict[str, Any]], head: dict[str, Any] = _HEAD_INT8
                             ) -> list[dict[str, Any]]:
    return [head, _EMBEDDING_INT8, *rules]


# name → (one-line description, recipe JSON). Int4 presets default to GPTQ (calibration is run anyway
# for the quality report, and GPTQ beats RTN at 4 bits); int8 RTN is already close to lossless.
_PRESET_DATA: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("every linear, the LM head and the embedding int8, per output channel / row, symmetric (RTN)",
             {"method": "rtn", "rules": _with_head_and_embedding(_all(8, None, "rtn"))}),
    "int4": ("every linear and the LM head int4, groups of 128, symmetric (GPTQ); embedding int8 — same as int4-g128",
             {"method": "gptq", "rules": _with_head_and_embedding(_all(4, 128, "gptq"), _HEAD_INT4_GPTQ)}),
    "int4-g128": ("every linear and the LM head int4, groups of 128, symmetric (GPTQ); embedding int8 (RTN)",
                  {"method": "gptq", "rules": _with_head_and_embedding(_all(4, 128, "gptq"), _HEAD_INT4_GPTQ)}),
    "int4-g64": ("every linear int4, groups of 64, symmetric (GPTQ)",
                 {"method": "gptq", "rules": _all(4, 64, "gptq")}),
    "int4-g32": ("every linear int4, groups of 32, symmetric (GPTQ): larger, more accurate",
                 {"method": "gptq", "rules": _all(4, 32, "gptq")}),
    "int4-experts": ("routed experts int4 g128 (GPTQ); attention, shared experts, dense MLPs int8 per channel",
                     {"method": "gptq", "rules": [{"match": _EXPERTS, "quant": _scheme(4, 128, "gptq")},
                                                  {"match": "re:.*", "quant": _scheme(8, None, "gptq")}]}),
    "int4-asym-g32": ("every linear int4, groups of 32, asymmetric (GPTQ); routed experts symmetric",
                      {"method": "gptq", "rules": _asym(32)}),
    "int4-asym-g128": ("every linear int4, groups of 128, asymmetric (GPTQ); routed experts symmetric",
                       {"method": "gptq", "rules": _asym(128)}),
    "fp16": ("no quantization; float tensors stored as float16",
             {"method": "rtn", "dtype": "float16", "rules": [{"match": "re:.*", "quant": None}]}),
    "none": ("no quantization; tensors kept in the checkpoint's dtype (prune only)",
             {"method": "rtn", "rules": [{"match": "re:.*", "quant": None}]}),
}

PRESETS: dict[str, str] = {name: description for name, (description, _) in _PRESET_DATA.items()}


def preset(name: str) -> Recipe:
    """A built-in recipe by name (see :data:`PRESETS`)."""
    if name not in _PRESET_DATA:
        raise UserError(f"unknown recipe preset {name!r}", hint=_preset_hint(name))
    description, data = _PRESET_DATA[name]
    return parse_recipe({"name": name, "description": description, **data}, f"preset {name}")


def load_recipe(preset_or_path: str | Path) -> Recipe:
    """A preset name, or a ``.json`` / ``.toml`` recipe file."""
    text = str(preset_or_path)
    if text in _PRESET_DATA:
        return preset(text)
    path = Path(preset_or_path)
    if path.suffix not in RECIPE_SUFFIXES:
        raise UserError(f"{text!r} is neither a recipe preset nor a .json/.toml recipe file",
                        hint=_preset_hint(text))
    if not path.is_file():
        raise UserError("recipe file not found", where=str(path), hint=_preset_hint(path.stem))
    data = _read_file(path)
    data.setdefault("name", path.stem)
    return parse_recipe(data, str(path))


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Strictly parse a recipe dict (from JSON or TOML): unknown keys and bad values are UserErrors."""
    if not isinstance(data, dict):
        raise UserError(f"a recipe must be an object, got {type(data).__name__}", where=where, hint=_FILE_HINT)
    _check_keys(data, _RECIPE_KEYS, where)
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"unsupported recipe schema_version {version!r}", where=where,
                        hint=f"this dsedge reads schema_version {SCHEMA_VERSION}")
    method = data.get("method", "rtn")
    if method not in METHODS:
        raise UserError(f"recipe method must be one of {METHODS}, got {method!r}", where=where)
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise UserError("recipe needs a non-empty 'rules' list", where=where, hint=_FILE_HINT)
    parsed = tuple(_parse_rule(rule, method, f"{where}: rules[{i}]") for i, rule in enumerate(rules))
    name, description, dtype = data.get("name", "recipe"), data.get("description", ""), data.get("dtype")
    if not isinstance(name, str) or not isinstance(description, str):
        raise UserError("recipe 'name' and 'description' must be strings", where=where)
    try:
        return Recipe(name, parsed, method, description, dtype)
    except UserError as exc:
        raise UserError(exc.what, where=where, hint=exc.hint) from None


def _parse_rule(rule: Any, method: str, where: str) -> Rule:
    if not isinstance(rule, dict):
        raise UserError(f"a rule must be an object, got {type(rule).__name__}", where=where, hint=_FILE_HINT)
    _check_keys(rule, _RULE_KEYS, where)
    if "match" not in rule or "quant" not in rule:
        raise UserError("a rule needs both 'match' and 'quant'", where=where,
                        hint='e.g. {"match": "re:.*", "quant": {"bits": 8}}; quant null keeps the module')
    _check_match(rule["match"], where)
    quant = rule["quant"]
    if quant is None or quant == _NONE:
        return Rule(rule["match"], None)
    if isinstance(quant, dict):
        quant = {"method": method, **quant}
    return Rule(rule["match"], QuantScheme.from_json(quant, f"{where}.quant"))


def _check_match(match: Any, where: str) -> None:
    if not isinstance(match, str) or not match or match == "re:":
        raise UserError(f"rule 'match' must be a non-empty string, got {match!r}", where=where,
                        hint="a module name like model.layers.0.mlp.down_proj, or re:<regex>")
    if match.startswith("re:"):
        try:
            _compiled(match[3:])
        except re.error as exc:
            raise UserError(f"invalid regex {match[3:]!r}: {exc}", where=where,
                            hint="Python re syntax; it must match the whole module name") from None
    elif match.endswith(".weight"):
        raise UserError(f"rule 'match' {match!r} names a tensor, not a module", where=where,
                        hint=f"drop the suffix: {match.removesuffix('.weight')!r}")


_REGEX_CACHE: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    if pattern not in _REGEX_CACHE:
        _REGEX_CACHE[pattern] = re.compile(pattern)
    return _REGEX_CACHE[pattern]


HEAD = "lm_head"
EMBEDDING = "model.embed_tokens"
NAMED_ONLY = (HEAD, EMBEDDING)  # quantized only by a rule that names them exactly (module docstring)

# Never quantized, whatever the recipe says (checked before the recipe's own rules); the LM head and the
# embedding only unless a rule names them exactly (see the module docstring).
SAFETY_RULES: tuple[Rule, ...] = (
    Rule(r"re:(.*\.)?mlp\.gate", None),  # the MoE router; e_score_correction_bias belongs to it
    Rule(r"re:(.*\.)?embed_tokens", None),
    Rule(HEAD, None),
    Rule(r"re:(.*\.)?shared_head\.head", None),  # the MTP layer's copy of the LM head
    Rule(r"re:(.*\.)?\w*norm", None),  # input/post-attention/q_a/kv_a/final/MTP norms
)


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        close = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
        named = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise UserError(f"unknown key(s) {named}", where=where, hint=f"allowed keys: {', '.join(allowed)}")


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe file ({exc})", where=str(path)) from exc
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"recipe file is not valid {path.suffix[1:].upper()}: {exc}", where=str(path),
                        hint=_FILE_HINT) from exc
    if not isinstance(data, dict):
        raise UserError("a recipe file must hold an object", where=str(path), hint=_FILE_HINT)
    return data


def _preset_hint(name: str) -> str:
    close = difflib.get_close_matches(name, list(_PRESET_DATA), n=1)
    presets = ", ".join(_PRESET_DATA)
    return (f"did you mean {close[0]!r}? " if close else "") + f"presets: {presets}; or a .json/.toml recipe file"

