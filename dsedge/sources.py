"""Where a model comes from: a directory as given, a shipped demo model, a Hugging Face repo id found in the
local Hugging Face cache (offline — nothing is ever downloaded), or a published model's name.

Name resolution lives here, above the checkpoint reader (:mod:`dsedge.models` takes directories only),
and is used by the commands and API entry points that accept names: compress, export, inspect, plan,
evaluation, and (through :mod:`dsedge.store`) run, chat, profile and serve. Stdlib only.

    resolve_checkpoint("deepseek-v3-tiny")                 # the shipped demo model
    resolve_checkpoint("deepseek-ai/DeepSeek-V2-Lite")  # <hub cache>/models--deepseek-ai--DeepSeek-V2-Lite/snapshots/…
    published_name("deepseek-r1:7b")                       # "r1-distill-qwen-7b" (ollama's tag), not the 671B model
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from dsedge.demo import DEMO_MODELS, model_path
from dsedge.errors import UserError

__all__ = ["PUBLISHED_ALIASES", "hf_cache_dir", "hf_cached_models", "hf_snapshot", "known_names", "published_name",
           "resolve_checkpoint", "resolve_model_name", "unknown_name_error"]

# Other spellings of dsedge.models.published's short names: Hugging Face repo ids (the -Chat/-Base/dated
# releases share their config) and ollama's tags (`deepseek-r1:7b` is the Qwen 7B distill, not the 671B model).
PUBLISHED_ALIASES: dict[str, str] = {
    "deepseek-ai/deepseek-r1": "deepseek-r1", "deepseek-ai/deepseek-r1-0528": "deepseek-r1",
    "deepseek-ai/deepseek-r1-zero": "deepseek-r1",
    "deepseek-ai/deepseek-v3": "deepseek-v3", "deepseek-ai/deepseek-v3-base": "deepseek-v3",
    "deepseek-ai/deepseek-v3-0324": "deepseek-v3",
    "deepseek-ai/deepseek-v2": "deepseek-v2", "deepseek-ai/deepseek-v2-chat": "deepseek-v2",
    "deepseek-ai/deepseek-v2-lite": "deepseek-v2-lite", "deepseek-ai/deepseek-v2-lite-chat": "deepseek-v2-lite",
    "deepseek-ai/deepseek-r1-distill-qwen-1.5b": "r1-distill-qwen-1.5b",
    "deepseek-ai/deepseek-r1-distill-qwen-7b": "r1-distill-qwen-7b",
    "deepseek-ai/deepseek-r1-distill-llama-8b": "r1-distill-llama-8b",
    "deepseek-r1:671b": "deepseek-r1", "deepseek-r1:1.5b": "r1-distill-qwen-1.5b",
    "deepseek-r1:7b": "r1-distill-qwen-7b", "deepseek-r1:8b": "r1-distill-llama-8b",
    "deepseek-v3:671b": "deepseek-v3", "deepseek-v3:latest": "deepseek-v3",
    "deepseek-v2:236b": "deepseek-v2", "deepseek-v2:16b": "deepseek-v2-lite", "deepseek-v2:latest": "deepseek-v2-lite",
}


def published_name(name: str) -> str | None:
    """The dsedge.models.published short name ``name`` stands for (itself, a repo id or an ollama tag), or None."""
    from dsedge.models.published import PUBLISHED_CONFIGS  # stdlib-only table; models/ must not import sources

    key = str(name).lower()
    if key in PUBLISHED_CONFIGS:
        return key
    return PUBLISHED_ALIASES.get(key)


# --- the Hugging Face cache (read only) ---------------------------------------------------------

def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def hf_cached_models() -> list[str]:
    """Repo ids with a snapshot holding config.json in the local Hugging Face cache (``models--org--name``)."""
    root = hf_cache_dir()
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    repos = []
    for entry in entries:
        if entry.name.startswith("models--") and _snapshot_dir(entry) is not None:
            repos.append(entry.name[len("models--"):].replace("--", "/"))
    return repos


def hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` (org/name): the one ``refs/main`` names, else the newest holding
    config.json; None when the repo is not in the cache. Repo ids match case-insensitively, as on the Hub."""
    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        return None
    wanted = "models--" + repo_id.replace("/", "--")
    root = hf_cache_dir()
    try:
        match = next((e for e in root.iterdir() if e.name.lower() == wanted.lower()), None)
    except OSError:
        return None
    return _snapshot_dir(match) if match is not None else None


def _snapshot_dir(repo_dir: Path) -> Path | None:
    snapshots = repo_dir / "snapshots"
    try:
        revision = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision / "config.json").is_file():
        return snapshots / revision
    try:
        candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
    except OSError:
        return None
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


# --- resolution ---------------------------------------------------------------------------------

def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """An existing directory as given, else the shipped demo model, else the Hugging Face cache's snapshot.

    ``dsedge inspect deepseek-v3-tiny`` works from any working directory; a local directory always wins
    over a name. A name that matches nothing raises a UserError listing what exists, with the closest match.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in DEMO_MODELS:
        return model_path(name)
    snapshot = hf_snapshot(name)
    if snapshot is not None:
        return snapshot
    raise unknown_name_error(name, what="checkpoint")


def resolve_model_name(name: str) -> str:
    """What `plan` should read for ``name``: a directory or file as given, a cached snapshot directory, a
    demo model's directory, else the published short name (repo ids and ollama tags mapped), else ``name``."""
    if Path(name).exists():
        return name
    if name in DEMO_MODELS:
        return str(model_path(name))
    snapshot = hf_snapshot(name)
    if snapshot is not None:
        return str(snapshot)
    return published_name(name) or name


def known_names() -> dict[str, list[str]]:
    """Every name that resolves here, by where it comes from (demo, Hugging Face cache, published configs)."""
    from dsedge.models.published import PUBLISHED_CONFIGS  # stdlib-only table; models/ must not import sources

    return {"demo models": list(DEMO_MODELS), f"Hugging Face cache ({hf_cache_dir()})": hf_cached_models(),
            "published configs (plan only)": list(PUBLISHED_CONFIGS)}


def unknown_name_error(name: str, *, what: str, extra: dict[str, list[str]] | None = None) -> UserError:
    """A UserError for a name that matches nothing: what exists, and the closest match."""
    groups = {**(extra or {}), **known_names()}
    if what != "model":
        groups.pop("published configs (plan only)", None)
    everything = [n for names in groups.values() for n in names]
    close = difflib.get_close_matches(name, everything, n=1, cutoff=0.5)
    listing = "; ".join(f"{group}: {', '.join(names) if names else '(none)'}" for group, names in groups.items())
    hint = (f"did you mean {close[0]!r}? " if close else "") + listing
    hint += " (nothing is downloaded)"
    return UserError(f"no {what} directory or known name {name!r}", where=name, hint=hint)
