"""Speculative decoding: draft k tokens, verify them in one forward of the main model, keep the accepted prefix.

One verify step (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"): the pending token (sampled,
not yet in the cache) and the k drafted tokens are run through ``DecodeState.forward`` at once, giving k + 1
logits rows. Row i is the model's distribution p_i for the token after draft i - 1. Draft i is accepted with
probability min(1, p_i(d) / q_i(d)); at the first rejection the replacement is drawn from norm(max(0, p_i - q_i)),
and when every draft is accepted one more token comes from row k for free. The cache is rolled back
(``DecodeState.truncate``) to the pending token plus the accepted drafts. This keeps the output distribution
exactly that of ordinary sampling; p_i is the sampler's own processed distribution (repetition penalty over
the history including the accepted drafts, temperature, top-k, top-p — ``Sampler.distribution``). Greedy
accepts a draft iff it is the argmax, so its output is token for token the non-speculative greedy output, as far as
a (k + 1)-token forward gives each row the logits a 1-token step gives it. onnxruntime's kernels are not
batch-invariant: the rows differ by ~3-5e-6 (demo model, fp32/int8/int4). MoE routing is a discrete top-k, so a
near-tie can flip. On the int8/int4 demo bundles, 2-3 of 8 prompts part at top-2 margins of 0.0003-0.011, 32-93
tokens in; fp32 stayed identical (benchmarks/README.md, session 15).

``configure(engine, mode, draft_tokens)`` switches it on for an engine: ``generate_step`` (and so every
caller — run, chat, serve, profile, validation of one prompt) then decodes through ``Speculation.steps``.

``auto`` (run's and chat's default) is prompt lookup where it cannot change the output and rarely costs:
only while decoding greedily (a sampled run keeps its seed's exact token stream), drafts only from a repeated
2-gram, and after a step whose drafts were all rejected drafting pauses for 1, 2, 4 … 16 steps (reset by an
accepted draft) — a verify over k + 1 tokens costs more than one step (ds3bench int4: 1.71× for 3 tokens), so
text that does not repeat itself runs as if speculation were off.

numpy only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from dsedge.contract import FINAL_HIDDEN
from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.decode import TokenEvent, prefill, token_logprobs
from dsedge.runtime.drafts import Draft, Drafter, MTPDrafter, PromptLookup

__all__ = ["MODES", "Speculation", "SpeculationStats", "accept_draft", "configure"]

MODES = ("off", "auto", "ngram", "mtp")
DEFAULT_DRAFT_TOKENS = {"auto": 3, "ngram": 3, "mtp": 1}
MAX_PAUSE = 16  # auto: the longest run of steps without drafting after rejected drafts


@dataclass
class SpeculationStats:
    """Counts over the verify steps since the last ``reset``."""

    forwards: int = 0  # main-model decode forwards (verify steps, also those with nothing drafted)
    tokens: int = 0  # tokens those forwards produced
    drafted: list[int] = field(default_factory=list)  # per draft position: steps that drafted a token there
    accepted: list[int] = field(default_factory=list)  # per draft position: steps that accepted it

    def record(self, drafted: int, accepted: int) -> None:
        self.forwards += 1
        self.tokens += accepted + 1
        grow = max(0, drafted - len(self.drafted))
        self.drafted += [0] * grow
        self.accepted += [0] * grow
        for position in range(drafted):
            self.drafted[position] += 1
            self.accepted[position] += position < accepted

    def reset(self) -> None:
        self.forwards, self.tokens, self.drafted, self.accepted = 0, 0, [], []

    @property
    def acceptance_by_position(self) -> list[float]:
        """Share of drafted tokens accepted at each draft position (1st, 2nd, …)."""
        return [a / d for a, d in zip(self.accepted, self.drafted, strict=True)]

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def to_json(self) -> dict:
        return {"verify_steps": self.forwards, "tokens": self.tokens, "tokens_per_verify_step": self.tokens_per_forward,
                "drafted_by_position": list(self.drafted), "accepted_by_position": list(self.accepted),
                "acceptance_by_position": self.acceptance_by_position,
                "acceptance": sum(self.accepted) / sum(self.drafted) if sum(self.drafted) else 0.0}


class Speculation:
    """Speculative decoding of one prompt with ``drafter`` proposing up to ``draft_tokens`` tokens a step."""

    def __init__(self, drafter: Drafter, draft_tokens: int, *, greedy_only: bool = False, backoff: bool = False,
                 name: str | None = None):
        if draft_tokens < 1:
            raise UserError(f"--draft-tokens must be ≥ 1, got {draft_tokens}", where="--draft-tokens")
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.greedy_only, self.backoff, self.name = greedy_only, backoff, name or drafter.name
        self.stats = SpeculationStats()

    @property
    def mode(self) -> str:
        return self.name

    def applies(self, sampler) -> bool:
        """Whether a generation with ``sampler`` decodes speculatively (auto: greedy only)."""
        return not self.greedy_only or bool(getattr(sampler, "greedy", False))

    def steps(self, engine, prompt: Sequence[int], sampler, *, cache: CacheBuffers | None,
              max_new_tokens: int) -> Iterator[TokenEvent]:
        """``generate_step``'s events for one prompt (one per token, numbered on), decoded speculatively."""
        if not hasattr(sampler, "distribution"):
            raise UserError("speculative decoding needs a dsedge Sampler (it accepts drafts against the sampler's "
                            "distribution), not a plain function", where="sampler",
                            hint="pass dsedge.runtime.sampling.Sampler(params), or switch speculation off")
        drafter = self.drafter.fresh() if hasattr(self.drafter, "fresh") else self.drafter  # per-generation state
        wants_hidden = getattr(drafter, "needs_hidden", False)
        started = time.perf_counter()
        outputs = {} if wants_hidden else None
        # last position's logits only (a 970-token prompt's full logits are 0.6 GB at a 152k vocabulary); the
        # MTP drafter reads final_hidden, which the graphs return at every new position anyway
        state, logits = prefill(engine, [list(prompt)], cache=cache, room=max_new_tokens, outputs=outputs,
                                last_only=True)
        prefilled = time.perf_counter()
        history = list(prompt)
        last = logits[:, -1]
        first = sampler(last[0], history)
        history.append(first)
        if wants_hidden:
            drafter.begin(history, outputs, state.length - outputs[FINAL_HIDDEN].shape[1])
        now = time.perf_counter()
        yield TokenEvent(0, (first,), token_logprobs(last, [first]), now - started, prefilled - started,
                         now - started)
        produced, paused, pause = 1, 0, 1
        while produced < max_new_tokens:
            step_started = time.perf_counter()
            # a step yields up to k + 1 tokens; the last kept one is never forwarded, so k ≤ remaining - 1
            room = min(self.draft_tokens, max_new_tokens - produced - 1, state.cache.room - 1)
            if paused:
                room, paused = 0, paused - 1
            draft = drafter.propose(history, room).first(room) if room > 0 else Draft()
            cached = state.length
            outputs = {} if wants_hidden else None
            rows = state.forward(np.asarray([[history[-1], *draft.tokens]], np.int64), outputs=outputs)[0]
            kept = accept_draft(draft, rows, sampler, history)
            state.truncate(cached + len(kept))  # the pending token and the accepted drafts stay cached
            if wants_hidden:
                drafter.advance(kept, outputs, cached)
            self.stats.record(len(draft.tokens), len(kept) - 1)
            if self.backoff and draft.tokens:  # rejected drafts: wait longer each time; an accepted one resets
                paused, pause = (pause, min(2 * pause, MAX_PAUSE)) if len(kept) == 1 else (0, 1)
            share = (time.perf_counter() - step_started) / len(kept)
            for position, token in enumerate(kept):
                history.append(token)
                yield TokenEvent(produced, (token,), token_logprobs(rows[position:position + 1], [token]), share)
                produced += 1


def accept_draft(draft: Draft, rows: np.ndarray, sampler, history: Sequence[int]) -> list[int]:
    """The tokens one verify step keeps: the accepted prefix of ``draft`` plus one token from the model.

    ``rows`` [len(draft) + 1, V]: the main model's logits after the pending token and after each draft token.
    ``history``: prompt + generated tokens up to and including the pending one (for the repetition penalty).
    """
    kept: list[int] = []
    for position, token in enumerate(draft.tokens):
        seen = [*history, *kept]
        if sampler.greedy:  # exact: a draft stands iff it is what greedy decoding picks here
            choice = sampler(rows[position], seen)
            if choice != token:
                return [*kept, choice]
            kept.append(token)
            continue
        target = sampler.distribution(rows[position], seen)
        proposal = _one_hot(token, target.size) if draft.probs is None else np.asarray(draft.probs[position],
                                                                                         np.float64)
        if proposal[token] > 0 and sampler.uniform() < min(1.0, target[token] / proposal[token]):
            kept.append(token)
            continue
        return [*kept, sampler.draw(_residual(target, proposal))]
    kept.append(sampler(rows[len(draft.tokens)], [*history, *kept]))
    return kept


def _residual(target: np.ndarray, proposal: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): what p still owes once q's proposals were accepted at rate min(1, p/q)."""
    residual = np.maximum(target - proposal, 0.0)
    total = residual.sum()
    return residual / total if total > 0 else target  # p == q never rejects; rounding may: then p itself


def _one_hot(token: int, size: int) -> np.ndarray:
    probs = np.zeros(size)
    probs[token] = 1.0
    return probs


def configure(engine, mode: str = "off", draft_tokens: int | None = None) -> Speculation | None:
    """Switch ``engine``'s decoding to ``mode`` ("off", "ngram", "mtp") with up to ``draft_tokens`` drafts a step
    (default: 3 for ngram, 1 for mtp); returns the Speculation set (None for off)."""
    if mode not in MODES:
        raise UserError(f"unknown speculative mode {mode!r}", where="--speculative",
                        hint=f"choose one of {', '.join(MODES)}")
    if mode == "off":
        engine.speculation = None
        return None
    tokens = DEFAULT_DRAFT_TOKENS[mode] if draft_tokens is None else draft_tokens
    if mode == "auto":
        engine.speculation = Speculation(PromptLookup(min_ngram=2), tokens, greedy_only=True, backoff=True,
                                         name="auto")
    else:
        engine.speculation = Speculation(_drafter(engine, mode), tokens)
    return engine.speculation


def _drafter(engine, mode: str) -> Drafter:
    return PromptLookup() if mode == "ngram" else MTPDrafter(engine)
