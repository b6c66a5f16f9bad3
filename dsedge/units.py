"""Sizes as people write them on a command line: ``4G``, ``512M``, ``1.5GiB``, ``2e9``, ``1073741824``.

Binary multiples (K = 1024), as ``free -h``, llama.cpp and docker's ``--memory`` read them; a trailing
``B``/``iB`` is accepted. Stdlib only: the runtime's CLI flags use it.
"""

from __future__ import annotations

import argparse
import math
import re

_SIZE = re.compile(r"\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[kKmMgGtT]?)(?:i?[bB])?\s*")
_MULTIPLIER = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError (with the accepted forms) for anything else, zero or negative included."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size: write e.g. 4G, 512M, 1.5GiB or a byte count")
    value = float(match["number"]) * _MULTIPLIER[match["unit"].lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def size_argument(text: str) -> int:
    """argparse ``type=`` for size flags: a usage error (exit 2) that shows the accepted forms."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
