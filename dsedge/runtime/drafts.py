"""Draft proposers for speculative decoding (``dsedge.runtime.speculative``).

A drafter guesses the next few tokens cheaply; the main model then checks all of them in one forward pass.
``PromptLookup`` works for every model, dense distills included: it copies the tokens that followed the
latest earlier occurrence of the text's last n-gram (transformers' ``prompt_lookup_num_tokens``, vLLM's
``ngram`` speculator) — cheap and often right where answers quote their context (RAG sources, code edits,
summaries) or the model repeats itself. ``MTPDrafter`` runs the bundle's draft graph (DeepSeek-V3's
multi-token-prediction module, ``dsedge.export.mtp``): it reads the main model's final hidden state, so the
speculative loop hands it the verify step's outputs (``needs_hidden``), and it keeps its own one-layer cache.

numpy only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from dsedge.contract import ATTENTION_MASK, DRAFT, DRAFT_HIDDEN, FINAL_HIDDEN, INPUT_IDS, LOGITS, POSITION_IDS
from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers

__all__ = ["Draft", "Drafter", "MTPDrafter", "PromptLookup"]


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


class MTPDrafter:
    """Drafts with the bundle's MTP graph: at position i it reads token t_{i+1} and the main model's final hidden
    state h_i and predicts t_{i+2}; for k > 1 it feeds its own output hidden state back (recursive drafting,
    as vLLM and SGLang run one MTP module several times). Drafts are its argmax (a deterministic drafter).

    ``fresh()`` gives one generation its own state (the module's cache and the positions not yet run through it):
    ``begin`` after the prefill, ``advance`` after every verify step, ``propose`` before the next.
    """

    name = "mtp"
    needs_hidden = True

    def __init__(self, engine):
        graphs = engine.graph(DRAFT)
        # the main model's last graph (monolithic decoder, or the partitioned head) returns the hidden state
        main_outputs = {t.name for role in ("decoder", "head") for g in engine.graph(role) for t in g.outputs}
        if not graphs or FINAL_HIDDEN not in main_outputs:
            raise UserError("this bundle has no MTP draft graph", where="--speculative mtp",
                            hint="use --speculative ngram, or export a checkpoint that stores an MTP layer "
                                 "(num_nextn_predict_layers ≥ 1: DeepSeek-V3/R1)")
        # Not spinning: the draft runs between two main-model forwards, so pool threads left spinning after one
        # session's run take the cores the next one needs. With both spinning (a monolithic bundle's default)
        # the demo model's MTP decoding ran 0.44x plain decoding, with the draft's pool not spinning 0.59x
        # (median of 8 alternated rounds; one thread 0.62x, not taken: a real MTP layer reads a whole MoE
        # layer and the head, which wants every core).
        self.engine = engine
        self.session = engine.session(graphs[0], config=replace(engine.session_config, spin=False))
        self.cache: CacheBuffers | None = None
        self._ids: list[int] = []
        self._hidden: list[np.ndarray] = []
        self._start = 0  # position of the first pending input

    def fresh(self) -> MTPDrafter:
        twin = copy.copy(self)  # shares the engine and the session
        twin.cache, twin._ids, twin._hidden, twin._start = None, [], [], 0
        return twin

    def begin(self, history: Sequence[int], outputs: dict, first_position: int) -> None:
        """After the prefill: ``history`` = prompt + first token; ``outputs`` the prefill's, whose rows start at
        ``first_position`` (a reused prompt cache leaves the module without the rows before it)."""
        hidden = outputs[FINAL_HIDDEN][0]
        self.cache = CacheBuffers(self.engine.cache_layout, 1, 1, self.engine.max_context)
        self._ids = [int(t) for t in history[first_position + 1: first_position + 1 + hidden.shape[0]]]
        self._hidden, self._start = [hidden], first_position

    def advance(self, kept: Sequence[int], outputs: dict, first_position: int) -> None:
        """After a verify step forwarded tokens from ``first_position`` on and kept ``kept``: the rows of the
        positions that stay (the pending token and the accepted drafts) pair with the tokens after them."""
        if not self._ids:
            self._start = first_position
        self._ids += [int(t) for t in kept]
        self._hidden.append(outputs[FINAL_HIDDEN][0, :len(kept)])

    def propose(self, history: Sequence[int], k: int) -> Draft:
        if k < 1 or not self._ids:
            return Draft()
        committed = self.cache.length + len(self._ids)
        ids, hidden, start = np.asarray([self._ids], np.int64), np.concatenate(self._hidden)[None], self._start
        self._ids, self._hidden = [], []
        drafts = []
        for _ in range(k):
            result = self._run(ids, hidden, start)
            token = int(np.argmax(result[LOGITS][0, -1]))
            drafts.append(token)
            start += ids.shape[1]
            ids, hidden = np.asarray([[token]], np.int64), result[DRAFT_HIDDEN][:, -1:]
        self.cache.truncate(committed)  # the recursive steps ran on drafts: keep only the verified positions
        return Draft(tuple(drafts))

    def _run(self, ids: np.ndarray, hidden: np.ndarray, start: int) -> dict[str, np.ndarray]:
        new = ids.shape[1]
        self.cache.check_room(new)
        feeds = {INPUT_IDS: ids, FINAL_HIDDEN: hidden, POSITION_IDS: np.arange(start, start + new)[None],
                 ATTENTION_MASK: np.ones((1, self.cache.length + new), np.int64), **self.cache.past()}
        result = self.session.run_with(feeds)
        self.cache.append(result, new)
        return result
