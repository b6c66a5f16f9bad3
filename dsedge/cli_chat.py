"""`dsedge chat BUNDLE`: an interactive multi-turn chat on a bundle (a thin layer over dsedge.runtime.chat)."""

from __future__ import annotations

import os
import sys

DIM, RESET = "\033[2m", "\033[0m"
COMMANDS = "/reset clears the history, /exit (or end of input) quits"

DESCRIPTION = f"""\
Chat with a bundle written by `dsedge export`, on onnxruntime alone. Each line read from stdin is a user
message; the reply streams to stdout and the turn's timings go to stderr. The prompt is the bundle's chat
template (its tokenizer_config.json, else the built-in template of the model's family); the history the
model sees keeps earlier answers only, as R1's template does. {COMMANDS}.

R1-style replies are split into reasoning (<think>…</think>) and answer: on a terminal the reasoning shows
dimmed, otherwise between <think> and </think> lines; --hide-reasoning leaves it out.

With --json nothing streams: at the end one JSON object holds the whole transcript, {{"ok": true, "bundle",
"template", "turns": [{{"conversation", "user", "reasoning", "answer", "text", "token_ids",
"finish_reason", "prompt_tokens", "timings", "prompt"}}, ...]}} ("conversation" counts /reset's).
"""


def register(sub, command) -> None:
    """Add `chat` to the CLI (argparse only)."""
    from dsedge.cli import add_engine_flags, add_rag_flags, add_sampling_flags

    cmd = command(sub, "chat", "interactive multi-turn chat with a bundle", DESCRIPTION, _run_chat, _render_chat)
    cmd.add_argument("bundle", help="bundle directory")
    cmd.add_argument("--system", metavar="TEXT", help="system message, kept across /reset")
    cmd.add_argument("--hide-reasoning", action="store_true", help="do not print the <think> reasoning")
    cmd.add_argument("--template", metavar="NAME|FILE",
                     help="chat template instead of the bundle's: deepseek-v2, deepseek-v3, deepseek-r1, r1-distill, "
                          "or a .jinja file")
    cmd.add_argument("-n", "--max-new-tokens", type=int, default=512, metavar="N",
                     help="per reply, capped at the context left (default 512)")
    add_sampling_flags(cmd)
    add_engine_flags(cmd)
    add_rag_flags(cmd)


class ChatTranscript:
    """What `dsedge chat` returns: the bundle, the template used and every completed turn."""

    def __init__(self, bundle: str, session):
        self.bundle, self.session = bundle, session

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "template": self.session.template.origin, "turns": self.session.turns}


def _run_chat(args) -> ChatTranscript:
    from dsedge.cli import load_engine
    from dsedge.rag import RagSources
    from dsedge.runtime.chat import ChatSession

    engine, retriever = load_engine(args)
    sources = RagSources(retriever, args.top_chunks) if retriever is not None else None
    session = ChatSession(engine, system=args.system, template=args.template, max_new_tokens=args.max_new_tokens,
                          sources=sources,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    quiet = args.quiet or args.json
    if not quiet:
        model = engine.spec.get("model_type", "?")
        _note(f"dsedge chat: {args.bundle} ({model}, {engine.layout}, template: {session.template.origin}); "
              f"{COMMANDS}")
    while (line := _read_line()) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            if not quiet:
                _note("(history cleared)")
        elif text.startswith("/"):
            _note(f"unknown command {text.split()[0]}; {COMMANDS}")
        elif text:
            _turn(session, text, args, quiet)
    return ChatTranscript(args.bundle, session)


def _read_line() -> str | None:
    """One line from stdin (None at end of input); the prompt goes to stderr, and only for a terminal."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line if line else None


def _turn(session, text: str, args, quiet: bool) -> None:
    from dsedge.errors import UserError

    try:
        replies = session.send(text)
        _show(replies, hide_reasoning=args.hide_reasoning, shown=not args.json)
    except UserError as exc:  # e.g. the conversation fills the context: say so and keep the session
        _note(f"error: {exc.message}")
        return
    except KeyboardInterrupt:  # Ctrl-C stops this reply (it does not join the history), not the chat
        _note("\n(interrupted)")
        return
    r = replies.result
    if args.show_sources and getattr(r, "sources", None) is not None and not args.json:
        from dsedge.cli import render_sources

        _write(render_sources(r.sources, r.cited) + "\n")
    if not quiet:
        t = r.timings
        _note(f"[{len(r.token_ids)} tokens, finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens, "
              f"TTFT {t.get('ttft_s', 0) * 1e3:.1f} ms, decode {t.get('decode_tokens_per_s', 0):.1f} tokens/s]")


def _show(replies, *, hide_reasoning: bool, shown: bool) -> None:
    """Stream one reply: reasoning dimmed on a terminal, else between <think> lines; answer plain."""
    color = _is_tty(sys.stdout) and not os.environ.get("NO_COLOR")
    kind = None  # what was printed last
    for piece in replies:
        if not shown or (piece.kind == "reasoning" and hide_reasoning):
            continue
        if piece.kind != kind:
            _write(_switch(kind, piece.kind, color))
            kind = piece.kind
        _write(piece.text)
    if shown:
        _write(_switch(kind, None, color) + "\n")


def _switch(before: str | None, after: str | None, color: bool) -> str:
    """What marks the change from printing ``before`` to ``after`` (kinds of piece, None = nothing)."""
    opening = {"reasoning": DIM if color else "<think>\n"}.get(after, "")
    closing = {"reasoning": RESET + "\n\n" if color else "\n</think>\n\n"}.get(before, "")
    if after is None and before == "reasoning":  # the reply ended while thinking
        closing = RESET if color else "\n</think>"
    return closing + opening


def _is_tty(stream) -> bool:
    return stream.isatty()


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _render_chat(transcript: ChatTranscript) -> None:
    """Nothing: the replies were printed as they streamed."""
