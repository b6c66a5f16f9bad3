"""Batched decode: rows that joined at different times advance together, one forward pass over [B, 1] a step.

A ``DecodeBatch`` holds the active rows in one cache (``CacheBuffers`` with one row each), left-padded and
right-aligned to a common end: row i's entries fill the last ``span_i`` columns and the attention mask is 1
there, 0 on its left padding. The graphs take that mask and position ids counted from it
(``engine.positions_from_mask``), and mask padded keys with a finite minimum before the softmax, so a padded
column weighs exactly 0 and a row decodes as it would alone (up to fp32 summation order).

A new row is prefilled on its own (``decode.generate_step`` on a one-row cache, possibly holding a prompt-cache
prefix), its first token sampled there; it joins the batch at the next step. With ``prefill_chunk`` C, a
newcomer is prefilled C tokens at a time (``begin`` → ``Admission.advance``, one chunk a call), so that the
caller can run decode steps of the active rows between its chunks (vLLM's chunked prefill): a long prompt no
longer pauses every other stream for its whole prefill. Each chunk extends the row's own cache, as a
prompt-cache prefix does, so the output is the same either way. Whenever the rows change (one
joins, one leaves) the batch cache is rebuilt for exactly the active rows: every row copied right-aligned at
the new common end, which is the longest active row's span. Why rebuild rather than keep N fixed slots:
each forward then runs only active rows (no dead rows masked out and paid for in every step, no fully masked
rows), a prompt longer than the batch simply widens the others' padding, and padding columns no longer
needed vanish (the batch never creeps towards the context limit while rows come and go). The copy moves the
cache once per join or leave — about one step's cache reads, next to the weights every step reads.

Each row keeps its own sampler and token budget; the caller reads each step's events, decides per row when
to stop (EOS, stop strings: ``generation.TokenText``) and releases it. A row whose budget is spent never has
its last token forwarded: it leaves at the next step. numpy only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.decode import (
    DecodeState,
    TokenEvent,
    TokenSampler,
    generate_step,
    greedy_sampler,
    prefill,
    token_logprobs,
)

__all__ = ["Admission", "BatchRow", "DecodeBatch"]


@dataclass(eq=False)
class BatchRow:
    """One sequence of a DecodeBatch: prompt + sampled tokens, its sampler and budget."""

    history: list[int]  # prompt and every sampled token (the sampler sees it: repetition penalty)
    prompt_tokens: int
    sampler: TokenSampler
    max_new_tokens: int
    cache: CacheBuffers | None = None  # its own one-row cache until it joins the batch
    span: int = 0  # cache positions it holds (prompt + forwarded tokens)
    released: bool = field(default=False)

    @property
    def produced(self) -> int:
        return len(self.history) - self.prompt_tokens

    @property
    def remaining(self) -> int:
        """Tokens it may still sample."""
        return self.max_new_tokens - self.produced


class Admission:
    """A newcomer being prefilled chunk by chunk (``DecodeBatch.begin``): ``advance`` runs the next chunk and
    returns None, or — the last chunk — samples the first token and returns ``(row, event)`` as ``admit``
    does; ``cancel`` drops it (the client left mid-prefill)."""

    def __init__(self, batch: DecodeBatch, ids: list[int], max_new_tokens: int, sampler: TokenSampler,
                 cache: CacheBuffers, chunk: int):
        self.batch, self.ids, self.max_new_tokens, self.sampler = batch, ids, max_new_tokens, sampler
        self.cache, self.chunk = cache, chunk
        self.chunks = 0  # chunks run so far (the last one included)
        self.done = False

    def advance(self) -> tuple[BatchRow, TokenEvent] | None:
        if self.done:
            raise ValueError("the admission has ended")
        self.chunks += 1
        end = self.cache.length + self.chunk
        if self.chunk and end < len(self.ids):  # not the last chunk: only extend the row's cache
            prefill(self.batch.engine, [self.ids[:end]], cache=self.cache, last_only=True)
            return None
        self.done = True
        self.batch._admitting.remove(self)
        # One step of the one decode loop: its prefill (only what ``cache`` lacks) and first token; the
        # generator is closed before it forwards anything more.
        steps = generate_step(self.batch.engine, self.ids, sampler=self.sampler, cache=self.cache, max_new_tokens=1)
        try:
            event = next(steps)
        finally:
            steps.close()
        row = BatchRow([*self.ids, event.token_id], len(self.ids), self.sampler, self.max_new_tokens, self.cache,
                       self.cache.length)
        self.batch._joining.append(row)
        return row, event

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.batch._admitting.remove(self)


class DecodeBatch:
    """Up to ``max_rows`` rows decoding together over ``engine`` (anything with ``new_cache`` and ``forward``).

    ``prefill_chunk``: prefill newcomers this many tokens at a time (``begin``); 0 or None: whole prompts."""

    def __init__(self, engine, max_rows: int, prefill_chunk: int | None = None):
        if max_rows < 1:
            raise ValueError("a batch holds at least one row")
        if prefill_chunk is not None and prefill_chunk < 0:
            raise UserError(f"the prefill chunk must be ≥ 0 tokens (0: whole prompts), got {prefill_chunk}",
                            where="--prefill-chunk")
        self.engine, self.max_rows, self.prefill_chunk = engine, max_rows, prefill_chunk or 0
        self.rows: list[BatchRow] = []  # in batch order, once joined
        self._joining: list[BatchRow] = []
        self._admitting: list[Admission] = []  # newcomers still prefilling
        self._state: DecodeState | None = None
        self.rebuilds = 0  # how often the batch cache was rebuilt (rows joined or left)

    def __len__(self) -> int:
        """Rows admitted (or being prefilled) and not released."""
        return len(self._live()) + len(self._admitting)

    @property
    def length(self) -> int:
        """Columns of the batch cache (the longest active row's span)."""
        return self._state.length if self._state is not None else 0

    def admit(self, prompt_ids: Sequence[int], *, max_new_tokens: int, sampler: TokenSampler | None = None,
              cache: CacheBuffers | None = None) -> tuple[BatchRow, TokenEvent]:
        """Prefill ``prompt_ids`` on its own (all its chunks at once) and sample its first token (step 0); the
        row joins the batch at the next ``step``. ``cache``: an empty or prefix-holding one-row cache
        (``decode.prefill``)."""
        admission = self.begin(prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, cache=cache)
        while (joined := admission.advance()) is None:
            pass
        return joined

    def begin(self, prompt_ids: Sequence[int], *, max_new_tokens: int, sampler: TokenSampler | None = None,
              cache: CacheBuffers | None = None) -> Admission:
        """Start admitting ``prompt_ids``: each ``advance`` of the Admission prefills ``prefill_chunk`` more
        tokens; the last one samples the first token (see ``admit``). It holds a row of the batch meanwhile."""
        if len(self) >= self.max_rows:
            raise UserError(f"the batch holds {self.max_rows} rows already", where="batch",
                            hint="release a row before admitting another")
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be ≥ 1", where="batch")
        ids = [int(t) for t in prompt_ids]
        if cache is None:
            cache = self.engine.new_cache(batch=1, max_len=len(ids))
        admission = Admission(self, ids, max_new_tokens, sampler or greedy_sampler(), cache, self.prefill_chunk)
        self._admitting.append(admission)
        return admission

    def release(self, row: BatchRow) -> None:
        """The row is done (finished, stopped or cancelled): it leaves at the next step; the last one to go
        drops the batch cache at once (an idle batch holds no memory)."""
        row.released = True
        if not self._live():
            self.rows, self._joining, self._state = [], [], None

    def row_cache(self, row: BatchRow) -> CacheBuffers:
        """A one-row copy of what ``row`` holds (prompt + forwarded tokens), e.g. for a prompt cache; asked
        before the step after the row ended (that step drops it)."""
        if row.cache is not None:
            return row.cache
        if row not in self.rows:
            raise ValueError("the row has left the batch: ask for its cache before the next step")
        index = self.rows.index(row)
        past = self._state.cache.filled()
        copy = self.engine.new_cache(batch=1, max_len=max(1, row.span))
        copy.append({_present(name): _row_window(view, self._batch_axis, index, row.span, self._state.cache.axis)
                     for name, view in past.items()}, row.span)
        return copy

    def step(self) -> list[tuple[BatchRow, TokenEvent]]:
        """One forward pass over every active row's last token, then each row samples its next one.
        Rows released (or out of budget) since the last step leave first; admitted rows join first."""
        started = time.perf_counter()
        self._regroup()
        if not self.rows:
            return []
        tokens = np.asarray([row.history[-1] for row in self.rows], np.int64)[:, None]
        last = self._state.forward(tokens)[:, -1]
        for row in self.rows:
            row.span += 1
        sampled = [row.sampler(last[i], row.history) for i, row in enumerate(self.rows)]
        logprobs = token_logprobs(last, sampled)
        step_s = time.perf_counter() - started
        events = []
        for row, token, logprob in zip(self.rows, sampled, logprobs, strict=True):
            row.history.append(token)
            events.append((row, TokenEvent(row.produced - 1, (token,), (logprob,), step_s)))
        return events

    # --- the batch cache --------------------------------------------------------------------------
    def _live(self) -> list[BatchRow]:
        return [row for row in [*self.rows, *self._joining] if not row.released]

    def _regroup(self) -> None:
        """Rebuild the batch cache when rows join or leave (a spent row leaves: its last token is never run)."""
        staying = [row for row in self.rows if not row.released and row.remaining > 0]
        joining = [row for row in self._joining if not row.released and row.remaining > 0]
        self._joining = []
        if len(staying) == len(self.rows) and not joining:
            return
        self.rebuilds += 1
        self._rebuild(staying, joining)

    def _rebuild(self, staying: list[BatchRow], joining: list[BatchRow]) -> None:
        rows = [*staying, *joining]
        if not rows:
            self.rows, self._state = [], None
            return
        width = max(row.span for row in rows)
        # Room for the longest-lived row; every step adds one column to all rows.
        # (A row's span + remaining ≤ its prompt + budget - 1 ≤ the context - 1, so the cap never bites
        # a row that is still decoding.)
        max_len = min(width + max(row.remaining for row in rows), self.engine.max_context)
        cache = self.engine.new_cache(batch=len(rows), max_len=max_len)
        old = self._state.cache.filled() if staying else {}
        sources = [(old, self.rows.index(row)) for row in staying] + [(row.cache.filled(), 0) for row in joining]
        presents = {}
        for name, empty in cache.past().items():  # zero columns yet: names, shapes and dtypes
            shape = list(empty.shape)
            shape[cache.axis] = width
            merged = np.zeros(shape, empty.dtype)  # padding: finite, and masked to weigh exactly 0
            for target, (row, (past, index)) in enumerate(zip(rows, sources, strict=True)):
                window = _aligned(self._batch_axis, cache.axis, target, width - row.span, width)
                merged[window] = _row_window(past[name], self._batch_axis, index, row.span, cache.axis)
            presents[_present(name)] = merged
        cache.append(presents, width)
        mask = np.zeros((len(rows), width), np.int64)
        for target, row in enumerate(rows):
            mask[target, width - row.span:] = 1
        for row in joining:
            row.cache = None  # its entries live in the batch now
        self.rows, self._state = rows, DecodeState(self.engine, cache, mask)

    @property
    def _batch_axis(self) -> int:
        return list(self.engine.cache_layout["shape"]).index("B")


def _present(past_name: str) -> str:
    return "present." + past_name.removeprefix("past.")


def _aligned(batch_axis: int, seq_axis: int, row: int, start: int, stop: int) -> tuple:
    window: list = [slice(None)] * (max(batch_axis, seq_axis) + 1)
    window[batch_axis], window[seq_axis] = slice(row, row + 1), slice(start, stop)
    return tuple(window)


def _row_window(view: np.ndarray, batch_axis: int, row: int, span: int, seq_axis: int) -> np.ndarray:
    """Row ``row``'s last ``span`` columns of a filled cache view (rows are right-aligned)."""
    length = view.shape[seq_axis]
    return view[_aligned(batch_axis, seq_axis, row, length - span, length)]
