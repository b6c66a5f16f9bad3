"""model_type → parser and tensor layout. One plain dict, as in mlx-lm."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from dsedge.errors import ConfigError
from dsedge.models.config import read_config_file
from dsedge.models.deepseek import deepseek_layout, parse_deepseek
from dsedge.models.dense import dense_layout, parse_dense
from dsedge.models.spec import ModelSpec, TensorSpec


class Architecture(NamedTuple):
    parse: Callable[[dict[str, Any], str], ModelSpec]
    layout: Callable[..., list[TensorSpec]]
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    "deepseek_v2": Architecture(parse_deepseek, deepseek_layout, "DeepSeek-V2 / V2-Lite (MLA + MoE)"),
    "deepseek_v3": Architecture(parse_deepseek, deepseek_layout, "DeepSeek-V3 / R1 (MLA + MoE, FP8, MTP)"),
    "qwen2": Architecture(parse_dense, dense_layout, "Qwen2 (DeepSeek-R1-Distill-Qwen)"),
    "llama": Architecture(parse_dense, dense_layout, "Llama (DeepSeek-R1-Distill-Llama)"),
}


def spec_from_config(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Parse a config dict; an unknown ``model_type`` lists the supported ones."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unsupported model_type {model_type!r}", where=where,
                          hint=f"dsedge supports: {supported}")
    return arch.parse(config, where)


def load_spec(path: str | Path) -> ModelSpec:
    """Spec from a checkpoint directory or a config.json path."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    return spec_from_config(read_config_file(config_path), str(config_path))


def tensor_layout(spec: ModelSpec, *, include_mtp: bool) -> list[TensorSpec]:
    return ARCHITECTURES[spec.model_type].layout(spec, include_mtp=include_mtp)
