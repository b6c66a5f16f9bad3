"""The spinning policy: on for one monolithic session, off for partitioned bundles, forced either way."""

from __future__ import annotations

import pytest

from dsedge.runtime.session import SessionConfig


@pytest.mark.parametrize(("layout", "want"), [("monolithic", True), ("partitioned", False)])
def test_auto_spin_follows_the_layout(layout, want):
    assert SessionConfig().for_layout(layout).spin is want


@pytest.mark.parametrize("forced", [True, False])
def test_explicit_spin_wins(forced):
    assert SessionConfig(spin=forced).for_layout("monolithic").spin is forced
    assert SessionConfig(spin=forced).for_layout("partitioned").spin is forced
