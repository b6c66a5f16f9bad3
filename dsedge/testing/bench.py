"""The bench models of ../shared/bench (DeepSeek-V3-shaped ds3bench, Qwen2 qwen2bench): random weights,
sized well beyond the L3 cache so decode is memory-bound as with real models. Configs are copied here as
literals so a clone without ../shared can still build them."""

from __future__ import annotations

from pathlib import Path

from dsedge.testing.tokenizer import write_tokenizer

_DS3BENCH = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 1, "hidden_size": 1024, "intermediate_size": 2816, "kv_lora_rank": 256,
    "max_position_embeddings": 4096, "moe_intermediate_size": 512, "n_group": 4, "n_routed_experts": 32,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 4,
    "num_hidden_layers": 8, "num_key_value_heads": 16, "num_nextn_predict_layers": 0, "q_lora_rank": 384,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "rms_norm_eps": 1e-06, "rope_interleave": True,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False, "topk_group": 2, "v_head_dim": 64, "vocab_size": 32000,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "initializer_range": 0.02,
}
_QWEN2BENCH = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 0, "eos_token_id": 1,
    "hidden_size": 1024, "intermediate_size": 2816, "max_position_embeddings": 4096, "num_attention_heads": 16,
    "num_hidden_layers": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "vocab_size": 32000, "initializer_range": 0.02,
}
BENCH_CONFIGS = {"ds3bench": _DS3BENCH, "qwen2bench": _QWEN2BENCH}


def write_bench_checkpoint(out: str | Path, name: str, *, seed: int = 0) -> Path:
    """Build a bench model through transformers' own class (normal(0, 0.02) init) and save it in bf16."""
    import torch
    import transformers

    out = Path(out)
    config = transformers.AutoConfig.for_model(**BENCH_CONFIGS[name])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a non-zero correction bias, so routing exercises the bias path
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.01)
    model.to(torch.bfloat16).save_pretrained(out)
    add_tokenizer(out)
    return out


def add_tokenizer(out: str | Path) -> None:
    """The fixtures' small BPE tokenizer (its ids fit the bench vocabulary), so calibration and `dsedge run`
    have text to work with; the weights are random, so the text generated means nothing."""
    write_tokenizer(Path(out))
