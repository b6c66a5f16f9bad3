"""DeepSeek-V2 / V2-Lite / V3 / R1: config parsing and the on-disk tensor layout.

Layout follows the published checkpoints' names (``model.layers.N.mlp.experts.J.gate_proj.weight``),
which is also what transformers 5 writes on save (it fuses experts only in memory).
"""

from __future__ import annotations

import warnings
from typing import Any

from dsedge.errors import ConfigError
from dsedge.models.config import ConfigReader, read_rope, token_ids
from dsedge.models.spec import MLASpec, ModelSpec, MoESpec, TensorSpec


def parse_deepseek(config: dict[str, Any], where: str) -> ModelSpec:
    cfg = ConfigReader(config, where)
    model_type = cfg.get("model_type", str)
    heads = cfg.positive("num_attention_heads")
    mla = _parse_mla(cfg)
    spec = ModelSpec(
        model_type=model_type,
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=cfg.positive("hidden_size"),
        intermediate_size=cfg.positive("intermediate_size"),
        num_hidden_layers=cfg.positive("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", int, heads) or heads,
        head_dim=mla.qk_head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", float, 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", int, 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", bool, False),
        rope=read_rope(cfg, interleaved=cfg.get("rope_interleave", bool, True)),
        attention_bias=cfg.get("attention_bias", bool, False),
        mla=mla,
        moe=_parse_moe(cfg, model_type),
        num_mtp_layers=cfg.get("num_nextn_predict_layers", int, 0) if model_type == "deepseek_v3" else 0,
        fp8_block_size=_parse_fp8(cfg),
        config=config,
        layout=deepseek_layout,
        **token_ids(cfg),
    )
    _check_groups(spec, where)
    return spec


def _parse_mla(cfg: ConfigReader) -> MLASpec:
    q_lora = cfg.get("q_lora_rank", int, None)
    return MLASpec(
        q_lora_rank=q_lora or None,  # 0 or null both mean "no q-LoRA" (V2-Lite)
        kv_lora_rank=cfg.positive("kv_lora_rank"),
        qk_nope_head_dim=cfg.positive("qk_nope_head_dim"),
        qk_rope_head_dim=cfg.positive("qk_rope_head_dim"),
        v_head_dim=cfg.positive("v_head_dim"),
    )


def _parse_moe(cfg: ConfigReader, model_type: str) -> MoESpec:
    routing, scoring = _routing_variant(cfg, model_type)
    return MoESpec(
        n_routed_experts=cfg.positive("n_routed_experts"),
        n_shared_experts=cfg.get("n_shared_experts", int, 0) or 0,
        num_experts_per_tok=cfg.positive("num_experts_per_tok"),
        moe_intermediate_size=cfg.positive("moe_intermediate_size"),
        routing=routing,
        scoring_func=scoring,
        n_group=cfg.get("n_group", int, 1) or 1,
        topk_group=cfg.get("topk_group", int, 1) or 1,
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 1.0),
        norm_topk_prob=cfg.get("norm_topk_prob", bool, False),
        first_k_dense_replace=cfg.get("first_k_dense_replace", int, 0),
        moe_layer_freq=cfg.get("moe_layer_freq", int, 1) or 1,
    )


def _routing_variant(cfg: ConfigReader, model_type: str) -> tuple[str, str]:
    """The router DeepSeek's own code runs for this model_type.

    DeepSeek-V3's reference (``inference/model.py``) hard-codes sigmoid scoring with the
    correction-bias top-k (noaux_tc) and ignores ``scoring_func``/``topk_method``; we do the same
    but warn when a config says otherwise, since that config would then be misleading.
    """
    method = cfg.get("topk_method", str, None)
    scoring = cfg.get("scoring_func", str, None)
    if model_type == "deepseek_v3":
        if method not in (None, "noaux_tc") or scoring not in (None, "sigmoid"):
            warnings.warn(f"{cfg.where}: deepseek_v3 always routes with sigmoid + noaux_tc (as DeepSeek's "
                          f"reference does); ignoring topk_method={method!r} scoring_func={scoring!r}",
                          stacklevel=3)
        return "noaux_tc", "sigmoid"
    method = method or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"unsupported topk_method {method!r} for {model_type}", where=cfg.where,
                          hint="DeepSeek-V2 checkpoints use 'greedy' or 'group_limited_greedy'")
    if scoring not in (None, "softmax"):
        raise ConfigError(f"unsupported scoring_func {scoring!r} for {model_type}", where=cfg.where,
                          hint="DeepSeek-V2 routers score with softmax")
    return method, "softmax"


def _parse_fp8(cfg: ConfigReader) -> tuple[int, int] | None:
    quant = cfg.config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"unsupported FP8 format {quant.get('fmt')!r}", where=cfg.where,
                          hint="only e4m3 block-scaled weights (as DeepSeek-V3/R1 ship) are supported")
    block = quant.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}",
                          where=cfg.where)
    return (block[0], block[1])


def _check_groups(spec: ModelSpec, where: str) -> None:
    moe = spec.moe
    assert moe is not None
    if moe.routing == "greedy":
        return
    if moe.n_routed_experts % moe.n_group:
        raise ConfigError(f"n_routed_experts={moe.n_routed_experts} is not divisible by n_group={moe.n_group}",
                          where=where, hint="group-limited routing needs equal-sized expert groups")
    if not 1 <= moe.topk_group <= moe.n_group:
        raise ConfigError(f"topk_group={moe.topk_group} must be in 1..n_group={moe.n_group}", where=where)
    reachable = moe.topk_group * (moe.n_routed_experts // moe.n_group)
    if reachable < moe.num_experts_per_tok:
        raise ConfigError(f"only {reachable} experts are reachable through {moe.topk_group} groups, "
                          f"fewer than num_experts_per_tok={moe.num_experts_per_tok}", where=where)


# --- tensor layout ------------------------------------------------------------------------------

def deepseek_layout(spec: ModelSpec, *, include_mtp: bool) -> list[TensorSpec]:
    H, V = spec.hidden_size, spec.vocab_size
    out = [TensorSpec("model.embed_tokens.weight", (V, H), "embeddings")]
    for i in range(spec.num_hidden_layers):
        out += _decoder_layer(spec, i, component=None)
    out.append(TensorSpec("model.norm.weight", (H,), "norms"))
    if not spec.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (V, H), "head"))
    if include_mtp:
        for i in spec.mtp_layers:
            out += _mtp_layer(spec, i)
    return out


def _decoder_layer(spec: ModelSpec, i: int, component: str | None) -> list[TensorSpec]:
    """One decoder layer; ``component`` overrides the per-tensor component (used for MTP)."""
    p = f"model.layers.{i}."
    H = spec.hidden_size
    tensors = [
        TensorSpec(p + "input_layernorm.weight", (H,), "norms", i),
        TensorSpec(p + "post_attention_layernorm.weight", (H,), "norms", i),
        *_mla_tensors(spec, p + "self_attn.", i),
        *(_moe_tensors(spec, p + "mlp.", i) if spec.is_moe_layer(i) or component == "mtp"
          else _mlp_tensors(p + "mlp.", H, spec.intermediate_size, "dense_mlp", i)),
    ]
    if component:
        tensors = [_with_component(t, component) for t in tensors]
    return tensors


def _mla_tensors(spec: ModelSpec, p: str, i: int) -> list[TensorSpec]:
    mla, H, n = spec.mla, spec.hidden_size, spec.num_attention_heads
    assert mla is not None
    if mla.q_lora_rank is None:
        q = [TensorSpec(p + "q_proj.weight", (n * mla.qk_head_dim, H), "attention", i, linear=True)]
    else:
        r = mla.q_lora_rank
        q = [TensorSpec(p + "q_a_proj.weight", (r, H), "attention", i, linear=True),
             TensorSpec(p + "q_a_layernorm.weight", (r,), "attention", i),
             TensorSpec(p + "q_b_proj.weight", (n * mla.qk_head_dim, r), "attention", i, linear=True)]
    kv = mla.kv_lora_rank
    return q + [
        TensorSpec(p + "kv_a_proj_with_mqa.weight", (kv + mla.qk_rope_head_dim, H), "attention", i,
                   linear=True),
        TensorSpec(p + "kv_a_layernorm.weight", (kv,), "attention", i),
        TensorSpec(p + "kv_b_proj.weight", (n * (mla.qk_nope_head_dim + mla.v_head_dim), kv), "attention", i,
                   linear=True),
        TensorSpec(p + "o_proj.weight", (H, n * mla.v_head_dim), "attention", i, linear=True),
    ]


def _mlp_tensors(p: str, H: int, inter: int, component: str, i: int, expert: int | None = None,
                 bias: bool = False) -> list[TensorSpec]:
    out = [TensorSpec(p + "gate_proj.weight", (inter, H), component, i, expert, True),
           TensorSpec(p + "up_proj.weight", (inter, H), component, i, expert, True),
           TensorSpec(p + "down_proj.weight", (H, inter), component, i, expert, True)]
    if bias:
        out += [TensorSpec(p + f"{n}.bias", (s,), component, i, expert)
                for n, s in (("gate_proj", inter), ("up_proj", inter), ("down_proj", H))]
    return out


def _moe_tensors(spec: ModelSpec, p: str, i: int) -> list[TensorSpec]:
    moe, H = spec.moe, spec.hidden_size
    assert moe is not None
    out = [TensorSpec(p + "gate.weight", (moe.n_routed_experts, H), "router", i)]
    if moe.has_correction_bias:
        out.append(TensorSpec(p + "gate.e_score_correction_bias", (moe.n_routed_experts,), "router", i,
                              buffer=True))
    for e in range(moe.n_routed_experts):
        out += _mlp_tensors(f"{p}experts.{e}.", H, moe.moe_intermediate_size, "routed_experts", i, e)
    if moe.n_shared_experts:
        out += _mlp_tensors(p + "shared_experts.", H, moe.moe_intermediate_size * moe.n_shared_experts,
                            "shared_experts", i)
    return out


def _mtp_layer(spec: ModelSpec, i: int) -> list[TensorSpec]:
    """DeepSeek-V3's multi-token-prediction module (V3 report §2.2), as stored at index L."""
    p, H, V = f"model.layers.{i}.", spec.hidden_size, spec.vocab_size
    extra = [
        TensorSpec(p + "embed_tokens.weight", (V, H), "mtp", i),
        TensorSpec(p + "enorm.weight", (H,), "mtp", i),
        TensorSpec(p + "hnorm.weight", (H,), "mtp", i),
        TensorSpec(p + "eh_proj.weight", (H, 2 * H), "mtp", i, linear=True),
        TensorSpec(p + "shared_head.norm.weight", (H,), "mtp", i),
        TensorSpec(p + "shared_head.head.weight", (V, H), "mtp", i),
    ]
    return extra + _decoder_layer(spec, i, component="mtp")


def _with_component(t: TensorSpec, component: str) -> TensorSpec:
    return TensorSpec(t.name, t.shape, component, t.layer, t.expert, t.linear, t.buffer)
