"""`dsedge plan`: will a model fit a device, and how fast can it decode — from config.json alone.

Weight bytes per precision scheme, the KV cache (latent MLA vs a naive per-head cache), the memory
budget check, how many routed experts can stay resident, and a bandwidth bound on decode speed
(decode streams every active weight once per token, so tokens/s ≤ bandwidth / bytes read per token).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsedge.demo import DEMO_MODELS
from dsedge.errors import ConfigError
from dsedge.models.config import read_config_file
from dsedge.models.params import ACTIVE_NOTE, count_params
from dsedge.models.published import PUBLISHED_CONFIGS, published_config
from dsedge.models.registry import spec_from_config
from dsedge.models.spec import ModelSpec, TensorSpec
from dsedge.targets import Target, load_target

INT4_GROUP = 128
# MatMulNBits has no per-channel form: export repeats a per-channel scale over blocks (per_channel_block).
# Measured (issue 12): int8 single-token MatMulNBits at level 4 reads 28–29.5 GB/s at block 128 (llama.cpp's
# Q8_0 per byte) against less at 32, and per-row scale bytes fall 4×; ds3bench int8 decode 13.8 → 12.3 ms
# and qwen2bench 11.6 → 10.2 ms per token (block 32 → 128, interleaved rounds).
PER_CHANNEL_BLOCKS = (128, 64, 32, 16)
QMOE_MAX_BLOCK = 128  # dsedge.export.moe.QMOE_MAX_BLOCK (plan cannot import export)
KV_BYTES = 2  # cache values in fp16/bf16
# Activations, onnxruntime arenas, tokenizer and Python: a fixed allowance. Estimate.
RUNTIME_OVERHEAD_BYTES = 256 * 1024**2
FLOAT_BYTES = {"fp32": 4, "fp16": 2}  # export's --dtype: every float tensor and quantization scale
# The runtime's process before weights: Python, numpy, onnxruntime, tokenizers (56 MiB after imports) and a
# demo bundle's sessions (79 MiB loaded), measured with ``dsedge run`` on this project's 2-core machine.
PROCESS_BASE_BYTES = 80 * 1024**2
# onnxruntime prepacks MatMulNBits/QMoE weights for its int8-activation kernels (accuracy level 4, the
# presets' level): codes and scales plus one float block sum per (row, block), rows padded to 16 (MLAS's
# QNBit "CompInt8" layout). Measured: anonymous RSS 1042 MiB after loading R1-Distill-Qwen-1.5B int4, plan's
# weights 1008 (benchmarks/run_memory.py).
BLOCK_SUM_BYTES = 4
# The MLA up-projection export absorbs into per-head matrices (w_uk, w_uv_t): float, or — when kv_b is
# quantized and the export fp32 — int8 codes with a scale per head and column (dsedge.export.attention).
ABSORBED = ".self_attn.kv_b_proj.weight"

# scheme → ((bits, group) of routed-expert linears, (bits, group) of other linears); None keeps them float.
# group None = one scale per output channel.
SCHEMES: dict[str, tuple[tuple[int, int | None] | None, tuple[int, int | None] | None]] = {
    "bf16": (None, None),
    "int8": ((8, None), (8, None)),
    "int4": ((4, INT4_GROUP), (4, INT4_GROUP)),
    "int4-experts": ((4, INT4_GROUP), (8, None)),
}
# scheme → (bits, group) of the LM head and of the token embedding where that preset quantizes them (the
# head by a recipe rule, MatMulNBits; the embedding at export, GatherBlockQuantized with a tied head reading
# the same codes: dsedge.export.embedding); absent = kept float. Mirrors dsedge.compress.recipes' presets.
HEAD_QUANT: dict[str, tuple[int, int | None]] = {"int8": (8, None), "int4": (4, 128)}
EMBEDDING_QUANT: dict[str, tuple[int, int | None]] = {"int8": (8, None), "int4": (8, None)}
SCHEME_NOTE = ("sizes are what `dsedge compress` (the preset of that name) + `dsedge export` write: int8 = per "
               "channel, int4 = group 128, symmetric, as MatMulNBits codes plus one scale per block of 32 inputs "
               "(per channel) or per group, in the bundle's float dtype; int8 and int4 also quantize the LM head "
               "(MatMulNBits) and the embedding (GatherBlockQuantized) int8 per row; int4-experts keeps them "
               "float; MLA's absorbed kv_b is int8 per head and column in an fp32 export; norms and routers "
               "stay float — fp32 in a default export (--dtype fp32), "
               "the bf16 row is a 16-bit export (--dtype fp16); a tied head is stored once; MTP is not counted "
               "(not exported)")
@dataclass(frozen=True)
class PrecisionPlan:
    scheme: str
    weight_bytes: int
    routed_expert_bytes: int
    active_bytes_per_token: int
    fits: bool | None  # None without a target
    resident_experts: int | None  # routed experts that fit next to the trunk (MoE only)
    offloaded_bytes: int | None
    fits_with_offload: bool | None  # trunk + resident experts on the device, the rest in host RAM / on disk
    decode_tokens_per_s_bound: float | None
    # with the non-resident experts read from disk (CPU/SoC targets that state disk_bandwidth_gbps)
    decode_tokens_per_s_disk_bound: float | None = None
    # peak RSS of `dsedge run` (short prompt, every expert resident, the cache at the plan's context): the
    # process, the weights a token reads as onnxruntime holds them, the largest one's copy while it is packed
    runtime_rss_bytes: int | None = None


@dataclass(frozen=True)
class PlanReport:
    model: str
    model_type: str
    params: dict[str, Any]
    context: int
    kv_latent_bytes_per_token: int | None  # MLA only
    kv_naive_bytes_per_token: int
    kv_bytes_at_context: int
    target: dict[str, Any] | None
    precisions: list[PrecisionPlan]
    total_routed_experts: int
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["precisions"] = [dict(p.__dict__) for p in self.precisions]
        return out


def plan(model: str | Path, *, target: str | Path | Target | None = None, context: int | None = None,
         dtype: str = "fp32", layout: str = "monolithic") -> PlanReport:
    """Plan a model (checkpoint dir, config.json, or a published short name) for a target.

    ``dtype`` and ``layout``: the export's (--dtype, default fp32, sets the quantized rows' float tensors;
    --layout, default monolithic, where quantized routed experts are one fused QMoE per layer)."""
    if dtype not in FLOAT_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(FLOAT_BYTES)}, got {dtype!r}", where="plan")
    if layout not in ("monolithic", "partitioned"):
        raise ConfigError(f"layout must be monolithic or partitioned, got {layout!r}", where="plan")
    spec, label = resolve_model(model)
    tgt = load_target(target) if target is not None else None
    ctx = _context(spec, tgt, context)
    latent, naive = kv_bytes_per_token(spec)
    kv_at_ctx = (latent if latent is not None else naive) * ctx
    tensors = spec.expected_tensors()
    extra = _tokenizer_bytes(model)
    rows = [_precision_plan(spec, tensors, scheme, tgt, kv_at_ctx, ctx, dtype, extra, layout) for scheme in SCHEMES]
    n_experts = len(spec.moe_layers) * spec.moe.n_routed_experts if spec.moe else 0
    return PlanReport(
        model=label, model_type=spec.model_type, params=count_params(spec).to_json(), context=ctx,
        kv_latent_bytes_per_token=latent, kv_naive_bytes_per_token=naive, kv_bytes_at_context=kv_at_ctx,
        target=tgt.to_json() | {"name": tgt.name} if tgt else None, precisions=rows,
        total_routed_experts=n_experts, notes=_notes(spec, tgt),
    )


def resolve_model(model: str | Path) -> tuple[ModelSpec, str]:
    """A spec from a checkpoint directory, a config.json path, or a published short name."""
    path = Path(model)
    if path.is_dir() or path.is_file():
        config_path = path / "config.json" if path.is_dir() else path
        return spec_from_config(read_config_file(config_path), str(config_path)), str(path)
    if str(model) in DEMO_MODELS:
        return resolve_model(DEMO_MODELS[str(model)])
    if str(model).lower() in PUBLISHED_CONFIGS:
        return spec_from_config(published_config(str(model)), f"published:{model}"), str(model).lower()
    if any(sep in str(model) for sep in ("/", "\\")) or str(model).endswith(".json"):
        raise ConfigError("no such checkpoint directory or config file", where=str(model),
                          hint="pass a checkpoint directory, a config.json, or one of: "
                               + ", ".join(PUBLISHED_CONFIGS))
    published_config(str(model))  # raises with a did-you-mean
    raise AssertionError("unreachable")


# What export copies into the bundle besides the graphs (dsedge.export.bundle.TOKENIZER_FILES).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _tokenizer_bytes(model: str | Path) -> int:
    """The tokenizer files a checkpoint directory holds (a bundle carries them too); 0 for published names."""
    path = Path(DEMO_MODELS.get(str(model), model))
    if not path.is_dir():
        return 0
    return sum((path / name).stat().st_size for name in TOKENIZER_FILES if (path / name).is_file())


def kv_bytes_per_token(spec: ModelSpec) -> tuple[int | None, int]:
    """(latent MLA cache, naive per-head K/V cache) bytes per token over all layers."""
    layers = spec.num_hidden_layers
    if spec.mla is not None:
        latent = layers * spec.mla.latent_cache_width * KV_BYTES
        naive = layers * spec.num_attention_heads * (spec.mla.qk_head_dim + spec.mla.v_head_dim) * KV_BYTES
        return latent, naive
    return None, layers * 2 * spec.num_key_value_heads * spec.head_dim * KV_BYTES


def tensor_bytes(t: TensorSpec, quant: tuple[int, int | None] | None, float_bytes: int = 4) -> int:
    """Bytes a bundle stores for one tensor: float at ``float_bytes``; a linear quantized to ``quant``
    (bits, group or None per channel) as MatMulNBits codes (padded to whole blocks) + one scale per block."""
    if t.name.endswith(ABSORBED) and quant is not None and float_bytes == 4:
        return absorbed_int8_bytes(t)
    if quant is None or not t.linear or t.name.endswith(ABSORBED):
        return t.numel * (4 if t.component == "router" else float_bytes)  # routers stay fp32 (DeepSeek does)
    return blocked_bytes(t.shape, quant, float_bytes)


def absorbed_int8_bytes(t: TensorSpec) -> int:
    """kv_b [H·(nope+v), kv] as the export's int8 w_uk/w_uv_t: a byte per weight and a float32 scale per
    head and column, H·(kv + v). The head count is not in the tensor's shape; H·(nope+v) scales stand in
    (V3: 32,768 for 81,920, 0.2 MB of a layer's 16.8 MB of codes)."""
    return t.numel + 4 * t.shape[0]


def blocked_bytes(shape: tuple[int, int], quant: tuple[int, int | None], float_bytes: int, scale_copies: int = 1
                  ) -> int:
    """A [rows, cols] matrix as MatMulNBits / GatherBlockQuantized codes (padded to whole blocks) plus
    ``scale_copies`` sets of one scale per block (a tied embedding keeps a second set for its head)."""
    bits, group = quant
    rows, cols = shape
    blocks = matmul_blocks(cols, group)
    return rows * blocks * (group or per_channel_block(cols)) * bits // 8 + scale_copies * rows * blocks * float_bytes


def matmul_blocks(cols: int, group: int | None) -> int:
    """Blocks per row of a MatMulNBits matrix (a per-channel scale is repeated over per_channel_block)."""
    return math.ceil(cols / (group or per_channel_block(cols)))


def per_channel_block(cols: int) -> int:
    """The MatMulNBits block a per-channel scale is repeated over for rows of ``cols`` inputs: the block of
    PER_CHANNEL_BLOCKS that pads the row least, the largest of those (128 tiles every published DeepSeek and
    Qwen2 width; SmolLM's 576 takes 64, the tiny fixtures' 72 take 16). Export uses this too."""
    return min(PER_CHANNEL_BLOCKS, key=lambda block: (math.ceil(cols / block) * block, -block))


def _head_and_embedding_bytes(spec: ModelSpec, tensors: list[TensorSpec], scheme: str, float_bytes: int
                              ) -> tuple[int, int, int]:
    """(head bytes, embedding bytes, embedding bytes one token reads) as export writes them for ``scheme``."""
    head_quant, embed_quant = HEAD_QUANT.get(scheme), EMBEDDING_QUANT.get(scheme)
    head = sum(t.numel * float_bytes if head_quant is None else blocked_bytes(t.shape, head_quant, float_bytes)
               for t in tensors if t.component == "head")
    table = next(t for t in tensors if t.component == "embeddings")
    tied = 2 if spec.tie_word_embeddings else 1
    embed = table.numel * float_bytes if embed_quant is None else blocked_bytes(table.shape, embed_quant,
                                                                                float_bytes, tied)
    row = spec.hidden_size * float_bytes if embed_quant is None else blocked_bytes((1, spec.hidden_size),
                                                                                   embed_quant, float_bytes)
    return head, embed, row


def qmoe_bytes(t: TensorSpec, quant: tuple[int, int | None], float_bytes: int, block: int = 0) -> int:
    """A routed-expert linear inside a fused ``QMoE`` node: codes packed along each row (no block padding) and
    one scale per QMoE ``block`` (each group's scale repeated over its blocks), or per row when ``block`` is 0
    (dsedge.export.moe._qmoe_weights)."""
    bits, _ = quant
    rows, cols = t.shape
    return rows * cols * bits // 8 + rows * (cols // block if block else 1) * float_bytes


def qmoe_layout(spec: ModelSpec, quant: tuple[int, int | None] | None) -> int | None:
    """The QMoE block export fuses a layer's quantized routed experts with, in either layout (one QMoE per
    layer, or per expert partition): the largest power of two ≥ 16 and ≤ 128 dividing the group (or, per
    channel, 128) and both widths; 0 (one scale per row) for per-channel experts no such block tiles; None
    when the experts stay per-expert MatMulNBits. Mirrors dsedge.export.moe.qmoe_scheme/qmoe_block for the
    presets (symmetric; 8-bit at the default level 4); planning cannot import export (export imports planning)."""
    if quant is None or spec.moe is None:
        return None
    bits, group = quant
    widths = (spec.hidden_size, spec.moe.moe_intermediate_size)
    if bits not in (4, 8) or any(d % 2 for d in widths):
        return None
    common = math.gcd(group or QMOE_MAX_BLOCK, *widths)
    block = min(common & -common, QMOE_MAX_BLOCK)
    if block >= 16:
        return block
    return 0 if group is None else None


def _draft_bytes(spec: ModelSpec, expert_quant, other_quant, float_bytes: int, expert_bytes) -> int:
    """The MTP module's draft graph (dsedge.export.mtp): its decoder block, eh_proj and norms as a layer is
    stored, routed experts like the decoder's; its embedding and head copies are the main model's, which the
    draft references instead of storing (as are its RoPE tables)."""
    total = 0
    for t in spec.expected_tensors(include_mtp=True):
        if t.component != "mtp" or t.name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            continue
        routed = ".mlp.experts." in t.name
        total += expert_bytes(t, expert_quant, float_bytes) if routed and expert_quant else \
            tensor_bytes(t, other_quant, float_bytes)
    return total


def rope_table_bytes(spec: ModelSpec, context: int, float_bytes: int) -> int:
    """The cos and sin tables baked into the graphs: context × rotary dim / 2 each."""
    rotary = spec.mla.qk_rope_head_dim if spec.mla is not None else spec.head_dim
    return 2 * context * (rotary // 2) * float_bytes


def _precision_plan(spec: ModelSpec, tensors: list[TensorSpec], scheme: str, tgt: Target | None,
                    kv_at_ctx: int, ctx: int, dtype: str, extra_bytes: int, layout: str) -> PrecisionPlan:
    expert_quant, other_quant = SCHEMES[scheme]
    float_bytes = 2 if scheme == "bf16" else FLOAT_BYTES[dtype]
    block = qmoe_layout(spec, expert_quant)
    expert_bytes = tensor_bytes if block is None else functools.partial(qmoe_bytes, block=block)
    routed = sum(expert_bytes(t, expert_quant, float_bytes) for t in tensors if t.component == "routed_experts")
    head, embed, row = _head_and_embedding_bytes(spec, tensors, scheme, float_bytes)
    other = sum(tensor_bytes(t, other_quant, float_bytes) for t in tensors
                if t.component not in ("routed_experts", "head", "embeddings"))
    other += head + embed + rope_table_bytes(spec, ctx, float_bytes) + extra_bytes
    draft = _draft_bytes(spec, expert_quant, other_quant, float_bytes, expert_bytes)
    active_routed = routed * spec.moe.num_experts_per_tok // spec.moe.n_routed_experts if spec.moe else 0
    # One embedding row is read per token, not the table — unless the table is also the (tied) head.
    active = other + active_routed - (0 if spec.tie_word_embeddings else embed - row)
    # the draft graph is stored but loaded only under --speculative mtp: in the bundle's bytes, not in what
    # must be resident to decode
    stored = routed + other + draft
    rss = runtime_rss_bytes(spec, tensors, scheme, float_bytes, block, kv_at_ctx, extra_bytes)
    if tgt is None:
        return PrecisionPlan(scheme, stored, routed, active, None, None, None, None, None, None, rss)
    need = routed + other + kv_at_ctx + RUNTIME_OVERHEAD_BYTES
    resident, offloaded = _residency(spec, routed, other, kv_at_ctx, tgt)
    per_token = active + kv_at_ctx  # decode attends over the whole cache
    bound = tgt.memory_bandwidth_gbps * 1e9 / per_token
    fits = need <= tgt.memory_budget_bytes
    return PrecisionPlan(scheme, stored, routed, active, fits, resident, offloaded,
                         _fits_with_offload(fits, spec, routed, other, kv_at_ctx, offloaded, tgt), round(bound, 2),
                         _disk_bound(spec, tgt, per_token, active_routed, resident), rss)


def runtime_rss_bytes(spec: ModelSpec, tensors: list[TensorSpec], scheme: str, float_bytes: int,
                      qmoe_block: int | None, kv_at_ctx: int, extra_bytes: int) -> int:
    """Peak RSS of a run with every expert resident: PROCESS_BASE_BYTES + the weights one token reads as
    onnxruntime holds them (quantized ones prepacked with their block sums; an untied embedding table is
    memory-mapped and only its looked-up rows are touched) + the largest quantized tensor's stored copy,
    held while it is packed + the cache at the plan's context. A long prefill adds its activations (a
    970-token prompt: 215 MiB on R1-Distill-Qwen-1.5B). Measured against `dsedge run` in docs/scale.md."""
    expert_quant, other_quant = SCHEMES[scheme]
    head_quant = HEAD_QUANT.get(scheme)
    held = transient = 0
    for t in tensors:
        if t.component == "embeddings" and not spec.tie_word_embeddings:
            continue  # memory-mapped: a token touches one row
        if t.component == "head":
            quant = head_quant
        elif t.component == "embeddings":  # tied: the head reads the whole table every token
            quant = head_quant or EMBEDDING_QUANT.get(scheme)
        elif t.component == "routed_experts":
            quant = expert_quant
        else:
            quant = other_quant
        packed, stored = _held(t, quant, float_bytes, qmoe_block if t.component == "routed_experts" else None)
        held += packed
        transient = max(transient, stored)
    return PROCESS_BASE_BYTES + held + transient + kv_at_ctx + extra_bytes


def _held(t: TensorSpec, quant: tuple[int, int | None] | None, float_bytes: int, qmoe_block: int | None
          ) -> tuple[int, int]:
    """(bytes onnxruntime holds for ``t``, bytes of the stored copy it packs from; 0 when it maps it)."""
    matrix = t.linear or t.component in ("head", "embeddings")  # the head and a tied table: MatMulNBits
    if t.name.endswith(ABSORBED):  # onnxruntime prepacks only a 2-D B (MatMulIntegerBase): 3-D stays as stored
        return tensor_bytes(t, quant, float_bytes), 0
    if quant is None or not matrix:
        return tensor_bytes(t, None, float_bytes), 0
    rows, cols = t.shape
    if qmoe_block is not None:  # a routed expert inside a fused QMoE
        stored, blocks = qmoe_bytes(t, quant, float_bytes, qmoe_block), cols // qmoe_block if qmoe_block else 1
    else:
        stored, blocks = blocked_bytes(t.shape, quant, float_bytes), matmul_blocks(cols, quant[1])
    return stored + math.ceil(rows / 16) * 16 * blocks * BLOCK_SUM_BYTES, stored


def _disk_bound(spec: ModelSpec, tgt: Target, per_token: int, active_routed: int, resident: int | None,
                ) -> float | None:
    """Decode tokens/s when the experts that do not fit are read from disk on demand: with routing spread
    evenly, a token's routed experts miss the resident set in proportion to the offloaded share, and those
    bytes come at the disk's speed (no page-cache reuse assumed: a lower bound for a cold cache)."""
    if spec.moe is None or resident is None or tgt.disk_bandwidth_gbps is None or tgt.kind == "gpu":
        return None
    n_experts = len(spec.moe_layers) * spec.moe.n_routed_experts
    from_disk = active_routed * (n_experts - resident) / n_experts
    if from_disk == 0:
        return None  # everything resident: the memory bound holds
    seconds = (per_token - from_disk) / (tgt.memory_bandwidth_gbps * 1e9) + from_disk / (tgt.disk_bandwidth_gbps * 1e9)
    return round(1 / seconds, 2)


def _fits_with_offload(fits: bool, spec: ModelSpec, routed: int, other: int, kv: int, offloaded: int | None,
                       tgt: Target) -> bool | None:
    if fits or spec.moe is None:
        return fits if spec.moe is not None else None
    if other + kv + RUNTIME_OVERHEAD_BYTES > tgt.memory_budget_bytes:
        return False  # not even the trunk fits
    # A GPU keeps offloaded experts in host RAM; a CPU/SoC target maps them from disk on demand.
    return tgt.kind != "gpu" or (offloaded or 0) <= tgt.host_memory_bytes


def _residency(spec: ModelSpec, routed: int, other: int, kv: int, tgt: Target) -> tuple[int | None, int | None]:
    """How many routed experts fit next to the trunk, cache and overhead; the bytes left offloaded."""
    if spec.moe is None:
        return None, None
    n_experts = len(spec.moe_layers) * spec.moe.n_routed_experts
    per_expert = routed // n_experts
    room = tgt.memory_budget_bytes - other - kv - RUNTIME_OVERHEAD_BYTES
    resident = max(0, min(n_experts, room // per_expert)) if room > 0 else 0
    return resident, (n_experts - resident) * per_expert


def _context(spec: ModelSpec, tgt: Target | None, context: int | None) -> int:
    if context is not None:
        if context < 1:
            raise ConfigError(f"--context must be ≥ 1, got {context}", where="plan")
        return context
    default = tgt.max_context if tgt else 4096
    return min(default, spec.max_position_embeddings)


def _notes(spec: ModelSpec, tgt: Target | None) -> list[str]:
    notes = [ACTIVE_NOTE, SCHEME_NOTE,
             f"runtime overhead allowance: {RUNTIME_OVERHEAD_BYTES // 1024**2} MiB (activations, arenas; estimate)",
             "run RSS = peak RSS of `dsedge run` on a short prompt with every expert resident: the process "
             f"({PROCESS_BASE_BYTES // 1024**2} MiB), the weights a token reads as onnxruntime holds them "
             "(prepacked with block sums; an untied embedding table is memory-mapped), the largest quantized "
             "tensor's copy while it packs, and the cache at the context; a long prefill adds activations "
             "(measured within 7% on R1-Distill-Qwen-1.5B int4/int8 and V2-Lite int4: docs/scale.md)",
             "decode bound = memory bandwidth / (active weight bytes + KV cache read at the full context); "
             "real decode reaches 50-90% of it"]
    if spec.moe and tgt:
        where = "host RAM (CUDA EP reads them over PCIe)" if tgt.kind == "gpu" else "disk, loaded on demand"
        notes.append(f"experts that are not resident live in {where}; the bound assumes every active weight "
                     "is read at the target's memory bandwidth, so it is optimistic when experts are offloaded")
    return notes
