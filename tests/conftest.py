"""Shared fixtures: tiny random checkpoints, each distinct one built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """A temporary DSEDGE_CACHE for the whole session (and the CLI subprocesses it starts): the bundle and index
    verification records (dsedge.verified) never land in the user's ~/.cache."""
    previous = os.environ.get("DSEDGE_CACHE")
    os.environ["DSEDGE_CACHE"] = str(tmp_path_factory.mktemp("session-cache"))
    yield
    if previous is None:
        os.environ.pop("DSEDGE_CACHE", None)
    else:
        os.environ["DSEDGE_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory ``tiny_checkpoint(variant, **kwargs) -> Path`` over ``dsedge.testing.tiny.write_checkpoint``.

    Each distinct (variant, kwargs) is written once per session; treat the directory as read-only.
    """
    from dsedge.testing.tiny import write_checkpoint

    built: dict[tuple, Path] = {}

    def build(variant: str, **kwargs) -> Path:
        key = (variant, tuple(sorted(kwargs.items())))
        if key not in built:
            label = "-".join([variant, *(f"{name}={value}" for name, value in key[1])])
            built[key] = write_checkpoint(tmp_path_factory.mktemp(label), variant, **kwargs)
        return built[key]

    return build


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory):
    """all-MiniLM-L6-v2 converted to ONNX (and validated against PyTorch) once per session, in a temporary
    DSEDGE_CACHE so tests neither read nor fill the user's cache."""
    from dsedge.retrieval.embedder import default_embedder_dir

    previous = os.environ.get("DSEDGE_CACHE")
    os.environ["DSEDGE_CACHE"] = str(tmp_path_factory.mktemp("dsedge-cache"))
    yield default_embedder_dir()
    if previous is None:
        os.environ.pop("DSEDGE_CACHE", None)
    else:
        os.environ["DSEDGE_CACHE"] = previous
