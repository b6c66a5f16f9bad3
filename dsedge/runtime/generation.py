"""Text generation over an engine: encode, run the decode loop (``dsedge.runtime.decode``), stream text, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dsedge.errors import UserError
from dsedge.runtime.decode import generate_step
from dsedge.runtime.sampling import Sampler, SamplingParams

__all__ = ["GenerationResult", "SamplingParams", "StreamEvent", "TextCodec", "TextStream", "TokenText"]


@dataclass(frozen=True)
class StreamEvent:
    token_id: int
    text: str  # the new text this token completes (may be "" inside a multi-byte character)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class TextCodec:
    """The bundle's tokenizer (``tokenizers`` only) plus its BOS/EOS ids."""

    def __init__(self, tokenizer, bos_id: int | None, eos_ids: set[int]):
        self.tokenizer, self.bos_id, self.eos_ids = tokenizer, bos_id, eos_ids

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Text over ``decode.generate_step``: detokenize, hold back partial UTF-8, stop at EOS or a stop string.

    Iterate it for StreamEvents; ``text`` is the text so far and ``result`` (a GenerationResult) is set when
    iteration ends (also when the consumer stops early: then with what was generated up to there).
    """

    def __init__(self, engine, codec: TextCodec | None, prompt: str | list[int], *, max_new_tokens: int,
                 sampling: SamplingParams, stop: list[str] | None = None, cache=None):
        self.prompt_ids = _prompt_ids(codec, prompt)
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be ≥ 1", where="generate")
        self.engine, self.codec, self.sampling, self.stop, self.cache = engine, codec, sampling, stop, cache
        self.max_new_tokens = max_new_tokens
        self.text = ""
        self.result: GenerationResult | None = None

    def run(self) -> GenerationResult:
        """Iterate to the end; the result."""
        for _ in self:
            pass
        return self.result

    def token_text(self) -> TokenText:
        """Fresh per-token text state for this stream (its codec, stop strings and token budget): what
        ``__iter__`` feeds one decode step at a time, and what a batched decode feeds a row's tokens to."""
        return TokenText(self.codec, self.stop, self.max_new_tokens)

    def __iter__(self) -> Iterator[StreamEvent]:
        text = self.token_text()
        steps = generate_step(self.engine, self.prompt_ids, sampler=Sampler(self.sampling), cache=self.cache,
                              max_new_tokens=self.max_new_tokens)
        try:
            for event in steps:
                released = text.push(event)
                self.text = text.text
                if released is not None:
                    yield released
                if text.done:
                    break
        finally:
            steps.close()
            self.result = text.result(len(self.prompt_ids))


class TokenText:
    """The per-token text logic of one stream: token ids in (one ``TokenEvent`` per decode step), text out.

    Detokenizes, holds back partial UTF-8, stops at EOS, a stop string or ``max_new_tokens``. ``push`` takes
    a step's event and returns the StreamEvent it releases (None at an EOS that releases no held-back text);
    ``done`` says whether the stream has ended; ``text`` is the text so far; ``result`` builds the
    GenerationResult (also mid-way: what was generated up to there). Push-driven, so one decode loop
    (``TextStream``) and the rows of a batched decode (the server's, over ``runtime.batch``) share it.
    """

    def __init__(self, codec: TextCodec | None, stop: list[str] | None, max_new_tokens: int):
        self.codec, self.stop, self.max_new_tokens = codec, stop, max_new_tokens
        self.eos = codec.eos_ids if codec else set()
        self.tokens: list[int] = []  # the generated ids (an EOS that ended the stream is not one of them)
        self.text = ""  # the text so far (cut at a stop string)
        self.finish_reason = "length"
        self.done = False
        self.timings: dict[str, float] = {}
        self._decoded = ""  # the text decoded so far, a partial character held back
        self._started = time.perf_counter()

    def push(self, event) -> StreamEvent | None:
        """One decode step's token (``event``: a one-row ``decode.TokenEvent``)."""
        if self.done:
            raise ValueError("push after the stream ended")
        token, codec = event.token_id, self.codec
        if event.step == 0:
            self._started = time.perf_counter() - event.ttft_s
            self.timings.update(prefill_s=event.prefill_s, ttft_s=event.ttft_s)
        if token in self.eos:
            self.finish_reason, self.done = "eos", True
            tail = codec.decode(self.tokens)[len(self._decoded):] if codec else ""
            if tail:  # a held-back partial character: flush it with the EOS token that ended it
                self.text = self._decoded + tail
                return StreamEvent(token, tail)
            return None
        self.tokens.append(token)
        final = event.step == self.max_new_tokens - 1
        piece, self._decoded = _new_text(codec, self.tokens, self._decoded, final=final)
        hit = _stop_hit(self._decoded, self.stop)
        if hit is not None:
            self.text, self.finish_reason, self.done = self._decoded[:hit], "stop", True
            return StreamEvent(token, piece[: max(0, hit - (len(self._decoded) - len(piece)))])
        self.text, self.done = self._decoded, final
        return StreamEvent(token, piece)

    def result(self, prompt_tokens: int) -> GenerationResult:
        total = time.perf_counter() - self._started
        decode_s = total - self.timings.get("ttft_s", total)  # the tokens after the first
        out = self.tokens
        timings = {**self.timings, "total_s": total,
                   "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 else 0.0}
        return GenerationResult(self.text, list(out), self.finish_reason, prompt_tokens, timings)


def _new_text(codec: TextCodec | None, out: list[int], text: str, *, final: bool) -> tuple[str, str]:
    """(new piece, text so far). A character whose bytes span tokens decodes to U+FFFD until its last byte
    arrives: hold it back so that streamed pieces always add up to the final text."""
    if codec is None:
        return "", text
    decoded = codec.decode(out)
    if decoded.endswith("\ufffd") and not final:
        decoded = decoded[:len(decoded.rstrip("\ufffd"))]
    if not decoded.startswith(text):  # a replacement inside earlier text resolved: keep what was streamed
        return "", text
    return decoded[len(text):], decoded


def _prompt_ids(codec: TextCodec | None, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if codec is None:
            raise UserError("this bundle has no tokenizer, so the prompt must be token ids", where="prompt")
        ids = codec.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise UserError("empty prompt", where="prompt", hint="pass some text or at least one token id")
    return ids


def _stop_hit(text: str, stop: list[str] | None) -> int | None:
    """Index where the earliest stop string starts, if one occurs."""
    hits = [text.find(s) for s in stop or () if s and s in text]
    return min(hits) if hits else None
