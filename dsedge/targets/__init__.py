"""Device targets: data files describing what a device can hold and run (DESIGN.md §8).

A target is a small TOML (or JSON) file. The built-ins ship next to this module; users pass a path
to their own. Parsing is strict (unknown keys, wrong types and out-of-range values are errors) so a
typo in a budget never silently becomes a wrong plan. Standard library only: this module is imported
by the on-device runtime and must not pull torch or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dsedge.errors import ConfigError
from dsedge.targets.detect import AUTO_NAME, detected_target_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = ["Target", "builtin_target_names", "detect_target", "list_targets", "load_target", "parse_target"]

SCHEMA_VERSION = 1
KINDS = ("cpu", "gpu", "soc")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# Compress presets a target may name as its default; the compress package defines what they do.
RECIPE_PRESETS = ("int4-experts", "int4", "int8", "fp16", "none")
TARGET_SUFFIXES = (".toml", ".json")

REQUIRED_KEYS = (
    "name", "description", "kind", "memory_budget_bytes", "memory_bandwidth_gbps", "host_memory_bytes",
    "execution_providers", "precisions", "threads", "max_context", "default_recipe",
)
# disk_bandwidth_gbps: sequential read speed of the storage offloaded experts are read from (plan's
# disk-bound decode estimate); absent = unknown, and plan gives no such estimate.
OPTIONAL_KEYS = ("notes", "disk_bandwidth_gbps")
ALLOWED_KEYS = ("schema_version", *REQUIRED_KEYS, *OPTIONAL_KEYS)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PROVIDER_PATTERN = re.compile(r"[A-Z][A-Za-z0-9]*ExecutionProvider")


@dataclass(frozen=True)
class Target:
    """One device: memory budget, bandwidth, providers and precisions. Build it with `parse_target`."""

    name: str
    description: str
    kind: str
    memory_budget_bytes: int
    memory_bandwidth_gbps: float
    host_memory_bytes: int
    execution_providers: tuple[str, ...]
    precisions: tuple[str, ...]
    threads: int
    max_context: int
    default_recipe: str
    notes: str = ""
    disk_bandwidth_gbps: float | None = None
    source: str = ""  # file the target was read from; not part of the file format

    def to_json(self) -> dict:
        """The file form (with ``schema_version``, without ``source``); `parse_target` reads it back."""
        fields = dataclasses.asdict(self)
        del fields["source"]
        if fields["disk_bandwidth_gbps"] is None:  # optional: absent from the file form when unknown
            del fields["disk_bandwidth_gbps"]
        fields["execution_providers"] = list(self.execution_providers)
        fields["precisions"] = list(self.precisions)
        return {"schema_version": SCHEMA_VERSION, **fields}


def builtin_target_names() -> list[str]:
    """Names of the targets shipped with dsedge, sorted."""
    package_dir = resources.files(__name__)
    return sorted(entry.name[: -len(".toml")] for entry in package_dir.iterdir()
                  if entry.name.endswith(".toml"))


def list_targets() -> list[Target]:
    """Every built-in target, parsed and validated, sorted by name."""
    return [_load_builtin(name) for name in builtin_target_names()]


def load_target(name_or_path: str | os.PathLike | Target) -> Target:
    """Load a target by built-in name (``"gpu-24g"``), ``"auto"`` (this machine, detected) or from a user
    ``.toml``/``.json`` file.

    A string is read as a path when it contains a path separator or ends in ``.toml``/``.json``;
    otherwise it must be a built-in name. A `Target` is returned unchanged.
    Raises `ConfigError` for an unknown name (with a "did you mean"), a missing or invalid file.
    """
    if isinstance(name_or_path, Target):
        return name_or_path
    if name_or_path == AUTO_NAME:  # this machine, detected (dsedge.targets.detect)
        return detect_target()
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        return _load_file(Path(name_or_path))
    return _load_builtin(name_or_path)


def detect_target(*, probe_bandwidth: bool = True) -> Target:
    """This machine as a target (``--target auto``): usable cores, memory (cgroup-capped), providers, GPU memory."""
    fields = detected_target_fields(probe_bandwidth=probe_bandwidth)
    return parse_target({"schema_version": SCHEMA_VERSION, **fields}, where="--target auto (detected)")


def parse_target(data: dict, *, where: str) -> Target:
    """Validate a parsed target file strictly and build a `Target`; ``where`` names it in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"a target must be a table/object, got {type(data).__name__}", where=where)
    _check_keys(data, where)
    _check_schema_version(data, where)
    fields = {
        "name": _read_name(data, where),
        "description": _read_str(data, "description", where),
        "kind": _read_choice(data, "kind", KINDS, where),
        "memory_budget_bytes": _read_int(data, "memory_budget_bytes", where, minimum=1),
        "memory_bandwidth_gbps": _read_positive_float(data, "memory_bandwidth_gbps", where),
        "host_memory_bytes": _read_int(data, "host_memory_bytes", where, minimum=0),
        "execution_providers": _read_providers(data, where),
        "precisions": _read_precisions(data, where),
        "threads": _read_int(data, "threads", where, minimum=1),
        "max_context": _read_int(data, "max_context", where, minimum=1),
        "default_recipe": _read_choice(data, "default_recipe", RECIPE_PRESETS, where),
        "notes": _read_str(data, "notes", where) if "notes" in data else "",
        "disk_bandwidth_gbps": (_read_positive_float(data, "disk_bandwidth_gbps", where)
                                if "disk_bandwidth_gbps" in data else None),
    }
    if fields["kind"] == "cpu" and "CPUExecutionProvider" not in fields["execution_providers"]:
        raise ConfigError("a kind = \"cpu\" target must list CPUExecutionProvider in execution_providers",
                          where=where, hint='add "CPUExecutionProvider" to execution_providers')
    return Target(**fields, source=where)


# ---------------------------------------------------------------- locating and reading files


def _looks_like_path(text: str) -> bool:
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.lower().endswith(TARGET_SUFFIXES)


def _load_builtin(name: str) -> Target:
    names = builtin_target_names()
    if name not in names:
        raise ConfigError(f"unknown target {name!r}", where=name, hint=_unknown_name_hint(name, names))
    resource = resources.files(__name__) / f"{name}.toml"
    where = str(resource)
    target = parse_target(_parse_toml(resource.read_text(encoding="utf-8"), where), where=where)
    # A built-in whose name differs from its file would be unreachable by that name.
    assert target.name == name, f"built-in target file {name}.toml declares name {target.name!r}"
    return target


def _unknown_name_hint(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    prefix = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (f"{prefix}built-in targets: {', '.join(names)}; `auto` detects this machine; "
            "or pass a path to a .toml/.json target file")


def _load_file(path: Path) -> Target:
    where = str(path)
    if not path.exists():
        raise ConfigError("target file not found", where=where,
                          hint=f"check the path; built-in targets: {', '.join(builtin_target_names())}")
    if not path.is_file():
        raise ConfigError("target path is not a file", where=where, hint="pass a .toml or .json file")
    suffix = path.suffix.lower()
    if suffix not in TARGET_SUFFIXES:
        raise ConfigError(f"unsupported target file type {suffix or '(no extension)'!r}", where=where,
                          hint="target files end in .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read target file: {exc}", where=where) from exc
    data = _parse_json(text, where) if suffix == ".json" else _parse_toml(text, where)
    return parse_target(data, where=where)


def _parse_toml(text: str, where: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # message carries "(at line L, column C)"
        raise ConfigError(f"invalid TOML: {exc}", where=where, hint="fix the syntax at that line") from exc


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # message carries "line L column C"
        raise ConfigError(f"invalid JSON: {exc}", where=where, hint="fix the syntax at that line") from exc


# ---------------------------------------------------------------- field validation


def _check_keys(data: dict, where: str) -> None:
    allowed = ", ".join(ALLOWED_KEYS)
    for key in data:
        if key not in ALLOWED_KEYS:
            close = difflib.get_close_matches(str(key), ALLOWED_KEYS, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown key {key!r} in target", where=where,
                              hint=f"{guess}allowed keys: {allowed}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"missing required key {key!r} in target", where=where,
                              hint=f"required keys: {', '.join(REQUIRED_KEYS)}")


def _check_schema_version(data: dict, where: str) -> None:
    version = data.get("schema_version")
    if version is None:
        raise ConfigError("missing required key 'schema_version' in target", where=where,
                          hint=f"add `schema_version = {SCHEMA_VERSION}`")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ConfigError(f"unsupported schema_version {version!r} in target", where=where,
                          hint=f"this dsedge reads schema_version = {SCHEMA_VERSION}")


def _type_error(key: str, expected: str, value: Any, where: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConfigError(f"{key} must be {expected}, got {type(value).__name__} {shown}", where=where)


def _range_error(key: str, rule: str, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{key} must be {rule}, got {value!r}", where=where)


def _read_str(data: dict, key: str, where: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise _type_error(key, "a string", value, where)
    return value


def _read_name(data: dict, where: str) -> str:
    name = _read_str(data, "name", where)
    if not _NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"name {name!r} is not a valid target name", where=where,
                          hint="use letters, digits, '.', '_' and '-', e.g. 'my-board-4g'")
    return name


def _read_choice(data: dict, key: str, choices: tuple[str, ...], where: str) -> str:
    value = _read_str(data, key, where)
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}", where=where, hint=f"one of: {', '.join(choices)}")
    return value


def _read_int(data: dict, key: str, where: str, *, minimum: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass; reject it
        raise _type_error(key, "an integer", value, where)
    if value < minimum:
        raise _range_error(key, f">= {minimum}", value, where)
    return value


def _read_positive_float(data: dict, key: str, where: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(key, "a number", value, where)
    if not math.isfinite(value) or value <= 0:
        raise _range_error(key, "a finite number > 0", value, where)
    return float(value)


def _read_str_list(data: dict, key: str, where: str) -> tuple[str, ...]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _type_error(key, "a list of strings", value, where)
    if not value:
        raise ConfigError(f"{key} must not be empty", where=where)
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} lists an entry twice: {value!r}", where=where)
    return tuple(value)


def _read_providers(data: dict, where: str) -> tuple[str, ...]:
    providers = _read_str_list(data, "execution_providers", where)
    for provider in providers:
        if not _PROVIDER_PATTERN.fullmatch(provider):
            raise ConfigError(f"execution_providers: {provider!r} is not an onnxruntime provider name",
                              where=where,
                              hint="names end in 'ExecutionProvider', e.g. 'CUDAExecutionProvider'")
    return providers


def _read_precisions(data: dict, where: str) -> tuple[str, ...]:
    precisions = _read_str_list(data, "precisions", where)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ConfigError(f"precisions: unknown precision {precision!r}", where=where,
                              hint=f"one of: {', '.join(PRECISIONS)}")
    return precisions
