"""Make freed tensor memory go back to the OS at once, so streamed peak RSS stays at one layer.

glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) each time a large mmapped block is
freed; later allocations of that size then come from the heap, where freed layers linger. Streaming a
model layer by layer measured 2.75x one layer of resident growth that way, and exactly 1x with a fixed
threshold (``benchmarks/reader_memory.py``). Setting the threshold explicitly (what the
``MALLOC_MMAP_THRESHOLD_`` variable does) turns the dynamic adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
LARGE_ALLOCATION = 1024 * 1024


@functools.cache
def return_large_frees_to_os() -> bool:
    """Serve allocations ≥ 1 MiB by mmap (glibc only; a no-op elsewhere). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION))
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
