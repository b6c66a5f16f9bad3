"""The server's one door into the engine: every call into dsedge.runtime goes through this module.

The scheduler asks for a ``Generation`` (prompt prepared, retrieval done) and advances it one step at a time;
each step yields the pieces of text that step released. Re-pointing the server at another decode loop means
changing this file only.

Batched decode (``--parallel`` N > 1): a Generation also carries a ``BatchedRow``, the same request as a row
of the scheduler's ``runtime.batch.DecodeBatch`` (``new_batch``): prefilled on its own, then decoded with the
other active rows in one forward pass a step, its tokens pushed through the same per-token text logic as
``steps`` runs (``generation.TokenText``, ``chat.ChatText``), so either way a client gets the same text.

Prompt cache: every generation runs on a cache that starts with the longest whole-block prefix of its prompt
held by the backend's ``PrefixCache`` (filled at the generation's first step, so a request admitted together
with another one sharing its system prompt finds the blocks the other's prefill stored just before); its
prompt's blocks are stored right after its prefill, and prompt + reply when it completes (the next turn of a
conversation starts with both).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dsedge.errors import UserError
from dsedge.rag import open_retriever, rag_prompt, with_sources
from dsedge.runtime import load_bundle
from dsedge.runtime.batch import DecodeBatch
from dsedge.runtime.chat import ChatStream, ChatText, model_sampling, prepare_prompt
from dsedge.runtime.decode import TokenEvent
from dsedge.runtime.generation import TextStream
from dsedge.runtime.prefix_cache import DEFAULT_CAPACITY_BYTES, PrefixCache, PrefixCacheStats
from dsedge.runtime.sampling import Sampler
from dsedge.runtime.speculative import SpeculationStats
from dsedge.runtime.speculative import configure as configure_speculation
from dsedge.serve.wire import FINISH_REASONS, Defaults, Sampling, WireError

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256  # tokens of a newcomer's prompt prefilled between two decode steps of the others


@dataclass(frozen=True)
class Piece:
    kind: str  # "reasoning" | "answer" (chat) or "text" (completions)
    text: str


@dataclass
class Outcome:
    finish_reason: str  # OpenAI's: "stop" | "length"
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache (not prefilled)
    speculation: SpeculationStats | None = None  # this generation's verify steps (speculative decoding on)


@dataclass
class Generation:
    """One request's generation. Iterating ``steps`` runs one decode step per item (the first one also runs
    the prefill) and yields the pieces it released; ``outcome`` is set when it is exhausted."""

    steps: Iterator[list[Piece]]
    prompt_tokens: int
    sources: list[dict] | None = None  # the numbered sources the model was given (retrieval only)
    outcome: Outcome | None = None
    row: BatchedRow | None = None  # the same generation as a row of a batch (None: steps only)
    speculation: SpeculationStats | None = None  # its own share of the engine's speculative counters

    def close(self) -> None:
        """Stop early (client gone): the generator's cache is dropped with it, a batch row leaves its batch."""
        self.steps.close()
        if self.row is not None:
            self.row.cancel()


class BatchedRow:
    """A generation decoded as one row of a ``DecodeBatch``: ``join`` prefills it alone, a chunk a call, and
    returns the pieces of its first token; ``token`` takes each later step's event; once ``done``, ``finish``
    returns the last held-back pieces and the outcome (and hands the row back to the batch)."""

    def __init__(self, backend: Backend, stream: TextStream, chat: ChatStream | None = None):
        self.backend, self.stream, self.chat = backend, stream, chat
        self.text = stream.token_text()
        self.reply = ChatText(chat.prompt.thinking) if chat is not None else None
        self.batch: DecodeBatch | None = None
        self.row = None  # its runtime.batch.BatchRow once joined
        self.admission = None  # its runtime.batch.Admission while it is prefilled chunk by chunk
        self.reused = 0

    @property
    def done(self) -> bool:
        return self.text.done

    def join(self, batch: DecodeBatch) -> list[Piece] | None:
        """One chunk of its prefill (from the prompt cache's longest prefix; ``batch.prefill_chunk`` tokens a
        call, all of it when chunking is off): None while chunks remain, else the pieces of the first token it
        sampled. The row then steps with the batch."""
        ids, cache = self.stream.prompt_ids, self.stream.cache
        if self.admission is None:
            self.reused = self.backend._reuse(ids, cache)
            self.admission = batch.begin(ids, max_new_tokens=self.stream.max_new_tokens,
                                         sampler=Sampler(self.stream.sampling), cache=cache)
        joined = self.admission.advance()
        if joined is None:
            return None
        self.row, event = joined
        self.batch = batch
        if cache is not None:  # a prompt cache is on: the prompt's blocks, right after its prefill
            self.backend._remember(ids, self.row.cache)
        return self.token(event)

    def token(self, event: TokenEvent) -> list[Piece]:
        released = self.text.push(event)
        if released is None:
            return []
        if self.reply is None:
            return [Piece("text", released.text)] if released.text else []
        return [Piece(p.kind, p.text) for p in self.reply.feed(self.text.text, released.token_id)]

    def finish(self) -> tuple[list[Piece], Outcome]:
        generated = self.text.result(len(self.stream.prompt_ids))
        pieces = []
        if self.chat is not None:
            pieces = [Piece(p.kind, p.text) for p in self.reply.finish(generated.text)]
            self.chat.complete(generated)
        if self.stream.cache is not None:  # prompt + reply, for the conversation's next turn
            self.backend._remember([*self.stream.prompt_ids, *generated.token_ids], self.batch.row_cache(self.row))
        self.cancel()
        return pieces, _outcome(generated, self.reused)

    def cancel(self) -> None:
        """Leave the batch (finished, or the client is gone; also mid-prefill)."""
        if self.admission is not None:
            self.admission.cancel()
        if self.batch is not None:
            self.batch.release(self.row)
            self.batch = None


class Backend:
    """A loaded bundle (and optionally its retriever) behind the calls the server makes.

    ``prompt_cache_bytes``: the prompt cache's bound (0: no prompt cache)."""

    def __init__(self, engine, model_id: str, *, retriever=None, prompt_cache_bytes: int = DEFAULT_CAPACITY_BYTES):
        self.engine, self.model_id, self.retriever = engine, model_id, retriever
        self.prompt_cache = (PrefixCache(engine.new_cache, capacity_bytes=prompt_cache_bytes)
                             if prompt_cache_bytes else None)

    @classmethod
    def open(cls, bundle: str | Path, *, index: str | Path | None = None, rag: bool = False,
             target: str | None = None, prompt_cache_bytes: int = DEFAULT_CAPACITY_BYTES, speculative: str = "off",
             draft_tokens: int | None = None, verify: bool = False) -> Backend:
        """Load ``bundle``; ``verify``: hash every file now (``load_bundle(verify="full")``), so a changed file
        fails the start rather than a request."""
        engine = load_bundle(bundle, target=target, verify="full" if verify else True)
        configure_speculation(engine, speculative, draft_tokens)  # each generation is one row: it applies to all
        if engine.codec is None:
            raise UserError("this bundle has no tokenizer, so it cannot serve text", where=str(bundle),
                            hint="re-export from a checkpoint directory that holds tokenizer.json")
        retriever = open_retriever(engine, index) if index is not None or rag else None
        if rag and retriever is None:
            raise UserError("this bundle has no embedded index", where=str(bundle),
                            hint="pass --index INDEX, or re-export with `dsedge export ... --index INDEX`")
        return cls(engine, Path(bundle).resolve().name, retriever=retriever, prompt_cache_bytes=prompt_cache_bytes)

    # --- what the bundle is -----------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.engine.max_context

    @property
    def embedder_id(self) -> str | None:
        return self.retriever.index.embedder.id if self.retriever else None

    def defaults(self) -> Defaults:
        """Sampling defaults from the bundle's generation_config (R1 ships temperature 0.6, top_p 0.95; the
        demo models repetition_penalty 1.1), as `dsedge run` applies them (``chat.model_sampling``)."""
        info = (self.engine.manifest.data.get("tokenizer") or {}).get("generation_defaults") or {}
        model = model_sampling(self.engine)
        return Defaults(float(model.get("temperature", info.get("temperature", 1.0))),
                        float(model.get("top_p", info.get("top_p", 1.0))), int(model.get("top_k", 0)),
                        float(model.get("repetition_penalty", 1.0)))

    def expert_cache(self) -> tuple[int, int] | None:
        """(hits, misses) of a partitioned bundle's expert cache; None for a monolithic one."""
        experts = getattr(self.engine, "experts", None)
        return (experts.stats.hits, experts.stats.misses) if experts is not None else None

    def prompt_cache_stats(self) -> PrefixCacheStats | None:
        """Lookups, hits, reused tokens and bytes held of the prompt cache; None without one."""
        return self.prompt_cache.stats if self.prompt_cache is not None else None

    # --- generations ----------------------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling) -> Generation:
        """Raw-text continuation (no chat template)."""
        ids = self.engine.codec.encode(prompt)
        max_new = self._room(len(ids), sampling.max_tokens, param="prompt")
        cache = self._new_cache(ids, max_new)
        events = self.engine.stream(ids, max_new, **_engine_sampling(sampling), cache=cache)

        def steps():
            reused = self._reuse(ids, cache)
            held = ids  # the tokens whose blocks are worth keeping once this generation ends
            try:
                for step, event in enumerate(self._counted(events, generation)):
                    if step == 0:
                        self._remember(ids, cache)
                    yield [Piece("text", event.text)] if event.text else []
                held = [*ids, *events.result.token_ids]
                generation.outcome = _outcome(events.result, reused, generation.speculation)
            finally:
                self._remember(held, cache)

        generation = Generation(steps(), len(ids), row=BatchedRow(self, events), speculation=self._own_stats())
        return generation

    def chat(self, messages: list[dict], sampling: Sampling, retrieval_k: int | None = None) -> Generation:
        """A reply through the bundle's chat template, reasoning split from answer; with ``retrieval_k``
        the last user message is answered from that many retrieved chunks (numbered sources)."""
        try:
            if retrieval_k is not None:
                replies, sources = self._grounded(messages, sampling, retrieval_k)
            else:
                prompt = prepare_prompt(self.engine, messages)
                max_new = self._room(len(prompt.token_ids), sampling.max_tokens)
                replies = ChatStream(self.engine, prompt, max_new, _engine_sampling(sampling),
                                     cache=self._new_cache(prompt.token_ids, max_new))
                sources = None
        except UserError as exc:  # a template that refuses the messages, no room for sources: the client's
            raise WireError(400, exc.what, param="messages") from exc
        ids, cache = replies.prompt.token_ids, replies.cache

        def steps():
            reused = self._reuse(ids, cache)
            held, prefilled = ids, False
            try:
                for piece in self._counted(replies, generation):
                    if not prefilled:  # the first piece comes after the prefill (and maybe more steps)
                        self._remember(ids, cache)
                        prefilled = True
                    yield [Piece(piece.kind, piece.text)]
                held = [*ids, *replies.result.token_ids]
                generation.outcome = _outcome(replies.result, reused, generation.speculation)
            finally:
                self._remember(held, cache)

        generation = Generation(steps(), len(ids), sources, row=BatchedRow(self, replies.text_stream(), replies),
                                speculation=self._own_stats())
        return generation

    def _grounded(self, messages: list[dict], sampling: Sampling, k: int):
        if self.retriever is None:
            raise WireError(400, "retrieval was asked for, but this server has no index (start it with --index "
                                 "INDEX or --rag)", param="retrieval")
        *history, question = messages
        if question["role"] != "user":
            raise WireError(400, "with retrieval the last message must be the user's question", param="messages")
        max_new = sampling.max_tokens or DEFAULT_RAG_TOKENS
        rag = rag_prompt(self.engine, self.retriever, question["content"], history=history, k=k,
                         max_new_tokens=max_new)
        prompt = prepare_prompt(self.engine, [*history, *rag.messages])
        max_new = self._room(len(prompt.token_ids), max_new)
        replies = ChatStream(self.engine, prompt, max_new, _engine_sampling(sampling),
                             finish=lambda result: with_sources(result, rag),
                             cache=self._new_cache(prompt.token_ids, max_new))
        return replies, [s.to_json() for s in rag.sources]

    def new_batch(self, rows: int, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> DecodeBatch:
        """The batch that up to ``rows`` generations' ``BatchedRow``s decode in together; newcomers are
        prefilled ``prefill_chunk`` tokens at a time between the active rows' decode steps (0: whole)."""
        return DecodeBatch(self.engine, rows, prefill_chunk=prefill_chunk)

    # --- speculative counters, per generation -----------------------------------------------------------
    def _own_stats(self) -> SpeculationStats | None:
        return SpeculationStats() if getattr(self.engine, "speculation", None) is not None else None

    def _counted(self, items, generation: Generation):
        """``items`` (a generation's events or pieces), each pull's share of the engine's speculative counters
        added to ``generation.speculation``. The engine's counters run over every generation it served; the
        worker runs one generation's code at a time, so what changes during a pull belongs to that one."""
        speculation = getattr(self.engine, "speculation", None)
        if generation.speculation is None or speculation is None:
            yield from items
            return
        pulled = iter(items)
        while True:
            before = _counters(speculation.stats)
            try:
                item = next(pulled)
            except StopIteration:
                return
            finally:
                _add_since(generation.speculation, speculation.stats, before)
            yield item

    # --- the prompt cache -------------------------------------------------------------------------
    def _new_cache(self, ids: list[int], max_new: int):
        """An empty cache for this generation (filled from the prompt cache at its first step), or None."""
        if self.prompt_cache is None:
            return None
        return self.engine.new_cache(batch=1, max_len=len(ids) + max_new)

    def _reuse(self, ids: list[int], cache) -> int:
        return self.prompt_cache.fill(cache, ids) if cache is not None else 0

    def _remember(self, tokens: list[int], cache) -> None:
        if cache is not None:
            self.prompt_cache.insert(tokens, cache)

    def _room(self, prompt_tokens: int, max_tokens: int | None, param: str = "messages") -> int:
        """New tokens allowed: what was asked, capped at the room left (finish "length" there); a prompt that
        leaves no room is the client's error."""
        room = self.engine.max_context - prompt_tokens
        if room < 1:
            raise WireError(400, f"the prompt is {prompt_tokens} tokens; this model's context is "
                                 f"{self.engine.max_context} tokens", param=param,
                            code="context_length_exceeded")
        return min(room, max_tokens) if max_tokens else room

    # --- embeddings -----------------------------------------------------------------------------
    def embed(self, texts: list[str]):
        """[N, dim] unit vectors from the index's embedder, and the word pieces they held."""
        embedder = self.retriever.index.embedder
        return embedder.embed(texts), sum(embedder.count_tokens(t) for t in texts)


DEFAULT_RAG_TOKENS = 256  # as `dsedge run --index`: the answer's room decides how many sources fit


def _engine_sampling(sampling: Sampling) -> dict:
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed,
            "stop": list(sampling.stop) or None}


def _outcome(result, cached_tokens: int = 0, speculation: SpeculationStats | None = None) -> Outcome:
    return Outcome(FINISH_REASONS[result.finish_reason], len(result.token_ids), cached_tokens, speculation)


def _counters(stats: SpeculationStats) -> tuple[int, int, list[int], list[int]]:
    return stats.forwards, stats.tokens, list(stats.drafted), list(stats.accepted)


def _add_since(own: SpeculationStats, engine_stats: SpeculationStats, before: tuple) -> None:
    """Add to ``own`` what ``engine_stats`` gained since ``before`` (``_counters``); a reset in between (another
    caller's ``stats.reset()``) counts from zero."""
    forwards, tokens, drafted, accepted = before
    if engine_stats.forwards < forwards:
        forwards, tokens, drafted, accepted = 0, 0, [], []
    own.forwards += engine_stats.forwards - forwards
    own.tokens += engine_stats.tokens - tokens
    pairs = ((own.drafted, engine_stats.drafted, drafted), (own.accepted, engine_stats.accepted, accepted))
    for mine, now, then in pairs:
        mine += [0] * max(0, len(now) - len(mine))
        for position, count in enumerate(now):
            mine[position] += count - (then[position] if position < len(then) else 0)
