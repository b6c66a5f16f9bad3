"""`dsedge chat BUNDLE`: an interactive multi-turn chat on a bundle (a thin layer over dsedge.runtime.chat)."""

from __future__ import annotations

import contextlib
import os
import sys

DIM, RESET = "\033[2m", "\033[0m"
COMMANDS = "/help lists the commands, /reset clears the history, /exit (or end of input) quits"
HELP = """\
/help                      this list
/reset                     forget the conversation (the system message stays)
/set temperature 0.7       sampling: temperature, top_p, top_k, repetition_penalty, seed, max_new_tokens
/set think on|off|auto     open replies in a <think> block (auto: when the model reasons)
/set reasoning_budget 64   reasoning tokens before </think> is forced (/set reasoning_budget off: no limit)
/show                      the settings in use
/exit, /quit, Ctrl-D       leave
Up/Down recall earlier lines (history kept in the dsedge cache directory); Ctrl-C stops the reply."""

DESCRIPTION = f"""\
Chat with a bundle written by `dsedge export`, on onnxruntime alone. Each line read from stdin is a user
message; the reply streams to stdout and the turn's timings go to stderr. The prompt is the bundle's chat
template (its tokenizer_config.json, else the built-in template of the model's family); the history the
model sees keeps earlier answers only, as R1's template does. {COMMANDS}.

R1-style replies are split into reasoning (<think>…</think>) and answer: on a terminal the reasoning shows
dimmed, otherwise between <think> and </think> lines; --hide-reasoning leaves it out.

With --json nothing streams: at the end one JSON object holds the whole transcript, {{"ok": true, "bundle",
"template", "turns": [{{"conversation", "user", "reasoning", "answer", "text", "token_ids",
"finish_reason", "prompt_tokens", "timings", "prompt"}}, ...]}} ("conversation" counts /reset's). A
transcript whose every turn failed exits non-zero (with "ok": false).

Sampling follows the model's generation_config unless flags (or /set) say otherwise; --greedy is
deterministic. --think auto (default) opens a think block only for a reasoning model (the shipped demo
models record that they are not one, so they answer directly).

examples:
  dsedge chat qwen2-tiny                              a demo model, exported into the store on first use
  dsedge chat demo.bundle --system "Answer briefly." --greedy
  dsedge chat r1.bundle --reasoning-budget 256 --hide-reasoning
  printf 'Tell me about the os module.\\n' | dsedge chat demo.bundle --json
  dsedge chat demo.bundle --index demo.index --show-sources
"""


def register(sub, command) -> None:
    """Add `chat` to the CLI (argparse only)."""
    from dsedge.cli import BUNDLE_HELP, add_engine_flags, add_rag_flags, add_sampling_flags, add_think_flags

    cmd = command(sub, "chat", "interactive multi-turn chat with a bundle", DESCRIPTION, _run_chat, _render_chat)
    cmd.add_argument("bundle", help=BUNDLE_HELP)
    cmd.add_argument("--system", metavar="TEXT", help="system message, kept across /reset")
    cmd.add_argument("--hide-reasoning", action="store_true", help="do not print the <think> reasoning")
    cmd.add_argument("--template", metavar="NAME|FILE",
                     help="chat template instead of the bundle's: deepseek-v2, deepseek-v3, deepseek-r1, r1-distill, "
                          "or a .jinja file")
    cmd.add_argument("-n", "--max-new-tokens", type=int, default=512, metavar="N",
                     help="per reply, capped at the context left (default 512)")
    add_sampling_flags(cmd)
    add_think_flags(cmd)
    add_engine_flags(cmd)
    add_rag_flags(cmd)


class ChatTranscript:
    """What `dsedge chat` returns: the bundle, the template used and every completed turn."""

    def __init__(self, bundle: str, session, errors: list | None = None):
        from dsedge.cli import all_units_failed

        self.bundle, self.session = bundle, session
        # every turn tried failed: the command fails (exit code and "ok": false), as dsedge.cli documents
        self.failure = all_units_failed(errors or [], len(session.turns), "chat turn")

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "template": self.session.template.origin, "turns": self.session.turns}


def _run_chat(args) -> ChatTranscript:
    from dsedge.cli import load_engine, sampling_options
    from dsedge.rag import RagSources
    from dsedge.runtime.chat import ChatSession, reasoning_model

    engine, retriever = load_engine(args)
    sources = RagSources(retriever, args.top_chunks) if retriever is not None else None
    session = ChatSession(engine, system=args.system, template=args.template, max_new_tokens=args.max_new_tokens,
                          sources=sources, force_think=args.think, reasoning_budget=args.reasoning_budget,
                          **sampling_options(args, engine))
    quiet = args.quiet or args.json
    if not quiet:
        model = engine.spec.get("model_type", "?")
        thinks = reasoning_model(engine, session.template)
        _note(f"dsedge chat: {args.bundle} ({model}, {engine.layout}, template: {session.template.origin}, "
              f"think {args.think}{' → on' if thinks and args.think == 'auto' else ''}"
              f"{' → off' if not thinks and args.think == 'auto' else ''}); {COMMANDS}")
    errors: list = []
    lines = LineReader()
    while (line := lines.read()) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text.startswith("/"):
            _command(session, text, quiet)
        elif text:
            error = _turn(session, text, args, quiet)
            if error is not None:
                errors.append(error)
    lines.close()
    return ChatTranscript(args.bundle, session, errors)


# /set keys: what the value parses as, and where it goes (the session's sampling, or the session itself).
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float, "seed": int,
            "max_new_tokens": int, "think": str, "reasoning_budget": int}


def _command(session, text: str, quiet: bool) -> None:
    """A /command line: /help, /reset, /set KEY VALUE, /show; anything else says what exists."""
    words = text.split()
    if words[0] == "/reset":
        session.reset()
        if not quiet:
            _note("(history cleared)")
    elif words[0] in ("/help", "/?"):
        _note(HELP)
    elif words[0] == "/show":
        think = {None: "auto", True: "on", False: "off"}.get(session.force_think, session.force_think)
        _note(f"think {think}, max_new_tokens {session.max_new_tokens}, "
              + ", ".join(f"{k} {v}" for k, v in session.sampling.items() if v is not None))
    elif words[0] == "/set" and len(words) == 3:
        _note(_set(session, words[1], words[2]))
    else:
        _note(f"unknown command {text!r}; {COMMANDS}")


def _set(session, key: str, value: str) -> str:
    """Apply ``/set key value`` to the session; the line that says what happened."""
    from dsedge.runtime.chat import THINK_MODES

    kind = SETTINGS.get(key)
    if kind is None:
        return f"cannot set {key!r}; settable: {', '.join(SETTINGS)}"
    if key == "think":
        if value not in THINK_MODES:
            return f"think is one of {', '.join(THINK_MODES)}"
        session.force_think = value
        return f"think {value}"
    if key == "reasoning_budget" and value in ("off", "none"):
        session.sampling["reasoning_budget"] = None
        return "reasoning budget off"
    try:
        parsed = kind(value)
    except ValueError:
        return f"{key} takes a{'n integer' if kind is int else ' number'}, got {value!r}"
    if key == "max_new_tokens":
        if parsed < 1:
            return "max_new_tokens must be ≥ 1"
        session.max_new_tokens = parsed
    else:
        session.sampling[key] = parsed
    return f"{key} {parsed}"


class LineReader:
    """Lines from stdin. On a terminal: readline editing (arrows, Ctrl-R) and a history file under the dsedge
    cache directory; otherwise plain reads (a pipe gets no prompt and no history)."""

    def __init__(self):
        self.interactive = sys.stdin.isatty()
        self.history = None
        if self.interactive:
            self.history = _history_file()
            self._readline = _with_readline(self.history)

    def read(self) -> str | None:
        if not self.interactive:
            line = sys.stdin.readline()
            return line if line else None
        try:
            return input("> ") if self._readline else _plain_prompt()
        except EOFError:
            print(file=sys.stderr)
            return None

    def close(self) -> None:
        if self.interactive and self._readline and self.history is not None:
            with contextlib.suppress(OSError):  # a read-only cache: history is a convenience
                self._readline.write_history_file(str(self.history))


def _plain_prompt() -> str:
    print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def _history_file():
    from dsedge.store import store_dir

    return store_dir().parent / "chat_history"


def _with_readline(history):
    """The readline module with the history loaded (None where Python has no readline, e.g. Windows)."""
    try:
        import readline  # stdlib; absent on some platforms, where plain lines still work
    except ImportError:
        return None
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(str(history))
        readline.set_history_length(1000)
    except OSError:
        pass
    return readline


def _turn(session, text: str, args, quiet: bool):
    """One exchange, streamed; the UserError that ended it (the session goes on), else None."""
    from dsedge.cli import sources_note
    from dsedge.errors import UserError

    try:
        replies = session.send(text)
        _show(replies, hide_reasoning=args.hide_reasoning, shown=not args.json)
    except UserError as exc:  # e.g. the conversation fills the context: say so and keep the session
        _note(f"error: {exc.message}")
        return exc
    except KeyboardInterrupt:  # Ctrl-C stops this reply (it does not join the history), not the chat
        _note("\n(interrupted)")
        return None
    if getattr(replies.result, "sources", None) is not None:
        sources_note(args, replies.result)
    r = replies.result
    if args.show_sources and getattr(r, "sources", None) is not None and not args.json:
        from dsedge.cli import render_sources

        _write(render_sources(r.sources, r.cited) + "\n")
    if not quiet:
        t = r.timings
        _note(f"[{len(r.token_ids)} tokens, finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens, "
              f"TTFT {t.get('ttft_s', 0) * 1e3:.1f} ms, decode {t.get('decode_tokens_per_s', 0):.1f} tokens/s]")
    return None


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
