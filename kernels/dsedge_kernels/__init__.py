"""Where the dsedge-kernels custom-op library is, and whether this CPU runs its fast paths.

The library (built from src/vnni_ops.c) registers the ops of domain ``com.dsedge`` with onnxruntime:
``MoEInt4`` (QMoE's 4-bit block layout read as stored: the expert partitions a memory budget leaves out run
from the bundle's file, dsedge/runtime/streamed.py), and the prototypes ``MatMulInt4`` and ``HeadMatMulU8``."""

from __future__ import annotations

import importlib.machinery
import platform
from pathlib import Path

__version__ = "0.1.0"
DOMAIN = "com.dsedge"
# The instructions the fast paths are compiled for (vpdpbusd on 512-bit registers, byte shuffles, masks).
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def library_path() -> Path | None:
    """The built shared library inside this package, or None when it is missing."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_vnni_ops{suffix}"
        if candidate.is_file():
            return candidate
    return None


def supported(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has the AVX-512 VNNI instructions the kernels are fast with (Linux x86-64: the flags of
    /proc/cpuinfo; elsewhere False, so the caller keeps onnxruntime's own ops)."""
    if cpuinfo is None:
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return all(flag in flags for flag in REQUIRED_FLAGS)
