"""The ASGI app (Starlette): routes, API-key check, body cap, OpenAI-shaped errors, server-sent events.

Handlers parse with ``wire``, hand the engine work to the ``Scheduler`` as a ``Job`` and turn the job's
events into a response. Every request watches for its client leaving: the job is cancelled at once, so a
disconnected stream frees its slot at the worker's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dsedge.serve import wire
from dsedge.serve.backend import DEFAULT_PREFILL_CHUNK, Backend, Generation
from dsedge.serve.metrics import CONTENT_TYPE, Metrics
from dsedge.serve.scheduler import DEFAULT_MAX_QUEUE, Event, Job, QueueFull, Scheduler
from dsedge.serve.wire import WireError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers probe it)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Server:
    """What the handlers share: the backend, the scheduler, the metrics and the limits."""

    def __init__(self, backend: Backend, *, api_key: str | None, parallel: int, max_queue: int, max_body: int,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        self.backend, self.api_key, self.max_body = backend, api_key, max_body
        self.defaults = backend.defaults()
        self.metrics = Metrics(queue_depth=lambda: self.scheduler.queue_depth, active=lambda: self.scheduler.active,
                               expert_cache=backend.expert_cache, prompt_cache=backend.prompt_cache_stats)
        # one forward pass for all active rows; newcomers prefilled in chunks between its steps
        batch = backend.new_batch(parallel, prefill_chunk) if parallel > 1 else None
        self.scheduler = Scheduler(parallel=parallel, max_queue=max_queue, metrics=self.metrics, batch=batch)


def create_app(backend: Backend, *, api_key: str | None = None, parallel: int = 1,
               max_queue: int = DEFAULT_MAX_QUEUE, max_body: int = MAX_BODY_BYTES,
               prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> Starlette:
    """The OpenAI-compatible app over ``backend``; the worker thread runs while the app's lifespan does.
    ``prefill_chunk``: with ``parallel`` > 1, a newcomer's prompt is prefilled this many tokens at a time
    between the active rows' decode steps (0: whole prompts)."""
    server = Server(backend, api_key=api_key, parallel=parallel, max_queue=max_queue, max_body=max_body,
                    prefill_chunk=prefill_chunk)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.stop()

    routes = [Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={WireError: _wire_error, HTTPException: _http_error})
    app.state.server = server
    app.add_middleware(_KeyCheck, api_key=api_key)
    app.add_middleware(_CountRequests, metrics=server.metrics)
    return app


# --- middleware ---------------------------------------------------------------------------------

class _KeyCheck:
    """``Authorization: Bearer KEY`` on every path but /health, compared in constant time."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            error = WireError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        elif not hmac.compare_digest(given.strip(), self.key):
            error = WireError(401, "incorrect API key", code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        await _error_response(error, {"www-authenticate": "Bearer"})(scope, receive, send)


class _CountRequests:
    """Counts every answered request by endpoint and status (unknown paths share one label)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _error_response(error: WireError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _wire_error(request: Request, exc: WireError) -> JSONResponse:
    return _error_response(exc, {"retry-after": "1"} if exc.status in (429, 503) else None)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error_response(WireError(exc.status_code, message.get(exc.status_code, str(exc.detail))))


# --- simple routes ------------------------------------------------------------------------------

def _server(request: Request) -> Server:
    return request.app.state.server


async def health(request: Request) -> JSONResponse:
    s = _server(request)
    return JSONResponse({"status": "ok", "model": s.backend.model_id, "queue_depth": s.scheduler.queue_depth,
                         "active": s.scheduler.active})


async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE)


async def models(request: Request) -> JSONResponse:
    backend = _server(request).backend
    cards = [wire.model_card(backend.model_id, 0, context_length=backend.context_length)]
    if backend.embedder_id:
        cards.append(wire.model_card(backend.embedder_id, 0, kind="embedding"))
    return JSONResponse({"object": "list", "data": cards})


# --- requests through the scheduler -------------------------------------------------------------

async def read_json(request: Request, cap: int) -> dict:
    """The body as a JSON object; 413 past ``cap`` bytes, judged by Content-Length before reading any."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise WireError(413, f"the request body is {declared} bytes; the limit is {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise WireError(413, f"the request body exceeds the limit of {cap} bytes")
        chunks.append(chunk)
    return wire.parse_json(b"".join(chunks))


def _check_model(backend: Backend, model: str, *also: str | None) -> None:
    if model not in (backend.model_id, *filter(None, also)):
        raise WireError(404, f"the model {model!r} does not exist; this server serves {backend.model_id!r}",
                        param="model", code="model_not_found")


class _Call:
    """A submitted job plus the watcher that cancels it when the client disconnects."""

    def __init__(self, request: Request, server: Server, start):
        self.server, self.job = server, Job(start, asyncio.get_running_loop())
        try:
            server.scheduler.submit(self.job)
        except QueueFull as exc:
            raise WireError(429, f"the server is busy ({exc}); retry shortly", code="queue_full") from exc
        self._watcher = asyncio.create_task(self._watch(request.receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.cancel()
        self.job.events.put_nowait(Event("gone"))

    async def next(self) -> Event:
        return await self.job.events.get()

    async def first(self) -> Event:
        """The first event; an error one becomes the HTTP error response."""
        event = await self.next()
        if event.kind == "error":
            self.close()
            raise event.payload
        if event.kind == "gone":
            self.close()
        return event

    def close(self) -> None:
        self.job.cancel()  # no-op once finished
        self._watcher.cancel()


async def embeddings(request: Request) -> JSONResponse:
    server = _server(request)
    backend = server.backend
    request_body = wire.parse_embedding(await read_json(request, server.max_body))
    if backend.retriever is None:
        raise WireError(404, "this server has no embedder: start it with --index INDEX (or --rag for the "
                             "bundle's own index)", code="embeddings_unavailable")
    _check_model(backend, request_body.model, backend.embedder_id)
    call = _Call(request, server, lambda: backend.embed(request_body.texts))
    event = await call.first()
    call.close()
    vectors, tokens = event.payload
    return JSONResponse(wire.embeddings(vectors, request_body.model, tokens, request_body.base64))


async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = wire.parse_chat(await read_json(request, server.max_body), server.defaults)
    _check_model(server.backend, body.model)
    call = _Call(request, server, lambda: server.backend.chat(body.messages, body.sampling, body.retrieval_k))
    return await _respond(call, body, _ChatFormat(body.model))


async def completions(request: Request) -> Response:
    server = _server(request)
    body = wire.parse_completion(await read_json(request, server.max_body), server.defaults)
    _check_model(server.backend, body.model)
    call = _Call(request, server, lambda: server.backend.complete(body.prompt, body.sampling))
    return await _respond(call, body, _TextFormat(body.model))


async def _respond(call: _Call, body, fmt) -> Response:
    event = await call.first()
    if event.kind == "gone":
        return Response(status_code=499)  # nobody reads it; keeps the status in the metrics honest
    generation: Generation = event.payload
    if body.stream:
        return EventStream(call, generation, fmt, body.include_usage)
    texts: dict[str, str] = {}
    while (event := await call.next()).kind == "pieces":
        for piece in event.payload:
            texts[piece.kind] = texts.get(piece.kind, "") + piece.text
    call.close()
    if event.kind == "error":
        raise event.payload
    if event.kind == "gone":
        return Response(status_code=499)
    outcome = event.payload
    call.server.metrics.count_tokens(generation.prompt_tokens, outcome.completion_tokens)
    call.server.metrics.count_speculation(outcome.speculation)
    return JSONResponse(fmt.whole(texts, outcome, generation))


class _ChatFormat:
    """Chat responses and chunks (``reasoning_content`` for R1 reasoning, ``sources`` for retrieval)."""

    object = "chat.completion.chunk"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, wire.new_id("chatcmpl"), wire.now()

    def whole(self, texts: dict, outcome, generation: Generation) -> dict:
        message = wire.chat_message(texts.get("answer", ""), texts.get("reasoning", ""))
        return wire.chat_completion(self.id, self.created, self.model, message, outcome.finish_reason,
                                    _usage(generation, outcome), generation.sources)

    def opening(self, generation: Generation) -> dict:
        extra = {"sources": generation.sources} if generation.sources is not None else {}
        return wire.chat_chunk(self.id, self.created, self.model, {"role": "assistant", "content": ""}, **extra)

    def piece(self, piece) -> dict:
        field = "reasoning_content" if piece.kind == "reasoning" else "content"
        return wire.chat_chunk(self.id, self.created, self.model, {field: piece.text})

    def closing(self, finish_reason: str) -> dict:
        return wire.chat_chunk(self.id, self.created, self.model, {}, finish_reason)


class _TextFormat:
    """/v1/completions responses and chunks."""

    object = "text_completion"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, wire.new_id("cmpl"), wire.now()

    def whole(self, texts: dict, outcome, generation: Generation) -> dict:
        return wire.text_completion(self.id, self.created, self.model, texts.get("text", ""), outcome.finish_reason,
                                    _usage(generation, outcome))

    def opening(self, generation: Generation) -> dict | None:
        return None

    def piece(self, piece) -> dict:
        return wire.text_completion(self.id, self.created, self.model, piece.text, None)

    def closing(self, finish_reason: str) -> dict:
        return wire.text_completion(self.id, self.created, self.model, "", finish_reason)


class EventStream(Response):
    """Server-sent events of one generation: chunks as the worker releases pieces, then ``[DONE]``."""

    def __init__(self, call: _Call, generation: Generation, fmt, include_usage: bool):
        # No super().__init__: a Response without content declares Content-Length 0; a stream declares none.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.call, self.generation, self.fmt, self.include_usage = call, generation, fmt, include_usage

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data in self._events():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two chunks
            log.info("client disconnected mid-stream")
        finally:
            self.call.close()

    async def _events(self):
        opening = self.fmt.opening(self.generation)
        if opening is not None:
            yield wire.sse(opening)
        while (event := await self.call.next()).kind == "pieces":
            for piece in event.payload:
                yield wire.sse(self.fmt.piece(piece))
        if event.kind == "gone":
            return
        if event.kind == "error":
            yield wire.sse(event.payload.body())
            return
        outcome = event.payload
        self.call.server.metrics.count_tokens(self.generation.prompt_tokens, outcome.completion_tokens)
        self.call.server.metrics.count_speculation(outcome.speculation)
        yield wire.sse(self.fmt.closing(outcome.finish_reason))
        if self.include_usage:
            use = _usage(self.generation, outcome)
            yield wire.sse(wire.usage_chunk(self.fmt.id, self.fmt.created, self.fmt.model, self.fmt.object, use))
        yield wire.sse("[DONE]")


__all__ = ["MAX_BODY_BYTES", "EventStream", "Server", "create_app", "read_json"]


def _usage(generation: Generation, outcome) -> dict:
    use = wire.usage(generation.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
    if outcome.speculation is not None:  # an extension: this generation's own acceptance (speculation on)
        use["speculative"] = outcome.speculation.to_json()
    return use
