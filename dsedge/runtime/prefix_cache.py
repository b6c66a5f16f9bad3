"""Prompt (prefix) caching: a prompt that starts with tokens already run reuses their cache entries.

Two shapes of the same idea, both verified by token ids (never by text) and both handing
``decode.generate_step(cache=...)`` a cache that holds a true prefix of the prompt, so it prefills only the rest:

``PrefixCache`` (the server: many clients, many prompts) stores cache entries in fixed-size blocks keyed
by their tokens *and* everything before them, as vLLM's automatic prefix caching does: block ``i`` is
identified by (its parent block, its ``block_size`` token ids), so two prompts that share a system prompt or
the same retrieved sources share those blocks, stored once
(https://docs.vllm.ai/en/latest/design/prefix_caching/, RFC vllm-project/vllm#2614). Keys here are exact —
(parent node id, token tuple) in a dict, a trie with block-wide edges — so no hash collision can hand a
prompt another prompt's cache. Memory is bounded in bytes of cached arrays; eviction is LRU, leaf first:
every lookup and insert touches a chain from its last block back to its first, so a parent is always more
recent than its children and the least recently used block is always a leaf (no orphaned, unreachable
children hold memory). Only whole blocks are cached: a hit reuses ``block_size`` × k tokens and the
prompt's tail (< one block) is prefilled again, vLLM's trade as well. A hit copies the blocks into a fresh
``CacheBuffers`` for the request; the request's own cache never aliases the store.

``ConversationCache`` (``dsedge chat``: one conversation, turn after turn) keeps the live cache of the last
turn and the token ids it holds, as llama.cpp's server keeps a slot's cache and reuses the longest common
prefix with the next prompt (``cache_prompt``; tools/server in ggml-org/llama.cpp). The next turn's
prompt is re-rendered from the history, which drops R1 reasoning and re-tokenizes the answer, so it is
compared token by token with what the cache holds and the cache is truncated to the common prefix.

numpy only; ``new_cache`` / ``engine.new_cache(batch, max_len)`` makes the buffers.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers

log = logging.getLogger(__name__)

__all__ = ["ConversationCache", "PrefixCache", "PrefixCacheStats", "common_prefix_length"]

DEFAULT_BLOCK_SIZE = 16  # vLLM's default block size
DEFAULT_CAPACITY_BYTES = 512 * 1024**2


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    reused_tokens: int = 0  # positions handed out from the store (not prefilled again)
    evicted_blocks: int = 0
    blocks: int = 0
    bytes: int = 0


@dataclass(eq=False)
class _Block:
    """One block of cache entries: per-layer arrays covering ``block_size`` positions."""

    node: int  # this block's id; children are keyed by it
    parent: int  # 0: the block is the first of its prompt
    tokens: tuple[int, ...]
    arrays: dict[str, np.ndarray]  # CacheBuffers key "i.t" -> the block's slice (a copy)
    nbytes: int
    children: int = field(default=0)


class PrefixCache:
    """Whole-block cache entries of earlier prompts, looked up by token ids; at most ``capacity_bytes`` held.

    ``new_cache(batch=, max_len=)`` makes request caches (``engine.new_cache``). Not for batches: one row.
    """

    def __init__(self, new_cache: Callable[..., CacheBuffers], *, capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1:
            raise UserError(f"the prompt cache's block size must be ≥ 1 (got {block_size})", where="prompt cache")
        if capacity_bytes < 0:
            raise UserError(f"the prompt cache's capacity must be ≥ 0 bytes (got {capacity_bytes})",
                            where="prompt cache", hint="pass a size such as 512M, or 0 to turn it off")
        self.new_cache, self.capacity_bytes, self.block_size = new_cache, capacity_bytes, block_size
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._nodes: dict[int, _Block] = {}  # node id -> block, to reach a block's parent
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # stats are read by other threads (a server's /metrics)
        self._stats = PrefixCacheStats()

    @property
    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(**self._stats.__dict__)

    @property
    def nbytes(self) -> int:
        return self._stats.bytes

    def __len__(self) -> int:
        return len(self._blocks)

    # --- lookup -----------------------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int], max_len: int) -> tuple[CacheBuffers, int]:
        """A fresh one-row cache for ``max_len`` positions holding the longest cached whole-block prefix of
        ``token_ids``, and how many of its positions a prefill skips (see ``fill``)."""
        cache = self.new_cache(batch=1, max_len=max_len)
        return cache, self.fill(cache, token_ids)

    def fill(self, cache: CacheBuffers, token_ids: Sequence[int]) -> int:
        """Write the longest cached whole-block prefix of ``token_ids`` (as far as it fits) into ``cache``, an
        empty one-row cache; returns how many positions a prefill skips: at most ``len(token_ids) - 1``, as
        the last prompt token is always run (its logits give the first new token)."""
        if cache.batch != 1 or cache.length:
            raise UserError(f"the prompt cache fills empty one-row caches (got {cache.batch} rows, "
                            f"{cache.length} positions)", where="prompt cache")
        chain = self._chain(token_ids)[: cache.max_len // self.block_size]
        for block in chain:
            cache.append({f"present.{key}": array for key, array in block.arrays.items()}, self.block_size)
        reused = min(cache.length, max(0, len(token_ids) - 1))
        with self._lock:
            self._stats.lookups += 1
            self._stats.hits += reused > 0
            self._stats.reused_tokens += reused
        if chain:
            self._touch(chain)
        return reused

    def _chain(self, token_ids: Sequence[int]) -> list[_Block]:
        """The cached blocks that spell the start of ``token_ids``, first to last."""
        chain, parent, size = [], 0, self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            block = self._blocks.get((parent, tuple(int(t) for t in token_ids[start:start + size])))
            if block is None:
                break
            chain.append(block)
            parent = block.node
        return chain

    # --- insert -----------------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], cache: CacheBuffers) -> int:
        """Store the whole blocks of ``cache`` (one row) that are not stored yet; ``token_ids`` are the tokens
        its filled positions hold (extra ids past ``cache.length`` are ignored). Returns the blocks added."""
        if cache.batch != 1:
            raise UserError(f"the prompt cache stores one-row caches (got {cache.batch} rows)", where="prompt cache")
        if self.capacity_bytes == 0:
            return 0
        held = min(cache.length, len(token_ids))
        chain, parent, added = [], 0, 0
        past = None
        for start in range(0, held - self.block_size + 1, self.block_size):
            tokens = tuple(int(t) for t in token_ids[start:start + self.block_size])
            block = self._blocks.get((parent, tokens))
            if block is None:
                past = cache.filled() if past is None else past
                block = self._new_block(parent, tokens, past, cache.axis, start)
                if block.nbytes > self.capacity_bytes:
                    break  # a block that can never fit: store nothing past it
                self._make_room(block.nbytes, keep=chain)
                if self._stats.bytes + block.nbytes > self.capacity_bytes:
                    break  # the chain so far fills the capacity
                self._add(block)
                added += 1
            chain.append(block)
            parent = block.node
        if chain:
            self._touch(chain)
        return added

    def _new_block(self, parent: int, tokens: tuple[int, ...], past: dict[str, np.ndarray], axis: int,
                   start: int) -> _Block:
        window = (slice(None),) * axis + (slice(start, start + self.block_size),)
        arrays = {name.removeprefix("past."): np.array(view[window]) for name, view in past.items()}
        return _Block(next(self._ids), parent, tokens, arrays, sum(a.nbytes for a in arrays.values()))

    def _add(self, block: _Block) -> None:
        self._blocks[(block.parent, block.tokens)] = block
        self._nodes[block.node] = block
        parent = self._nodes.get(block.parent)
        if parent is not None:
            parent.children += 1
        with self._lock:
            self._stats.blocks += 1
            self._stats.bytes += block.nbytes

    # --- eviction ---------------------------------------------------------------------------------
    def _make_room(self, nbytes: int, keep: list[_Block]) -> None:
        """Evict least recently used leaves until ``nbytes`` more fit (never a block of ``keep``)."""
        kept = {id(b) for b in keep}
        while self._stats.bytes + nbytes > self.capacity_bytes:
            victim = next((b for b in self._blocks.values() if not b.children and id(b) not in kept), None)
            if victim is None:
                return
            self._evict(victim)

    def _evict(self, block: _Block) -> None:
        del self._blocks[(block.parent, block.tokens)]
        del self._nodes[block.node]
        parent = self._nodes.get(block.parent)
        if parent is not None:
            parent.children -= 1
        with self._lock:
            self._stats.blocks -= 1
            self._stats.bytes -= block.nbytes
            self._stats.evicted_blocks += 1

    def _touch(self, chain: list[_Block]) -> None:
        """Most recently used: the chain's last block first, its first block last (a parent outlives its
        children in LRU order)."""
        for block in reversed(chain):
            self._blocks.move_to_end((block.parent, block.tokens))

    def clear(self) -> None:
        self._blocks.clear()
        self._nodes.clear()
        with self._lock:
            self._stats.blocks = self._stats.bytes = 0


class ConversationCache:
    """The cache of one conversation's last turn and the token ids it holds; the next turn reuses the
    longest common prefix with its prompt. ``take`` hands the cache out (a turn that never completes
    leaves nothing behind); ``keep`` takes it back with the tokens of the finished turn."""

    def __init__(self, engine):
        self.engine = engine
        self._cache: CacheBuffers | None = None
        self._tokens: list[int] = []
        self.reused = 0  # positions the last ``take`` kept

    def take(self, prompt_ids: Sequence[int], max_new_tokens: int) -> CacheBuffers:
        """A one-row cache holding the longest prefix of ``prompt_ids`` that the last turn's cache holds
        (at most all but the last prompt token), with room for the prompt and ``max_new_tokens``."""
        needed = len(prompt_ids) + max(0, max_new_tokens - 1)  # the last new token is never forwarded
        cache, self._cache = self._cache, None
        self.reused = 0
        if cache is not None:
            self.reused = min(common_prefix_length(self._tokens, prompt_ids), len(prompt_ids) - 1, cache.length)
            cache.truncate(self.reused)
            if cache.max_len < needed:  # grow by doubling: a conversation keeps growing
                cache = cache.copy(max_len=min(self.engine.max_context, max(needed, 2 * cache.max_len)))
        log.debug("conversation cache: %d of %d prompt tokens reused", self.reused, len(prompt_ids))
        return cache if cache is not None else self.engine.new_cache(batch=1, max_len=needed)

    def keep(self, cache: CacheBuffers, token_ids: Sequence[int]) -> None:
        """After a turn: ``cache`` holds the first ``cache.length`` of ``token_ids`` (prompt + reply)."""
        if cache.length > len(token_ids):  # not what this turn ran: do not trust it
            self.clear()
            return
        self._cache, self._tokens = cache, [int(t) for t in token_ids[:cache.length]]

    def clear(self) -> None:
        self._cache, self._tokens = None, []
