"""Typed, frozen model specs parsed from a Hugging Face ``config.json``.

A spec is the single source of truth for an architecture's shapes: the checkpoint reader validates
tensors against :meth:`ModelSpec.expected_tensors`, and parameter counts are sums over the same list,
so the two can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Components a tensor belongs to; parameter counts are reported per component.
COMPONENTS = (
    "embeddings", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts",
    "head", "mtp",
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the checkpoint must hold: on-disk name, shape, and what it belongs to."""

    name: str
    shape: tuple[int, ...]
    component: str
    layer: int | None = None  # decoder layer index; None for embeddings/final norm/head
    expert: int | None = None  # routed expert index
    linear: bool = False  # a 2-D matmul weight (a candidate for FP8 storage and quantization)
    buffer: bool = False  # stored but not trained by gradient (V3's e_score_correction_bias)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings, read from ``rope_scaling`` (published) or ``rope_parameters`` (tf5)."""

    theta: float
    type: str = "default"  # default | yarn | llama3 | linear | dynamic
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    interleaved: bool = False  # DeepSeek rotates pairs (2i, 2i+1); Llama/Qwen rotate halves


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention dims (DeepSeek-V2 paper §2.1)."""

    q_lora_rank: int | None  # None: V2-Lite's plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_cache_width(self) -> int:
        """Values cached per token per layer in the absorbed form: normalized latent + rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim


ROUTING_VARIANTS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoESpec:
    """Fine-grained MoE with shared experts, and the routing variant that picks experts."""

    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routing: str  # one of ROUTING_VARIANTS
    scoring_func: str  # softmax | sigmoid
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int

    @property
    def has_correction_bias(self) -> bool:
        return self.routing == "noaux_tc"


@dataclass(frozen=True)
class ModelSpec:
    """Everything dsedge needs to know about an architecture, from config.json alone."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # per-head dim of GQA models; for MLA the qk head dim
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeSpec
    attention_bias: bool = False  # bias on q/k/v (Qwen2) or on q/k/v/o (Llama attention_bias)
    mlp_bias: bool = False
    mla: MLASpec | None = None
    moe: MoESpec | None = None
    num_mtp_layers: int = 0
    fp8_block_size: tuple[int, int] | None = None  # from quantization_config (V3/R1 ship FP8)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)
    # The architecture's tensor list (set by its parser: deepseek_layout, dense_layout), called by
    # expected_tensors; held here so that specs need not import the parsers that build them.
    layout: Callable[..., list[TensorSpec]] | None = field(default=None, compare=False, repr=False, hash=False)

    # --- structure -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "deepseek" if self.mla is not None else "dense"

    def is_moe_layer(self, layer: int) -> bool:
        moe = self.moe
        if moe is None:
            return False
        return layer >= moe.first_k_dense_replace and layer % moe.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def mtp_layers(self) -> list[int]:
        """Indices of the multi-token-prediction layers, stored after the decoder layers."""
        return list(range(self.num_hidden_layers, self.num_hidden_layers + self.num_mtp_layers))

    @property
    def softmax_scale(self) -> float:
        """Attention softmax scale, including YaRN's mscale² for DeepSeek (DESIGN.md §4)."""
        if self.mla is None:
            return self.head_dim ** -0.5
        scale = self.mla.qk_head_dim ** -0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def expected_tensors(self, *, include_mtp: bool = False) -> list[TensorSpec]:
        """Every tensor a checkpoint of this spec holds, in on-disk (HF) names."""
        if self.layout is None:
            raise ValueError(f"this {self.model_type} spec has no tensor layout; build specs with "
                             "dsedge.models.registry.spec_from_config")
        return self.layout(self, include_mtp=include_mtp)

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON summary (for `inspect --json` and manifests)."""
        out = {
            "model_type": self.model_type, "family": self.family, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "rope": _asdict(self.rope),
            "softmax_scale": self.softmax_scale, "num_mtp_layers": self.num_mtp_layers,
            "fp8_block_size": list(self.fp8_block_size) if self.fp8_block_size else None,
        }
        if self.mla:
            out["mla"] = {**_asdict(self.mla), "latent_cache_width": self.mla.latent_cache_width}
        if self.moe:
            out["moe"] = {**_asdict(self.moe), "moe_layers": self.moe_layers}
        return out


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention-temperature factor (DeepSeek-V2 modeling code, ``yarn_get_mscale``)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _asdict(obj) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
