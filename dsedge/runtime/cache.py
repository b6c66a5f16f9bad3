"""Preallocated cache buffers; the graphs return only the new tokens' entries and we write them in place."""

from __future__ import annotations

import numpy as np

from dsedge.errors import UserError


class CacheBuffers:
    """Per-layer cache tensors of shape ``layout`` with the sequence axis sized to ``max_len``."""

    def __init__(self, cache: dict, layers: int, batch: int, max_len: int):
        self.names = tuple(cache["tensors"])
        dtype = np.dtype(cache.get("dtype", "float32"))
        layout = [batch if d == "B" else max_len if d == "S" else int(d) for d in cache["shape"]]
        self.axis = cache["shape"].index("S")
        self.layers, self.max_len, self.length = layers, max_len, 0
        self.buffers = {f"{i}.{t}": np.zeros(layout, dtype) for i in range(layers) for t in self.names}

    def _window(self, start: int, stop: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(start, stop),)

    def past(self) -> dict[str, np.ndarray]:
        """Graph inputs ``past.{i}.{t}``: views of the filled part (contiguous for batch 1 MLA caches)."""
        window = self._window(0, self.length)
        return {f"past.{key}": buf[window] for key, buf in self.buffers.items()}

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise UserError(f"{self.length} cached + {new_tokens} new tokens exceed the bundle's max context "
                            f"of {self.max_len}", where="kv cache",
                            hint="shorten the prompt or max_new_tokens, or re-export with a larger --max-context")

    def append(self, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        """Write ``present.{i}.{t}`` outputs at the current end, then advance."""
        self.check_room(new_tokens)
        window = self._window(self.length, self.length + new_tokens)
        for key, buf in self.buffers.items():
            buf[window] = presents[f"present.{key}"]
        self.length += new_tokens
