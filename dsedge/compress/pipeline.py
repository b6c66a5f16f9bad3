"""`dsedge compress`: calibrate, prune routed experts and quantize, streamed one decoder layer at a time.

For each decoder layer, in order (DESIGN.md §5):

1. read the layer's tensors from the shards and build transformers' own decoder layer with them
   (:mod:`.layers`), so the forward is the reference's; its linear weights are *held as stored* (bf16/fp16,
   FP8 with its block scales) and upcast to float32 one module / one expert at a time (:mod:`.held`), to the
   very values a float32 read gives, so every result below is what a float32 layer computes;
2. run the calibration hidden states through it with the *original* weights, collecting each selected
   linear's GPTQ Hessian and, for MoE layers, the router's choices (:mod:`.calibration`);
3. MoE layers: routing counts and REAP saliency for every routed expert, then pruning (:mod:`.pruning`);
   each kept expert's Hessians from its routed tokens (all tokens when too few were routed to it);
4. quantize every linear the recipe selects (RTN or GPTQ, :mod:`.quant`), a module or a row-stacked group
   at a time, pack it (:mod:`dsedge.quantformat.packing`) and hand it to the shard writer at once; its held
   weight becomes its bit-packed integers (the original's bytes are freed module by module);
5. the layer now computes with the dequantized weights (pruned: rebuilt smaller over the same held weights);
   run the calibration states through it:
   the next layer is calibrated on what the *compressed* model feeds it — GPTQ's sequential practice
   (arXiv:2210.17323 §4, "quantize one layer, then pass the quantized outputs on"), so each layer corrects
   for the error before it. Held-out windows go through both the original and the compressed layer,
   which yields the quality report at the end without holding either model;
6. write the layer's unquantized tensors (norms, router, ignored linears), free it.

Peak memory: the largest layer *as stored* (a DeepSeek-V3 MoE layer: 10.5 GiB FP8, not 42 GiB float32), one
module or joint GPTQ group in float32 with its Hessian, the calibration and held-out hidden states, and one
buffered output shard (``max_shard_bytes``). tests/test_compress_memory.py holds the peak to the stored size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsedge.compress import calibration as cal
from dsedge.compress.held import Held, HeldExperts, HeldQuantized, LazyStored, SpilledQuantized, SpillFile, is_held
from dsedge.compress.layers import LayerRunner, build_layer, classes_for, final_norm, hf_config
from dsedge.compress.pruning import PrunePlan, choose_kept, plan_pruning, prune_state
from dsedge.compress.quant import (
    ROW_BLOCK_ELEMENTS,
    HessianAccumulator,
    quantize,
    quantize_by_rows,
    sqnr_db,
    sqnr_db_of_blocks,
)
from dsedge.compress.recipes import EMBEDDING, load_recipe
from dsedge.compress.report import REPORT_FILE, CompressReport, quality
from dsedge.compress.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardWriter,
    check_compressed_output,
    compressed_output,
    copy_tokenizer_files,
    write_json,
)
from dsedge.errors import UserError
from dsedge.models.checkpoint import FP8_DTYPE, Checkpoint, torch_dtype
from dsedge.models.routing import write_frequencies
from dsedge.planning import plan
from dsedge.progress import progress
from dsedge.quantformat.config import EXPORT_EMBEDDING_KEY, quantization_config, stored_group
from dsedge.quantformat.packing import pack
from dsedge.quantformat.tensor import QuantizedTensor, dequantize
from dsedge.rss import peak_rss_bytes
from dsedge.sources import resolve_checkpoint

log = logging.getLogger("dsedge")

DEFAULT_CALIB_TOKENS = 8192
DEFAULT_HELDOUT_TOKENS = 4096
DEFAULT_SEQ_LEN = 512
MIN_EXPERT_TOKENS = 16
EXPERT_STATISTICS = ("all-tokens", "routed")
MAX_JOINT_ROWS = 16384  # rows of expert gate/up weights GPTQ-quantized together on one shared Hessian
RECIPE_FILE = "recipe.json"


def compress(checkpoint: str | Path, output: str | Path, *, recipe: str | Path | None = None,
             target: str | Path | None = None, calib: str | Path | None = None,
             calib_tokens: int = DEFAULT_CALIB_TOKENS, heldout_tokens: int = DEFAULT_HELDOUT_TOKENS,
             seq_len: int = DEFAULT_SEQ_LEN, prune_experts: float = 0.0, method: str | None = None,
             overwrite: bool = False, evaluate: bool = True, expert_statistics: str = "all-tokens",
             min_expert_tokens: int = MIN_EXPERT_TOKENS, batch_size: int = 8,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> CompressReport:
    """Compress a checkpoint directory (or demo model name) into ``output``, one decoder layer at a time.

    ``recipe``: a preset name (``int8``, ``int4``, ``int4-g32``, ``int4-g128``, ``int4-experts``, ``fp16``, or
    ``none`` to only prune; see ``dsedge.compress.recipes.PRESETS``) or a recipe .json/.toml file; without
    one, ``target`` picks the preset that fits the device (:func:`recipe_for_target`), else ``int4-experts``
    (``int8`` for dense models). ``method`` (``rtn`` or ``gptq``) overrides the recipe's. ``calib``: a UTF-8
    text file (default: the built-in text); the first ``calib_tokens`` tokens calibrate, the last
    ``heldout_tokens`` measure quality (``evaluate``). ``expert_statistics``: GPTQ statistics of routed
    experts from ``all-tokens`` (every expert run on every calibration token; the forward still combines only
    routed outputs) or ``routed`` (the tokens routed to it, all tokens below ``min_expert_tokens``).
    ``prune_experts``: fraction of routed experts removed per MoE layer. The output is written to a
    temporary sibling directory and renamed when complete; an existing ``output`` is refused unless
    ``overwrite``.
    """
    started = time.perf_counter()
    ckpt = Checkpoint(resolve_checkpoint(checkpoint))
    out = Path(output)
    check_compressed_output(out, source=ckpt.path, overwrite=overwrite)
    if method is not None and method not in ("rtn", "gptq"):
        raise UserError(f"--method must be rtn or gptq, got {method!r}")
    if expert_statistics not in EXPERT_STATISTICS:
        raise UserError(f"--expert-statistics must be one of {', '.join(EXPERT_STATISTICS)}, "
                        f"got {expert_statistics!r}")
    chosen = resolve_recipe(recipe, target, ckpt, method)
    prune = plan_pruning(ckpt.spec.moe, prune_experts)
    calibset = cal.load_calibration(_tokenizer(ckpt), calib, calib_tokens=calib_tokens,
                                    heldout_tokens=heldout_tokens,
                                    seq_len=min(seq_len, ckpt.spec.max_position_embeddings))
    log.info("compress %s: %s, %d calibration tokens (%s), %d held-out", ckpt.path,
             chosen.name, calibset.calib.numel(), calibset.source,
             calibset.heldout.numel() if evaluate else 0)
    with compressed_output(out, source=ckpt.path, overwrite=overwrite) as tmp:
        run = _Run(ckpt, chosen, prune, calibset, evaluate=evaluate,
                   min_expert_tokens=None if expert_statistics == "all-tokens" else min_expert_tokens,
                   batch_size=batch_size)
        run.write(tmp, max_shard_bytes)
        report = run.report(out, started, tmp)
        write_json(tmp / REPORT_FILE, report.to_json())
    return report


# --- recipe choice ------------------------------------------------------------------------------

def resolve_recipe(recipe, target, ckpt: Checkpoint, method: str | None):
    """The Recipe to apply, from ``recipe``, else ``target``, else the default; ``method`` overrides its method."""
    if recipe is None:
        recipe = recipe_for_target(ckpt, target) if target is not None else _default_preset(ckpt)
    loaded = load_recipe(recipe)
    return loaded.with_method(method) if method else loaded


def _default_preset(ckpt: Checkpoint) -> str:
    return "int4-experts" if ckpt.spec.moe else "int8"


# plan's precision schemes, best quality first, and the preset that realizes each.
_PLAN_TO_PRESET = (("int8", "int8"), ("int4-experts", "int4-experts"), ("int4", "int4-g128"))


def recipe_for_target(ckpt: Checkpoint, target) -> str:
    """The highest-precision preset whose planned size fits the target's memory budget (`dsedge plan`'s
    arithmetic: weights + KV cache at the target's context + runtime allowance); int4 when nothing fits."""
    report = plan(ckpt.path, target=target)
    fits = {p.scheme: p.fits or p.fits_with_offload for p in report.precisions}
    for scheme, preset in _PLAN_TO_PRESET:
        if fits.get(scheme):
            log.info("target %s: %s fits (plan), using recipe %s", report.target["name"], scheme, preset)
            return preset
    log.warning("target %s: the model does not fit even at int4 (see `dsedge plan`); using int4-g128",
                report.target["name"])
    return "int4-g128"


def _tokenizer(ckpt: Checkpoint) -> Path:
    path = ckpt.path / "tokenizer.json"
    if not path.is_file():
        raise UserError("checkpoint has no tokenizer.json", where=str(ckpt.path),
                        hint="calibration tokenizes text with the model's own tokenizer; copy tokenizer.json in")
    return path


# --- the streamed run ---------------------------------------------------------------------------

class _Run:
    """State carried from layer to layer: hidden states, output shards, per-layer records."""

    def __init__(self, ckpt: Checkpoint, recipe, prune: PrunePlan | None, calibset: cal.CalibrationSet, *,
                 evaluate: bool, min_expert_tokens: int | None, batch_size: int):
        self.ckpt, self.spec, self.recipe, self.prune = ckpt, ckpt.spec, recipe, prune
        self.calibset, self.evaluate, self.min_expert_tokens = calibset, evaluate, min_expert_tokens
        self.classes = classes_for(self.spec.model_type)
        self.config = hf_config(self.spec.config)
        self.pruned_config = (hf_config(self.spec.config, n_routed_experts=prune.experts_after)
                              if prune else self.config)
        self.runner = LayerRunner(self.classes, self.config, calibset.seq_len, batch_size)
        self.mtp_layers = self.spec.mtp_layers if ckpt.has_mtp else []  # compressed too: the speculative draft
        self.linear_names = {t.name for t in self.spec.expected_tensors(include_mtp=ckpt.has_mtp) if t.linear}
        self.layers: list[dict] = []
        self.kept: dict[int, list[int]] = {}
        self.warnings: list[str] = []
        self.schemes: dict[str, Any] = {}  # module name -> QuantScheme, for quantization_config
        self.shapes: dict[str, tuple[int, int]] = {}
        self.ignored: list[str] = []  # linears the recipe leaves unquantized
        self.quality: dict | None = None
        self.head_record: dict | None = None  # the LM head's scheme and SQNR when the recipe quantizes it
        self.spill: SpillFile | None = None  # the current layer's quantized routed experts (.held)
        self.scale_dtype = _scale_dtype(self.recipe.dtype or self.spec.config.get("torch_dtype")
                                        or self.spec.config.get("dtype"))
        # routed experts share one stored group size over these input widths (quantformat.config.stored_group)
        self.expert_widths = (self.spec.hidden_size, self.spec.moe.moe_intermediate_size) if self.spec.moe else None

    # -- driver --
    def write(self, directory: Path, max_shard_bytes: int) -> None:
        writer = ShardWriter(directory, max_shard_bytes)
        self._embed(writer)
        total = self.spec.num_hidden_layers + len(self.mtp_layers)
        with progress("compress", total=total, unit="layer") as self.layers_done:
            for i in range(self.spec.num_hidden_layers):
                self._layer(i, writer)
            hidden = None  # module k reads module k-1's output; the first reads the main model's
            for depth, i in enumerate(self.mtp_layers):
                hidden = self._mtp_layer(i, depth, hidden, writer)
        self._head(writer)
        writer.finish()
        self._write_frequencies(directory)
        write_json(directory / "config.json", self._config())
        write_json(directory / RECIPE_FILE, self.recipe.to_json())
        copy_tokenizer_files(self.ckpt.path, directory)

    def _write_frequencies(self, directory: Path) -> None:
        """Routed calibration tokens per expert of the written checkpoint (kept experts, renumbered, when
        pruned): export ranks expert partitions by them (dsedge.models.routing)."""
        counts = {}
        for record in self.layers:
            routed = (record.get("experts") or {}).get("routed_tokens")
            if routed is None or record.get("mtp"):  # export ranks the trunk's expert partitions only
                continue
            kept = self.kept.get(record["layer"])
            counts[record["layer"]] = [routed[e] for e in kept] if kept else list(routed)
        if counts:
            write_frequencies(directory, counts, source=self.calibset.source, tokens=int(self.calibset.calib.numel()))

    def _embed(self, writer: ShardWriter) -> None:
        weight = self.ckpt.read("model.embed_tokens.weight")
        self.x = weight[self.calibset.calib]  # [N, S, H]
        heldout = weight[self.calibset.heldout] if self.evaluate else weight[:0][None]
        self.h_orig, self.h_comp = heldout, heldout.clone()
        for name in self.ckpt.non_layer_names():
            if name == "lm_head.weight" and self.head_scheme is not None:
                continue  # quantized last, from the final hidden states (_head)
            writer.add({name: self._stored(name, self.ckpt.read(name))})

    @property
    def head_scheme(self):
        """The LM head's scheme: only a recipe rule naming ``lm_head`` exactly quantizes it (recipes.py)."""
        return self.recipe.scheme_for("lm_head") if "lm_head.weight" in self.ckpt.tensors else None

    def _head(self, writer: ShardWriter) -> None:
        norm = self.ckpt.read("model.norm.weight")
        head_name = "lm_head.weight" if "lm_head.weight" in self.ckpt.tensors else "model.embed_tokens.weight"
        head = self.ckpt.read(head_name)
        head_comp = None
        if self.head_scheme is not None:
            head_comp = self._quantize_head(writer, head, norm)
        if not self.evaluate:
            return
        self.quality = quality(self.h_orig, self.h_comp, self.calibset.heldout, norm, head, self.spec.rms_norm_eps,
                                self.classes.norm, self.runner.batch_size, head_comp=head_comp)
        log.info("calib-tail perplexity: original %.3f, compressed %.3f, top-1 agreement %.2f%%",
                 self.quality["original"]["perplexity"], self.quality["compressed"]["perplexity"],
                 100 * self.quality["top1_agreement"])

    def _quantize_head(self, writer: ShardWriter, head, norm):
        """Quantize the LM head (GPTQ on the final-norm outputs of the calibration states, which have been
        through every compressed layer), write it packed, record it; returns the dequantized head."""
        scheme, weight = self.head_scheme, head.float()
        hessian = None
        if scheme.method == "gptq":
            hessian = HessianAccumulator(weight.shape[1])
            for start in range(0, self.x.shape[0], self.runner.batch_size):
                hessian.add(final_norm(self.x[start:start + self.runner.batch_size], norm, self.spec.rms_norm_eps,
                                       self.classes.norm))
        qt = quantize_by_rows(weight, scheme, hessian, name="lm_head", scale_dtype=self.scale_dtype)
        writer.add(pack("lm_head", qt, scale_dtype=self.scale_dtype))
        self.schemes["lm_head"], self.shapes["lm_head"] = scheme, tuple(weight.shape)
        head_sqnr = _sqnr_by_rows(weight, qt)
        self.head_record = {"scheme": scheme.label, "sqnr_db": _json_db(head_sqnr)}
        log.info("lm_head: %s, SQNR %.1f dB", scheme.label, head_sqnr)
        return dequantize(qt) if self.evaluate else None  # the held-out quality's compressed head

    # -- one layer --
    def _layer(self, i: int, writer: ShardWriter, names: list[str] | None = None, *, mtp: bool = False) -> None:
        """Layer ``i`` (``names``: its decoder-block tensors; an MTP layer's own extras are not) compressed on
        the calibration states ``self.x``, which it then carries to the next layer's input; written as made."""
        t0 = time.perf_counter()
        prefix = f"model.layers.{i}."
        names = self.ckpt.layer_names(i) if names is None else names
        state = {n: self._hold(n) for n in names}  # linears as stored (routed experts: read per use), the rest fp32
        # the quantized routed experts wait here for the compressed layer's forward (.held.SpillFile)
        self.spill = SpillFile() if any(".mlp.experts." in n for n in names) else None
        layer = build_layer(self.classes, self.config, i, _relative(state, prefix))
        evaluate = self.evaluate and not mtp  # the held-out quality is the main model's
        if evaluate:
            self.h_orig = self.runner.run(layer, self.h_orig)
        selected = self._selected(state)
        stats = self._calibrate(layer, prefix, selected)
        record: dict[str, Any] = {"layer": i, "moe": self.spec.is_moe_layer(i), "modules": {}}
        if mtp:
            record["mtp"] = True
        kept = None
        if stats.moe is not None:
            activity = cal.expert_activity(layer.mlp.experts, *stats.moe)
            record["experts"] = activity.to_json()
            if self.prune:
                kept = choose_kept(self.prune, activity.counts, activity.saliency)
                record["experts"]["kept"] = self.kept[i] = kept
                state = prune_state(state, kept)
                selected = self._selected(state)
        # each module is written as soon as it is quantized, and its held weight becomes the packed integers
        # (the layer reads them through the same slot, so it now computes compressed)
        quantized = self._quantize_layer(i, layer, state, selected, stats, kept, record, writer)
        self.ignored += [n for n, s in self._linears(state).items() if s is None]
        if kept:  # fewer experts: a layer of the pruned shape, over the same held weights
            layer = build_layer(self.classes, self.pruned_config, i, _relative(state, prefix))
        self.x = self.runner.run(layer, self.x)
        if evaluate:
            self.h_comp = self.runner.run(layer, self.h_comp)
        del layer
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self._write_unquantized(writer, state, quantized)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        self._log_layer(record)
        self.layers.append(record)

    def _hold(self, name: str):
        """A layer tensor as compress keeps it: a linear (matmul) weight held as stored, upcast per use
        (:mod:`.held`); norms, router and biases — small — read in float32 as before."""
        info = self.ckpt.tensors.get(name)
        linear = name in self.linear_names or (".mlp.experts." in name and name.endswith("_proj.weight"))
        if linear and info is not None and ".mlp.experts." in name and len(info.shape) == 2:
            return Held(LazyStored(self.ckpt, name))  # a routed expert: read per use (.held)
        if linear and (info is None or len(info.shape) == 2):
            return Held(self.ckpt.read_stored(name))
        return self.ckpt.read(name)

    def _selected(self, state: dict) -> dict[str, Any]:
        """Module name -> scheme of every linear of the layer the recipe quantizes."""
        return {n: s for n, s in self._linears(state).items() if s is not None}

    def _linears(self, state: dict) -> dict[str, Any]:
        """Module name -> scheme or None, for every linear weight of the layer."""
        return {name.removesuffix(".weight"): self.recipe.scheme_for(name.removesuffix(".weight"))
                for name in state if name in self.linear_names or _is_linear_weight(name, state[name])}

    def _calibrate(self, layer, prefix: str, selected: dict) -> _LayerStats:
        """One pass of the calibration states through the original layer: Hessians of the selected linears
        that GPTQ quantizes (routed experts excepted), and the MoE input with the router's choices."""
        gptq = [n.removeprefix(prefix) for n, s in selected.items() if s.method == "gptq" and ".experts." not in n]
        modules = dict(layer.named_modules())
        hooks = cal.LinearInputs(layer, [n for n in gptq if n in modules])
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        moe = cal.MoEInputs(experts) if isinstance(experts, HeldExperts) else None
        try:
            self.runner.run(layer, self.x)
        finally:
            hooks.remove()
            if moe:
                moe.remove()
        return _LayerStats(hooks.hessians, moe.tensors() if moe else None)

    def _quantize_layer(self, i, layer, state, selected, stats, kept, record, writer) -> set[str]:
        """Quantize the selected linears: the others with their layer-pass Hessians, then the routed
        experts one at a time (an expert's Hessians exist only while it is quantized). Returns the names of
        the quantized modules; each is written and its held weight replaced as it is made."""
        prefix = f"model.layers.{i}."
        experts: dict[int, list[str]] = {}
        for name in selected:
            if ".mlp.experts." in name:
                experts.setdefault(_expert_id(name), []).append(name)
        others = [n for n in selected if ".mlp.experts." not in n]
        layer_hessian = lambda n: stats.hessians.get(n.removeprefix(prefix))  # noqa: E731
        quantize = lambda names, hessian_of: self._quantize_modules(  # noqa: E731
            names, selected, state, hessian_of, prefix, record, writer)
        quantized = quantize(others, layer_hessian)
        fallback, pending = [], []
        shared = _all_tokens_hessian(stats.moe[0]) if experts and stats.moe is not None else None
        flush = lambda names: quantize(names, lambda n: shared)  # noqa: E731
        for new_id, names in sorted(experts.items()):
            old_id = kept[new_id] if kept else new_id
            hessians = self._expert_hessians(layer, stats, names, selected, old_id, shared, fallback)
            # gate/up on the all-token Hessian: batched across experts (one factorization for many)
            later = [n for n in names if shared is not None and hessians.get(n) is shared]
            now = [n for n in names if n not in later]
            quantized |= quantize(now, hessians.get)
            pending += later
            if sum(state[n + ".weight"].shape[0] for n in pending) >= MAX_JOINT_ROWS:
                quantized, pending = quantized | flush(pending), []
        quantized |= flush(pending) if pending else set()
        if experts:
            record.setdefault("experts", {})["all_token_statistics"] = fallback
        if fallback:
            msg = (f"layer {i}: experts {fallback} had fewer than {self.min_expert_tokens} routed calibration "
                   "tokens; their GPTQ statistics come from all calibration tokens")
            self.warnings.append(msg)
            log.warning("%s", msg)
        return quantized

    def _quantize_modules(self, names, selected, state, hessian_of, prefix, record, writer) -> set[str]:
        """Quantize ``names``; GPTQ modules sharing one Hessian (same input) and scheme are quantized as one
        row-stacked matrix — GPTQ treats rows independently, so this is exact and factors H once. Each
        module is upcast here (only this group is float32 at once), written packed at once, and its held
        weight replaced by its packed integers."""
        quantized = set()
        for group, hessian in _joint_groups(names, selected, hessian_of):
            scheme = selected[group[0]]
            weights = [state[n + ".weight"].float() for n in group]
            rows = [w.shape[0] for w in weights]
            joint = quantize(_cat(weights), scheme, hessian if scheme.method == "gptq" else None,
                             scale_dtype=self.scale_dtype)
            for name, weight, qt in zip(group, weights, _split_rows(joint, rows), strict=True):
                quantized.add(name)
                self.schemes[name], self.shapes[name] = scheme, tuple(weight.shape)
                record["modules"][name.removeprefix(prefix)] = {
                    "scheme": scheme.label, "sqnr_db": _json_db(sqnr_db(weight, dequantize(qt)))}
                writer.add(pack(name, qt, stored_group=stored_group(name, qt.scheme, self.expert_widths),
                                scale_dtype=self.scale_dtype))
                writer.flush_if_full()
                spilled = self.spill is not None and ".mlp.experts." in name
                state[name + ".weight"].replace(SpilledQuantized(qt, self.spill) if spilled else HeldQuantized(qt))
            del weights, joint
        return quantized

    def _expert_hessians(self, layer, stats, names, selected, old_id, shared, fallback) -> dict:
        """GPTQ Hessians of one routed expert's projections (module name -> accumulator), or {} for RTN."""
        if stats.moe is None or not any(selected[n].method == "gptq" for n in names):
            return {}
        hidden, index, _ = stats.moe
        experts = layer.mlp.experts
        gate_up, down = experts.weights(old_id)
        h_in, h_down, source = cal.expert_hessians(
            gate_up, down, hidden, index, old_id, experts.act_fn,
            min_tokens=self.min_expert_tokens, all_tokens_hessian=shared)
        if source != "routed" and self.min_expert_tokens is not None:
            fallback.append(old_id)
        base = names[0].rsplit(".", 1)[0] + "."
        return {base + "gate_proj": h_in, base + "up_proj": h_in, base + "down_proj": h_down}

    def _write_unquantized(self, writer: ShardWriter, state: dict, quantized: set[str]) -> None:
        """The layer's tensors that were not quantized (norms, router, ignored linears), in the output dtype."""
        for name, value in state.items():
            if name.removesuffix(".weight") in quantized and name.endswith(".weight"):
                continue
            writer.add({name: self._stored(name, value.float() if is_held(value) else value)})
            writer.flush_if_full()

    def _stored(self, name: str, tensor):
        """An unquantized tensor in the recipe's dtype, else its on-disk one (FP8, dequantized by the reader,
        becomes bf16)."""
        if self.recipe.dtype and tensor.is_floating_point():
            return tensor.to(getattr(torch, self.recipe.dtype))
        info = self.ckpt.tensors.get(name)
        if info is None or info.dtype == FP8_DTYPE:
            return tensor.to(torch.bfloat16)
        return tensor.to(torch_dtype(info.dtype))

    def _log_layer(self, record: dict) -> None:
        sqnr = [m["sqnr_db"] for m in record["modules"].values() if m["sqnr_db"] is not None]
        detail = f", {len(record['modules'])} linears" + (f", SQNR min {min(sqnr):.1f} dB" if sqnr else "")
        kept = record.get("experts", {}).get("kept")
        detail += f", kept {len(kept)} experts" if kept else ""
        self.layers_done.advance(detail=detail.removeprefix(", "))  # "compress: layer 3/12, 1.2 s/layer, ETA …"

    # -- the MTP module (DeepSeek-V3 report §2.2; dsedge.testing.mtp_reference) --
    def _mtp_layer(self, i: int, depth: int, hidden, writer: ShardWriter):
        """MTP module ``depth`` at layer ``i``, compressed like a layer on its own calibration input: at
        position j, eh_proj([enorm(Emb(t_{j+1+depth})); hnorm(h_j)]) with h_j the compressed main model's
        normed final state (module k > 0: module k-1's output). eh_proj is a linear under the recipe, the norms
        stay float, the embedding and head are the main model's (not written again when they are its copies).
        Writes its tensors; returns the module's output states."""
        prefix = f"model.layers.{i}."
        names = self.ckpt.layer_names(i)
        extras = [n for n in names if n.removeprefix(prefix) in MTP_OWN]
        own = {n.removeprefix(prefix): self.ckpt.read(n) for n in extras}
        main_embed = self.ckpt.read("model.embed_tokens.weight")
        embed = own.get("embed_tokens.weight", main_embed)
        if hidden is None:
            hidden = final_norm(self.x, self.ckpt.read("model.norm.weight"), self.spec.rms_norm_eps, self.classes.norm)
        ids = self.calibset.calib
        # the token after next at each position; the last positions (no such token) repeat the last one
        ahead = torch.cat([ids[:, depth + 1:], ids[:, -1:].expand(-1, depth + 1)], dim=1)
        joined = torch.cat([self._rms(embed[ahead], own["enorm.weight"]), self._rms(hidden, own["hnorm.weight"])], -1)
        out, eh_proj = self._mtp_eh_proj(prefix, own["eh_proj.weight"], joined)
        saved, self.x = self.x, (joined @ eh_proj.T.float()).to(self.x.dtype)
        try:
            self._layer(i, writer, [n for n in names if n not in extras], mtp=True)
            block_out = self.x
        finally:
            self.x = saved
        for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            out[prefix + name] = self._stored(prefix + name, own[name])
        main_head = self.ckpt.read("lm_head.weight") if "lm_head.weight" in self.ckpt.tensors else main_embed
        for name, main in (("embed_tokens.weight", main_embed), ("shared_head.head.weight", main_head)):
            if name in own and not torch.equal(own[name], main):  # a module trained with its own: kept
                out[prefix + name] = self._stored(prefix + name, own[name])
        writer.add(out)
        writer.flush_if_full()
        return block_out

    def _mtp_eh_proj(self, prefix: str, weight, joined) -> tuple[dict, Any]:
        """eh_proj under the recipe (GPTQ on the module's joined inputs); its tensors and the weight it now
        computes with (dequantized when quantized)."""
        module = prefix + "eh_proj"
        scheme = self.recipe.scheme_for(module)
        if scheme is None:
            self.ignored.append(module)
            return {module + ".weight": self._stored(module + ".weight", weight)}, weight.float()
        hessian = None
        if scheme.method == "gptq":
            hessian = HessianAccumulator(weight.shape[1])
            for start in range(0, joined.shape[0], self.runner.batch_size):
                hessian.add(joined[start:start + self.runner.batch_size])
        qt = quantize(weight.float(), scheme, hessian, name=module, scale_dtype=self.scale_dtype)
        self.schemes[module], self.shapes[module] = scheme, tuple(weight.shape)
        dequantized = dequantize(qt)
        log.info("%s: %s, SQNR %.1f dB", module, scheme.label, sqnr_db(weight.float(), dequantized))
        tensors = pack(module, qt, stored_group=stored_group(module, scheme, self.expert_widths),
                       scale_dtype=self.scale_dtype)
        return tensors, dequantized

    def _rms(self, x, weight):
        """RMSNorm in fp32, as the MTP reference computes enorm/hnorm."""
        x = x.float()
        return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps))

    # -- config and report --
    def _config(self) -> dict:
        config = {k: v for k, v in self.spec.config.items() if k != "quantization_config"}
        if "num_nextn_predict_layers" in config and not self.mtp_layers:  # the checkpoint stored none
            config["num_nextn_predict_layers"] = 0
        if self.prune:
            config["n_routed_experts"] = self.prune.experts_after
            config["dsedge_pruning"] = {"method": "reap-saliency", "paper": "arXiv:2510.13999",
                                        **self.prune.to_json(),
                                        "kept_experts": {str(k): v for k, v in self.kept.items()}}
        if self.recipe.dtype:
            config.update({k: self.recipe.dtype for k in ("dtype", "torch_dtype") if k in config})
        embedding = self.recipe.scheme_for(EMBEDDING)
        if embedding is not None:  # transformers cannot load a packed Embedding: export quantizes it (config.py)
            config[EXPORT_EMBEDDING_KEY] = embedding.with_method("rtn").to_json()
        if self.schemes:
            kept_head = "lm_head.weight" in self.ckpt.tensors and self.head_scheme is None
            ignore = self.ignored + (["lm_head"] if kept_head else [])
            stored = {n: stored_group(n, s, self.expert_widths) for n, s in self.schemes.items()}
            config["quantization_config"] = quantization_config(self.recipe.name, self.schemes, ignore,
                                                                shapes=self.shapes, stored_groups=stored)
        return config

    def report(self, out: Path, started: float, directory: Path) -> CompressReport:
        before = sum(f.stat().st_size for f in self.ckpt.files)
        after = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        experts = sum(1 for n in self.schemes if ".mlp.experts." in n and n.endswith("down_proj"))
        pruning = self.prune.to_json() | {"kept_experts": {str(k): v for k, v in self.kept.items()}} \
            if self.prune else None
        return CompressReport(
            checkpoint=str(self.ckpt.path), output=str(out), model_type=self.spec.model_type,
            recipe=self.recipe.to_json(),
            method=_methods(self.schemes), layers=self.layers, bytes_before=before, bytes_after=after,
            quantized_modules=len(self.schemes), quantized_experts=experts, pruning=pruning,
            calibration=self.calibset.to_json() | {
                "expert_statistics": "all-tokens" if self.min_expert_tokens is None else "routed",
                "min_expert_tokens": self.min_expert_tokens},
            quality=self.quality, elapsed_s=round(time.perf_counter() - started, 3),
            peak_rss_bytes=peak_rss_bytes(), warnings=self.warnings, lm_head=self.head_record)


@dataclass
class _LayerStats:
    hessians: dict  # layer-relative module name -> HessianAccumulator
    moe: tuple | None  # (hidden [T, H], top-k index [T, k], top-k weights [T, k]) of the fused experts


# An MTP layer's tensors outside its decoder block (models/deepseek.py::_mtp_layer)
MTP_OWN = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
           "shared_head.head.weight")


def _all_tokens_hessian(hidden):
    """The Hessian of every calibration token's MoE input: under-routed experts' gate/up statistics."""
    h = HessianAccumulator(hidden.shape[-1])
    h.add(hidden)
    return h


def _joint_groups(names, selected, hessian_of):
    """[(module names, Hessian)]: GPTQ modules with the same Hessian object and scheme together."""
    groups: dict = {}
    for name in names:
        hessian, scheme = hessian_of(name), selected[name]
        key = (id(hessian), scheme) if hessian is not None and scheme.method == "gptq" else (name,)
        groups.setdefault(key, ([], hessian))[0].append(name)
    return list(groups.values())


def _cat(weights):
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def _sqnr_by_rows(weight, qt: QuantizedTensor) -> float:
    """``sqnr_db(weight, dequantize(qt))`` without the whole dequantized matrix."""
    rows = max(1, ROW_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    starts = range(0, weight.shape[0], rows)
    parts = _split_rows(qt, [min(rows, weight.shape[0] - start) for start in starts])
    return sqnr_db_of_blocks((weight[start:start + rows], dequantize(part))
                             for start, part in zip(starts, parts, strict=True))


def _split_rows(qt, rows: list[int]) -> list:
    """A row-stacked QuantizedTensor back into one per module (integers, scales, zero points by row)."""
    if len(rows) == 1:
        return [qt]
    out, start = [], 0
    for n in rows:
        part = slice(start, start + n)
        zero = None if qt.zero_point is None else qt.zero_point[part].contiguous()
        out.append(QuantizedTensor(qt.q[part].contiguous(), qt.scale[part].contiguous(), zero, qt.scheme,
                                   (n, qt.shape[1])))
        start += n
    return out


def _scale_dtype(model_dtype: str | None):
    """Scales are stored in the model's 16-bit dtype (vLLM allocates them in it); float16 otherwise."""
    return torch.bfloat16 if model_dtype == "bfloat16" else torch.float16


def _json_db(value: float) -> float | None:
    """dB for the report; None when quantization was exact (infinite SQNR is not JSON)."""
    return round(value, 3) if math.isfinite(value) else None


def _relative(state: dict, prefix: str) -> dict:
    return {n.removeprefix(prefix): t for n, t in state.items()}


def _is_linear_weight(name: str, tensor) -> bool:
    # Pruned/renumbered expert names are not in the spec's list; they are linear like the originals.
    return ".mlp.experts." in name and name.endswith("_proj.weight") and tensor.dim() == 2


def _expert_id(module: str) -> int:
    return int(module.split(".mlp.experts.")[1].split(".")[0])


def _methods(schemes: dict) -> str | None:
    methods = sorted({s.method for s in schemes.values()})
    return "+".join(methods) if methods else None
