"""The OpenAI wire format: request bodies parsed into checked dataclasses, responses and stream chunks built.

Pure functions over dicts (no I/O, no engine), so the contract is testable on its own. Unknown request fields
are ignored as OpenAI-compatible servers do; fields whose meaning we cannot honour are refused with a 400.
Extensions: ``reasoning_content`` (DeepSeek's name for R1 reasoning) and ``retrieval``/``sources`` (RAG).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_STOP_STRINGS = 4  # OpenAI's limit
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class WireError(Exception):
    """An error the client gets as HTTP ``status`` with OpenAI's body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> WireError:
    return WireError(400, message, param=param, code=code)


# --- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """Generation options common to both endpoints; ``max_tokens`` None = the room the context has left."""

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    top_k: int = 0  # extension (vLLM's): 0 = off
    repetition_penalty: float = 1.0  # extension (vLLM's): 1 = off


@dataclass(frozen=True)
class Defaults:
    """What a request that leaves a field out gets: the bundle's generation_config (as vLLM does), else OpenAI's.

    ``top_k`` applies only when sampling; a request with ``temperature: 0`` is greedy whatever the model lists
    (its ``repetition_penalty`` still applies, as `dsedge run --greedy` keeps it)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    sampling: Sampling
    stream: bool
    include_usage: bool
    retrieval_k: int | None  # the "retrieval": {"k": K} extension; None = no grounding


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    sampling: Sampling
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    base64: bool  # the openai client asks for base64 unless told otherwise


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def parse_chat(body: dict, defaults: Defaults) -> ChatRequest:
    _refuse_unsupported(body)
    stream, include_usage = _stream_flags(body)
    return ChatRequest(_model(body), _messages(body.get("messages")), _sampling(body, defaults), stream,
                       include_usage, _retrieval(body.get("retrieval")))


def parse_completion(body: dict, defaults: Defaults) -> CompletionRequest:
    _refuse_unsupported(body)
    if "retrieval" in body:
        raise bad("retrieval needs a chat template: use /v1/chat/completions", "retrieval")
    for name in ("echo", "suffix"):
        if body.get(name):
            raise bad(f"{name} is not supported", name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    stream, include_usage = _stream_flags(body)
    return CompletionRequest(_model(body), prompt, _sampling(body, defaults), stream, include_usage)


def parse_embedding(body: dict) -> EmbeddingRequest:
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("input must be a non-empty string or a list of non-empty strings (token ids are not accepted)",
                  "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("dimensions is not supported: the embedder has a fixed size", "dimensions")
    return EmbeddingRequest(_model(body), texts, encoding == "base64")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (see GET /v1/models)", "model")
    return model


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise bad("only n=1 is supported", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise bad("tools are not supported", "tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(index: int, message: Any) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{param} must be an object with role and content", param)
    role = ROLE_ALIASES.get(message.get("role"))
    if role is None:
        raise bad(f"{param}.role {message.get('role')!r} is not one of system, user, assistant", f"{param}.role")
    out = {"role": role, "content": _content(message.get("content"), role, f"{param}.content")}
    reasoning = message.get("reasoning_content")
    if role == "assistant" and isinstance(reasoning, str):
        out["reasoning_content"] = reasoning
    return out


def _content(content: Any, role: str, param: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise bad(f"{param}: only text content parts are supported", param)
    raise bad(f"{param} must be a string", param)


def _sampling(body: dict, defaults: Defaults) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad(f"{param} must be an integer ≥ 1", param)
    temperature = _number(body, "temperature", defaults.temperature)
    if not 0 <= temperature <= 2:
        raise bad("temperature must be between 0 and 2", "temperature")
    top_p = _number(body, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise bad("top_p must be in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("seed must be an integer", "seed")
    top_k = defaults.top_k if body.get("top_k") is None else body["top_k"]
    if not _is_int(top_k) or top_k < -1:
        raise bad("top_k must be an integer ≥ 0 (0 or -1: off)", "top_k")
    penalty = _number(body, "repetition_penalty", defaults.repetition_penalty)
    if not 0 < penalty <= 10:
        raise bad("repetition_penalty must be in (0, 10] (1: off)", "repetition_penalty")
    return Sampling(max_tokens, float(temperature), float(top_p), seed, _stop(body.get("stop")), max(0, top_k),
                    float(penalty))


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number", name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stops)


def _retrieval(value: Any) -> int | None:
    if value is None:
        return None
    k = value.get("k", 5) if isinstance(value, dict) else None
    if not _is_int(k) or k < 1:
        raise bad("retrieval must be an object like {\"k\": 5} with k ≥ 1", "retrieval")
    return k


# --- responses ----------------------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the runtime's → OpenAI's


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: the prompt tokens the prompt cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (or the literal ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def chat_message(answer: str, reasoning: str) -> dict:
    message = {"role": "assistant", "content": answer}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def chat_completion(ident: str, created: int, model: str, message: dict, finish_reason: str, use: dict,
                    sources: list[dict] | None) -> dict:
    body = {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}
    return body | ({"sources": sources} if sources is not None else {})


def chat_chunk(ident: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               **extra) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], **extra}


def usage_chunk(ident: str, created: int, model: str, obj: str, use: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": ident, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def text_completion(ident: str, created: int, model: str, text: str, finish_reason: str | None,
                    use: dict | None = None) -> dict:
    """A /v1/completions response (or, with ``use`` None and streaming, one of its chunks)."""
    body = {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    return body | ({"usage": use} if use is not None else {})


def model_card(ident: str, created: int, **extra) -> dict:
    return {"id": ident, "object": "model", "created": created, "owned_by": "dsedge", **extra}


def embeddings(vectors: np.ndarray, model: str, prompt_tokens: int, as_base64: bool) -> dict:
    def encode(row: np.ndarray):
        if as_base64:  # little-endian float32 bytes, as OpenAI sends them
            return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in row]

    data = [{"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
