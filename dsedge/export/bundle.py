"""`dsedge export`: checkpoint → validated ONNX bundle, staged by dsedge.staging (temporary sibling, lock, renamed)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsedge import __version__, safe_json
from dsedge.contract import DECODER, DRAFT, EXPERTS, decoder_io
from dsedge.errors import UserError
from dsedge.export.decoder import build_decoder, cache_spec, graph_shapes
from dsedge.export.embedding import EMBEDDING, RequantizedEmbedding, embedding_scheme, quantize_embedding
from dsedge.export.graph import save_graph
from dsedge.export.mtp import write_draft
from dsedge.export.partitioned import placement_plan, write_partitioned
from dsedge.export.quantized import (
    MLA_PRODUCTS_INT8,
    QuantizedWeight,
    accuracy_level_for,
    effective_accuracy_level,
    products_int8_at,
    valid_accuracy_level,
)
from dsedge.export.validate import precision_of, raise_on_failure, validate_bundle
from dsedge.manifest import MANIFEST_FILE, GraphEntry, write_manifest
from dsedge.models.checkpoint import Checkpoint
from dsedge.models.params import count_params
from dsedge.models.reference import StreamedReference
from dsedge.models.routing import read_frequencies
from dsedge.planning import KV_BYTES, kv_bytes_per_token
from dsedge.progress import progress
from dsedge.quantformat.scheme import QuantScheme
from dsedge.rss import peak_rss_bytes
from dsedge.runtime import load_bundle
from dsedge.runtime.generation import encoding_rule
from dsedge.sources import resolve_checkpoint
from dsedge.staging import Artifact, check_output, staged_output
from dsedge.targets import load_target
from dsedge.verified import read_regular

log = logging.getLogger(__name__)

LAYOUTS = ("monolithic", "partitioned")
DTYPES = ("fp32", "fp16")
EXPERT_PATHS = ("auto", "dispatch", "moe_op", "dense")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
DEFAULT_MAX_CONTEXT = 4096
MAX_TOKENIZER_FILE_BYTES = 512 << 20  # tokenizer.json of a 128k-vocabulary model is ~10 MB
GRAPH_DIR = "graphs"


@dataclass(frozen=True)
class ExportReport:
    output: str
    layout: str
    dtype: str
    max_context: int
    graphs: list[dict[str, Any]]
    bundle_bytes: int
    elapsed_s: float
    peak_rss_bytes: int
    validation: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_bundle(checkpoint: str | Path, output: str | Path, *, target=None, layout: str = "monolithic",
                  dtype: str = "fp32", max_context: int | None = None, overwrite: bool = False,
                  validate: bool = True, experts_per_partition: int | None = None,
                  expert_path: str = "auto", accuracy_level: int | dict[int, int] = 4,
                  index: str | Path | None = None, quantize_embedding: str | None = None) -> ExportReport:
    """Export a checkpoint to an ONNX bundle (manifest + graphs + tokenizer), validated against the reference.

    The bundle appears at ``output`` only when complete and validated; a failure leaves nothing behind.
    ``expert_path`` (monolithic only): "auto" (default: "moe_op" where it is exact, "dispatch" elsewhere),
    "dispatch" (quantized experts as one QMoE where their layout allows, else each expert gathers its rows),
    "moe_op" (onnxruntime's fused MoE operator over float experts; exact only where ``norm_topk_prob`` holds,
    i.e. V3/R1), or "dense" (every expert on every token: the baseline
    benchmarks/export_bench.py compares against).
    A compressed checkpoint (``dsedge compress``) exports its quantized linears as MatMulNBits over the stored
    integers; ``accuracy_level`` is that operator's compute precision (4: int8 activations, the fast CPU
    kernels; 0: float) and sets the validation tolerance. ``index`` (`dsedge index build`) is copied into the
    bundle's ``retriever/`` so that the bundle answers from it (`dsedge run --rag`). ``quantize_embedding``
    (int8, int4, none; default: what the recipe recorded) runs the token embedding as GatherBlockQuantized, and a
    tied head as MatMulNBits over the same codes (dsedge.export.embedding).
    """
    started = time.perf_counter()
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("dtype", dtype, DTYPES)
    out = Path(output)
    ckpt = Checkpoint(resolve_checkpoint(checkpoint))
    inputs = [ckpt.path, *([index] if index is not None else [])]  # never written over, around or into
    check_output(out, inputs=inputs, overwrite=overwrite, artifact=BUNDLE)
    ckpt.validate()
    _check_supported(ckpt.spec)
    tgt = load_target(target) if target is not None else None
    context = _max_context(ckpt, tgt, max_context)
    _tokenizer_files(ckpt.path)  # checked now: a malformed tokenizer fails before minutes of graph building
    _check_choice("expert_path", expert_path, EXPERT_PATHS)
    expert_path = _resolve_expert_path(ckpt, expert_path, layout)
    if expert_path == "moe_op" and not (ckpt.spec.moe and ckpt.spec.moe.norm_topk_prob):
        raise UserError("expert_path 'moe_op' reproduces DeepSeek routing only for routers with norm_topk_prob "
                        "(V3/R1)", where="expert_path", hint="use the default path ('auto')")
    quantized = bool(ckpt.quantization)
    if _quantized_experts(ckpt) and expert_path == "moe_op":
        raise UserError("expert_path 'moe_op' takes float experts; this checkpoint's are quantized",
                        where="expert_path", hint="use the default path (QMoE or per-expert MatMulNBits)")
    if not valid_accuracy_level(accuracy_level):
        raise UserError(f"--accuracy-level must be 0-4 (or {{bits: 0-4}}), got {accuracy_level}",
                        where="--accuracy-level")
    if experts_per_partition is not None and experts_per_partition < 1:
        raise UserError(f"--experts-per-partition must be ≥ 1, got {experts_per_partition}",
                        where="--experts-per-partition")
    embedding = embedding_scheme(quantize_embedding, ckpt.spec.config)
    with staged_output(out, inputs=inputs, overwrite=overwrite, artifact=BUNDLE) as tmp:
        with progress("export", total=ckpt.spec.num_hidden_layers, unit="layer") as layers_done:
            weights = _layer_weights(ckpt, accuracy_level, layers_done, embedding)
            graphs = _write_graphs(ckpt, weights, tmp, context, layout, tgt, experts_per_partition, expert_path,
                                   dtype == "fp16")
        _copy_tokenizer(ckpt.path, tmp)
        manifest = _manifest(ckpt, tgt, layout, dtype, context, graphs, accuracy_level)
        if embedding is not None:
            manifest["quantization"]["embedding"] = f"{embedding.label} (GatherBlockQuantized" + \
                (", tied head MatMulNBits)" if ckpt.spec.tie_word_embeddings else ")")
        if max_context and max_context > context:
            manifest["notes"].append(f"--max-context {max_context} capped at {context}, the model's "
                                     "max_position_embeddings")
        if index is not None:
            manifest["retriever"] = _embed_index(index, tmp)
        if layout == "partitioned":
            manifest["placement"] = placement_plan(graphs, budget=tgt.memory_budget_bytes if tgt else None,
                                                   kv_bytes=_kv_bytes(ckpt.spec, context, dtype),
                                                   frequencies=partition_frequencies(ckpt, graphs))
        write_manifest(tmp, manifest)
        head_bits = [embedding.bits] if embedding is not None and ckpt.spec.tie_word_embeddings else []
        level = effective_accuracy_level(accuracy_level, [*(q.bits for q in ckpt.quantization.values()), *head_bits]) \
            if quantized or head_bits else None
        del weights  # the top arrays: validation reads (and re-quantizes) what it needs from the checkpoint
        requantized = RequantizedEmbedding(ckpt, embedding, accuracy_level) if embedding else None
        checks = _validate(ckpt, tmp, layout, dtype, level, requantized) if validate else []
        manifest["validation"] = {"dtype": dtype, "accuracy_level": level, "checks": [c.to_json() for c in checks],
                                  "passed": bool(checks)}
        written = write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(str(out), layout, dtype, context, [g.to_json() for g in written.graphs], size,
                        round(time.perf_counter() - started, 2), peak_rss_bytes(), [c.to_json() for c in checks],
                        manifest["notes"])


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unsupported {name} {value!r}", where=f"--{name}", hint=f"choose one of: {', '.join(choices)}")


def _check_supported(spec) -> None:
    """Config options no released DeepSeek/R1-Distill checkpoint uses, which the graphs do not implement."""
    unsupported = []
    if spec.mlp_bias:
        unsupported.append("mlp_bias=true")
    if spec.mla is not None and spec.attention_bias:
        unsupported.append("attention_bias=true on MLA projections")
    if spec.rope.type not in ("default", "yarn", "llama3", "linear"):
        unsupported.append(f"rope type {spec.rope.type!r}")
    if unsupported:
        raise UserError(f"export does not support {', '.join(unsupported)}", where="config.json",
                        hint="no released DeepSeek or R1-Distill checkpoint uses these; please open an issue")


def _max_context(ckpt: Checkpoint, tgt, requested: int | None) -> int:
    limit = ckpt.spec.max_position_embeddings
    # `requested or …` turned --max-context 0 into the default: only an absent flag falls back
    context = requested if requested is not None else (tgt.max_context if tgt else DEFAULT_MAX_CONTEXT)
    if context < 1:
        raise UserError(f"--max-context must be ≥ 1, got {context}", where="--max-context")
    if requested and context > limit:  # said, not silent: the bundle serves fewer tokens than asked for
        log.warning("export: --max-context %d capped at %d, the model's max_position_embeddings", context, limit)
    return min(context, limit)


def _is_bundle(root: Path) -> bool:
    """A directory `dsedge export` wrote: its manifest.json lists graphs (an index's manifest does not)."""
    import json

    if not (root / MANIFEST_FILE).is_file():  # a FIFO named manifest.json would block the read
        return False
    try:
        return "graphs" in json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


# What `--overwrite` may replace (dsedge.staging): only a bundle, never an arbitrary folder.
BUNDLE = Artifact("dsedge bundle (manifest.json with graphs)", _is_bundle)


def _layer_weights(ckpt: Checkpoint, accuracy_level: int, layers_done, embedding: QuantScheme | None = None):
    """Float tensors as numpy; quantized linears as their stored integer codes (never dequantized here); the
    embedding quantized with ``embedding`` when given (once: the top weights are cached).
    Each layer's graph is built right after its weights load, so a loaded layer is one step of ``layers_done``."""
    top: dict = {}

    def load(name: str):
        stored = ckpt.quantized(name)
        return ckpt.read(name).numpy() if stored is None else QuantizedWeight.from_tensor(stored, accuracy_level)

    def weights(layer: int | None):
        if layer is None and top:
            return top
        names = ckpt.non_layer_names() if layer is None else ckpt.layer_names(layer)
        if layer is None and embedding is not None:  # quantized from row blocks: never whole in float32
            top[EMBEDDING] = quantize_embedding(ckpt, embedding, accuracy_level)
        loaded = {n: load(n) for n in names if n not in top}
        if layer is not None:
            layers_done.advance()
            return loaded
        top.update(loaded)
        return top

    return weights


def partition_frequencies(ckpt: Checkpoint, graphs: list[GraphEntry]) -> dict[str, float] | None:
    """Per expert partition, the share of its layer's routed picks that land in it, as compress measured
    (dsedge.models.routing); None when the checkpoint carries no measurement (placement is then uniform)."""
    moe = ckpt.spec.moe
    measured = read_frequencies(ckpt.path, ckpt.spec.moe_layers, moe.n_routed_experts) if moe else None
    if measured is None:
        return None
    return {g.name: sum(measured[g.layer][g.experts[0]:g.experts[1]]) for g in graphs if g.role == EXPERTS}


def _kv_bytes(spec, context: int, dtype: str) -> int:
    """Batch-1 cache bytes at ``context`` tokens, in the bundle's cache precision."""
    latent, naive = kv_bytes_per_token(spec)  # counted at 2 bytes per value
    per_token = latent if latent is not None else naive
    return per_token // KV_BYTES * (2 if dtype == "fp16" else 4) * context


def _resolve_expert_path(ckpt: Checkpoint, expert_path: str, layout: str) -> str:
    """"auto": onnxruntime's fused MoE op for float routed experts where it reproduces DeepSeek's routing (V3/R1's
    renormalised weights; monolithic), per-expert dispatch (or QMoE, for quantized experts) elsewhere.

    Why the op where it is exact: dispatch runs ~12 nodes per expert every step, routed or not (NonZero finds
    no rows for most of them), so a float MoE layer costs O(experts) kernel calls; the op is one. ds3bench,
    3 alternated rounds each (benchmarks/README.md), decode tokens/s at 16 / 512 cached tokens and prefill(512),
    dispatch → op: fp32 27.4 → 31.5, 26.7 → 29.3, 329 → 331; fp16 21.8 → 23.1, 20.7 → 21.5, 312 → 290. (On
    the CUDA execution provider each NonZero's data-dependent shape also waits for the device; not measured.)
    The float op has no ``router_weights`` input, so V2's unnormalised weights cannot be fed to it and V2/V2-Lite
    keep dispatch.
    """
    if expert_path != "auto":
        return expert_path
    moe = ckpt.spec.moe
    fits = moe is not None and moe.norm_topk_prob and layout == "monolithic" and not _quantized_experts(ckpt)
    return "moe_op" if fits else "dispatch"


def _quantized_experts(ckpt: Checkpoint) -> bool:
    return any(".experts." in module for module in ckpt.quantization)


def _write_graphs(ckpt: Checkpoint, weights, root: Path, context: int, layout: str, tgt, per_partition: int | None,
                  expert_path: str, half: bool) -> list[GraphEntry]:
    if layout == "partitioned":
        return write_partitioned(ckpt.spec, weights, root, GRAPH_DIR, max_positions=context,
                                 target_budget=tgt.memory_budget_bytes if tgt else None, per_partition=per_partition,
                                 half=half, has_mtp=ckpt.has_mtp)
    def build(data: Path):
        return build_decoder(ckpt.spec, weights, max_positions=context, expert_path=expert_path, data_path=data,
                             half=half)

    graphs = [save_graph(build, decoder_io(graph_shapes(ckpt.spec, half)), root, GRAPH_DIR, DECODER, DECODER)]
    if ckpt.has_mtp:  # the MTP module as the speculative draft graph, reading the decoder's embedding and head
        graphs.append(write_draft(ckpt.spec, weights, root, GRAPH_DIR, max_positions=context,
                                  half=half, shares=graphs[:1], expert_path=expert_path))
    return graphs


def _copy_tokenizer(src: Path, root: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files (their contents: a link in the checkpoint becomes a plain file)."""
    (root / "tokenizer").mkdir()
    copied = []
    for name, raw in _tokenizer_files(src).items():
        (root / "tokenizer" / name).write_bytes(raw)
        copied.append(f"tokenizer/{name}")
    return copied


def _tokenizer_files(src: Path) -> dict[str, bytes]:
    """The checkpoint's tokenizer files, each checked: the runtime must be able to load what the bundle
    carries, so a malformed file (or a FIFO, or a directory) fails the export naming it, exit 3."""
    found = {}
    for name in TOKENIZER_FILES:
        if (src / name).exists() or (src / name).is_symlink():
            raw = read_regular(src / name, what=f"checkpoint {name}", max_bytes=MAX_TOKENIZER_FILE_BYTES,
                               hint="fix or remove the file; export copies it into the bundle")
            _check_tokenizer_file(src / name, raw)
            found[name] = raw
    return found


def _check_tokenizer_file(path: Path, raw: bytes) -> None:
    hint = "fix or replace the checkpoint's tokenizer file (it must be the JSON transformers writes)"
    if path.suffix == ".json":
        try:
            data = safe_json.loads(raw.decode("utf-8"), max_depth=64)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"checkpoint {path.name} is not valid JSON: {exc}", where=str(path), hint=hint) from exc
        if not isinstance(data, dict):
            raise UserError(f"checkpoint {path.name} must hold a JSON object", where=str(path), hint=hint)
    if path.name == "tokenizer.json":
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
            raise UserError(f"checkpoint tokenizer.json cannot be loaded by tokenizers: {str(exc)[:200]}",
                            where=str(path), hint=hint) from None


def _manifest(ckpt: Checkpoint, tgt, layout: str, dtype: str, context: int, graphs: list[GraphEntry],
              accuracy_level: int) -> dict[str, Any]:
    spec = ckpt.spec
    notes = []
    mtp_exported = any(g.role == DRAFT for g in graphs)
    if spec.num_mtp_layers and not mtp_exported:
        notes.append("the MTP (multi-token prediction) layer is not exported (the checkpoint does not store it): "
                     "`--speculative mtp` is unavailable, `ngram` works")
    return {
        "dsedge_version": __version__,
        "created_unix": int(time.time()),
        "source_checkpoint": str(ckpt.path),
        "model": {**spec.to_json(), "params": count_params(spec).to_json()},
        "quantization": _quantization_summary(ckpt, dtype, accuracy_level),
        "target": tgt.to_json() | {"name": tgt.name} if tgt else None,
        "layout": layout,
        "max_context": context,
        "cache": cache_spec(spec).layout(half=dtype == "fp16"),
        "graphs": graphs,
        "tokenizer": _tokenizer_info(ckpt.path, spec),
        "mtp": {"in_checkpoint": ckpt.has_mtp, "exported": mtp_exported},
        "notes": notes,
    }


def _embed_index(index: str | Path, root: Path) -> dict[str, Any]:
    from dsedge.retrieval import copy_index  # the retrieval extra (hnswlib), needed only with --index

    log.info("export: embedding the index %s", index)
    return {"dir": "retriever", **copy_index(index, root / "retriever")}


def _quantization_summary(ckpt: Checkpoint, dtype: str, accuracy_level: int) -> dict[str, Any]:
    """What the bundle computes with: float dtype, and per scheme how many linears run as MatMulNBits."""
    summary: dict[str, Any] = {"method": "none", "dtype": dtype, "source_fp8": ckpt.is_fp8}
    if ckpt.quantization:
        schemes: dict[str, int] = {}
        for scheme in ckpt.quantization.values():
            label = f"int{scheme.bits}-{'g' + str(scheme.group_size) if scheme.group_size else 'channel'}-" \
                    f"{'sym' if scheme.symmetric else 'asym'}"
            schemes[label] = schemes.get(label, 0) + 1
        summary |= {"method": "weight-only (compressed-tensors pack-quantized → MatMulNBits)",
                    "accuracy_level": accuracy_level, "modules_by_scheme": schemes}
        kv_b = [s for name, s in ckpt.quantization.items() if name.endswith("kv_b_proj")]
        if kv_b and products_int8_at(accuracy_level_for(kv_b[0].bits, accuracy_level), dtype != "fp32"):
            summary["mla_products"] = MLA_PRODUCTS_INT8
    return summary


def _tokenizer_info(src: Path, spec) -> dict[str, Any]:
    import json

    info: dict[str, Any] = {"dir": "tokenizer", "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id}
    if (src / "tokenizer.json").is_file():  # the rule that makes `run -p TEXT` give transformers' ids
        info["encoding"] = encoding_rule(src).to_json()
    for name, key in (("tokenizer_config.json", "chat_template"), ("generation_config.json", None)):
        path = src / name
        if path.exists():
            raw = read_regular(path, what=f"checkpoint {name}", max_bytes=MAX_TOKENIZER_FILE_BYTES)
            _check_tokenizer_file(path, raw)
            data = json.loads(raw)
            if key is None:
                info["generation_defaults"] = data
            else:
                info[key] = data.get(key)
    return info


def _validate(ckpt: Checkpoint, root: Path, layout: str, dtype: str, accuracy_level: int | None,
              embedding: QuantizedWeight | None = None):
    """Validate against transformers' decoder layers on our weights, one at a time; a quantized ``embedding``
    (and with it a tied head) is dequantized into the reference, as the checkpoint's quantized linears are."""
    log.info("export: validating against the PyTorch reference (transformers' decoder layers, one at a time)")
    bits = [q.bits for q in ckpt.quantization.values()] + ([embedding.bits] if embedding is not None else [])
    precision = precision_of(dtype, accuracy_level, bits)
    reference = StreamedReference(ckpt, embedding=embedding)  # dequantized by the reference, block by block
    # A partitioned bundle is run both ways: as one composed graph with its fused layer_experts graphs (what a
    # resident run takes), and graph by graph through its expert partitions (what a memory budget takes; its
    # per-layer states locate a wrong layer), both checked against the one reference pass.
    layered = layout == "partitioned"
    checks = validate_bundle(lambda: load_bundle(root), reference, precision=precision,
                             open_partitions=(lambda: load_bundle(root, fuse_layers=False, compose=False))
                             if layered else None)
    raise_on_failure(checks, "decoder" if layout == "monolithic" else "partitioned trunk + experts")
    return checks
