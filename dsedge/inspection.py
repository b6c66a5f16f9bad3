"""`dsedge inspect`: what a checkpoint directory holds, checked against its config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsedge.models.checkpoint import Checkpoint
from dsedge.models.params import count_params
from dsedge.models.registry import architecture_label
from dsedge.quantformat.config import export_embedding_scheme
from dsedge.sources import resolve_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class InspectReport:
    path: str
    model_type: str
    architecture: str
    spec: dict[str, Any]
    params: dict[str, Any]
    params_on_disk: int  # parameters stored (FP8 scales and quantization parameters excluded), MTP included
    files: int
    bytes_on_disk: int
    bytes_by_dtype: dict[str, int]
    fp8: bool
    mtp_in_config: bool
    mtp_on_disk: bool
    tokenizer: str | None
    chat_template: str | None
    validated: bool
    notes: list[str] = field(default_factory=list)
    quantized_modules: dict[str, int] = field(default_factory=dict)  # scheme label -> linears (compressed ckpts)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def inspect_checkpoint(path: str | Path, *, validate: bool = True) -> InspectReport:
    """Describe a checkpoint: architecture, routing, parameter counts, dtypes and bytes, MTP, tokenizer.

    Reads config.json and the safetensors headers only (no weights), so it is fast on any size.
    With ``validate`` every tensor's name, shape and dtype is checked against the spec.
    """
    ckpt = Checkpoint(resolve_checkpoint(path))
    spec = ckpt.spec
    if validate:
        ckpt.validate()
    on_disk = _stored_params(ckpt)
    notes = []
    if spec.num_mtp_layers and not ckpt.has_mtp:
        notes.append("config declares an MTP layer but the checkpoint does not store it")
    embedding = export_embedding_scheme(spec.config, str(ckpt.path / "config.json"))
    if embedding is not None:  # kept float on disk (transformers loads no packed Embedding): export quantizes it
        notes.append(f"the recipe asks for the embedding as {embedding.label}: kept float here, quantized by "
                     "`dsedge export` (GatherBlockQuantized)")
    return InspectReport(
        path=str(ckpt.path), model_type=spec.model_type,
        architecture=architecture_label(spec, ckpt.path),
        spec=spec.to_json(), params=count_params(spec).to_json(), params_on_disk=on_disk,
        files=len(ckpt.files), bytes_on_disk=sum(f.stat().st_size for f in ckpt.files),
        bytes_by_dtype=ckpt.bytes_by_dtype(), fp8=ckpt.is_fp8,
        mtp_in_config=spec.num_mtp_layers > 0, mtp_on_disk=ckpt.has_mtp,
        tokenizer=_first_existing(ckpt.path, TOKENIZER_FILES),
        chat_template=_chat_template_source(ckpt.path), validated=validate, notes=notes,
        quantized_modules=_schemes(ckpt),
    )


def _stored_params(ckpt: Checkpoint) -> int:
    """Parameters the files hold: FP8 scales and packed-quantization tensors count as their logical weights."""
    quantized = ckpt.quantization
    total = sum(t.numel for n, t in ckpt.tensors.items()
                if not n.endswith("_scale_inv") and n.rsplit(".", 1)[0] not in quantized)
    return total + sum(ckpt.quantized(m).q.numel() for m in quantized) if quantized else total


def _schemes(ckpt: Checkpoint) -> dict[str, int]:
    counts: dict[str, int] = {}
    for scheme in ckpt.quantization.values():
        counts[scheme.label] = counts.get(scheme.label, 0) + 1
    return counts


def _first_existing(path: Path, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if (path / n).is_file()), None)


def _chat_template_source(path: Path) -> str | None:
    """Where the chat template lives: its own file, or inside tokenizer_config.json."""
    found = _first_existing(path, CHAT_TEMPLATE_FILES)
    if found:
        return found
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("chat_template"):
                return "tokenizer_config.json"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
    return None
