"""Published configs of the DeepSeek family, as literals, so `plan deepseek-v3` works offline.

Facts, not code. Sources (values copied, not invented):
- deepseek-r1 / deepseek-v3: HF deepseek-ai/DeepSeek-R1 config.json (abf9bba5, 2025-01-20); DeepSeek-V3
  (-Base) config.json differs only in transformers_version.
- deepseek-v2-lite / deepseek-v2: HF deepseek-ai/DeepSeek-V2-Lite and DeepSeek-V2 config.json,
  cross-checked against deepseek-ai/DeepSeek-V3 inference/configs/config_16B.json and config_236B.json
  (dims, experts, groups, route_scale, mscale 0.707).
- r1-distill-qwen-1.5b / -7b: HF deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B} config.json.
- r1-distill-llama-8b: HF deepseek-ai/DeepSeek-R1-Distill-Llama-8B config.json (architecture values).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from dsedge.errors import ConfigError

_V3_ROPE = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}
_V2_ROPE = {**_V3_ROPE, "mscale": 0.707, "mscale_all_dim": 0.707}

_DEEPSEEK_R1 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
    "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": _V3_ROPE, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

_DEEPSEEK_V2 = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 8,
    "topk_group": 3, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
    "norm_topk_prob": False, "routed_scaling_factor": 16.0, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": _V2_ROPE, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}

_DEEPSEEK_V2_LITE = {
    **_DEEPSEEK_V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0, "q_lora_rank": None,
}

_DISTILL_QWEN_1_5B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}

_DISTILL_QWEN_7B = {
    **_DISTILL_QWEN_1_5B, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_key_value_heads": 4,
}

_DISTILL_LLAMA_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16",
}

PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-r1": _DEEPSEEK_R1,
    "deepseek-v3": _DEEPSEEK_R1,
    "deepseek-v2": _DEEPSEEK_V2,
    "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "r1-distill-qwen-1.5b": _DISTILL_QWEN_1_5B,
    "r1-distill-qwen-7b": _DISTILL_QWEN_7B,
    "r1-distill-llama-8b": _DISTILL_LLAMA_8B,
}


def published_config(name: str) -> dict[str, Any]:
    """A copy of a published config by short name; an unknown name suggests the closest ones."""
    key = name.lower()
    if key not in PUBLISHED_CONFIGS:
        close = difflib.get_close_matches(key, PUBLISHED_CONFIGS, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown model name {name!r}", where="published configs",
                          hint=f"{hint}known names: {', '.join(PUBLISHED_CONFIGS)}; or pass a checkpoint "
                               "directory or config.json path")
    return copy.deepcopy(PUBLISHED_CONFIGS[key])
