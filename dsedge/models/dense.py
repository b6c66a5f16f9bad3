"""Dense GQA decoders of the R1-Distill family: Qwen2 and Llama."""

from __future__ import annotations

from typing import Any

from dsedge.errors import ConfigError
from dsedge.models.config import ConfigReader, read_rope, token_ids
from dsedge.models.deepseek import _mlp_tensors
from dsedge.models.spec import ModelSpec, TensorSpec


def parse_dense(config: dict[str, Any], where: str) -> ModelSpec:
    cfg = ConfigReader(config, where)
    model_type = cfg.get("model_type", str)
    hidden, heads = cfg.positive("hidden_size"), cfg.positive("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", int, heads) or heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}",
                          where=where)
    # Qwen2 always carries q/k/v biases (transformers hard-codes them); Llama follows attention_bias.
    bias = True if model_type == "qwen2" else cfg.get("attention_bias", bool, False)
    return ModelSpec(
        model_type=model_type,
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=hidden,
        intermediate_size=cfg.positive("intermediate_size"),
        num_hidden_layers=cfg.positive("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=cfg.get("head_dim", int, None) or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", float, 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", int, 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", bool, False),
        rope=read_rope(cfg, interleaved=False),
        attention_bias=bias,
        mlp_bias=cfg.get("mlp_bias", bool, False) if model_type == "llama" else False,
        config=config,
        layout=dense_layout,
        **token_ids(cfg),
    )


def dense_layout(spec: ModelSpec, *, include_mtp: bool = False) -> list[TensorSpec]:
    H, V = spec.hidden_size, spec.vocab_size
    out = [TensorSpec("model.embed_tokens.weight", (V, H), "embeddings")]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [TensorSpec(p + "input_layernorm.weight", (H,), "norms", i),
                TensorSpec(p + "post_attention_layernorm.weight", (H,), "norms", i)]
        out += _gqa_tensors(spec, p + "self_attn.", i)
        out += _mlp_tensors(p + "mlp.", H, spec.intermediate_size, "dense_mlp", i, bias=spec.mlp_bias)
    out.append(TensorSpec("model.norm.weight", (H,), "norms"))
    if not spec.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (V, H), "head"))
    return out


def _gqa_tensors(spec: ModelSpec, p: str, i: int) -> list[TensorSpec]:
    H, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_attention_heads * d, spec.num_key_value_heads * d
    out = [TensorSpec(p + "q_proj.weight", (q_out, H), "attention", i, linear=True),
           TensorSpec(p + "k_proj.weight", (kv_out, H), "attention", i, linear=True),
           TensorSpec(p + "v_proj.weight", (kv_out, H), "attention", i, linear=True),
           TensorSpec(p + "o_proj.weight", (H, q_out), "attention", i, linear=True)]
    if spec.attention_bias:
        out += [TensorSpec(p + "q_proj.bias", (q_out,), "attention", i),
                TensorSpec(p + "k_proj.bias", (kv_out,), "attention", i),
                TensorSpec(p + "v_proj.bias", (kv_out,), "attention", i)]
        if spec.model_type == "llama":  # Llama's attention_bias also covers o_proj
            out.append(TensorSpec(p + "o_proj.bias", (H,), "attention", i))
    return out
