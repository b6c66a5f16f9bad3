"""Draft proposers for speculative decoding (``dsedge.runtime.speculative``).

A drafter guesses the next few tokens cheaply; the main model then checks all of them in one forward pass.
``PromptLookup`` works for every model, dense distills included: it copies the tokens that followed the
latest earlier occurrence of the text's last n-gram (transformers' ``prompt_lookup_num_tokens``, vLLM's
``ngram`` speculator) — cheap and often right where answers quote their context (RAG sources, code edits,
summaries) or the model repeats itself.

numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dsedge.errors import UserError

__all__ = ["Draft", "Drafter", "PromptLookup"]


@dataclass(frozen=True)
class Draft:
    """Proposed next tokens and, for a sampling drafter, the distribution q [V] each was drawn from.

    ``probs`` None: the drafter is deterministic (q is one-hot at the token), as prompt lookup and a greedy
    draft head are.
    """

    tokens: tuple[int, ...] = ()
    probs: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        if self.probs is not None and len(self.probs) != len(self.tokens):
            raise ValueError(f"{len(self.probs)} draft distributions for {len(self.tokens)} draft tokens")

    def first(self, k: int) -> Draft:
        """The first ``k`` proposed tokens (a drafter may propose more than the step has room for)."""
        if len(self.tokens) <= k:
            return self
        return Draft(self.tokens[:k], None if self.probs is None else self.probs[:k])


class Drafter(Protocol):
    """Anything that proposes up to ``k`` tokens to follow ``history`` (prompt + tokens generated so far)."""

    name: str

    def propose(self, history: Sequence[int], k: int) -> Draft: ...


class PromptLookup:
    """Drafts copied from the history: find the longest suffix n-gram (``max_ngram`` down to ``min_ngram``
    tokens) that occurred before, and propose the tokens that followed its most recent earlier occurrence."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"prompt lookup n-gram sizes must satisfy 1 ≤ min ({min_ngram}) ≤ max ({max_ngram})",
                            where="speculative ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: Sequence[int], k: int) -> Draft:
        tokens = np.asarray(history, dtype=np.int64)
        if k < 1 or tokens.size < 2:
            return Draft()
        for n in range(min(self.max_ngram, tokens.size - 1), self.min_ngram - 1, -1):
            start = _latest_earlier_match(tokens, n)
            if start is not None:
                follow = tokens[start + n: start + n + k]
                return Draft(tuple(int(t) for t in follow))
        return Draft()


def _latest_earlier_match(tokens: np.ndarray, n: int) -> int | None:
    """Start of the latest occurrence of the last ``n`` tokens that has at least one token after it, excluding
    the suffix itself. The latest, not the first (as transformers takes): in a loop or a quoted passage the
    nearest occurrence is the one whose continuation the text is following."""
    suffix = tokens[-n:]
    # windows start at 0 .. len-1-n, so every match is followed by at least one token, and the suffix is not one
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    return int(hits[-1]) if hits.size else None
