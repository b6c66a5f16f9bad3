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


@pytest.mark.parametrize(("layout", "want"), [("monolithic", False), ("partitioned", True)])
def test_shared_arena_follows_the_layout_unless_forced(layout, want):
    assert SessionConfig().for_layout(layout).shared_arena is want
    assert SessionConfig(shared_arena=not want).for_layout(layout).shared_arena is (not want)


def test_partitioned_sessions_use_the_environments_shared_arena(tmp_path):
    """Every session of a partitioned bundle (trunk, head, each expert partition) allocates from the one CPU
    arena registered with onnxruntime's environment; a monolithic session keeps its own."""
    from dsedge.export.bundle import export_bundle
    from dsedge.runtime import load_bundle
    from dsedge.testing.tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c", "v3")
    for layout in ("partitioned", "monolithic"):
        export_bundle(ckpt, tmp_path / layout, layout=layout, validate=False)
        engine = load_bundle(tmp_path / layout, compose=False)  # graph by graph, as under a budget
        if layout == "partitioned":
            engine.generate([1, 2, 3], max_new_tokens=2)  # expert partitions load when first routed to
            sessions = [engine.prelude, *engine.layer_sessions, engine.head, *engine.experts.loaded.values()]
            assert engine.experts.loaded
        else:
            sessions = [engine.decoder]
        entries = {_config_entry(s, "session.use_env_allocators") for s in sessions}
        assert entries == ({"1"} if layout == "partitioned" else {""}), (layout, entries)


def _config_entry(session, key: str) -> str:
    options = session.get_session_options()
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # not set
        return ""


@pytest.mark.parametrize(("layout", "want"), [("monolithic", False), ("partitioned", True)])
def test_process_thread_pool_follows_the_layout_in_an_owned_process_unless_forced(layout, want, monkeypatch):
    from dsedge.runtime import session

    assert SessionConfig().for_layout(layout).shared_threads is False  # a library user's process: opt-in only
    assert SessionConfig(shared_threads=True).for_layout(layout).shared_threads is True
    monkeypatch.setattr(session, "_owned_process", [True])  # what the dsedge command declares
    assert SessionConfig().for_layout(layout).shared_threads is want
    assert SessionConfig(shared_threads=not want).for_layout(layout).shared_threads is (not want)


POOL_PROBE = """
import json, sys
from dsedge.runtime import load_bundle
from dsedge.runtime import session
if sys.argv[3] == "owned":
    session.own_process_threads()
order = sys.argv[1].split(",")
out = {}
for layout in order:
    engine = load_bundle(sys.argv[2] + "/" + layout, compose=False)  # partitioned: graph by graph
    out[layout] = engine.greedy([1, 2, 3, 4], 6)
    out[layout + "_pool"] = list(session._process_pool)
print(json.dumps(out))
"""


def test_partitioned_bundles_share_one_process_thread_pool_and_every_later_session_uses_it(tmp_path):
    """In a fresh process that the dsedge command owns: a partitioned bundle creates the process-wide pool; a
    monolithic bundle loaded after it runs on that pool (onnxruntime refuses per-session threads once it
    exists); a monolithic bundle alone keeps its own, and so does a partitioned one in a library user's
    process. Greedy tokens are the same every way."""
    import json
    import subprocess
    import sys

    from dsedge.export.bundle import export_bundle
    from dsedge.testing.tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c", "v3")
    for layout in ("partitioned", "monolithic"):
        export_bundle(ckpt, tmp_path / layout, layout=layout, validate=False)

    def probe(order, owned="owned"):
        run = subprocess.run([sys.executable, "-c", POOL_PROBE, order, str(tmp_path), owned], check=True,
                             capture_output=True, text=True)
        return json.loads(run.stdout.strip().splitlines()[-1])

    both = probe("partitioned,monolithic")
    alone = probe("monolithic")
    library = probe("partitioned", "library")
    assert both["partitioned_pool"] == [0] and both["monolithic_pool"] == [0]
    assert alone["monolithic_pool"] == [] and library["partitioned_pool"] == []
    assert both["partitioned"] == both["monolithic"] == alone["monolithic"] == library["partitioned"]
