"""Text generation over an engine: encode, run the decode loop (``dsedge.runtime.decode``), stream text, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dsedge.errors import UserError
from dsedge.runtime.decode import generate_step
from dsedge.runtime.sampling import Sampler, SamplingParams

__all__ = ["GenerationResult", "SamplingParams", "StreamEvent", "TextCodec", "TextStream"]


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

    def __iter__(self) -> Iterator[StreamEvent]:
        codec, eos = self.codec, self.codec.eos_ids if self.codec else set()
        out, text, finish, timings, started = [], "", "length", {}, time.perf_counter()
        steps = generate_step(self.engine, self.prompt_ids, sampler=Sampler(self.sampling), cache=self.cache,
                              max_new_tokens=self.max_new_tokens)
        try:
            for event in steps:
                token = event.token_id
                if event.step == 0:
                    started = time.perf_counter() - event.ttft_s
                    timings.update(prefill_s=event.prefill_s, ttft_s=event.ttft_s)
                if token in eos:
                    finish = "eos"
                    tail = codec.decode(out)[len(text):] if codec else ""
                    if tail:  # a held-back partial character: flush it with the EOS token that ended it
                        self.text = text + tail
                        yield StreamEvent(token, tail)
                    break
                out.append(token)
                piece, text = _new_text(codec, out, text, final=event.step == self.max_new_tokens - 1)
                hit = _stop_hit(text, self.stop)
                if hit is not None:
                    self.text, finish = text[:hit], "stop"
                    yield StreamEvent(token, piece[: max(0, hit - (len(text) - len(piece)))])
                    break
                self.text = text
                yield StreamEvent(token, piece)
        finally:
            steps.close()
            total = time.perf_counter() - started
            decode_s = total - timings.get("ttft_s", total)  # the tokens after the first
            timings.update(total_s=total, decode_tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 else 0.0)
            self.result = GenerationResult(self.text, out, finish, len(self.prompt_ids), timings)


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
