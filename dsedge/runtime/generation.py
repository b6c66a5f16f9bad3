"""Text generation over an engine: encode, prefill, sample token by token through the cache, stream, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from dsedge.errors import UserError
from dsedge.runtime.sampling import Sampler, SamplingParams

__all__ = ["GenerationResult", "SamplingParams", "StreamEvent", "TextCodec", "stream_tokens"]


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


def stream_tokens(engine, codec: TextCodec | None, prompt: str | list[int], *, max_new_tokens: int,
                  sampling: SamplingParams, stop: list[str] | None, result: GenerationResult) -> Iterator[StreamEvent]:
    """Yield tokens as they are produced; ``result`` is filled in as generation goes (finish reason last)."""
    ids = _prompt_ids(codec, prompt)
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be ≥ 1", where="generate")
    cache = engine.new_cache(max_len=len(ids) + max_new_tokens)
    sampler, eos = Sampler(sampling), codec.eos_ids if codec else set()
    started = time.perf_counter()
    mask = np.ones((1, len(ids)), np.int64)
    logits = engine.forward(np.asarray([ids]), mask, cache)
    result.prompt_tokens, result.timings["prefill_s"] = len(ids), time.perf_counter() - started
    out, text = result.token_ids, ""
    for step in range(max_new_tokens):
        token = sampler(logits[0, -1], ids + out)
        if step == 0:
            result.timings["ttft_s"] = time.perf_counter() - started
        last = step == max_new_tokens - 1
        if token in eos:
            result.finish_reason = "eos"
            tail = codec.decode(out)[len(text):] if codec else ""
            if tail:  # a held-back partial character: flush it with the EOS token that ended it
                result.text = text + tail
                yield StreamEvent(token, tail)
            break
        out.append(token)
        piece, text = _new_text(codec, out, text, final=last)
        hit = _stop_hit(text, stop)
        if hit is not None:
            result.text, result.finish_reason = text[:hit], "stop"
            yield StreamEvent(token, piece[: max(0, hit - (len(text) - len(piece)))])
            break
        result.text = text
        yield StreamEvent(token, piece)
        if last:
            result.finish_reason = "length"
            break
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        logits = engine.forward(np.asarray([[token]]), mask, cache)
    total = time.perf_counter() - started
    decode_s = total - result.timings.get("ttft_s", total)  # the tokens after the first
    result.timings.update(total_s=total, decode_tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 else 0.0)


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
