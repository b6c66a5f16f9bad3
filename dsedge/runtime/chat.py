"""Chat over a bundle: its chat template rendered as transformers renders it, and R1 reasoning split off.

The template comes from the bundle's tokenizer files (``chat_template.jinja``, else ``tokenizer_config.json``),
else the manifest, else the built-in template of the model's family (``dsedge.chat_templates``). It is
rendered by jinja2 in the environment of transformers' ``apply_chat_template`` (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``, the tokenizer's special tokens as
variables), so the prompt is byte-identical to what transformers would build.

R1-style models answer ``<think>reasoning</think>answer``; R1's updated templates end the generation prompt
with ``<think>\\n`` so the output starts inside the think block. Output is split into ``reasoning`` and
``answer`` as it streams; history handed back to the model keeps only the answers, as R1's template does.

Imports: standard library, jinja2 and the tokenizer via the engine — never torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dsedge import chat_templates, safe_json
from dsedge.chat_templates import bounded_render, sandboxed_environment
from dsedge.errors import UserError
from dsedge.runtime.generation import GenerationResult
from dsedge.runtime.prefix_cache import ConversationCache
from dsedge.verified import read_regular

__all__ = ["ChatPiece", "ChatResult", "ChatSession", "ChatStream", "ChatText", "ChatTemplate", "ReasoningSplitter",
           "chat", "load_chat_template", "prepare_prompt", "sources_prompt", "split_reasoning"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLES = ("system", "user", "assistant", "tool")
# transformers passes these named special tokens (as strings) to every template.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers copies a message's reasoning under every name templates read it by.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAX_JSON_DEPTH = 64  # tokenizer_config.json nests a few levels (added_tokens_decoder entries)
MAX_TOKENIZER_CONFIG_BYTES = 64 << 20
MAX_TEMPLATE_BYTES = 1 << 20  # published chat templates are a few KiB
_TOKENIZER_HINT = "fix or replace the tokenizer file (it must be the JSON transformers writes)"


# --- templates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template, where it came from, and the special tokens it is rendered with."""

    source: str
    origin: str  # e.g. "tokenizer/tokenizer_config.json" or "built-in deepseek-r1"
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def strips_reasoning(self) -> bool:
        """Whether this is an R1-family template (it drops ``…</think>`` from assistant turns)."""
        return THINK_CLOSE in self.source

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text, as ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` returns it."""
        import jinja2

        messages = _normalized(messages)
        try:
            return bounded_render(_compiled(self.source), dict(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **variables}), where=f"chat template ({self.origin})")
        except jinja2.TemplateError as exc:
            raise UserError(f"the chat template failed: {exc}", where=f"chat template ({self.origin})",
                            hint="check the messages' roles and order, or pick a template with --template") from exc
        except (TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as exc:
            # the template's own code failed (`'a' + 1`, a recursive macro): the template's fault, not ours
            raise UserError(f"the chat template failed: {type(exc).__name__}: {exc}",
                            where=f"chat template ({self.origin})",
                            hint="fix the template, or pick another with --template") from None

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path, origin_prefix: str = "") -> ChatTemplate | None:
        """The template of a tokenizer directory (``chat_template.jinja`` wins, as in transformers), or None.
        For a plain directory (a checkpoint's); a bundle's files are read through its manifest instead."""
        path = Path(path)

        def present(name: str) -> Path | None:
            return path / name if (path / name).exists() else None

        return _template_from(present, origin_prefix)

    @classmethod
    def builtin(cls, family: str, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """A published template by family name (``dsedge.chat_templates.FAMILIES``)."""
        if family not in chat_templates.FAMILIES:
            raise UserError(f"unknown chat template {family!r}", where="template",
                            hint=f"use one of {', '.join(chat_templates.FAMILIES)} or a .jinja file")
        return cls(chat_templates.FAMILIES[family], f"built-in {family}", dict(special_tokens or {}))


def load_chat_template(engine, template: str | Path | ChatTemplate | None = None) -> ChatTemplate:
    """The chat template for ``engine``'s bundle, or the one ``template`` names (family name or .jinja file).

    Without a template of its own the bundle gets its family's by ``model_type`` (DeepSeek-V2 → V2's,
    DeepSeek-V3/R1 → V3's, Qwen2/Llama R1-Distills → the distills'); name ``deepseek-r1`` for R1 then.
    """
    if isinstance(template, ChatTemplate):
        return template
    manifest = engine.manifest
    found = _bundle_template(manifest)
    tokens = found.special_tokens if found else _tokens_from_ids(engine)
    if template is not None:
        text = str(template)
        if text in chat_templates.FAMILIES:
            return ChatTemplate.builtin(text, tokens)
        file = Path(text)
        if not file.exists():  # a FIFO or a directory exists: _read_template names what it is
            raise UserError(f"no chat template {text!r}", where="template",
                            hint=f"name one of {', '.join(chat_templates.FAMILIES)} or an existing .jinja file")
        return ChatTemplate(_read_template(file), str(file), tokens)
    if found:
        return found
    family = chat_templates.family_for_model_type(manifest.data.get("model", {}).get("model_type"))
    if family is None:
        raise UserError("this bundle has no chat template and its model type has no built-in one",
                        where=str(manifest.root), hint="pass a template: a family name or a .jinja file")
    return ChatTemplate.builtin(family, tokens)


def _bundle_template(manifest) -> ChatTemplate | None:
    """The bundle's own template, from listed tokenizer files only, each through the verified door: an unlisted
    (or linked) ``chat_template.jinja`` never becomes the prompt."""
    def listed(name: str) -> Path | None:
        rel = f"tokenizer/{name}"
        return manifest.path(rel, what="tokenizer file") if rel in manifest.files else None

    found = _template_from(listed, "tokenizer/")
    if found:
        return found
    source = _default_template((manifest.data.get("tokenizer") or {}).get("chat_template"), "manifest.json tokenizer")
    return ChatTemplate(source, "manifest.json tokenizer.chat_template") if source else None


def _template_from(file, origin_prefix: str) -> ChatTemplate | None:
    """``chat_template.jinja`` (wins, as in transformers), else tokenizer_config.json's ``chat_template``, with
    the special tokens of tokenizer_config.json / special_tokens_map.json; ``file(name)`` gives each file's path
    (or None when it is absent)."""
    config = _read_json(file("tokenizer_config.json"))
    tokens = _special_tokens(config, _read_json(file("special_tokens_map.json")))
    jinja_file = file("chat_template.jinja")
    if jinja_file is not None:
        return ChatTemplate(_read_template(jinja_file), origin_prefix + jinja_file.name, tokens)
    source = _default_template(config.get("chat_template"), origin_prefix + "tokenizer_config.json")
    return ChatTemplate(source, origin_prefix + "tokenizer_config.json", tokens) if source else None


def _tokens_from_ids(engine) -> dict[str, str]:
    # No tokenizer_config.json: name bos/eos after the manifest's ids, as the tokenizer spells them.
    codec, info = engine.codec, engine.manifest.data.get("tokenizer") or {}
    tokens = {}
    for key, ident in (("bos_token", info.get("bos_token_id")), ("eos_token", info.get("eos_token_id"))):
        ident = ident[0] if isinstance(ident, list) and ident else ident
        text = codec.tokenizer.id_to_token(int(ident)) if codec and isinstance(ident, int) else None
        if text:
            tokens[key] = text
    return tokens


def _default_template(value, where: str = "tokenizer_config.json") -> str | None:
    # tokenizer_config.json may hold several named templates; transformers uses "default".
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise UserError(f"chat_template must be a string or a list of {{name, template}}, got {type(value).__name__}",
                        where=where, hint="fix the tokenizer files, or pass a template with --template")
    return value or None


def _special_tokens(config: dict, special_map: dict) -> dict[str, str]:
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key) or special_map.get(key)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _read_json(path: Path | None) -> dict:
    """A tokenizer JSON file (absent: {}): a regular file of bounded size and depth, an object at the top."""
    if path is None:
        return {}
    raw = read_regular(path, what=path.name, max_bytes=MAX_TOKENIZER_CONFIG_BYTES, hint=_TOKENIZER_HINT)
    try:
        data = safe_json.loads(raw.decode("utf-8"), max_depth=MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name} is not valid JSON: {exc}", where=str(path), hint=_TOKENIZER_HINT) from exc
    if not isinstance(data, dict):
        raise UserError(f"{path.name} must hold a JSON object, not {type(data).__name__}", where=str(path),
                        hint=_TOKENIZER_HINT)
    return data


def _read_template(path: Path) -> str:
    raw = read_regular(path, what="chat template", max_bytes=MAX_TEMPLATE_BYTES, hint="pass a .jinja text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"chat template {path.name} is not UTF-8 text ({exc})", where=str(path)) from None


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The template compiled in transformers' environment (chat_template_utils._compile_jinja_template)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    class GenerationTag(Extension):
        # transformers' {% generation %} marks assistant tokens for masks; rendering passes the body through.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own tojson: no HTML escaping, unicode kept
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = sandboxed_environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"the chat template does not parse: {exc}", where="chat template") from exc


def _normalized(messages: list[dict]) -> list[dict]:
    """Checked copies, None-valued keys dropped and reasoning aliased, as transformers prepares them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...}", where="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {index} needs a role among {', '.join(ROLES)}", where="messages",
                            hint="each message is {'role': 'system'|'user'|'assistant', 'content': str}")
        if "content" in message and message["content"] is not None and not isinstance(message["content"], str):
            raise UserError(f"message {index}: content must be a string", where="messages")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --- prompts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]
    thinking: bool  # the prompt ends inside an open <think> block: output starts as reasoning


THINK_MODES = ("auto", "on", "off")


def think_flag(mode: str | bool | None) -> bool | None:
    """``--think auto|on|off`` as ``prepare_prompt``'s ``force_think``: None (auto), True or False."""
    if mode is None or isinstance(mode, bool):
        return mode
    if mode not in THINK_MODES:
        raise UserError(f"unknown think mode {mode!r}", where="--think", hint="use auto, on or off")
    return {"auto": None, "on": True, "off": False}[mode]


def reasoning_model(engine, chat_template: ChatTemplate) -> bool:
    """Whether the bundle's model reasons before it answers (what ``--think auto`` follows).

    The model's own record wins: ``reasoning_model`` in its generation_config.json, which export copies
    into the manifest (the shipped demo models record ``false``: they were trained on documentation, not on
    ``<think>`` transcripts, so a forced think block swallows their whole reply). Without a record, the
    template decides: an R1-family template (it strips ``…</think>`` from history, or ends its generation
    prompt in ``<think>``) belongs to a reasoning model — published R1 checkpoints carry no record.
    """
    info = engine.manifest.data.get("tokenizer") or {}
    for record in (info.get("reasoning_model"), (info.get("generation_defaults") or {}).get("reasoning_model")):
        if isinstance(record, bool):
            return record
    return chat_template.strips_reasoning or _ends_in_think(chat_template.render([{"role": "user", "content": ""}]))


def prepare_prompt(engine, messages: list[dict], *, template: str | Path | ChatTemplate | None = None,
                   force_think: bool | str | None = None) -> ChatPrompt:
    """Render ``messages`` with the generation prompt and encode it as transformers does (no extra BOS).

    ``force_think`` (or "auto"/"on"/"off"): None/"auto" (default) thinks when the model is a reasoning model
    (:func:`reasoning_model`): ``<think>\\n`` is appended when the template does not end with it (R1's January
    template; DeepSeek recommends forcing it). True/"on" appends it to any template. False/"off" — and auto
    for a model that does not reason — leaves the prompt out of a think block: a template that opens
    ``<think>`` itself gets it closed at once (``</think>``), so the model answers directly.
    """
    chat_template = load_chat_template(engine, template)
    text = chat_template.render(messages, add_generation_prompt=True)
    thinking = _ends_in_think(text)
    force_think = think_flag(force_think)
    wants_think = reasoning_model(engine, chat_template) if force_think is None else force_think
    if wants_think and not thinking:
        text, thinking = text + THINK_OPEN + "\n", True
    elif not wants_think and thinking:
        text, thinking = text.rstrip() + "\n" + THINK_CLOSE + "\n\n", False
    codec = engine.codec
    if codec is None:
        raise UserError("this bundle has no tokenizer, so it cannot chat", where=str(engine.manifest.root),
                        hint="re-export from a checkpoint directory that holds tokenizer.json")
    return ChatPrompt(text, codec.tokenizer.encode(text, add_special_tokens=False).ids, thinking)


def model_sampling(engine) -> dict[str, Any]:
    """The sampling the bundle's model asks for (its generation_config.json, kept in the manifest as
    ``tokenizer.generation_defaults``), as ``Engine.stream`` keywords; {} when it asks for nothing.

    As in transformers, ``do_sample: false`` means greedy whatever temperature it lists; a model that
    samples gets its temperature/top_p/top_k, and its repetition_penalty either way.
    """
    info = (engine.manifest.data.get("tokenizer") or {}).get("generation_defaults") or {}
    out: dict[str, Any] = {}
    if info.get("do_sample"):
        for key, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
            if isinstance(info.get(key), (int, float)) and not isinstance(info.get(key), bool):
                out[key] = kind(info[key])
    if isinstance(info.get("repetition_penalty"), (int, float)) and info["repetition_penalty"] > 0:
        out["repetition_penalty"] = float(info["repetition_penalty"])
    return out


def _ends_in_think(text: str) -> bool:
    return text.rstrip().endswith(THINK_OPEN)


# --- reasoning split ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatPiece:
    """A piece of the reply as it streams: ``kind`` is "reasoning" or "answer"."""

    kind: str
    text: str
    token_id: int | None = None  # the token whose arrival released this text (None: released at the end)


class ReasoningSplitter:
    """Splits streamed text into reasoning and answer without ever emitting a think tag.

    Reasoning runs from the start (when the prompt opened ``<think>``) or from a leading ``<think>`` in the
    output, up to the first ``</think>``; everything else is answer. Whitespace at either end of each part is
    dropped, so text that may turn out to be a tag or trailing whitespace is held back until it is decided.
    With no ``</think>`` yet, all the text so far is reasoning.
    """

    def __init__(self, thinking: bool):
        self._phase = "reasoning" if thinking else "start"
        self._buffer = ""
        self._started = False  # whether the current phase has emitted its first non-space text

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far is inside a think block that has not closed."""
        return self._phase == "reasoning"

    def feed(self, text: str) -> list[tuple[str, str]]:
        """(kind, text) pairs releasable after ``text``."""
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, at the end of the output."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while True:
            if not self._started:
                head = self._buffer.lstrip()
                if head.startswith(THINK_OPEN) and self._phase != "answer":  # opening tag (also a repeated one)
                    self._buffer, self._phase = head[len(THINK_OPEN):], "reasoning"
                    continue
                if not final and THINK_OPEN.startswith(head) and self._phase != "answer":
                    return out  # empty, or maybe the start of <think>: wait for more
                if self._phase == "start":
                    self._phase = "answer"
                self._buffer, self._started = head, bool(head)
                if not head:
                    return out
            if self._phase == "reasoning" and THINK_CLOSE in self._buffer:
                before, self._buffer = self._buffer.split(THINK_CLOSE, 1)
                out += _piece("reasoning", before.rstrip())
                self._phase, self._started = "answer", False
                continue
            tag = THINK_CLOSE if self._phase == "reasoning" else ""
            cut = len(self._buffer.rstrip()) if final else _releasable(self._buffer, tag)
            out += _piece(self._phase, self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            return out


def _releasable(buffer: str, tag: str) -> int:
    """Length of ``buffer`` that can go out now: not a tail that may begin ``tag``, nor trailing whitespace."""
    end = len(buffer)
    for k in range(min(len(tag) - 1, end), 0, -1):
        if tag.startswith(buffer[end - k:]):
            end -= k
            break
    return len(buffer[:end].rstrip())


def _piece(kind: str, text: str) -> list[tuple[str, str]]:
    return [(kind, text)] if text else []


def split_reasoning(text: str, *, thinking: bool = False) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole reply; ``thinking``: the prompt ended inside ``<think>``."""
    splitter = ReasoningSplitter(thinking)
    parts = {"reasoning": "", "answer": ""}
    for kind, piece in splitter.feed(text) + splitter.finish():
        parts[kind] += piece
    return parts["reasoning"], parts["answer"]


# --- generation ---------------------------------------------------------------------------------

@dataclass
class ChatResult(GenerationResult):
    """A generation result plus the reply split into reasoning and answer, and the rendered prompt."""

    reasoning: str = ""
    answer: str = ""
    prompt: str = ""


class ChatText:
    """The per-token side of a ChatStream: the text so far in (after each token), reasoning/answer pieces out.

    Push-driven, so ``ChatStream`` and a batch of rows decoded together (the server's) share it.
    """

    def __init__(self, thinking: bool):
        self.splitter, self.fed = ReasoningSplitter(thinking), ""

    def feed(self, text: str, token_id: int | None) -> list[ChatPiece]:
        """The pieces released once the decoded text has become ``text`` (with ``token_id``'s arrival)."""
        # Feed from the whole text decoded so far (the stream's ``text``), holding back while it ends in
        # U+FFFD: a character split over tokens shows as U+FFFD until its last byte arrives, and the
        # event's own text piece keeps that placeholder.
        if text.endswith("\ufffd") or not text.startswith(self.fed):
            return []
        pieces = [ChatPiece(kind, piece, token_id) for kind, piece in self.splitter.feed(text[len(self.fed):])]
        self.fed = text
        return pieces

    def flush(self, text: str) -> list[ChatPiece]:
        """The held-back tail once one text stream ended with ``text``; the split state carries on (a reply
        continued in a second stream, after a forced ``</think>``)."""
        tail = text[len(self.fed):] if text.startswith(self.fed) else ""
        self.fed = ""
        return [ChatPiece(kind, piece) for kind, piece in self.splitter.feed(tail)]

    def finish(self, text: str) -> list[ChatPiece]:
        """What is left once the generation ended with ``text``."""
        return self.flush(text) + [ChatPiece(kind, piece) for kind, piece in self.splitter.finish()]


class ChatStream:
    """Iterates ChatPieces as tokens arrive; ``result`` (a ChatResult) is set once iteration ends.

    ``finish`` (optional) turns the ChatResult into a richer one (RAG adds its sources) before ``on_done``
    sees it and ``result`` holds it. ``sampling`` may hold ``reasoning_budget`` (N tokens): a reply still
    inside its think block after N tokens gets ``</think>`` appended and goes on as the answer. ``cache``: one
    holding a prefix of the prompt's tokens (a prompt cache's); it ends holding the prompt and the reply.
    """

    def __init__(self, engine, prompt: ChatPrompt, max_new_tokens: int, sampling: dict[str, Any], on_done=None,
                 finish=None, cache=None):
        sampling = dict(sampling)
        self.reasoning_budget = _budget(sampling.pop("reasoning_budget", None))
        if self.reasoning_budget == 0 and prompt.thinking:  # no reasoning at all: close the block in the prompt
            prompt = _closed_think(engine, prompt)
        self.engine, self.prompt, self.sampling, self.cache = engine, prompt, sampling, cache
        self.max_new_tokens = _fit_context(engine, prompt, max_new_tokens)
        self.result: ChatResult | None = None
        self._on_done, self._finish = on_done, finish

    def text_stream(self):
        """The TextStream under this reply (``__iter__`` runs it; a batched decode feeds its TokenText)."""
        return self.engine.stream(self.prompt.token_ids, self.max_new_tokens, **self.sampling, cache=self.cache)

    def __iter__(self) -> Iterator[ChatPiece]:
        reply = ChatText(self.prompt.thinking)
        budget = self.reasoning_budget if self.prompt.thinking else None
        first = self.engine.stream(self.prompt.token_ids, min(budget or self.max_new_tokens, self.max_new_tokens),
                                   **self.sampling, cache=self.cache)
        yield from _stream_pieces(first, reply)
        generated = first.result
        left = self.max_new_tokens - len(generated.token_ids)
        if budget is not None and generated.finish_reason == "length" and left > 0:
            # Over budget: close the think block if it is still open (forced tokens, as llama.cpp does), then
            # continue the answer from the whole sequence so far (one more prefill of it).
            closing = "\n" + THINK_CLOSE + "\n\n" if reply.splitter.in_reasoning else ""
            closing_ids = self.engine.codec.tokenizer.encode(closing, add_special_tokens=False).ids if closing else []
            for kind, piece in reply.splitter.feed(closing):
                yield ChatPiece(kind, piece)
            left -= len(closing_ids)
            if left > 0:
                # The same cache holds the prompt and the reply so far: only the closing tokens are prefilled.
                rest = self.engine.stream([*self.prompt.token_ids, *generated.token_ids, *closing_ids], left,
                                          **self.sampling, cache=self.cache)
                yield from _stream_pieces(rest, reply)
                generated = _joined(generated, closing, closing_ids, rest.result)
        yield from reply.finish("")
        self.complete(generated)

    def complete(self, generated: GenerationResult) -> ChatResult:
        """The ChatResult of the generation that ended (``finish`` and ``on_done`` applied); also ``result``."""
        reasoning, answer = split_reasoning(generated.text, thinking=self.prompt.thinking)
        result = ChatResult(**generated.__dict__, reasoning=reasoning, answer=answer, prompt=self.prompt.text)
        self.result = self._finish(result) if self._finish else result
        if self._on_done:
            self._on_done(self.result)
        return self.result

    def run(self) -> ChatResult:
        """Iterate to the end; the result."""
        for _ in self:
            pass
        return self.result


def _closed_think(engine, prompt: ChatPrompt) -> ChatPrompt:
    text = prompt.text.rstrip() + "\n" + THINK_CLOSE + "\n\n"
    return ChatPrompt(text, engine.codec.tokenizer.encode(text, add_special_tokens=False).ids, False)


def _stream_pieces(text_stream, reply: ChatText) -> Iterator[ChatPiece]:
    """The ChatPieces of one TextStream through ``reply`` (whose split state carries across streams)."""
    for event in text_stream:
        yield from reply.feed(text_stream.text, event.token_id)
    yield from reply.flush(text_stream.result.text)


def _joined(first: GenerationResult, closing: str, closing_ids: list[int], rest: GenerationResult):
    """One GenerationResult of a reply generated in two parts around forced ``</think>`` tokens."""
    timings = dict(first.timings)
    timings["total_s"] = first.timings.get("total_s", 0.0) + rest.timings.get("total_s", 0.0)
    timings["reasoning_budget_hit"] = bool(closing)
    return GenerationResult(first.text + closing + rest.text, [*first.token_ids, *closing_ids, *rest.token_ids],
                            rest.finish_reason, first.prompt_tokens, timings)


def _budget(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"the reasoning budget must be a whole number ≥ 0, got {value!r}", where="--reasoning-budget")
    return value


def _fit_context(engine, prompt: ChatPrompt, max_new_tokens: int) -> int:
    # A conversation grows each turn: cap the reply at the room left rather than refusing the turn.
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be ≥ 1", where="chat")
    room = engine.max_context - len(prompt.token_ids)
    if room < 1:
        raise UserError(f"the conversation ({len(prompt.token_ids)} tokens) fills the bundle's max context of "
                        f"{engine.max_context}", where="chat",
                        hint="start a new conversation (/reset), or re-export with a larger --max-context")
    return min(max_new_tokens, room)


def chat(engine, messages: list[dict], *, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
         top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
         stream: bool = False, template: str | Path | ChatTemplate | None = None, force_think: bool | str | None = None,
         reasoning_budget: int | None = None):
    """Reply to ``messages`` ([{"role": ..., "content": ...}]) through the bundle's chat template.

    Returns a ChatResult (text, reasoning, answer, token ids, finish reason, timings, prompt), or with
    ``stream=True`` a ChatStream of ChatPieces whose ``result`` is set at the end. ``max_new_tokens`` is
    capped at the room the context has left. ``template`` and ``force_think``: see ``load_chat_template``
    and ``prepare_prompt``; ``reasoning_budget``: see ``ChatStream``.
    """
    prompt = prepare_prompt(engine, messages, template=template, force_think=force_think)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                    seed=seed, stop=stop, reasoning_budget=reasoning_budget)
    replies = ChatStream(engine, prompt, max_new_tokens, sampling)
    return replies if stream else replies.run()


THINK_MARGIN = 8  # tokens for an appended "<think>\n" and tokenizer merges at the seams


def sources_prompt(engine, retriever, question: str, *, history: list[dict] | None = None, k: int = 5,
                   max_new_tokens: int = 256, template=None):
    """Retrieve for ``question`` and assemble a user turn with numbered sources that fits the context.

    ``retriever``: anything with ``prompt(question, count_tokens, budget, k=, system_role=)`` (a
    ``dsedge.retrieval.Retriever``). The budget for sources is what the context has left after the chat
    template's own tokens (rendered with the real history and an empty question), the room kept for the
    answer and a small margin for R1's forced ``<think>`` opening. Instructions and sources go in the user
    turn (``system_role=False``): it works with every template, and DeepSeek recommends it for R1.
    """
    if retriever is None:
        raise UserError("no index to retrieve from", where=str(engine.manifest.root),
                        hint="pass --index INDEX (built with `dsedge index build`) or export with --index")
    codec = engine.codec
    if codec is None:
        raise UserError("this bundle has no tokenizer, so it cannot build a prompt", where=str(engine.manifest.root))

    def count_tokens(text: str) -> int:  # as prepare_prompt encodes a rendered prompt: no extra specials
        return len(codec.tokenizer.encode(text, add_special_tokens=False).ids)

    chat_template = load_chat_template(engine, template)
    frame = chat_template.render([*(history or []), {"role": "user", "content": ""}], add_generation_prompt=True)
    budget = engine.max_context - max_new_tokens - count_tokens(frame) - THINK_MARGIN
    if budget < 1:
        raise UserError(f"no room for sources: the context ({engine.max_context} tokens) is taken by the "
                        f"conversation and the {max_new_tokens} tokens kept for the answer", where="rag",
                        hint="lower --max-new-tokens, start a new conversation, or re-export with a larger "
                             "--max-context")
    return retriever.prompt(question, count_tokens, budget, k=k, system_role=False)


class ChatSession:
    """A multi-turn conversation: the history the model sees keeps answers only (reasoning dropped).

    ``turns`` records every completed exchange (with reasoning, finish reason, timings and ``cached_tokens``:
    the prompt tokens the conversation cache held) across resets.

    ``sources``: something that adds retrieved sources to each question (``dsedge.rag.RagSources``): its
    ``augment(engine, question, history=, template=, max_new_tokens=)`` returns the messages that stand for
    the question in the prompt and a function that completes the ChatResult (None: plain chat).

    ``prompt_cache``: keep the last turn's cache (``prefix_cache.ConversationCache``), so that turn N
    prefills only what its prompt does not share with turn N-1's prompt and reply, checked token by token
    (the re-rendered history drops reasoning; a reply may re-tokenize differently): output is the same.
    """

    def __init__(self, engine, *, system: str | None = None, template: str | Path | ChatTemplate | None = None,
                 force_think: bool | None = None, max_new_tokens: int = 512, sources=None, prompt_cache: bool = True,
                 **sampling):
        self.engine, self.system, self.force_think = engine, system, force_think
        self.sources = sources
        self.template = load_chat_template(engine, template)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.messages: list[dict] = []
        self.turns: list[dict] = []
        self.conversation = 0  # bumped by reset()
        self.cache = ConversationCache(engine) if prompt_cache else None

    def history(self) -> list[dict]:
        """The messages the next prompt is rendered from (system message first, if any)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def send(self, text: str) -> ChatStream:
        """Stream the reply to a user message; the exchange joins the history only when the reply completes."""
        if self.sources is not None:
            messages, finish = self.sources.augment(self.engine, text, history=self.history(),
                                                    template=self.template, max_new_tokens=self.max_new_tokens)
        else:  # the history keeps the plain question either way
            messages, finish = [{"role": "user", "content": text}], None
        prompt = prepare_prompt(self.engine, [*self.history(), *messages], template=self.template,
                                force_think=self.force_think)
        max_new = _fit_context(self.engine, prompt, self.max_new_tokens)
        cache = self.cache.take(prompt.token_ids, max_new) if self.cache is not None else None
        cached = self.cache.reused if self.cache is not None else 0

        def done(result: ChatResult) -> None:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.answer}]
            self.turns.append({"conversation": self.conversation, "user": text, "cached_tokens": cached,
                               **result.to_json()})
            if cache is not None:
                self.cache.keep(cache, [*prompt.token_ids, *result.token_ids])

        return ChatStream(self.engine, prompt, max_new, self.sampling, on_done=done, finish=finish, cache=cache)

    def reset(self) -> None:
        """Forget the history (the system message stays; the conversation cache may still share it)."""
        self.messages = []
        self.conversation += 1
