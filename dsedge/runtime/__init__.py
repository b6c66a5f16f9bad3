"""The on-device runtime: onnxruntime + numpy + tokenizers only (a test asserts torch is never imported)."""

from __future__ import annotations

from pathlib import Path

from dsedge.runtime.bundle import open_manifest
from dsedge.runtime.engine import Engine, SessionConfig


def load_bundle(path: str | Path, target=None, memory_budget_bytes: int | None = None,
                providers: list[str] | None = None, threads: int | None = None, *, verify: bool = True) -> Engine:
    """Open a bundle written by `dsedge export`: verify it, create sessions, return an Engine.

    ``target`` (name, file or Target) supplies default providers and threads; explicit arguments win.
    Every file's sha256 is checked unless ``verify=False``; paths that leave the bundle are refused always.
    """
    from dsedge.targets import load_target

    tgt = load_target(target) if target is not None else None
    providers = providers or (list(tgt.execution_providers) if tgt else ["CPUExecutionProvider"])
    threads = threads or (tgt.threads if tgt else None)
    manifest = open_manifest(path, verify=verify)
    del memory_budget_bytes  # used by partitioned bundles' expert cache
    return Engine(manifest, SessionConfig(tuple(providers), threads))


__all__ = ["Engine", "SessionConfig", "load_bundle"]
