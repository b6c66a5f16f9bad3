"""``--target auto``: a Target for the machine this process runs on (cores, memory, providers, GPU memory).

Read from what the OS says about *this process* — its CPU affinity and cgroup memory limit (a container's
limit, not the host's RAM) — so that threads and budgets fit where the command actually runs. Memory
bandwidth is not measurable without a benchmark, so it comes from a short copy probe (about 0.1 s); the
figure only feeds `plan`'s decode bound and placement.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

AUTO_NAME = "auto"
# What the OS, page cache and the rest of the desktop keep: the same allowance the built-in CPU targets make.
OS_RESERVE_FRACTION = 0.25
PROBE_BYTES = 64 * 1024**2
_MEMINFO = Path("/proc/meminfo")
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def usable_cores() -> int:
    """Cores this process may run on (affinity / cpuset), not the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def physical_memory_bytes() -> int:
    """Total memory, capped by a cgroup (container) limit when one is set."""
    total = _meminfo_bytes("MemTotal") or _sysconf_memory()
    limits = [_cgroup_limit(p) for p in _CGROUP_LIMITS]
    return min([total, *[lim for lim in limits if lim]])


def available_providers() -> tuple[str, ...]:
    """onnxruntime's providers in this build, fastest first; CPU always last."""
    import onnxruntime as ort  # a base dependency, imported here so that `dsedge.targets` stays stdlib-only

    order = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")
    present = set(ort.get_available_providers())
    return tuple(p for p in order if p in present and p != "CPUExecutionProvider") + ("CPUExecutionProvider",)


def gpu_memory_bytes() -> int | None:
    """Memory of the first CUDA device (nvidia-smi), or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[:1]
    return int(float(first[0])) * 1024**2 if first and first[0].strip().replace(".", "").isdigit() else None


def copy_bandwidth_gbps(nbytes: int = PROBE_BYTES, rounds: int = 3) -> float:
    """Best of a few large memory copies: reads + writes per second, in GB/s (STREAM's copy, roughly)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


def detected_target_fields(*, probe_bandwidth: bool = True) -> dict:
    """The fields of the target ``auto`` stands for (``dsedge.targets.load_target`` validates them)."""
    providers = available_providers()
    gpu = gpu_memory_bytes() if "CUDAExecutionProvider" in providers else None
    host = physical_memory_bytes()
    budget = gpu if gpu else int(host * (1 - OS_RESERVE_FRACTION))
    cores = usable_cores()
    bandwidth = round(copy_bandwidth_gbps(), 1) if probe_bandwidth else 20.0
    data = {
        "name": AUTO_NAME, "kind": "gpu" if gpu else "cpu",
        "description": f"this machine: {cores} cores, {host / 1024**3:.1f} GiB"
                       + (f", GPU {gpu / 1024**3:.1f} GiB" if gpu else ""),
        "memory_budget_bytes": budget, "memory_bandwidth_gbps": bandwidth,
        "host_memory_bytes": int(host * (1 - OS_RESERVE_FRACTION)),
        "execution_providers": list(providers),
        "precisions": ["fp16", "int4", "int8", "fp32"] if gpu else ["int4", "int8", "fp32"],
        "threads": cores, "max_context": 8192 if budget >= 8 * 1024**3 else 4096,
        "default_recipe": "int4-experts" if gpu else "int4",
        "notes": "detected at run time" + ("" if probe_bandwidth else "; bandwidth not probed (a guess)"),
    }
    return data


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in _MEMINFO.read_text(encoding="ascii").splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3  # nothing to read: assume a small machine rather than refuse


def _cgroup_limit(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    value = int(text)
    return value if value < 1 << 60 else None  # cgroup v1 writes ~2^63 for "no limit"
