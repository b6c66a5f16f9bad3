"""Tolerant reading of Hugging Face config.json values (unknown keys are kept, never fatal).

Tolerant of keys, strict about values: every size is range-checked here, before anything is planned or
allocated from it, so a corrupt or hostile config (``n_routed_experts: 1e9``, a negative context length,
``rms_norm_eps: NaN``) is refused with the limit in the message instead of exhausting memory later.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

from dsedge import safe_json
from dsedge.errors import ConfigError
from dsedge.models.spec import RopeSpec

MAX_CONFIG_BYTES = 64 * 1024 * 1024  # published configs are a few KB
MAX_CONFIG_DEPTH = 32  # published configs nest 3 levels (quantization_config, rope_scaling)

# Inclusive [low, high] of each integer key. The ceilings sit far above every published DeepSeek, Qwen
# and Llama config (largest seen: vocab 262144, hidden 16384, intermediate 53248, 126 layers, 128 heads,
# 512 routed experts, 10M context) so no real model is refused; 0 is allowed where the parsers read it as
# "none/default" (q_lora_rank, head_dim, num_key_value_heads, n_group, ...).
_VOCAB_CEILING = 1 << 22
_CONTEXT_CEILING = 1 << 26
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, _VOCAB_CEILING),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (0, 4096),
    "head_dim": (0, 8192),
    "max_position_embeddings": (1, _CONTEXT_CEILING),
    "original_max_position_embeddings": (1, _CONTEXT_CEILING),
    "kv_lora_rank": (1, 1 << 16),
    "q_lora_rank": (0, 1 << 16),
    "qk_nope_head_dim": (1, 8192),
    "qk_rope_head_dim": (1, 8192),
    "v_head_dim": (1, 8192),
    "n_routed_experts": (1, 8192),
    "num_experts_per_tok": (1, 8192),
    "n_shared_experts": (0, 1024),
    "n_group": (0, 8192),
    "topk_group": (0, 8192),
    "first_k_dense_replace": (0, 1024),
    "moe_layer_freq": (0, 1024),
    "num_nextn_predict_layers": (0, 64),
    "bos_token_id": (0, _VOCAB_CEILING),
    "eos_token_id": (0, _VOCAB_CEILING),
}
# The tensor layout lists three tensors per routed expert per layer; cap the product as well (published
# maximum ≈ 24.6k: 512 experts × 48 layers) so the listing stays in the megabytes.
MAX_ROUTED_EXPERTS_TOTAL = 1 << 18
# (exclusive low, inclusive high) of each float key; every float must also be finite.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e15),
    "factor": (0.0, 1e6),
    "routed_scaling_factor": (0.0, 1e6),
}


class ConfigReader:
    """Typed access to a config dict; a wrong type, missing key or out-of-range value names the key and file."""

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
        value = _coerce(key, value, kind, self.where)
        if key == "n_routed_experts":
            self._check_expert_total(value)
        return value

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value < 1:
            raise ConfigError(f"config.json '{key}' must be ≥ 1, got {value}", where=self.where)
        return value

    def _check_expert_total(self, experts: int) -> None:
        layers = self.config.get("num_hidden_layers")
        if isinstance(layers, int) and not isinstance(layers, bool) and experts * layers > MAX_ROUTED_EXPERTS_TOTAL:
            raise ConfigError(f"config.json describes {experts} routed experts × {layers} layers = "
                              f"{experts * layers} expert MLPs, above the limit of {MAX_ROUTED_EXPERTS_TOTAL}",
                              where=self.where, hint=_CORRUPT_HINT)


_CORRUPT_HINT = "no published model comes close to this; the config is corrupt or was edited"


def _coerce(key: str, value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (an int-valued float is an int, an int is a float; a bool is neither), in range."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"config.json '{key}' should be {kind.__name__}, got {value!r}", where=where)
    if kind is int:
        _check_int_range(key, value, where)
    elif kind is float:
        _check_float_range(key, value, where)
    return value


def _check_int_range(key: str, value: int, where: str) -> None:
    if key not in INT_RANGES:
        return
    low, high = INT_RANGES[key]
    if not low <= value <= high:
        raise ConfigError(f"config.json '{key}' = {value} is outside the allowed range {low}..{high}",
                          where=where, hint=_CORRUPT_HINT if value > high else None)


def _check_float_range(key: str, value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"config.json '{key}' must be a finite number, got {value!r}", where=where)
    if key not in FLOAT_RANGES:
        return
    low, high = FLOAT_RANGES[key]
    if not low < value <= high:
        raise ConfigError(f"config.json '{key}' = {value!r} is outside the allowed range ({low:g}, {high:g}]",
                          where=where)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a config.json, with a clear error for a missing, special, oversized or malformed file."""
    try:
        info = os.stat(path)
    except OSError:
        info = None
    if info is None or stat.S_ISDIR(info.st_mode):
        raise ConfigError("config.json not found", where=str(path),
                          hint="pass a Hugging Face checkpoint directory (config.json + *.safetensors)")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
        raise ConfigError("config.json is not a regular file (a FIFO, device or socket)", where=str(path),
                          hint="replace it with the checkpoint's real config.json")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config.json is {info.st_size} bytes, more than the {MAX_CONFIG_BYTES} allowed",
                          where=str(path), hint="this is not a Hugging Face config (those are a few KB)")
    try:
        data = safe_json.loads(path.read_text(encoding="utf-8"), max_depth=MAX_CONFIG_DEPTH)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, too deep, a 5000-digit number
        raise ConfigError(f"config.json is not valid JSON: {exc}", where=str(path)) from None
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
    if not isinstance(kind, str):
        raise ConfigError(f"config.json rope 'rope_type' should be str, got {kind!r}", where=cfg.where)
    sub = ConfigReader(merged, f"{cfg.where}: rope")
    return RopeSpec(
        theta=_coerce("rope_theta", theta, float, cfg.where),
        type=kind,
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
    """bos (an int or null) and eos (an int, a list of ints, or null), each a valid token id."""
    eos = cfg.config.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(_coerce("eos_token_id", e, int, cfg.where) for e in eos)
    elif eos is not None:
        eos = _coerce("eos_token_id", eos, int, cfg.where)
    return {"bos_token_id": cfg.get("bos_token_id", int, None), "eos_token_id": eos}
