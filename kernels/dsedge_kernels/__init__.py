"""Where the dsedge-kernels custom-op library is, and whether this CPU runs its fast paths.

The library (built from src/vnni_ops.c) registers the ops of domain ``com.dsedge`` with onnxruntime:
``MoEInt4`` (QMoE's 4-bit block layout read as stored, on AVX-512 VNNI or AVX2 with FMA: the expert partitions
a memory budget leaves out run from the bundle's file, dsedge/runtime/streamed.py), and the prototypes
``MatMulInt4`` and ``HeadMatMulU8`` (AVX-512 VNNI only, benchmarks only)."""

from __future__ import annotations

import importlib.machinery
import platform
from pathlib import Path

__version__ = "0.1.0"
DOMAIN = "com.dsedge"
# The instructions of MoEInt4's two vector paths, the best one the compiler may use chosen at build time
# (-march=native): vpdpbusd on 512-bit registers, else vpmaddubsw/vpmaddwd on 256-bit ones.
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
AVX2_FLAGS = ("avx2", "fma")


def library_path() -> Path | None:
    """The built shared library inside this package, or None when it is missing."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_vnni_ops{suffix}"
        if candidate.is_file():
            return candidate
    return None


def supported(cpuinfo: str | None = None) -> bool:
    """Whether this CPU runs MoEInt4 on a vector path: AVX-512 VNNI, or AVX2 with FMA (Linux x86-64: the flags of
    /proc/cpuinfo; elsewhere False, so the caller keeps onnxruntime's own ops)."""
    return vector_path(cpuinfo) is not None


def vector_path(cpuinfo: str | None = None) -> str | None:
    """The best of MoEInt4's vector paths this CPU has: "avx512-vnni", "avx2" or None (the library built here with
    -march=native compiles that one)."""
    if cpuinfo is None:
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return None
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    if all(flag in flags for flag in VNNI_FLAGS):
        return "avx512-vnni"
    return "avx2" if all(flag in flags for flag in AVX2_FLAGS) else None
