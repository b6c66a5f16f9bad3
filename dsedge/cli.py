"""`dsedge` command line: a thin layer over the Python API. Only this module prints.

Exit codes (stable): 0 ok, 1 internal error, 2 usage, 3 bad input, 4 a check failed, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 129 hung up (SIGHUP) — 128 + the signal's number, as shells report it.

With ``--json`` exactly one JSON object goes to stdout for every outcome, usage errors included:
``{"ok": true, ...}`` or ``{"ok": false, "error": {"type", "kind", "message", "where", "hint", "exit_code"}}``.
NaN and ±Infinity (not JSON) are printed as ``null``. ``--help`` and ``--version`` print text.

A result whose every unit failed (e.g. a chat whose every turn failed) sets ``failure`` (a DsedgeError, see
:func:`all_units_failed`): the command then exits with that error's code, and ``--json`` prints the result
with ``"ok": false`` and the error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from dsedge import __version__, progress
from dsedge.errors import DsedgeError, Terminated, UnitsFailed, UsageError
from dsedge.extras import missing_extra
from dsedge.units import size_argument

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
dsedge: make DeepSeek-family checkpoints (V2, V2-Lite, V3, R1 and the R1-Distill Qwen/Llama models)
run fast and small on one card or an edge device.

  dsedge inspect CKPT                  what a checkpoint holds (architecture, routing, parameters, dtypes)
  dsedge plan MODEL --target T         will it fit the device, at which precision, how fast can it decode
  dsedge targets                       the built-in device profiles
  dsedge compress CKPT -o OUT          quantize (int8/int4, RTN/GPTQ) and prune experts, layer by layer
  dsedge export CKPT -o BUNDLE         ONNX bundle (latent MLA cache, exact routing), validated vs PyTorch
  dsedge run MODEL --prompt TEXT       generate from a bundle or a model name (exported once into the store)
  dsedge chat MODEL                    interactive chat with the bundle's template (R1 reasoning shown apart)
  dsedge list / dsedge rm NAME         the bundles in the local store (~/.cache/dsedge/bundles)
  dsedge profile BUNDLE                TTFT, decode tokens/s, time per graph/layer/expert, peak memory
  dsedge index build DOCS -o INDEX     HNSW index of your documents for retrieval-augmented answers
"""

EPILOG = """\
examples:
  dsedge run deepseek-v3-tiny -p "The json module"  # the demo model, exported into the store on first use
  dsedge chat qwen2-tiny
  dsedge plan deepseek-r1 --target gpu-24g        # a published model by short name, no weights needed
  dsedge plan deepseek-r1:7b --target arm-sbc-8g   # ollama's tag: the Qwen 7B distill
  dsedge plan ./DeepSeek-V2-Lite --target arm-sbc-8g --context 2048
  dsedge inspect ./DeepSeek-V2-Lite --json
  dsedge export ./DeepSeek-V2-Lite -o v2lite.bundle --target x86-cpu-16g --max-context 4096

exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 a check failed, 130 interrupted (Ctrl-C),
143 SIGTERM, 129 SIGHUP. With --json: one JSON object on stdout for every outcome (NaN/Infinity as null).
"""


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `dsedge` command (console script, python -m dsedge): the process is ours
        from dsedge.runtime.session import own_process_threads

        own_process_threads()  # partitioned bundles may use one onnxruntime thread pool for the process
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        wants_json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
        return _fail(argparse.Namespace(json=wants_json), exc.to_json(), f"{exc.hint}{exc.where}: error: {exc.what}",
                     exc.exit_code)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(getattr(args, "quiet", False) or getattr(args, "json", False))
    try:
        result = args.handler(args)
    except DsedgeError as exc:
        return _fail(args, exc.to_json(), f"error: {exc.message}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail(args, {"type": "KeyboardInterrupt", "message": "interrupted"}, "interrupted", EXIT_INTERRUPTED)
    except Terminated as exc:  # SIGTERM/SIGHUP during a staged output: it has been cleaned up
        return _fail(args, {"type": "Terminated", "message": str(exc), "signal": exc.signal_name}, str(exc),
                     exc.exit_code)
    except ModuleNotFoundError as exc:  # an extra not installed is the user's to fix, not an internal error
        missing = missing_extra(exc, getattr(args, "command", None))
        if missing is None:
            return _internal_error(args, exc)
        return _fail(args, missing.to_json(), f"error: {missing.message}", missing.exit_code)
    except Exception as exc:  # noqa: BLE001 — the last line of defence: report, never a bare traceback
        return _internal_error(args, exc)
    return _print_result(args, result)


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    detail = traceback.format_exc() if os.environ.get("DSEDGE_DEBUG") else None
    text = (f"internal error: {type(exc).__name__}: {exc}\n"
            "  (set DSEDGE_DEBUG=1 for the traceback; please report it)")
    return _fail(args, {"type": type(exc).__name__, "message": str(exc), "traceback": detail},
                 detail or text, EXIT_INTERNAL)


def _print_result(args: argparse.Namespace, result) -> int:
    """The result on stdout (one JSON object with --json); a result whose every unit failed exits non-zero."""
    failure: DsedgeError | None = getattr(result, "failure", None)
    code = failure.exit_code if failure else EXIT_OK
    notes = getattr(args, "notes", [])
    try:
        if args.json:
            error = {"error": failure.to_json()} if failure else {}
            body = result.to_json()
            if notes:  # caps, roundings and defaults the command applied (also printed on stderr without --json)
                body = {**body, "notes": [*body.get("notes", []), *notes]}
            print(json_text({"ok": failure is None, **body, **error}))
        else:
            args.render(result)
            if failure:
                print(f"error: {failure.message}", file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:  # `dsedge ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def note(args: argparse.Namespace, text: str) -> None:
    """Say a cap, a rounding or a default the command applied: on stderr now (-q too: it is a warning, not
    progress), or in the result's ``notes`` list with --json."""
    if not hasattr(args, "notes"):
        args.notes = []
    args.notes.append(text)
    if not getattr(args, "json", False):
        print(f"note: {text}", file=sys.stderr, flush=True)


def all_units_failed(errors: list[DsedgeError], succeeded: int, unit: str) -> UnitsFailed | None:
    """A result's ``failure``: None unless at least one ``unit`` was tried and every one failed."""
    return UnitsFailed(errors, unit) if errors and not succeeded else None


def _setup_logging(quiet: bool) -> None:
    """Progress goes to stderr (results to stdout), silenced by -q: tqdm bars on a terminal (log lines printed
    above them), plain lines otherwise (dsedge.progress logs them), nothing with -q/--json."""
    renderer = _progress_renderer(quiet)
    progress.use_renderer(renderer)
    handler = _AboveBars(renderer) if isinstance(renderer, progress.TqdmRenderer) else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dsedge")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def _progress_renderer(quiet: bool) -> progress.Renderer:
    if quiet:
        return progress.Silent()
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        try:
            return progress.TqdmRenderer(sys.stderr)
        except ImportError:  # tqdm missing (a bare runtime install): plain lines do
            pass
    return progress.PlainLines()


class _AboveBars(logging.Handler):
    """Log lines on a terminal with bars: written above the bars, which tqdm redraws below."""

    def __init__(self, renderer):
        super().__init__()
        self.renderer = renderer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.renderer.write(self.format(record))
        except Exception:  # noqa: BLE001 — logging's own contract: a failing handler never raises
            self.handleError(record)


def _fail(args: argparse.Namespace, error: dict[str, Any], text: str, code: int) -> int:
    try:
        if getattr(args, "json", False):
            print(json_text({"ok": False, "error": error | {"exit_code": code}}))
        else:
            print(text, file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def json_text(obj: Any) -> str:
    """``obj`` as one line of strict JSON: NaN/±Infinity become null (never the bare tokens NaN/Infinity that
    strict parsers reject), objects with ``to_json`` are expanded, numpy values become Python ones."""
    return json.dumps(_plain(obj), allow_nan=False, ensure_ascii=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, float):  # numpy float64 included (a float subclass)
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _plain(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # arrays and scalars, without importing numpy
        return _plain(obj.tolist())
    if hasattr(obj, "to_json"):
        return _plain(obj.to_json())
    return str(obj)


# --- parser -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing and exiting, so that main reports it (one JSON object with
    --json). Subcommand parsers inherit the class (argparse's add_subparsers uses the parent's type)."""

    def error(self, message: str):
        raise UsageError(message, where=self.prog, hint=self.format_usage())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsedge", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dsedge {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in (_add_inspect, _add_plan, _add_targets, _add_export, _add_run):
        register(sub)
    for module in _command_modules():
        module.register(sub, _command)
    return parser


# Command groups that live next to their code. Each module defines ``register(sub, command)`` (argparse only,
# no heavy imports at module level) and its handlers/renderers; printing is allowed there as in this module.
COMMAND_MODULES = (
    "dsedge.cli_compress",
    "dsedge.cli_chat",
    "dsedge.cli_profile",
    "dsedge.cli_index",
    "dsedge.cli_serve",
    "dsedge.cli_completion",
    "dsedge.cli_store",
)


def _command_modules():
    for name in COMMAND_MODULES:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: surface it
                raise


def _command(sub, name: str, help_text: str, description: str, handler: Callable, render: Callable):
    cmd = sub.add_parser(name, help=help_text, description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.set_defaults(command=name)
    cmd.add_argument("--json", action="store_true", help="print one JSON object on stdout (also on failure)")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    cmd.set_defaults(handler=handler, render=render)
    return cmd


def _add_inspect(sub) -> None:
    cmd = _command(sub, "inspect", "describe a checkpoint directory",
                   "Describe a Hugging Face checkpoint directory: architecture and routing variant, parameter\n"
                   "counts (total, active per token, per component), on-disk dtypes and bytes, whether the MTP\n"
                   "layer is stored, and whether a tokenizer and chat template are present. Reads only\n"
                   "config.json and the safetensors headers, and checks every tensor's name, shape and dtype.\n\n"
                   "examples:\n"
                   "  dsedge inspect deepseek-v3-tiny                 a shipped demo model\n"
                   "  dsedge inspect deepseek-ai/DeepSeek-V2-Lite     a repo id from the local Hugging Face cache\n"
                   "  dsedge inspect ./my-checkpoint --json",
                   _run_inspect, _render_inspect)
    cmd.add_argument("checkpoint", help=CHECKPOINT_HELP)
    cmd.add_argument("--no-validate", action="store_true", help="skip checking tensors against config.json")


def _add_plan(sub) -> None:
    cmd = _command(sub, "plan", "will a model fit a device, and how fast can it decode",
                   "From config.json alone (no weights needed): weight bytes at bf16 / int8 / int4 / int4-experts,\n"
                   "KV-cache bytes per token and at the context length (latent MLA cache vs a naive per-head\n"
                   "cache), whether it fits the target's memory budget, how many routed experts can stay\n"
                   "resident otherwise, and an upper bound on decode tokens/s from memory bandwidth.\n\n"
                   "examples:\n"
                   "  dsedge plan deepseek-r1 --target gpu-24g\n"
                   "  dsedge plan deepseek-ai/DeepSeek-R1 --target x86-cpu-16g   a repo id (cache or published)\n"
                   "  dsedge plan deepseek-r1:7b --target arm-sbc-8g             ollama's tag: the Qwen 7B distill\n"
                   "  dsedge plan ./DeepSeek-V2-Lite --target auto --context 2048",
                   _run_plan, _render_plan)
    cmd.add_argument("model", help="checkpoint directory, config.json path, a Hugging Face repo id (local cache, "
                                   "else its published config), or a published name: deepseek-v3, deepseek-r1, "
                                   "deepseek-v2, deepseek-v2-lite, r1-distill-qwen-1.5b, r1-distill-qwen-7b, "
                                   "r1-distill-llama-8b (ollama tags such as deepseek-r1:7b too)")
    cmd.add_argument("--target",
                     help="device target: a built-in name (see `dsedge targets`), `auto` or a .toml/.json file")
    cmd.add_argument("--context", type=int, help="context length in tokens (default: the target's max_context)")


def _add_targets(sub) -> None:
    cmd = _command(sub, "targets", "list the built-in device targets",
                   "List the built-in device profiles, or show one in full. A target file of your own (same\n"
                   "fields, TOML or JSON) is accepted anywhere a target name is, and so is `auto` (this machine:\n"
                   "usable cores, memory under any cgroup limit, onnxruntime's providers, GPU memory, a short\n"
                   "memory-copy probe for bandwidth).\n\n"
                   "examples:\n"
                   "  dsedge targets                 every built-in target\n"
                   "  dsedge targets --detect        what `--target auto` finds on this machine\n"
                   "  dsedge targets x86-cpu-16g --json", _run_targets, _render_targets)
    cmd.add_argument("name", nargs="?", help="show one target (a built-in name, `auto` or a file path)")
    cmd.add_argument("--detect", action="store_true", help="show the target detected for this machine (= auto)")


def _add_export(sub) -> None:
    cmd = _command(sub, "export", "export a checkpoint to a validated ONNX bundle",
                   "Export a checkpoint to an ONNX bundle: one decoder graph for prefill and decode with explicit\n"
                   "cache inputs/outputs (DeepSeek: the absorbed MLA latent cache, kv_lora + rope values per token\n"
                   "per layer), exact DeepSeek routing, routed experts computed only on their tokens, plus the\n"
                   "tokenizer, chat template and a manifest with every file's sha256. The bundle is checked in\n"
                   "onnxruntime against the PyTorch reference (prefill logits, 16 greedy tokens, decode through\n"
                   "the cache, batch 2 with left padding); a miss fails with exit code 4 and writes nothing.\n"
                   "A checkpoint written by `dsedge compress` exports its int8/int4 linears as MatMulNBits over the\n"
                   "stored integers (repacked, never re-quantized) and is validated against its dequantized\n"
                   "weights.\n\n"
                   "examples:\n"
                   "  dsedge export deepseek-v3-tiny -o demo.bundle\n"
                   "  dsedge export demo.ckpt -o demo.bundle --layout partitioned --target x86-cpu-16g\n"
                   "  dsedge export ./DeepSeek-V2-Lite -o v2lite.bundle --dtype fp16 --max-context 4096",
                   _run_export, _render_export)
    cmd.add_argument("checkpoint", help=CHECKPOINT_HELP)
    cmd.add_argument("-o", "--output", required=True, help="bundle directory to write")
    cmd.add_argument("--target", help="device target (name, file or `auto`): sets the default max context")
    cmd.add_argument("--layout", default="monolithic", choices=["monolithic", "partitioned"],
                     help="monolithic: one graph. partitioned: a trunk (one graph per layer) plus routed experts in "
                          "their own partitions and data files, placed resident or on demand for the target's "
                          "memory budget (default monolithic)")
    cmd.add_argument("--experts-per-partition", type=int, metavar="N",
                     help="routed experts per partition (default: sized to 1/64 of the target's budget, else 64 MiB)")
    cmd.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                     help="fp32 (default) or fp16 weights, activations and cache (norms, softmax, router and expert "
                          "sums stay fp32); validated to 1e-4 / 5e-3 max abs logit error")
    cmd.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                     help="compressed checkpoints: MatMulNBits compute precision. 4 (default) quantizes activations "
                          "to int8 inside the kernel (the fast CPU path; validated to 5%% of the logit range), and "
                          "runs MLA's absorbed per-head products int8 (activations per row); 0 computes in float "
                          "(exact vs the dequantized reference, slower)")
    cmd.add_argument("--quantize-embedding", choices=["int8", "int4", "none"],
                     help="token embedding as GatherBlockQuantized (int8 per row, int4 groups of 32; a tied head "
                          "reads the same codes through MatMulNBits); default: what the compress recipe recorded, "
                          "else kept float")
    cmd.add_argument("--max-context", type=int, help="longest prompt + generation the bundle serves (default: "
                                                     "the target's max_context, else 4096)")
    cmd.add_argument("--index", metavar="INDEX", help="embed this retrieval index (`dsedge index build`) in the "
                                                     "bundle; `dsedge run/chat --rag` then answer from it")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    cmd.add_argument("--no-validate", action="store_true", help="skip the check against the PyTorch reference")


def _add_run(sub) -> None:
    cmd = _command(sub, "run", "generate text from a bundle",
                   "Generate from a bundle written by `dsedge export`, on onnxruntime alone (no torch). Text streams\n"
                   "to stdout as it is produced; timings go to stderr. Sampling follows the model's own\n"
                   "generation_config (temperature, top_p, repetition penalty) unless flags say otherwise;\n"
                   "--greedy decodes deterministically, a --seed makes sampling reproducible. With --json, one\n"
                   "object with the text, token ids, finish reason (eos, stop, length) and timings is printed at\n"
                   "the end instead. A model name (not a directory) is looked up in the bundle store and, the\n"
                   "first time, exported into it (`dsedge list`, `dsedge rm NAME`).\n\n"
                   "examples:\n"
                   "  dsedge run deepseek-v3-tiny -p \"The json module\"           exported into the store once\n"
                   "  dsedge run demo.bundle -p \"The json module\" -n 60 --greedy\n"
                   "  echo \"The os module\" | dsedge run demo.bundle -p -          the prompt from stdin\n"
                   "  dsedge run demo.bundle --index demo.index --show-sources -p \"What was the model trained on?\"",
                   _run_run, _render_run)
    cmd.add_argument("bundle", help=BUNDLE_HELP)
    cmd.add_argument("-p", "--prompt", required=True,
                     help="prompt text, or - to read it from stdin (raw, no chat template; with --index/--rag: the "
                          "question, sent through the bundle's chat template with the retrieved sources)")
    cmd.add_argument("-n", "--max-new-tokens", type=int, default=128, metavar="N",
                     help="default 128; capped (with a note) at the context the prompt leaves")
    add_sampling_flags(cmd)
    add_think_flags(cmd)
    add_engine_flags(cmd)
    add_rag_flags(cmd)


CHECKPOINT_HELP = ("checkpoint directory (config.json + *.safetensors), a shipped demo model name (deepseek-v3-tiny, "
                   "qwen2-tiny) or a Hugging Face repo id in the local Hugging Face cache (offline)")
BUNDLE_HELP = ("bundle directory, or a model name: a stored bundle (`dsedge list`), else a demo model or a Hugging "
               "Face repo id from the local cache, exported into the store on first use")


def add_think_flags(cmd) -> None:
    """R1 reasoning (chat, and run with --index/--rag): whether the reply opens a think block, and its length."""
    cmd.add_argument("--think", choices=["auto", "on", "off"], default="auto",
                     help="open the reply in a <think> block: auto (default) when the model is a reasoning model "
                          "(its record, else an R1-family template), on, or off (answer directly)")
    cmd.add_argument("--reasoning-budget", type=int, metavar="N",
                     help="reasoning tokens allowed; then </think> is forced and the answer follows")


def add_rag_flags(cmd) -> None:
    """Retrieval-augmented generation (run, chat): which index, how many chunks, whether to list sources."""
    cmd.add_argument("--index", metavar="INDEX", help="answer from this index (`dsedge index build`): the top "
                                                     "chunks go into the prompt as numbered sources")
    cmd.add_argument("--rag", action="store_true", help="answer from the index embedded in the bundle "
                                                        "(`dsedge export --index`)")
    cmd.add_argument("-k", "--top-chunks", type=int, default=5, metavar="K",
                     help="chunks retrieved per question (default 5; fewer if the context cannot hold them)")
    cmd.add_argument("--show-sources", action="store_true", help="list the sources the model was given")


def add_sampling_flags(cmd) -> None:
    """Sampling flags shared by run and chat (names match ``Engine.generate``'s keywords)."""
    cmd.add_argument("--temperature", type=float,
                     help="0 = greedy (default: the model's generation_config, else 0)")
    cmd.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off; default: the model's)")
    cmd.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off; default: the model's)")
    cmd.add_argument("--repetition-penalty", type=float,
                     help="CTRL-style penalty (1 = off; default: the model's generation_config, else 1)")
    cmd.add_argument("--greedy", action="store_true",
                     help="deterministic: always the most likely token (drops the model's temperature/top-p/top-k; "
                          "keeps its repetition penalty)")
    cmd.add_argument("--seed", type=int, help="seed for reproducible sampling")
    cmd.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")


def add_engine_flags(cmd, *, threads_list: bool = False) -> None:
    """How a bundle is loaded (``load_bundle``'s keywords): target, threads, expert budget and prefetch.
    ``threads_list``: -t takes a comma list (profile sweeps)."""
    cmd.add_argument("--target", help="device target: execution providers and threads (a built-in name, a file, "
                                      "or `auto` for this machine; default: the bundle's export target)")
    if threads_list:
        cmd.add_argument("-t", "--threads", type=int_list, metavar="N[,N...]",
                         help="intra-op threads, or a comma list to sweep (default: the target's, capped at the cores)")
    else:
        cmd.add_argument("-t", "--threads", type=int, help="intra-op threads (default: the target's, capped at the "
                                                           "cores)")
    cmd.add_argument("--memory-budget", type=size_argument, metavar="SIZE",
                     help="partitioned bundles: expert partitions kept loaded, e.g. 2G or 512M (LRU beyond)")
    cmd.add_argument("--prefetch-experts", action="store_true",
                     help="partitioned bundles: load the next layer's likely partitions in the background")
    cmd.add_argument("--graph-by-graph", action="store_true",
                     help="partitioned bundles: run the prelude, each layer, its experts and the head as separate "
                          "sessions even when every expert is resident (default then: one graph composed of them)")
    cmd.add_argument("--verify", action="store_true",
                     help="hash every bundle (and index) file now, ignoring the record of earlier verifications "
                          "(by default a file is hashed when first opened, unless unchanged since it last matched)")
    # profile measures what it is told (default off); run and chat default to auto, measured faster on the
    # demo bundles' greedy decoding and never changing output (README: Speculative decoding)
    cmd.add_argument("--speculative", choices=["off", "auto", "ngram", "mtp"],
                     default="off" if threads_list else "auto",
                     help="speculative decoding: draft tokens by copying from the prompt and output (ngram) or with "
                          "the bundle's MTP head (mtp); the model verifies them, so greedy output is unchanged. "
                          "auto: prompt lookup while decoding greedily, paused after rejected drafts (default for "
                          "run and chat; profile: off)")
    cmd.add_argument("--draft-tokens", type=int, metavar="K",
                     help="tokens drafted per verify step (default 3 for ngram, 1 for mtp)")


def int_list(text: str) -> list[int]:
    """``128,512`` -> [128, 512] (llama-bench's comma lists), each ≥ 1."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 128,512; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers ≥ 1 separated by commas, got {text!r}")
    return values


# --- handlers -----------------------------------------------------------------------------------

def _run_inspect(args):
    from dsedge.inspection import inspect_checkpoint

    return inspect_checkpoint(args.checkpoint, validate=not args.no_validate)


def _run_plan(args):
    from dsedge.planning import plan
    from dsedge.sources import resolve_model_name

    return plan(resolve_model_name(args.model), target=args.target, context=args.context)


class _TargetList:
    def __init__(self, targets):
        self.targets = targets

    def to_json(self):
        return {"targets": [t.to_json() | {"name": t.name} for t in self.targets]}


def _run_targets(args):
    from dsedge.targets import list_targets, load_target

    if args.detect:
        return _TargetList([load_target("auto")])
    return _TargetList([load_target(args.name)] if args.name else list_targets())


def _run_export(args):
    from dsedge.export.bundle import export_bundle

    return export_bundle(args.checkpoint, args.output, target=args.target, layout=args.layout, dtype=args.dtype,
                         max_context=args.max_context, overwrite=args.overwrite, validate=not args.no_validate,
                         experts_per_partition=args.experts_per_partition, accuracy_level=args.accuracy_level,
                         index=args.index, quantize_embedding=args.quantize_embedding)


def load_engine(args):
    """load_bundle from the engine flags, and the retriever the RAG flags ask for (run, chat): (engine, retriever
    or None). The index is opened (and verified) now, so a bad one fails before the first question.

    ``args.bundle`` may be a model name (dsedge.store). Without --target the bundle's export target is used,
    else this machine's (`auto`)."""
    from dsedge.errors import UserError
    from dsedge.rag import open_retriever
    from dsedge.runtime import load_bundle
    from dsedge.runtime.speculative import configure
    from dsedge.store import resolve_bundle

    bundle = resolve_bundle(args.bundle)
    engine = load_bundle(bundle, target=args.target or default_target(bundle), threads=args.threads,
                         memory_budget_bytes=args.memory_budget, prefetch_experts=args.prefetch_experts,
                         verify="full" if args.verify else True, compose=not args.graph_by_graph)
    configure(engine, args.speculative, args.draft_tokens)
    retriever = open_retriever(engine, args.index) if (args.index or args.rag) else None
    if args.rag and retriever is None:
        raise UserError("this bundle has no embedded index", where=args.bundle,
                        hint="pass --index INDEX, or re-export with `dsedge export ... --index INDEX`")
    if getattr(args, "show_sources", False) and retriever is None:
        note(args, "--show-sources has no effect without --index INDEX or --rag: there are no sources")
    return engine, retriever


def default_target(bundle):
    """The target a bundle runs on without --target: the one it was exported for, else this machine (`auto`)."""
    from pathlib import Path

    from dsedge.targets import parse_target

    try:
        recorded = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8")).get("target")
        return parse_target(recorded, where="manifest.json target") if isinstance(recorded, dict) else "auto"
    except (OSError, ValueError, AttributeError, DsedgeError):  # an old or odd record: this machine's defaults
        return "auto"


def sampling_options(args, engine) -> dict[str, Any]:
    """``Engine.stream`` sampling keywords: the flags given, else the model's generation_config, else greedy
    with no penalty. --greedy drops the model's temperature/top-p/top-k (its repetition penalty stays)."""
    from dsedge.runtime.chat import model_sampling

    flags = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")
             if getattr(args, k, None) is not None}
    model = model_sampling(engine)
    if args.greedy:
        if flags.get("temperature"):
            raise UsageError("--greedy and --temperature > 0 contradict each other", where="--greedy",
                             hint="drop one of them")
        flags["temperature"] = 0.0
    if flags.get("temperature") == 0.0:  # greedy: the model's temperature/top-p/top-k do not apply
        model = {k: v for k, v in model.items() if k == "repetition_penalty"}
    chosen = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0} | model | flags
    from_model = {k: v for k, v in model.items() if k not in flags}
    if from_model:
        said = ", ".join(f"{k} {v:g}" for k, v in from_model.items())
        hint = "; --greedy for deterministic output" if chosen["temperature"] > 0 else ""
        note(args, f"sampling: {said} (the model's generation_config){hint}")
    return chosen | {"seed": args.seed, "stop": args.stop}


def read_prompt(args) -> str:
    """``-p -`` reads the prompt from stdin (as llama.cpp's ``-f -``, mlx-lm's ``--prompt -``)."""
    if args.prompt != "-":
        return args.prompt
    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("-p - read an empty prompt from stdin", where="--prompt", hint="pipe some text in")
    return text.rstrip("\n")


def capped_new_tokens(args, engine, prompt_tokens: int) -> int:
    """``-n``, capped (with a note) at the room the bundle's context leaves after the prompt."""
    from dsedge.errors import UserError

    room = engine.max_context - prompt_tokens
    if room < 1:
        raise UserError(f"the prompt ({prompt_tokens} tokens) fills the bundle's max context of "
                        f"{engine.max_context}", where="--prompt",
                        hint="shorten the prompt, or re-export with a larger --max-context (up to the model's "
                             f"max_position_embeddings, {engine.spec.get('max_position_embeddings', '?')})")
    if args.max_new_tokens > room:
        note(args, f"-n {args.max_new_tokens} capped at {room}: the prompt's {prompt_tokens} tokens leave that much "
                   f"of the bundle's {engine.max_context}-token context")
        return room
    return args.max_new_tokens


def _run_run(args):
    from dsedge.errors import UserError

    engine, retriever = load_engine(args)
    args.prompt = read_prompt(args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}", where="--max-new-tokens")
    if retriever is not None:
        return _run_rag(engine, retriever, args)
    if args.reasoning_budget is not None or args.think != "auto":
        note(args, "--think/--reasoning-budget apply to chat templates (chat, run --index/--rag); run -p is raw text")
    ids = engine.codec.encode(args.prompt) if engine.codec is not None else None
    max_new = capped_new_tokens(args, engine, len(ids)) if ids else args.max_new_tokens
    stream = engine.stream(ids or args.prompt, max_new, **sampling_options(args, engine))
    for event in stream:
        if not args.json:
            print(event.text, end="", flush=True)
    return stream.result


# --- rendering ----------------------------------------------------------------------------------

def _render_inspect(r) -> None:
    from dsedge.render import render_inspect

    print(render_inspect(r))


def _render_plan(r) -> None:
    from dsedge.render import render_plan

    print(render_plan(r))


def _render_export(r) -> None:
    from dsedge.render import render_export

    print(render_export(r))


def _run_rag(engine, retriever, args):
    from dsedge.rag import ask

    max_new = min(args.max_new_tokens, engine.max_context // 2)
    if max_new < args.max_new_tokens:
        note(args, f"-n {args.max_new_tokens} capped at {max_new}: half the bundle's {engine.max_context}-token "
                   "context stays for the sources")
    replies = ask(engine, args.prompt, retriever=retriever, k=args.top_chunks, max_new_tokens=max_new,
                  stream=True, force_think=args.think, reasoning_budget=args.reasoning_budget,
                  **sampling_options(args, engine))
    for piece in replies:
        if not args.json:
            print(piece.text, end="", flush=True)
    result = replies.result
    result.show_sources = args.show_sources
    sources_note(args, result)
    return result


def sources_note(args, result) -> None:
    """Say when fewer sources than -k went into the prompt (the context could not hold them)."""
    given, dropped = len(getattr(result, "sources", [])), getattr(result, "dropped", 0)
    if dropped:
        note(args, f"{given} of the {given + dropped} retrieved sources fit in the context (-k {args.top_chunks}); "
                   "lower -n or re-export with a larger --max-context for more")


def render_sources(sources: list[dict], cited: list[int]) -> str:
    lines = ["sources:"]
    for s in sources:
        mark = "*" if s["number"] in cited else " "
        lines.append(f" {mark}[{s['number']}] {s['source']}:{s['start']}-{s['end']}  (score {s['score']:.3f})")
    return "\n".join(lines)


def _render_run(r) -> None:
    print()
    if getattr(r, "show_sources", False):
        print(render_sources(r.sources, r.cited))
    t = r.timings
    print(f"[{len(r.token_ids)} tokens, finish: {r.finish_reason}; prompt {r.prompt_tokens} tokens, "
          f"TTFT {t.get('ttft_s', 0) * 1e3:.1f} ms, decode {t.get('decode_tokens_per_s', 0):.1f} tokens/s]",
          file=sys.stderr)


def _render_targets(r) -> None:
    from dsedge.render import render_targets

    print(render_targets(r.targets))


if __name__ == "__main__":
    raise SystemExit(main())
