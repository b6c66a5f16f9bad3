"""The process's own peak resident set, as compress, export and profile report it.

Linux's ``ru_maxrss`` is not the process's own: exec keeps the high-water mark of the memory it replaces, so a
process started by a large parent (a benchmark driver that just built a checkpoint, a test runner) reports the
parent's peak: one export of R1-Distill-Qwen-1.5B int4 showed 2.45 GiB for its own 1.47 (docs/scale.md, 2026-12-06).
``VmHWM`` in /proc/self/status belongs to the process's own address space; ``ru_maxrss`` is the fallback
where /proc is absent (macOS reports it in bytes, Linux and the BSDs in KiB).
"""

from __future__ import annotations

import resource
import sys

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """The highest resident set this process's own memory has reached so far, in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024

