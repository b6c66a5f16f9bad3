"""Small trained models shipped with dsedge, and the held-out text they are measured on.

``deepseek-v3-tiny`` is a DeepSeek-V3-architecture MoE (MLA with q-LoRA, sigmoid group-limited routing
with the correction bias, a shared expert, a dense first layer) and ``qwen2-tiny`` its dense GQA twin
with about the same active parameters; both were trained on the Python 3.11 documentation by
``scripts/train_demo.py``. See MODEL_CARD.md next to this file for configs, data and measured quality.
Stdlib only: safe to import from the torch-free runtime.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from dsedge.errors import UserError

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODELS: dict[str, Path] = {
    "deepseek-v3-tiny": DEMO_DIR / "models" / "deepseek-v3-tiny",
    "qwen2-tiny": DEMO_DIR / "models" / "qwen2-tiny",
}
HELDOUT_TEXT = DEMO_DIR / "data" / "heldout.txt"
MODEL_CARD = DEMO_DIR / "MODEL_CARD.md"


def model_path(name: str) -> Path:
    """The HF checkpoint directory of the shipped demo model ``name`` (e.g. ``"deepseek-v3-tiny"``)."""
    path = DEMO_MODELS.get(name)
    if path is None:
        raise UserError(f"unknown demo model {name!r}", hint=_did_you_mean(name))
    if not (path / "config.json").is_file():
        raise UserError(f"demo model {name!r} is not installed", where=str(path),
                        hint="reinstall dsedge; its package data must include dsedge/demo/models")
    return path


def heldout_path() -> Path:
    """The shipped held-out text (whole documentation pages the demo models never trained on)."""
    if not HELDOUT_TEXT.is_file():
        raise UserError("the demo held-out text is not installed", where=str(HELDOUT_TEXT),
                        hint="reinstall dsedge; its package data must include dsedge/demo/data")
    return HELDOUT_TEXT


def _did_you_mean(name: str) -> str:
    available = ", ".join(DEMO_MODELS)
    close = difflib.get_close_matches(str(name), list(DEMO_MODELS), n=1, cutoff=0.4)
    return f"did you mean {close[0]!r}? demo models: {available}" if close else f"demo models: {available}"
