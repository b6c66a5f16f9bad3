"""`dsedge serve BUNDLE`: an OpenAI-compatible local server (a thin layer over dsedge.serve.serve)."""

from __future__ import annotations

import sys

from dsedge.units import size_argument

DESCRIPTION = """\
Serve a bundle over the OpenAI HTTP API, so any OpenAI client (the `openai` package, curl, editors, agent
frameworks) can use it: POST /v1/chat/completions (streamed or not; R1 reasoning in `reasoning_content`),
POST /v1/completions, GET /v1/models, POST /v1/embeddings (with an index), GET /health and GET /metrics
(Prometheus). With --index/--rag a chat request may ask for grounding with "retrieval": {"k": 5}; the reply
then lists the numbered `sources` the model was given.

One worker thread runs the model; requests queue in arrival order (at most 64 waiting, then 429). With
--parallel N, N generations decode together, one forward pass a step. Binds 127.0.0.1 unless --host says
otherwise; use --api-key when anything but this machine can reach it. Needs `pip install 'dsedge[serve]'`.

examples:
  dsedge serve model.bundle --port 8000
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
print(c.chat.completions.create(model='model.bundle', messages=[{'role': 'user', 'content': 'Hi'}]))"
"""


def _cache_size(text: str) -> int:
    """A size (512M, 1G, …), or 0: no prompt cache."""
    return 0 if text.strip() == "0" else size_argument(text)


def register(sub, command) -> None:
    """Add `serve` to the CLI (argparse only)."""
    cmd = command(sub, "serve", "OpenAI-compatible HTTP server over a bundle", DESCRIPTION, _run_serve, _render)
    cmd.add_argument("bundle", help="bundle directory (its name is the model id clients send)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    cmd.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port)")
    rag = cmd.add_mutually_exclusive_group()
    rag.add_argument("--index", metavar="INDEX", help="an index (`dsedge index build`) for retrieval and "
                                                      "/v1/embeddings")
    rag.add_argument("--rag", action="store_true", help="use the index embedded in the bundle")
    cmd.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (all but /health)")
    cmd.add_argument("--parallel", type=int, default=1, metavar="N",
                     help="generations decoded together in one batch, one forward pass a step (default 1)")
    cmd.add_argument("--prefill-chunk", type=int, default=256, metavar="TOKENS",
                     help="with --parallel: prefill a new request's prompt this many tokens at a time, between "
                          "decode steps of the active streams, so a long prompt does not stall them "
                          "(default 256; 0: whole prompts)")
    cmd.add_argument("--prompt-cache", type=_cache_size, default="512M", metavar="SIZE",
                     help="memory for cached prompt prefixes, reused by requests that start the same way "
                          "(default 512M; 0 turns it off)")
    cmd.add_argument("--verify", action="store_true",
                     help="hash every bundle (and index) file now, before serving, ignoring the record of earlier "
                          "verifications (as `dsedge run --verify`; by default a file is hashed when first opened)")
    cmd.add_argument("--target", help="device target: execution providers and threads (a name, a file or `auto`)")
    cmd.add_argument("--speculative", choices=["off", "ngram", "mtp"], default="off",
                     help="speculative decoding (see `dsedge run --help`; default off)")
    cmd.add_argument("--draft-tokens", type=int, metavar="K", help="tokens drafted per verify step")


def _run_serve(args):
    from dsedge.serve import serve

    return serve(args.bundle, host=args.host, port=args.port, index=args.index, rag=args.rag,
                 api_key=args.api_key, parallel=args.parallel, target=args.target,
                 prompt_cache_bytes=args.prompt_cache, speculative=args.speculative,
                 draft_tokens=args.draft_tokens, verify=args.verify, prefill_chunk=args.prefill_chunk)


def _render(report) -> None:
    print(f"stopped serving {report.model} at {report.url} after {report.requests} requests", file=sys.stderr)
