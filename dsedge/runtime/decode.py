"""The one prefill/decode loop (the shape of mlx-lm's ``generate_step`` and gpt-fast's decode loop).

``generate_step`` prefills the prompt rows (left-padded when there are several; only the part a given cache
does not hold yet), then yields one ``TokenEvent`` per step: each row's sampled token, its log-probability
under the model and the step's time. It knows nothing of text, EOS or stop strings: callers decide when to
stop by no longer asking for tokens (a generator only computes the step it is asked for, so stopping costs
no extra forward pass). Text streaming (``generation.TextStream``), validation's greedy checks, profile's
trials and the engine's ``greedy`` conveniences all run this loop.

``DecodeState`` is the step itself: rows, their cache and attention mask. ``forward`` takes any number of
new tokens per row and returns one logits row per token, and ``truncate`` rolls cache and mask back — what
a speculative-decoding verify step needs (forward the last token plus k drafted ones, keep the accepted
prefix, truncate the rest) without a second loop.

Speculative decoding (``dsedge.runtime.speculative``) is this loop's other step: when the engine carries a
``speculation`` (set by ``speculative.configure``) and there is one prompt, ``generate_step`` hands the
request to it; its events are the same, one per token. Without one (or for a batch) nothing changes.

numpy only; the engine is anything with ``new_cache(batch, max_len)`` and ``forward(ids, mask, cache, last_only=)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.sampling import Sampler, SamplingParams

# A sampler picks a token from one row's logits [V] given that row's history (prompt + generated so far).
TokenSampler = Callable[[np.ndarray, Sequence[int]], int]

__all__ = ["DecodeState", "TokenEvent", "TokenSampler", "generate_step", "left_padded", "prefill", "token_logprobs"]


def left_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, T] padded on the left, and the attention mask (1 = token)."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
    return ids, mask


@dataclass(frozen=True)
class TokenEvent:
    """One decode step: a token per row."""

    step: int  # 0: the token sampled from the prefill's logits
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log p(token) under the model's own distribution (before sampling filters)
    step_s: float  # this step's forward pass (step 0: the prefill) plus sampling
    prefill_s: float | None = None  # step 0 only: the prefill forward pass alone
    ttft_s: float | None = None  # step 0 only: from the first request to the first token

    @property
    def token_id(self) -> int:
        """The token of a single-row decode."""
        if len(self.token_ids) != 1:
            raise ValueError(f"token_id of a {len(self.token_ids)}-row step: use token_ids")
        return self.token_ids[0]


class DecodeState:
    """Rows being decoded: their cache and the attention mask over it (1 = a real token, 0 = left padding)."""

    def __init__(self, engine, cache: CacheBuffers, mask: np.ndarray):
        if mask.shape != (cache.batch, cache.length):
            raise ValueError(f"mask {mask.shape} does not cover the cache ({cache.batch} rows, {cache.length})")
        self.engine, self.cache, self.mask = engine, cache, mask.astype(np.int64)

    @property
    def length(self) -> int:
        return self.cache.length

    def forward(self, ids: np.ndarray, new_mask: np.ndarray | None = None, *, last_only: bool = False,
                outputs: dict | None = None) -> np.ndarray:
        """Run ``ids`` [B, T] after what is cached (``new_mask``: their mask, default all tokens); logits [B, T, V]
        (``last_only``: [B, 1, V], the last position's only). ``outputs``: a dict to receive every graph output
        (``Engine.forward``), e.g. the MTP draft's input."""
        ids = np.asarray(ids, dtype=np.int64)
        new_mask = np.ones(ids.shape, np.int64) if new_mask is None else new_mask
        mask = np.concatenate([self.mask, new_mask.astype(np.int64)], axis=1)
        options = {"last_only": True} if last_only else {}  # only what is asked: engines are duck-typed
        if outputs is not None:
            options["outputs"] = outputs
        logits = self.engine.forward(ids, mask, self.cache, **options)
        self.mask = mask  # only once the cache holds the new entries
        return logits

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (e.g. drop rejected draft tokens)."""
        self.cache.truncate(length)
        self.mask = self.mask[:, :length]


def prefill(engine, rows: list[list[int]], *, cache: CacheBuffers | None = None, room: int = 0,
            last_only: bool = False, outputs: dict | None = None) -> tuple[DecodeState, np.ndarray]:
    """Prefill ``rows`` (left-padded to one width W) and return the state and the logits of the new columns.

    ``cache``: one that already holds the first ``cache.length`` columns of the padded prompt (a prompt cache;
    the caller knows what it holds). Only the rest is run; at least the last column is always run, since its
    logits give the first token, so a cache holding the whole prompt (or more) is truncated to W - 1.
    ``room``: the tokens to be generated after it; a new cache is allocated for W + ``room`` positions.
    ``last_only``: return (and compute) only the last column's logits [B, 1, V] — all a decode loop needs.
    ``outputs``: see ``DecodeState.forward``.
    """
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    if cache is None:
        cache = engine.new_cache(batch=len(rows), max_len=width + room)
    elif cache.batch != len(rows):
        raise UserError(f"the cache holds {cache.batch} rows, the prompt has {len(rows)}", where="kv cache",
                        hint="pass a cache made for as many rows as prompts")
    reused = min(cache.length, width - 1)
    cache.truncate(reused)
    cache.check_room(width - reused + max(0, room - 1))  # the last new token is never forwarded
    state = DecodeState(engine, cache, mask[:, :reused])
    return state, state.forward(ids[:, reused:], mask[:, reused:], last_only=last_only, outputs=outputs)


def generate_step(engine, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *,
                  sampler: TokenSampler | Sequence[TokenSampler] | None = None, cache: CacheBuffers | None = None,
                  max_new_tokens: int) -> Iterator[TokenEvent]:
    """Yield up to ``max_new_tokens`` TokenEvents: prefill, then one token per row per step through the cache.

    ``prompt_ids``: one prompt (a list of ids) or several (a list of lists, left-padded into one batch).
    ``sampler``: one for all rows or one per row (default greedy); each sees its row's unpadded history.
    ``cache``: see ``prefill``; it must have room for the prompt's uncached part + ``max_new_tokens`` - 1.
    The last token is never forwarded: no step is computed that nobody asked for.
    """
    rows = _rows(prompt_ids)
    samplers = _samplers(sampler, len(rows))
    if max_new_tokens < 0:
        raise UserError("max_new_tokens must be ≥ 0", where="generate")
    if max_new_tokens == 0:
        return
    speculation = getattr(engine, "speculation", None)
    # a batch's rows would accept drafts of different lengths; auto speculates on greedy decoding only
    if speculation is not None and len(rows) == 1 and speculation.applies(samplers[0]):
        yield from speculation.steps(engine, rows[0], samplers[0], cache=cache, max_new_tokens=max_new_tokens)
        return
    started = time.perf_counter()
    state, logits = prefill(engine, rows, cache=cache, room=max_new_tokens, last_only=True)
    prefilled = time.perf_counter()
    histories, tokens = [list(r) for r in rows], []
    for step in range(max_new_tokens):
        step_started = time.perf_counter()
        if step:  # forward the previous step's tokens only now that the caller asked for the next ones
            logits = state.forward(np.asarray(tokens, np.int64)[:, None])
        last = logits[:, -1]
        tokens = [samplers[r](last[r], histories[r]) for r in range(len(rows))]
        for history, token in zip(histories, tokens, strict=True):
            history.append(token)
        now = time.perf_counter()
        if step == 0:
            yield TokenEvent(0, tuple(tokens), token_logprobs(last, tokens), now - started, prefilled - started,
                             now - started)
        else:
            yield TokenEvent(step, tuple(tokens), token_logprobs(last, tokens), now - step_started)


def greedy_sampler() -> Sampler:
    return Sampler(SamplingParams())


def _rows(prompt_ids) -> list[list[int]]:
    if len(prompt_ids) and not np.isscalar(prompt_ids[0]):
        rows = [[int(t) for t in row] for row in prompt_ids]
    else:
        rows = [[int(t) for t in prompt_ids]]
    if not rows or any(not r for r in rows):
        raise UserError("empty prompt", where="prompt", hint="pass some text or at least one token id")
    return rows


def _samplers(sampler, batch: int) -> list[TokenSampler]:
    if sampler is None:
        return [greedy_sampler()] * batch
    if callable(sampler):
        return [sampler] * batch
    samplers = list(sampler)
    if len(samplers) != batch:
        raise UserError(f"{len(samplers)} samplers for {batch} prompts", where="generate",
                        hint="pass one sampler, or one per prompt")
    return samplers


def token_logprobs(last: np.ndarray, tokens: list[int]) -> tuple[float, ...]:
    """log softmax at the chosen tokens: one pass over each row. The exponentials in float32 and their sum
    accumulated in float64 (within ~1e-7 of an all-float64 pass, which took several times as long: a float64
    copy of every row, tens of µs a token at a 32k vocabulary)."""
    scores = np.asarray(last, np.float32)
    top = scores.max(-1, keepdims=True)
    log_norm = top[:, 0].astype(np.float64) + np.log(np.exp(scores - top).sum(-1, dtype=np.float64))
    return tuple(float(scores[r, t] - log_norm[r]) for r, t in enumerate(tokens))
