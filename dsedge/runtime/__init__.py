"""The on-device runtime: onnxruntime + numpy + tokenizers only (a test asserts torch is never imported)."""

from __future__ import annotations

from pathlib import Path

from dsedge.runtime.bundle import open_manifest
from dsedge.runtime.engine import Engine
from dsedge.runtime.monolithic import MonolithicEngine
from dsedge.runtime.partitioned import PartitionedEngine
from dsedge.runtime.session import SessionConfig
from dsedge.targets import AUTO_NAME, detect_target, load_target


def load_bundle(path: str | Path, target=None, memory_budget_bytes: int | None = None,
                providers: list[str] | None = None, threads: int | None = None, *, verify: bool | str = True,
                profile_dir: str | Path | None = None, prefetch_experts: bool = False,
                spin: bool | None = None, fuse_layers: bool = True, shared_threads: bool | None = None,
                compose: bool = True) -> Engine:
    """Open a bundle written by `dsedge export`: verify it, create sessions, return an Engine.

    ``target`` (name, file or Target) supplies default providers and threads; explicit arguments win.
    ``memory_budget_bytes`` caps the expert partitions a partitioned bundle keeps loaded (LRU beyond it).
    Every file is reached through one verified door (``dsedge.verified``): listed, inside, no link, a regular
    file, its sha256 matched. ``verify=True`` (fast start) hashes a file when it is first opened — an expert
    partition when first loaded — unless the verification record says it is unchanged since it last matched;
    ``verify="full"`` hashes every file now; ``verify=False`` skips hashing (paths, links, kinds still checked).
    ``prefetch_experts`` (partitioned): load the partitions a layer used at the previous step in the background
    while the layer before it runs.
    Retrieval (RAG) is not the runtime's: ``dsedge.rag.open_retriever(engine, index)`` / ``dsedge.rag.ask``.
    ``profile_dir``: write onnxruntime's per-node profiler traces there (slower; `dsedge profile --by-op`).
    ``spin``: onnxruntime's thread-pool spinning. None (default): on for a monolithic bundle (one session with
    the cores to itself: faster), off for a partitioned one (its many sessions' idle pools would spin against
    the running one); True/False force it (pass False when other work shares the cores).
    ``shared_threads``: one onnxruntime intra-op thread pool for the whole process (a partitioned bundle runs
    its sessions in turn; each waking its own pool cost 20-30% of decode). Once created it serves every later
    session of the process, sized as the first asked, and onnxruntime refuses sessions with their own threads,
    so it is opt-in: True, or None (default) in a process that called
    ``dsedge.runtime.session.own_process_threads()`` (the CLI does) for partitioned bundles.
    ``fuse_layers`` (partitioned): a layer whose expert partitions are all resident runs its one fused experts
    graph where the bundle has it (the default; False runs the partitions, as validation checks them).
    ``compose`` (partitioned): when every expert partition is resident (no budget, or one they all fit in), run
    the prelude, the layers with their experts and the head as one graph composed in memory from the bundle's
    graphs over the same files (``dsedge.runtime.compose``; sessions as for a monolithic bundle: spinning on
    unless ``spin`` says otherwise). False runs them graph by graph, as a budget does.
    """
    # The runtime reads a target's providers and threads only: `auto` skips detection's bandwidth probe (two
    # 64 MiB buffers copied for 0.1 s: +100 MiB peak RSS on every `dsedge run` of a bundle without a target).
    tgt = detect_target(probe_bandwidth=False) if target == AUTO_NAME else load_target(target) \
        if target is not None else None
    providers = providers or (list(tgt.execution_providers) if tgt else ["CPUExecutionProvider"])
    threads = threads or (_available_threads(tgt.threads) if tgt else None)
    manifest = open_manifest(path, verify=verify)
    prefix = f"{Path(profile_dir)}/" if profile_dir is not None else None
    asked = SessionConfig(tuple(providers), threads, spin, profile_prefix=prefix, shared_threads=shared_threads)
    config = asked.for_layout(manifest.contract.layout)
    if manifest.contract.layout == "partitioned":
        engine = PartitionedEngine(manifest, config, memory_budget_bytes, prefetch=prefetch_experts,
                                   fuse_layers=fuse_layers,
                                   whole_config=asked.for_layout("monolithic") if compose else None)
    else:
        engine = MonolithicEngine(manifest, config)
    return engine


def _available_threads(wanted: int) -> int:
    """A target's thread count, capped at the cores this process may use: a device class says 8 threads,
    but running 8 onnxruntime threads on 2 cores makes every step wait for descheduled workers."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or wanted)
    return max(1, min(wanted, cores))


__all__ = ["Engine", "MonolithicEngine", "PartitionedEngine", "SessionConfig", "load_bundle"]
