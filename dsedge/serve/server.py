"""Run the app: ``serve`` (the `dsedge serve` command, until interrupted) and ``background`` (a server in a
thread on a free loopback port, for tests and benchmarks)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dsedge.errors import UserError
from dsedge.runtime.prefix_cache import DEFAULT_CAPACITY_BYTES
from dsedge.serve.backend import DEFAULT_PREFILL_CHUNK, Backend

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = "pip install 'dsedge[serve]'"


@dataclass
class ServeReport:
    """What `dsedge serve` hands back when it stops."""

    url: str
    model: str
    requests: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def require_serve_extra() -> None:
    """The server's dependencies (starlette, uvicorn) are an extra: say how to get them."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"`dsedge serve` needs the [serve] extra ({exc.name} is not installed)",
                        where="dsedge serve", hint=INSTALL_HINT) from exc


def serve(bundle: str | Path, *, host: str = "127.0.0.1", port: int = 8000, index: str | Path | None = None,
          rag: bool = False, api_key: str | None = None, parallel: int = 1, target: str | None = None,
          max_queue: int = 64, prompt_cache_bytes: int = DEFAULT_CAPACITY_BYTES, speculative: str = "off",
          draft_tokens: int | None = None, verify: bool = False,
          prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> ServeReport:
    """Serve ``bundle`` over the OpenAI API on ``host:port`` until interrupted (Ctrl-C / SIGTERM).
    ``prompt_cache_bytes``: the prompt cache's bound (0: none); ``speculative``/``draft_tokens``/``verify`` (hash
    every file before serving): as `dsedge run`; ``prefill_chunk``: see ``create_app``."""
    require_serve_extra()
    import uvicorn

    from dsedge.serve.app import create_app  # starlette: the [serve] extra

    _check_options(parallel, max_queue, port, prefill_chunk)
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    backend = Backend.open(bundle, index=index, rag=rag, target=target, prompt_cache_bytes=prompt_cache_bytes,
                           speculative=speculative, draft_tokens=draft_tokens, verify=verify)
    app = create_app(backend, api_key=api_key, parallel=parallel, max_queue=max_queue, prefill_chunk=prefill_chunk)
    sock = bind(host, port)
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}/v1"
    log.info("serving %s (context %d tokens) at %s", backend.model_id, backend.context_length, url)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    served = sum(app.state.server.metrics.requests.values())
    return ServeReport(url, backend.model_id, served)


def _check_options(parallel: int, max_queue: int, port: int, prefill_chunk: int = 0) -> None:
    if parallel < 1:
        raise UserError(f"--parallel must be ≥ 1 (got {parallel})", where="dsedge serve")
    if max_queue < 1:
        raise UserError(f"the queue must hold at least one request (got {max_queue})", where="dsedge serve")
    if prefill_chunk < 0:
        raise UserError(f"--prefill-chunk must be ≥ 0 tokens (0: whole prompts; got {prefill_chunk})",
                        where="dsedge serve")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (got {port})", where="dsedge serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a taken port is a UserError here rather than uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", where="dsedge serve",
                        hint="pick another --port, or stop what is using it") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", port: int = 0, *, startup_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread; yields its base URL (``http://host:port``)."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsedge-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(startup_s)
        sock.close()
