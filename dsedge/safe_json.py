"""JSON from untrusted files, with a nesting limit checked before parsing. Stdlib only (the runtime may use it).

``json.loads`` recurses once per nesting level, so a few kilobytes of ``[[[[…`` raise RecursionError (or
worse, exhaust the C stack) instead of a parse error. ``loads`` counts the depth first, with the strings
blanked out so a bracket inside a string does not count, and raises ValueError for anything it refuses;
callers turn that into their own UserError naming the file.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A JSON string, escapes included (the "unrolled loop" form, linear time on long strings).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def nesting_depth(text: str) -> int:
    """How deeply arrays/objects nest in ``text`` (0 for a scalar); brackets inside strings are ignored."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(text: str, *, max_depth: int, reject_duplicates: bool = False) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` (and, if asked, duplicate keys)."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nests {depth} levels deep, more than the {max_depth} allowed")
    hook = _unique_keys if reject_duplicates else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except RecursionError:  # the depth check above should make this unreachable; never let it escape
        raise ValueError("JSON nests too deeply to parse") from None
    # json.JSONDecodeError and the int-digit limit (a 5000-digit number) are both ValueError already


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out
