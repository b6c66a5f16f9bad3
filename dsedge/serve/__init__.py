"""`dsedge serve`: an OpenAI-compatible HTTP server over a bundle (needs the ``[serve]`` extra).

    from dsedge.serve import Backend, create_app, serve
    serve("model.bundle", port=8000)                     # blocks; or:
    app = create_app(Backend.open("model.bundle"))       # an ASGI app for any ASGI server

Layout: ``wire`` (request parsing, response and chunk builders — the contract), ``backend`` (the one module
that calls the engine), ``scheduler`` (the worker thread, FIFO queue, round-robin slots), ``metrics``
(Prometheus text), ``app`` (routes, key check, body cap, SSE) and ``server`` (uvicorn).
Only ``wire``, ``backend`` and ``scheduler`` import without the extra.
"""

from __future__ import annotations

from dsedge.serve import wire
from dsedge.serve.backend import Backend
from dsedge.serve.server import ServeReport, background, require_serve_extra, serve


def create_app(backend: Backend, **options):
    """The ASGI app (``dsedge.serve.app.create_app``); imported lazily so this package loads without starlette."""
    require_serve_extra()
    from dsedge.serve.app import create_app as build  # starlette: the [serve] extra

    return build(backend, **options)


__all__ = ["Backend", "wire", "ServeReport", "background", "create_app", "require_serve_extra", "serve"]
