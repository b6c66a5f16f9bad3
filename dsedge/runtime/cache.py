"""Preallocated cache buffers, contiguous per layer and tensor, sized to ``max_len``.

Two layouts (the manifest's cache shape says which): with ``S`` (MLA's latent, [B, S, W]) the graphs read
the filled prefix, a contiguous view at batch 1, and return only the new tokens' entries, which ``append``
writes at the end; with ``M`` (GQA's key/value, [B, KV, M, d]) the graphs read the whole buffer and write
the new entries into it themselves: ``in_place_outputs()`` names the buffers to bind each present to, so
no step copies the cache (a [B, KV, S, d] prefix of a longer buffer is not contiguous, and onnxruntime
would copy it on every call).

``length`` positions are filled. ``truncate(n)`` rolls back to a prefix (a rejected speculative draft, or a
prompt cache reused up to the first token that differs); ``copy()`` snapshots the filled part (a server's
prompt cache keeps one per cached prefix). The engines only ever read ``past()`` and call ``append``.
"""

from __future__ import annotations

import numpy as np

from dsedge.errors import UserError

_CONTEXT_HINT = "shorten the prompt or max_new_tokens, or re-export with a larger --max-context"


class CacheBuffers:
    """Per-layer cache tensors of shape ``layout`` with the sequence axis sized to ``max_len``."""

    def __init__(self, cache: dict, layers: int, batch: int, max_len: int):
        self.names = tuple(cache["tensors"])
        self.layout_spec = cache
        dtype = np.dtype(cache.get("dtype", "float32"))
        layout = [batch if d == "B" else max_len if d in ("S", "M") else int(d) for d in cache["shape"]]
        self.in_place = "M" in cache["shape"]
        self.axis = cache["shape"].index("M" if self.in_place else "S")
        self.layers, self.batch, self.max_len, self.length = layers, batch, max_len, 0
        self.buffers = {f"{i}.{t}": np.zeros(layout, dtype) for i in range(layers) for t in self.names}

    def _window(self, start: int, stop: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(start, stop),)

    @property
    def room(self) -> int:
        """Positions still free."""
        return self.max_len - self.length

    def fits(self, new_tokens: int) -> bool:
        return 0 <= new_tokens <= self.room

    def past(self) -> dict[str, np.ndarray]:
        """Graph inputs ``past.{i}.{t}``: the whole buffers (in place), else views of the filled part
        (contiguous for batch 1)."""
        if self.in_place:
            return {f"past.{key}": buf for key, buf in self.buffers.items()}
        window = self._window(0, self.length)
        return {f"past.{key}": buf[window] for key, buf in self.buffers.items()}

    def filled(self) -> dict[str, np.ndarray]:
        """``past.{i}.{t}`` → a view of the filled part, whatever the layout (to copy a cache's contents)."""
        window = self._window(0, self.length)
        return {f"past.{key}": buf[window] for key, buf in self.buffers.items()}

    def in_place_outputs(self) -> dict[str, np.ndarray]:
        """``present.{i}.{t}`` → the buffer a run should write it into (empty when presents are new entries)."""
        return {f"present.{key}": buf for key, buf in self.buffers.items()} if self.in_place else {}

    def check_room(self, new_tokens: int) -> None:
        if not self.fits(new_tokens):
            raise UserError(f"{self.length} cached + {new_tokens} new tokens exceed the bundle's max context "
                            f"of {self.max_len}", where="kv cache", hint=_CONTEXT_HINT)

    def append(self, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        """Write ``present.{i}.{t}`` outputs at the current end, then advance.

        In place: a present that is the buffer itself (bound) needs nothing; one a run allocated (unbound)
        holds the whole updated buffer and replaces it."""
        self.check_room(new_tokens)
        if self.in_place:
            window = self._window(self.length, self.length + new_tokens)
            for key, buf in self.buffers.items():
                present = presents[f"present.{key}"]
                if present is buf:
                    continue
                if present.shape[self.axis] == new_tokens != buf.shape[self.axis]:
                    buf[window] = present  # new entries only (a prompt-cache block, a batch being merged)
                else:
                    self.buffers[key] = np.ascontiguousarray(present, dtype=buf.dtype)
        else:
            window = self._window(self.length, self.length + new_tokens)
            for key, buf in self.buffers.items():
                buf[window] = presents[f"present.{key}"]
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions. Entries past it are left in place and overwritten by the next
        ``append``: ``past()`` never shows them, so a rolled-back cache reads exactly as if never extended."""
        if not 0 <= length <= self.length:
            raise UserError(f"cannot truncate a cache of {self.length} positions to {length}", where="kv cache",
                            hint="truncate to a length between 0 and the cached length")
        self.length = length

    def copy(self, max_len: int | None = None) -> CacheBuffers:
        """An independent cache holding the same filled positions, sized for ``max_len`` (default: the same)."""
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.length:
            raise UserError(f"a copy of {max_len} positions cannot hold the {self.length} cached ones",
                            where="kv cache", hint=_CONTEXT_HINT)
        twin = CacheBuffers(self.layout_spec, self.layers, self.batch, max_len)
        window = self._window(0, self.length)
        for key, buf in self.buffers.items():
            twin.buffers[key][window] = buf[window]
        twin.length = self.length
        return twin
