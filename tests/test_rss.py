"""The peak RSS dsedge reports is the process's own, not the high-water mark exec inherits from its parent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsedge.rss import peak_rss_bytes

PARENT_BYTES = 384 << 20
CHILD = """
import json, resource
from dsedge.rss import peak_rss_bytes
print(json.dumps({"ours": peak_rss_bytes(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _touched(nbytes: int) -> bytearray:
    block = bytearray(nbytes)
    block[::4096] = b"\1" * len(range(0, nbytes, 4096))  # every page resident, not just reserved
    return block


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc/self/status")
def test_a_child_of_a_large_parent_reports_its_own_peak():
    held = _touched(PARENT_BYTES)
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child = json.loads(run.stdout)
    del held
    # The trap itself, so that the test fails if the fallback were ever taken on Linux: ru_maxrss carries the
    # parent's peak through exec; the process's own figure is that of an interpreter with one module loaded.
    assert child["ru_maxrss"] >= PARENT_BYTES
    assert child["ours"] < 96 << 20


def test_the_peak_counts_this_process_allocations_in_bytes():
    before = peak_rss_bytes()
    held = _touched(64 << 20)
    assert peak_rss_bytes() >= max(before, len(held))  # KiB taken for bytes would read 1024x too small
