"""Text generation over an engine: encode, run the decode loop (``dsedge.runtime.decode``), stream text, stop."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsedge.errors import UserError
from dsedge.runtime.decode import generate_step
from dsedge.runtime.sampling import Sampler, SamplingParams

__all__ = ["EncodingRule", "GenerationResult", "SamplingParams", "StreamEvent", "TextCodec", "TextStream", "TokenText",
           "encoding_rule"]


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


@dataclass(frozen=True)
class EncodingRule:
    """Which special tokens encoding plain text adds around it, as the model's own tokenizer does.

    Resolved once, at export, from the checkpoint's tokenizer files (:func:`encoding_rule`) and recorded in
    the manifest (``tokenizer.encoding``), so the runtime gives the ids ``transformers`` gives for the same
    text (``tokenizer(text).input_ids``)."""

    prepend: tuple[int, ...]
    append: tuple[int, ...]
    source: str  # which file and setting decided it

    def to_json(self) -> dict:
        return {"prepend": list(self.prepend), "append": list(self.append), "source": self.source}

    @classmethod
    def from_json(cls, data: dict) -> EncodingRule:
        try:
            return cls(tuple(int(i) for i in data["prepend"]), tuple(int(i) for i in data["append"]),
                       str(data.get("source", "manifest")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"manifest tokenizer.encoding is malformed ({exc})", where="manifest.json",
                            hint="re-export the bundle") from exc


def encoding_rule(tokenizer_dir: str | Path, tokenizer=None) -> EncodingRule:
    """The special tokens transformers' fast tokenizer adds to plain text, from a tokenizer directory.

    transformers 5 (``TokenizersBackend``) rebuilds the post-processor from ``add_bos_token``/``add_eos_token``
    (both default false) when ``tokenizer_config.json`` sets either, or when ``tokenizer.json`` has no
    post-processor; otherwise ``tokenizer.json``'s own post-processor decides. ``legacy`` concerns the slow
    SentencePiece tokenizer's spacing after special tokens, which a ``tokenizer.json`` already encodes.
    """
    from tokenizers import Tokenizer  # the runtime's one tokenizer library, loaded only with a tokenizer

    root = Path(tokenizer_dir)
    tokenizer = tokenizer or Tokenizer.from_file(str(root / "tokenizer.json"))
    config = _json_object(root / "tokenizer_config.json")
    if "add_bos_token" in config or "add_eos_token" in config or tokenizer.post_processor is None:
        specials = config | {k: v for k, v in _json_object(root / "special_tokens_map.json").items() if k not in config}
        bos = _special_id(tokenizer, specials.get("bos_token")) if config.get("add_bos_token") else None
        eos = _special_id(tokenizer, specials.get("eos_token")) if config.get("add_eos_token") else None
        return EncodingRule(() if bos is None else (bos,), () if eos is None else (eos,),
                            "tokenizer_config.json add_bos_token/add_eos_token")
    return encoding_rule_of(tokenizer)


def encoding_rule_of(tokenizer) -> EncodingRule:
    """The rule ``tokenizer.json``'s own post-processor applies (what ``add_special_tokens=True`` adds)."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return EncodingRule(tuple(full[:start]), tuple(full[start + len(plain):]), "tokenizer.json post-processor")


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path.name} ({exc})", where=str(path),
                        hint="copy the model's tokenizer files again") from exc
    return data if isinstance(data, dict) else {}


def _special_id(tokenizer, token) -> int | None:
    """The id of a special token given as text or as an AddedToken object; None when absent (transformers
    then drops the flag too)."""
    text = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(text) if isinstance(text, str) else None


class TextCodec:
    """The bundle's tokenizer (``tokenizers`` only), its BOS/EOS ids and its encoding rule.

    ``rule`` None: the tokenizer's own post-processor."""

    def __init__(self, tokenizer, bos_id: int | None, eos_ids: set[int], rule: EncodingRule | None = None):
        self.tokenizer, self.bos_id, self.eos_ids = tokenizer, bos_id, eos_ids
        self.rule = rule

    def encode(self, text: str) -> list[int]:
        """The ids transformers gives for ``text`` (``tokenizer(text).input_ids``), with one deliberate
        difference: text that already opens with the prefix (a rendered chat prompt starts with the BOS
        text) does not get it twice — transformers would give a double BOS, which models are not trained on."""
        rule = self.rule or encoding_rule_of(self.tokenizer)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        prepend = [] if rule.prepend and tuple(ids[:len(rule.prepend)]) == rule.prepend else list(rule.prepend)
        return [*prepend, *ids, *rule.append]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Text over ``decode.generate_step``: detokenize, hold back partial UTF-8, stop at EOS or a stop string.

    Iterate it for StreamEvents; ``text`` is the text released so far (the events' pieces joined) and
    ``result`` (a GenerationResult) is set when iteration ends (also when the consumer stops early: then with
    what was generated up to there).
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
    ``done`` says whether the stream has ended; ``text`` is the text released so far (text that may begin a stop
    string is held back until it can no longer match; all of it once ``done``); ``result`` builds the
    GenerationResult (also mid-way: what was generated up to there). Push-driven, so one decode loop
    (``TextStream``) and the rows of a batched decode (the server's, over ``runtime.batch``) share it.
    """

    def __init__(self, codec: TextCodec | None, stop: list[str] | None, max_new_tokens: int):
        self.codec, self.stop, self.max_new_tokens = codec, stop, max_new_tokens
        self.eos = codec.eos_ids if codec else set()
        self.tokens: list[int] = []  # the generated ids (an EOS that ended the stream is not one of them)
        self.text = ""  # the text released so far (cut at a stop string; the whole text once done)
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
            self._decoded += tail  # a held-back partial character, completed by the EOS that ended it
            piece = self._release(final=True)
            return StreamEvent(token, piece) if piece else None
        self.tokens.append(token)
        final = event.step == self.max_new_tokens - 1
        _, self._decoded = _new_text(codec, self.tokens, self._decoded, final=final)
        self.done = final
        return StreamEvent(token, self._release(final=final))

    def _release(self, *, final: bool) -> str:
        """The text that can go out now, and ``text`` advanced past it. A stop string ends the stream before
        it (none of it is ever released); without one, a tail that may still grow into a stop string is held
        back (as vLLM does) until it diverges, or the stream ends."""
        hit = _stop_hit(self._decoded, self.stop)
        if hit is not None:
            end = max(hit, len(self.text))  # never below what went out (held-back text cannot hold a stop)
            self.finish_reason, self.done = "stop", True
        else:
            end = len(self._decoded) - (0 if final else _stop_prefix_tail(self._decoded, self.stop))
        piece = self._decoded[len(self.text):end]
        self.text = self._decoded[:end]
        return piece

    def result(self, prompt_tokens: int) -> GenerationResult:
        total = time.perf_counter() - self._started
        decode_s = total - self.timings.get("ttft_s", total)  # the tokens after the first
        out = self.tokens
        text = self.text if self.done else self._decoded  # stopped early: also what was held back
        timings = {**self.timings, "total_s": total,
                   "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 else 0.0}
        return GenerationResult(text, list(out), self.finish_reason, prompt_tokens, timings)


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


def _stop_prefix_tail(text: str, stop: list[str] | None) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string (0: none): text
    that may still become a stop string once more tokens arrive."""
    longest = 0
    for s in stop or ():
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[len(text) - k:]):
                longest = k
                break
    return longest


def _stop_hit(text: str, stop: list[str] | None) -> int | None:
    """Index where the earliest stop string starts, if one occurs."""
    hits = [text.find(s) for s in stop or () if s and s in text]
    return min(hits) if hits else None
