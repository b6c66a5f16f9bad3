"""model_type → everything dsedge knows per architecture. One plain dict, as in mlx-lm.

Each entry carries the config parser (whose spec knows its tensor layout), a description, and the stem of
transformers' class names, which compress uses to build one decoder layer at a time
(:func:`dsedge.compress.layers.classes_for`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from dsedge.errors import ConfigError
from dsedge.models.config import read_config_file
from dsedge.models.deepseek import parse_deepseek
from dsedge.models.dense import parse_dense
from dsedge.models.spec import ModelSpec


class Architecture(NamedTuple):
    parse: Callable[[dict[str, Any], str], ModelSpec]  # the spec it returns carries the tensor layout
    description: str
    # transformers.models.<model_type>.modeling_<model_type> holds <stem>DecoderLayer,
    # <stem>RotaryEmbedding and <stem>RMSNorm
    hf_class_stem: str


ARCHITECTURES: dict[str, Architecture] = {
    "deepseek_v2": Architecture(parse_deepseek, "DeepSeek-V2 / V2-Lite (MLA + MoE)", "DeepseekV2"),
    "deepseek_v3": Architecture(parse_deepseek, "DeepSeek-V3 / R1 (MLA + MoE, FP8, MTP)", "DeepseekV3"),
    "qwen2": Architecture(parse_dense, "Qwen2 (dense GQA)", "Qwen2"),
    "llama": Architecture(parse_dense, "Llama (dense GQA)", "Llama"),
}
# The DeepSeek distillations built on a dense architecture: named only when the checkpoint says it is one.
DISTILLED_AS = {"qwen2": "DeepSeek-R1-Distill-Qwen", "llama": "DeepSeek-R1-Distill-Llama"}
_DEEPSEEK_NAME = re.compile(r"deepseek|r1[-_]distill", re.IGNORECASE)


def architecture_label(spec: ModelSpec, source: str | Path = "") -> str:
    """What `inspect` calls the model: the architecture, plus the DeepSeek distillation only when the
    config's ``_name_or_path`` or the checkpoint's directory name says so (any Llama is not R1-Distill)."""
    label = ARCHITECTURES[spec.model_type].description
    distilled = DISTILLED_AS.get(spec.model_type)
    names = f"{spec.config.get('_name_or_path', '')} {Path(source).name if source else ''}"
    return f"{label}: {distilled}" if distilled and _DEEPSEEK_NAME.search(names) else label


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

