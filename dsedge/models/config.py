"""Tolerant reading of Hugging Face config.json values (unknown keys are kept, never fatal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsedge.errors import ConfigError
from dsedge.models.spec import RopeSpec


class ConfigReader:
    """Typed access to a config dict; a wrong type or missing required key names the key and file."""

    def __init__(self, config: dict[str, Any], where: str):
        self.config = config
        self.where = where

    def get(self, key: str, kind: type, default: Any = ..., *, allow_none: bool = False) -> Any:
        value = self.config.get(key, default)
        if value is ...:
            raise ConfigError(f"config.json has no '{key}'", where=self.where,
                              hint="the file is incomplete or not a supported Hugging Face config")
        if value is None and (allow_none or default is None):
            return None
        return _coerce(key, value, kind, self.where)

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value < 1:
            raise ConfigError(f"config.json '{key}' must be ≥ 1, got {value}", where=self.where)
        return value


def _coerce(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"config.json '{key}' should be {kind.__name__}, got {value!r}", where=where)
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a config.json, with a clear error for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError("config.json not found", where=str(path),
                          hint="pass a Hugging Face checkpoint directory (config.json + *.safetensors)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("config.json must hold a JSON object", where=str(path))
    return data


def read_rope(cfg: ConfigReader, *, interleaved: bool) -> RopeSpec:
    """RoPE settings from `rope_scaling` (as published) or `rope_parameters` (as transformers 5 saves)."""
    params = cfg.config.get("rope_parameters") or {}
    scaling = cfg.config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("config.json 'rope_scaling'/'rope_parameters' must be objects", where=cfg.where)
    merged = {**params, **scaling}
    theta = merged.get("rope_theta", cfg.config.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    sub = ConfigReader(merged, f"{cfg.where}: rope")
    return RopeSpec(
        theta=_coerce("rope_theta", theta, float, cfg.where),
        type=str(kind),
        factor=sub.get("factor", float, 1.0),
        original_max_position=sub.get("original_max_position_embeddings", int, None),
        beta_fast=sub.get("beta_fast", float, None),
        beta_slow=sub.get("beta_slow", float, None),
        mscale=sub.get("mscale", float, None),
        mscale_all_dim=sub.get("mscale_all_dim", float, None),
        low_freq_factor=sub.get("low_freq_factor", float, None),
        high_freq_factor=sub.get("high_freq_factor", float, None),
        interleaved=interleaved,
    )


def token_ids(cfg: ConfigReader) -> dict[str, Any]:
    eos = cfg.config.get("eos_token_id")
    return {
        "bos_token_id": cfg.get("bos_token_id", int, None),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
    }
