"""Seeded tiny random checkpoints for every architecture variant, built with transformers' own classes.

A checkpoint directory written here looks like a published DeepSeek / R1-Distill one: ``config.json``
(published or transformers-5 layout), per-expert safetensors names, optional FP8 block-quantized
weights with ``weight_scale_inv``, an optional MTP layer at index ``num_hidden_layers``, optional
shards with ``model.safetensors.index.json``, ``generation_config.json`` and a tiny tokenizer.

Dimensions are small (a checkpoint is ~1 MB in bf16) but shape-faithful, and deliberately not powers
of two nor multiples of the FP8 block, so code that assumes either fails on them.
Every tensor's values depend only on (seed, tensor name, shape): the FP8, MTP and sharded variants
of a seed hold the same underlying weights as the plain one.
"""

from __future__ import annotations

import copy
import json
import math
import re
import zlib
from pathlib import Path

from dsedge.testing.tokenizer import BOS_ID, EOS_ID, VARIANT_CHAT_TEMPLATES, VOCAB_SIZE, write_tokenizer

__all__ = ["VARIANTS", "build_tensors", "quantize_fp8_blocks", "tiny_config", "write_checkpoint",
           "write_tokenizer"]

VARIANTS: tuple[str, ...] = ("v2_lite", "v2", "v3", "qwen2", "llama")
STYLES: tuple[str, ...] = ("published", "transformers")
DTYPES: tuple[str, ...] = ("bfloat16", "float32")

FP8_BLOCK = 32  # the real checkpoints use 128; 32 keeps tensors tiny and still leaves partial blocks
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
LINEAR_STD = 0.02
ROUTER_STD = 0.1  # wider than the linears so top-k choices are clear-cut, not near-ties
NORM_NOISE_STD = 0.1  # norm weights 1 + noise: a swapped or skipped norm changes the output
BIAS_STD = 0.1  # e_score_correction_bias: large enough to change which experts are selected

_YARN_V2 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096, "type": "yarn"}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}
# DeepSeek-R1-Distill-Llama-8B's rope scaling, verbatim; the numbers cost nothing at tiny size.
_LLAMA3_ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# MLA shapes shared by the three DeepSeek variants. Every dim is off the 32-block grid:
# q_b out 3*(16+8)=72, kv_a out 40+8=48, kv_b out 3*(16+12)=84, o_proj in 3*12=36.
# v_head_dim differs from qk_nope_head_dim so code that confuses the two fails.
_MLA_DIMS = {
    "hidden_size": 72,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
    "kv_lora_rank": 40,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "intermediate_size": 100,
    "moe_intermediate_size": 40,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rms_norm_eps": 1e-6,
}

_DEEPSEEK_COMMON = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "pretraining_tp": 1,
    "seq_aux": True,
    "tie_word_embeddings": False,
    "use_cache": True,
}

# Per-variant architecture and routing, in the published configs' own key names.
_VARIANT_FIELDS = {
    "v2_lite": {  # DeepSeek-V2-Lite: no q-LoRA, softmax, plain greedy top-k, no scaling
        "model_type": "deepseek_v2", "q_lora_rank": None, "n_routed_experts": 10,
        "num_experts_per_tok": 3, "n_shared_experts": 2, "topk_method": "greedy", "n_group": 1,
        "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "rope_scaling": _YARN_V2,
    },
    "v2": {  # DeepSeek-V2: q-LoRA, group-limited greedy (group max), x16, no renormalization
        "model_type": "deepseek_v2", "q_lora_rank": 56, "n_routed_experts": 12,
        "num_experts_per_tok": 3, "n_shared_experts": 2, "topk_method": "group_limited_greedy",
        "n_group": 4, "topk_group": 2, "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 16.0, "rope_scaling": _YARN_V2,
    },
    "v3": {  # DeepSeek-V3/R1: sigmoid, bias-corrected selection, group = sum of top-2, x2.5
        "model_type": "deepseek_v3", "q_lora_rank": 56, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "n_shared_experts": 1, "topk_method": "noaux_tc", "n_group": 4,
        "topk_group": 2, "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rope_scaling": _YARN_V3, "ep_size": 1,
    },
}

_DENSE_FIELDS = {
    "qwen2": {  # R1-Distill-Qwen layout: GQA 6:2, q/k/v biases, plain rope
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
        "hidden_size": 72, "initializer_range": 0.02, "intermediate_size": 148,
        "max_position_embeddings": 131072, "max_window_layers": 2, "model_type": "qwen2",
        "num_attention_heads": 6, "num_hidden_layers": 3, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "sliding_window": 4096,
        "tie_word_embeddings": False, "transformers_version": "4.44.0", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False,
    },
    "llama": {  # R1-Distill-Llama layout: GQA 4:2, head_dim 20, no biases, llama3 rope scaling
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": 80, "initializer_range": 0.02,
        "intermediate_size": 216, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": _LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "transformers_version": "4.44.0", "use_cache": True,
    },
}

_DEEPSEEK_CLASS_NAMES = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3"}
_PUBLISHED_TRANSFORMERS_VERSION = {"deepseek_v2": "4.33.1", "deepseek_v3": "4.46.3"}

# Which on-disk weights DeepSeek stores as FP8: every projection inside a decoder layer's attention
# and MLP (dense, routed and shared experts). Not the router (mlp.gate.weight), embeddings, heads,
# norms, nor the MTP eh_proj (bf16 in the V3 checkpoint; vLLM/SGLang load it as a plain Linear).
_FP8_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?\w+_proj(_with_mqa)?\.weight$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------- configs


def tiny_config(variant: str, *, mtp: bool = False, fp8: bool = False, style: str = "published",
                tied: bool = False) -> dict:
    """The ``config.json`` dict of a tiny ``variant`` checkpoint.

    ``style="published"`` lays it out like the released DeepSeek / R1-Distill files (``rope_scaling``,
    ``scoring_func``, ``topk_method``, ``auto_map``, ``torch_dtype``, FP8 ``quantization_config``);
    ``style="transformers"`` is that config as transformers 5 re-saves it (``rope_parameters``, ``dtype``).
    ``tied``: ``tie_word_embeddings: true`` (the head is the embedding matrix, as in Qwen2.5-0.5B/1.5B and
    Llama-3.2-1B), so the checkpoint holds no ``lm_head.weight``.
    """
    _check_options(variant, fp8=fp8, mtp=mtp, style=style)
    config = _published_config(variant, mtp=mtp, fp8=fp8, tied=tied)
    return config if style == "published" else _as_transformers_saves_it(config)


def _check_options(variant: str, *, fp8: bool, mtp: bool, style: str, dtype: str = "bfloat16") -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if style not in STYLES:
        raise ValueError(f"unknown config style {style!r}; choose one of {', '.join(STYLES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if (fp8 or mtp) and variant != "v3":
        raise ValueError(f"fp8/mtp checkpoints exist only for v3, not {variant!r}")


def _published_config(variant: str, *, mtp: bool, fp8: bool, dtype: str = "bfloat16", tied: bool = False) -> dict:
    if variant in _DENSE_FIELDS:
        config = copy.deepcopy(_DENSE_FIELDS[variant])
    else:
        config = _published_deepseek_config(variant, mtp=mtp, fp8=fp8)
    config.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, vocab_size=VOCAB_SIZE, torch_dtype=dtype,
                  tie_word_embeddings=tied)
    return dict(sorted(config.items()))  # the published files are key-sorted


def _published_deepseek_config(variant: str, *, mtp: bool, fp8: bool) -> dict:
    config = {**_DEEPSEEK_COMMON, **_MLA_DIMS, **copy.deepcopy(_VARIANT_FIELDS[variant])}
    class_name = _DEEPSEEK_CLASS_NAMES[config["model_type"]]
    config["architectures"] = [f"{class_name}ForCausalLM"]
    config["auto_map"] = {  # the real repos ship remote code; we never load it
        "AutoConfig": f"configuration_deepseek.{class_name}Config",
        "AutoModel": f"modeling_deepseek.{class_name}Model",
        "AutoModelForCausalLM": f"modeling_deepseek.{class_name}ForCausalLM",
    }
    config["transformers_version"] = _PUBLISHED_TRANSFORMERS_VERSION[config["model_type"]]
    if config["model_type"] == "deepseek_v3":
        # Written even when 0: transformers' DeepseekV3Config defaults it to 1.
        config["num_nextn_predict_layers"] = 1 if mtp else 0
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    return config


def _as_transformers_saves_it(published: dict) -> dict:
    # What `from_pretrained` + `save_pretrained` turns a published config into (to_diff_dict).
    config = _transformers_config(published)
    return json.loads(config.to_json_string(use_diff=True))


def _transformers_config(config_dict: dict):
    from transformers import AutoConfig

    kwargs = dict(config_dict)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


# ----------------------------------------------------------------------------- weights


def write_checkpoint(out_dir, variant: str, *, seed: int = 0, fp8: bool = False, mtp: bool = False,
                     num_shards: int = 1, style: str = "published", dtype: str = "bfloat16",
                     tokenizer: bool = True, tied: bool = False, bos: bool = True) -> Path:
    """Write a seeded tiny random ``variant`` checkpoint into ``out_dir`` and return its path.

    ``fp8`` (v3 only) stores decoder projections as float8_e4m3fn with ``weight_scale_inv`` per
    32x32 block; ``mtp`` (v3 only) adds the MTP layer at index ``num_hidden_layers``;
    ``num_shards > 1`` splits the tensors over ``model-0000i-of-0000N.safetensors`` plus an index;
    ``dtype`` is the storage dtype of the non-FP8 tensors, except that the V3 correction bias is
    always float32 (as published) and, with ``style="transformers"``, the routers' ``mlp.gate.weight``
    too (as transformers 5 re-saves them); ``tokenizer`` also writes the tiny DeepSeek tokenizer
    with the chat template of the variant's published family (``VARIANT_CHAT_TEMPLATES``).
    ``tied`` ties the head to the embeddings (no ``lm_head.weight``, see :func:`tiny_config`); ``bos=False``
    writes a tokenizer that adds no BOS (no post-processor, ``add_bos_token: false``), as Qwen2's does.
    """
    _check_options(variant, fp8=fp8, mtp=mtp, style=style, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    published = _published_config(variant, mtp=mtp, fp8=fp8, dtype=dtype, tied=tied)
    tensors = build_tensors(variant, seed=seed, mtp=mtp, tied=tied)
    tensors = _storage_tensors(tensors, dtype=dtype, fp8=fp8, router_fp32=style == "transformers")
    _write_safetensors(out, tensors, num_shards=num_shards)
    config = published if style == "published" else _as_transformers_saves_it(published)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(style))
    if tokenizer:
        write_tokenizer(out, chat_template=VARIANT_CHAT_TEMPLATES[variant])
        if not bos:
            _tokenizer_without_bos(out)
    return out


def _tokenizer_without_bos(out: Path) -> None:
    """Qwen2's tokenizer rules: tokenizer.json has no post-processor, tokenizer_config.json says
    ``add_bos_token: false`` — transformers then encodes text with no BOS in front."""
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["add_bos_token"] = False
    _write_json(out / "tokenizer_config.json", config)


def build_tensors(variant: str, *, seed: int = 0, mtp: bool = False, tied: bool = False) -> dict:
    """The float32 weights of a tiny checkpoint under their on-disk (per-expert) names, before FP8.

    ``tied``: no ``lm_head.weight`` (the head is ``model.embed_tokens.weight``)."""
    _check_options(variant, fp8=False, mtp=mtp, style="published")
    config = _transformers_config(_published_config(variant, mtp=mtp, fp8=False, tied=tied))
    model = _build_model(config)
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)  # a second name for the embedding matrix, not stored
    tensors = _per_expert(_randomized_state(state, seed=seed))
    if mtp:
        tensors.update(_mtp_tensors(config, tensors, seed=seed))
    return tensors


def _build_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    # Every value is overwritten below; seeding only keeps transformers' own init reproducible,
    # and fork_rng leaves the caller's global RNG state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _randomized_state(state: dict, *, seed: int) -> dict:
    return {name: _random_like(name, tensor, seed=seed) for name, tensor in state.items()}


def _random_like(name: str, tensor, *, seed: int):
    import torch

    # One generator per (seed, name): values do not shift when other tensors come or go.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return (noise - noise.mean()) * BIAS_STD  # zero-mean: always both signs, never all zero
    if name.endswith("norm.weight"):
        return 1.0 + NORM_NOISE_STD * noise
    if name.endswith("mlp.gate.weight"):
        return ROUTER_STD * noise
    return LINEAR_STD * noise


def _per_expert(state: dict) -> dict:
    """Split transformers 5's fused in-memory experts into the published per-expert tensors."""
    tensors = {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            prefix, half = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for expert, fused in enumerate(tensor):
                tensors[f"{prefix}{expert}.gate_proj.weight"] = fused[:half].clone()
                tensors[f"{prefix}{expert}.up_proj.weight"] = fused[half:].clone()
        elif name.endswith(".experts.down_proj"):  # [E, H, I]
            prefix = name.removesuffix("down_proj")
            for expert, down in enumerate(tensor):
                tensors[f"{prefix}{expert}.down_proj.weight"] = down.clone()
        else:
            tensors[name] = tensor
    return tensors


def _mtp_tensors(config, main: dict, *, seed: int) -> dict:
    """DeepSeek-V3's MTP module at layer index L = num_hidden_layers, under its checkpoint names.

    transformers builds no MTP module, so the embedded decoder layer comes from its decoder-layer
    class; embed_tokens and shared_head.head are copies of the main ones (the module shares them).
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    layer_index = config.num_hidden_layers
    prefix = f"model.layers.{layer_index}."
    decoder = DeepseekV3DecoderLayer(config, layer_idx=layer_index)  # index >= first_k_dense: MoE
    state = {prefix + name: tensor for name, tensor in decoder.state_dict().items()}
    hidden = config.hidden_size
    shapes = {"enorm.weight": [hidden], "hnorm.weight": [hidden], "eh_proj.weight": [hidden, 2 * hidden],
              "shared_head.norm.weight": [hidden]}
    state.update({prefix + name: _empty(shape) for name, shape in shapes.items()})
    tensors = _per_expert(_randomized_state(state, seed=seed))
    tensors[prefix + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    tensors[prefix + "shared_head.head.weight"] = main.get("lm_head.weight", main["model.embed_tokens.weight"]).clone()
    return tensors


def _empty(shape):
    import torch

    return torch.empty(shape, dtype=torch.float32)


# ----------------------------------------------------------------------------- storage


def _storage_tensors(tensors: dict, *, dtype: str, fp8: bool, router_fp32: bool) -> dict:
    import torch

    storage_dtype = getattr(torch, dtype)
    stored = {}
    for name, tensor in tensors.items():
        if fp8 and _FP8_WEIGHT.match(name):
            stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(tensor, FP8_BLOCK)
        elif name.endswith("e_score_correction_bias") or (router_fp32 and name.endswith("mlp.gate.weight")):
            # The bias is float32 in the published V3 files; transformers 5 keeps routers in float32
            # (_keep_in_fp32_modules_strict) and so re-saves mlp.gate.weight as float32 too.
            stored[name] = tensor.to(torch.float32)
        else:
            stored[name] = tensor.to(storage_dtype).contiguous()
    return stored


def quantize_fp8_blocks(weight, block: int = FP8_BLOCK):
    """DeepSeek block FP8: ``(q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/B), ceil(in/B)])``.

    ``weight ≈ q * scale_inv`` per block (multiplied, despite the name); scale = amax / 448.
    Edge blocks are partial: they are padded with zeros only while computing their amax.
    """
    import torch

    rows, cols = weight.shape
    grid_rows, grid_cols = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(grid_rows * block, grid_cols * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid_rows, block, grid_cols, block)  # [R, B, C, B]
    amax = blocks.abs().amax(dim=(1, 3))  # [R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # all-zero block: q = 0
    scaled = blocks / scale[:, None, :, None]
    quantized = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    quantized = quantized.view(grid_rows * block, grid_cols * block)[:rows, :cols].contiguous()
    return quantized, scale.contiguous()


def _write_safetensors(out: Path, tensors: dict, *, num_shards: int) -> None:
    from safetensors.torch import save_file

    names = sorted(tensors, key=_checkpoint_order)
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards = _split_into_shards(names, tensors, num_shards)
    weight_map = {}
    for number, shard_names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file({name: tensors[name] for name in shard_names}, str(out / file_name),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, file_name))
    total_size = sum(_nbytes(tensor) for tensor in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)


def _checkpoint_order(name: str) -> tuple:
    # Embeddings, then layers in numeric order (layer 10 after 9), then final norm and head.
    layer = _LAYER_INDEX.match(name)
    if layer:
        return (1, int(layer.group(1)), name)
    return (0 if name.startswith("model.embed_tokens") else 2, 0, name)


def _split_into_shards(names: list[str], tensors: dict, num_shards: int) -> list[list[str]]:
    """Consecutive runs of roughly equal bytes; a layer may straddle two shards.

    A weight and its ``_scale_inv`` always land in the same shard, as in the real checkpoints.
    """
    units = _weight_units(names)
    if not 1 <= num_shards <= len(units):
        raise ValueError(f"num_shards must be between 1 and {len(units)}, got {num_shards}")
    total = sum(_nbytes(tensors[name]) for name in names)
    shards: list[list[str]] = [[]]
    written = 0
    for position, unit in enumerate(units):
        units_left, shards_left = len(units) - position, num_shards - len(shards)
        shard_full = written >= total * len(shards) / num_shards
        if shards[-1] and shards_left and (shard_full or units_left <= shards_left):
            shards.append([])
        shards[-1].extend(unit)
        written += sum(_nbytes(tensors[name]) for name in unit)
    return shards


def _weight_units(names: list[str]) -> list[list[str]]:
    units: list[list[str]] = []
    for name in names:
        if name.endswith("_scale_inv") and units and units[-1][0] == name.removesuffix("_scale_inv"):
            units[-1].append(name)
        else:
            units.append([name])
    return units


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _generation_config(style: str) -> dict:
    # DeepSeek-R1's generation_config.json, with our tokenizer's ids.
    import transformers

    version = "4.39.3" if style == "published" else transformers.__version__
    return {"_from_model_config": True, "bos_token_id": BOS_ID, "do_sample": True, "eos_token_id": EOS_ID,
            "temperature": 0.6, "top_p": 0.95, "transformers_version": version}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
