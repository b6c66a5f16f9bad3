"""Where a checkpoint comes from: a directory as given, or the name of a shipped demo model.

Name resolution lives here, above the checkpoint reader (:mod:`dsedge.models` takes directories only),
and is used by the commands and API entry points that accept either: compress, export, inspect,
evaluation. Stdlib only.
"""

from __future__ import annotations

from pathlib import Path

from dsedge.demo import DEMO_MODELS, model_path
from dsedge.errors import UserError


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """An existing directory as given, else the shipped demo model of that name.

    ``dsedge inspect deepseek-v3-tiny`` works from any working directory; a local directory always wins
    over a demo name.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and (name_or_path in DEMO_MODELS or "/" not in name_or_path):
        return model_path(name_or_path)
    raise UserError("checkpoint directory not found", where=str(path),
                    hint=f"pass a checkpoint directory or a demo model name ({', '.join(DEMO_MODELS)})")
