"""`dsedge compress`: argparse registration, handler and rendering (a thin layer over
:func:`dsedge.compress.pipeline.compress`). No heavy imports at module level: `--help` stays fast."""

from __future__ import annotations

DESCRIPTION = """\
Compress a checkpoint for a smaller device: calibrate on text, optionally prune routed experts, and
quantize weights to int8/int4 (RTN or GPTQ), streaming one decoder layer at a time from the shards
(FP8 checkpoints are dequantized on the fly), so peak memory is one layer plus activations.

The output is a Hugging Face checkpoint directory: quantized linears in the compressed-tensors
pack-quantized format (what vLLM/SGLang load) with quantization_config in config.json, everything else
in its original dtype, the tokenizer files, recipe.json, and compress_report.json (per-layer weight SQNR,
bytes before/after, experts kept, routing counts, calibration, held-out perplexity of the original and
compressed model, top-1 agreement, time and peak RSS). It is written to a temporary sibling directory
and renamed when complete: an interrupted run leaves nothing.

calibration: the built-in text (Python 3.11 documentation pages, PSF license; see
dsedge/compress/data/SOURCE.md) or --calib FILE (UTF-8). The first --calib-tokens tokens calibrate;
the last --heldout-tokens (never used to calibrate) measure quality. Every routed expert is run on every
calibration token for its GPTQ statistics while the forward combines only routed outputs, so an expert the
router rarely or never picks is calibrated too (and never wiped); --expert-statistics routed uses only the
tokens routed to each expert instead. Layers are calibrated on the outputs of the already compressed layers
before them (GPTQ's sequential practice). GPTQ: Frantar et al., arXiv:2210.17323.

expert pruning (--prune-experts F): per MoE layer, remove floor(F x experts) routed experts, rounded to
the same number in every router group, lowest REAP saliency first (mean over routed tokens of gate
weight x |expert output|, arXiv:2510.13999; routing frequency breaks ties). Router rows and V3's
e_score_correction_bias are sliced, experts renumbered, n_routed_experts updated, and the kept original
expert ids recorded in config.json (dsedge_pruning) and the report. A fraction that would leave top-k
unreachable is refused.
"""


def _epilog() -> str:
    from dsedge.compress.recipes import PRESETS

    width = max(map(len, PRESETS))
    presets = "\n".join(f"  {name:<{width}}  {text}" for name, text in PRESETS.items())
    return f"""\
recipe presets (--recipe NAME):
{presets}
  Router (and its bias), norms, embeddings and the LM head are never quantized.
  Default without --recipe: the --target's best fit (via `dsedge plan`), else int4-experts (MoE) / int8 (dense).

recipe file (--recipe FILE.json or FILE.toml): ordered rules, first match wins; match is an exact module
name (weight name without .weight) or re:<regex> (full match); quant null (TOML: "none") keeps a module.
  {{"name": "mine", "method": "gptq", "rules": [
     {{"match": "re:.*\\\\.mlp\\\\.experts\\\\.\\\\d+\\\\.(gate|up|down)_proj",
      "quant": {{"bits": 4, "group_size": 64}}}},
     {{"match": "re:.*self_attn.*", "quant": {{"bits": 8}}}},
     {{"match": "re:.*", "quant": null}}]}}
  quant keys: bits (4|8), group_size (int or null = per channel), symmetric, method (rtn|gptq), act_order, damp.

examples:
  dsedge compress deepseek-v3-tiny -o v3-int4 --recipe int4-experts
  dsedge compress ./DeepSeek-V2-Lite -o v2lite-int4 --target x86-cpu-16g --calib my_docs.txt
  dsedge compress ./R1-Distill-Qwen-7B -o qwen7b-int8 --recipe int8 --method rtn
  dsedge compress deepseek-v3-tiny -o v3-pruned --recipe none --prune-experts 0.25 --json

exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input (checkpoint, recipe, calibration text,
prune fraction, existing output), 130 interrupted.
"""


def register(sub, command) -> None:
    import argparse

    cmd = command(sub, "compress", "quantize (int8/int4, RTN/GPTQ) and prune experts, streamed layer by layer",
                  DESCRIPTION, _run, _render)
    cmd.epilog = _epilog()
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.add_argument("checkpoint", help="checkpoint directory (config.json + *.safetensors + tokenizer.json) or a "
                                        "shipped demo model name (deepseek-v3-tiny, qwen2-tiny)")
    cmd.add_argument("-o", "--output", required=True, help="directory to write the compressed checkpoint to")
    cmd.add_argument("-r", "--recipe", help="preset name or recipe file (.json/.toml); see below")
    cmd.add_argument("--target",
                     help="device target (name, file or `auto`): picks the recipe when --recipe is not given")
    cmd.add_argument("--calib", metavar="FILE", help="UTF-8 calibration text (default: the built-in text)")
    cmd.add_argument("--calib-tokens", type=int, default=8192, metavar="N",
                     help="calibration tokens (default 8192)")
    cmd.add_argument("--heldout-tokens", type=int, default=4096, metavar="N",
                     help="held-out tokens for the quality report, from the end of the text (default 4096)")
    cmd.add_argument("--seq-len", type=int, default=512, metavar="N",
                     help="calibration window length (default 512, capped by the model's context)")
    cmd.add_argument("--prune-experts", type=float, default=0.0, metavar="F",
                     help="fraction of routed experts to remove per MoE layer (default 0)")
    cmd.add_argument("--method", choices=["rtn", "gptq"], help="override the recipe's quantization method")
    cmd.add_argument("--expert-statistics", choices=["all-tokens", "routed"], default="all-tokens",
                     help="GPTQ statistics of routed experts: every calibration token (default; each expert run on "
                          "all tokens, only routed outputs combined) or only the tokens routed to it")
    cmd.add_argument("--min-expert-tokens", type=int, default=16, metavar="N",
                     help="with --expert-statistics routed: fewer routed tokens than this -> all tokens (default 16)")
    cmd.add_argument("--no-eval", action="store_true", help="skip the held-out quality report")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _run(args):
    from dsedge.compress.pipeline import compress

    if args.prune_experts:
        _say_prune_rounding(args)
    return compress(args.checkpoint, args.output, recipe=args.recipe, target=args.target, calib=args.calib,
                    calib_tokens=args.calib_tokens, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len,
                    prune_experts=args.prune_experts, method=args.method, overwrite=args.overwrite,
                    evaluate=not args.no_eval, expert_statistics=args.expert_statistics,
                    min_expert_tokens=args.min_expert_tokens)


def _say_prune_rounding(args) -> None:
    """--prune-experts F removes whole experts per group: say what F becomes when that is not F exactly
    (12 experts in 4 groups at 0.25: 3 → 1 per group → 4 removed, 33%)."""
    from dsedge.cli import note
    from dsedge.compress.pruning import plan_pruning
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.sources import resolve_checkpoint

    prune = plan_pruning(Checkpoint(resolve_checkpoint(args.checkpoint)).spec.moe, args.prune_experts)
    removed = prune.n_group * prune.per_group_removed
    actual = removed / prune.experts_before
    if abs(actual - args.prune_experts) > 1e-9:
        note(args, f"--prune-experts {args.prune_experts:g} removes {removed} of {prune.experts_before} routed "
                   f"experts per layer ({actual:.0%}): whole experts, the same number in each of the "
                   f"{prune.n_group} routing groups")


def _render(report) -> None:
    print(report.summary())
