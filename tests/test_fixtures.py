"""The tiny checkpoints are what they claim: transformers loads them, and their files hold the
published names, dtypes, FP8 blocks, MTP layer and shard index that the real checkpoints have."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsedge.testing.tiny import VARIANTS, build_tensors, tiny_config, write_checkpoint
from dsedge.testing.tokenizer import DEEPSEEK_R1_CHAT_TEMPLATE, tokenizer_json

STYLES = ("published", "transformers")
BLOCK = 32
SPECIAL_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                  "<think>", "</think>")

# What each variant must read back as in transformers (literals: tests do not read ../shared).
ROUTING = {
    "v2_lite": {"topk_method": "greedy", "n_group": 1, "topk_group": 1, "n_routed_experts": 10,
                "num_experts_per_tok": 3, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
                "norm_topk_prob": False, "q_lora_rank": None, "first_k_dense_replace": 1},
    "v2": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "n_routed_experts": 12,
           "num_experts_per_tok": 3, "n_shared_experts": 2, "routed_scaling_factor": 16.0,
           "norm_topk_prob": False, "q_lora_rank": 56, "first_k_dense_replace": 1},
    "v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
           "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
           "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 56,
           "first_k_dense_replace": 1},
    "qwen2": {"num_attention_heads": 6, "num_key_value_heads": 2},
    "llama": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 20},
}
YARN = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1}
ROPE = {
    "v2_lite": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    "v2": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    "v3": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    "qwen2": {"rope_type": "default", "rope_theta": 10000},
    "llama": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
}
PROMPT = torch.tensor([[0, 5, 17, 123, 260, 396, 42]])
EXPERT_WEIGHT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def read_files(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


@functools.cache
def load_model(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def logits_of(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path)[0](PROMPT).logits


def in_memory(state: dict, name: str) -> torch.Tensor:
    """The slice of transformers' in-memory state that holds on-disk tensor ``name``."""
    expert = EXPERT_WEIGHT.match(name)
    if not expert:
        return state[name]
    prefix, index, kind = expert.group(1), int(expert.group(2)), expert.group(3)
    if kind == "down":
        return state[f"{prefix}.down_proj"][index]
    fused = state[f"{prefix}.gate_up_proj"][index]  # [2I, H]: gate rows, then up rows
    half = fused.shape[0] // 2
    return fused[:half] if kind == "gate" else fused[half:]


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_every_variant_and_style(tiny_checkpoint, variant, style):
    path = tiny_checkpoint(variant, style=style)
    model, info = load_model(path)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    config = model.config
    for field, expected in ROUTING[variant].items():
        assert getattr(config, field) == expected, field
    for field, expected in ROPE[variant].items():
        assert config.rope_parameters[field] == expected, field
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (0, 1, 397)
    logits = logits_of(path)
    assert logits.shape == (1, PROMPT.shape[1], 397)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", ["v2_lite", "v2", "v3"])
def test_config_styles_differ_as_published_and_resaved(tiny_checkpoint, variant):
    published = json.loads((tiny_checkpoint(variant) / "config.json").read_text())
    resaved = json.loads((tiny_checkpoint(variant, style="transformers") / "config.json").read_text())
    assert published["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in published
    assert published["auto_map"]["AutoModelForCausalLM"].startswith("modeling_deepseek.")
    assert published["torch_dtype"] == "bfloat16"
    assert resaved["rope_parameters"]["rope_type"] == "yarn" and "rope_scaling" not in resaved
    assert published == tiny_config(variant)
    assert resaved == tiny_config(variant, style="transformers")


def test_router_implements_configured_routing(tiny_checkpoint):
    v2_gate = load_model(tiny_checkpoint("v2"))[0].model.layers[1].mlp.gate
    assert (v2_gate.topk_method, v2_gate.num_group, v2_gate.topk_group) == ("group_limited_greedy", 4, 2)
    v3_gate = load_model(tiny_checkpoint("v3"))[0].model.layers[1].mlp.gate
    assert (v3_gate.num_group, v3_gate.topk_group, v3_gate.routed_scaling_factor) == (4, 2, 2.5)


def test_qwen2_has_qkv_biases_and_llama_has_none(tiny_checkpoint):
    qwen = read_files(tiny_checkpoint("qwen2"))
    llama = read_files(tiny_checkpoint("llama"))
    assert {"q", "k", "v"} == {n.split(".")[-2][0] for n in qwen if n.endswith("_proj.bias")}
    assert not [name for name in llama if name.endswith(".bias")]
    assert qwen["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 12, 72)  # GQA: 2 kv heads


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_reloaded_state_equals_files(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    files = read_files(path)
    state = load_model(path)[0].state_dict()
    for name, stored in files.items():
        assert torch.equal(in_memory(state, name), stored.float()), name


@pytest.mark.parametrize("variant", ["v2_lite", "v2", "v3"])
def test_files_hold_published_per_expert_names(tiny_checkpoint, variant):
    files = read_files(tiny_checkpoint(variant))
    state = load_model(tiny_checkpoint(variant))[0].state_dict()
    prefix = "model.layers.2.mlp."
    experts = ROUTING[variant]["n_routed_experts"]
    for expert in range(experts):
        for kind in ("gate", "up", "down"):
            assert f"{prefix}experts.{expert}.{kind}_proj.weight" in files
    assert f"{prefix}experts.{experts}.gate_proj.weight" not in files
    assert not [name for name in files if name.endswith(("gate_up_proj", "experts.down_proj"))]
    for kind in ("gate", "up", "down"):
        assert f"{prefix}shared_experts.{kind}_proj.weight" in files
    assert files[f"{prefix}gate.weight"].shape == (experts, 72)
    fused = state[f"{prefix}experts.gate_up_proj"][5]
    gate, up = files[f"{prefix}experts.5.gate_proj.weight"], files[f"{prefix}experts.5.up_proj.weight"]
    assert torch.equal(fused, torch.cat([gate, up]).float())
    assert "model.layers.0.mlp.gate_proj.weight" in files  # first_k_dense_replace = 1: dense layer 0


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_transformers_resaves_the_same_tensors_under_the_same_names(tiny_checkpoint, tmp_path, variant):
    # Our files are exactly what transformers 5 itself writes for this model: names and values.
    files = read_files(tiny_checkpoint(variant))
    load_model(tiny_checkpoint(variant))[0].save_pretrained(tmp_path)
    resaved = read_files(tmp_path)
    assert resaved.keys() == files.keys()
    assert all(torch.equal(resaved[name], files[name].float()) for name in files)


def test_norm_weights_are_not_ones(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3"))
    norms = {name: tensor.float() for name, tensor in files.items() if name.endswith("norm.weight")}
    assert len(norms) == 3 * 4 + 1  # per layer: input, post-attention, q_a, kv_a; plus the final norm
    for name, weight in norms.items():
        assert (weight != 1).any() and (weight - 1).abs().max() < 1, name


def test_v3_correction_bias_is_float32_nonzero_and_partly_negative(tiny_checkpoint):
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert read_files(tiny_checkpoint("v3"))[name].dtype == torch.float32
    bias = load_model(tiny_checkpoint("v3"))[0].state_dict()[name]
    assert (bias < 0).any() and (bias > 0).any() and bias.abs().min() > 0


def test_transformers_style_stores_routers_in_float32_like_save_pretrained(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v2", style="transformers"))
    assert files["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert files["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16


def test_float32_storage_holds_the_exact_generated_weights(tiny_checkpoint):
    path = tiny_checkpoint("v2", dtype="float32")
    files = read_files(path)
    assert {tensor.dtype for tensor in files.values()} == {torch.float32}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"
    reference = build_tensors("v2")
    assert files.keys() == reference.keys()
    assert all(torch.equal(files[name], reference[name]) for name in files)


def test_seed_decides_the_bytes(tiny_checkpoint, tmp_path):
    again = write_checkpoint(tmp_path / "again", "v3", tokenizer=False)
    other = write_checkpoint(tmp_path / "other", "v3", seed=1, tokenizer=False)
    original = (tiny_checkpoint("v3") / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original


def test_checkpoints_are_small_and_fast_to_build(tiny_checkpoint, tmp_path):
    largest = tiny_checkpoint("v3", mtp=True, dtype="float32")
    assert sum(file.stat().st_size for file in largest.iterdir()) < 3_000_000
    start = time.perf_counter()
    write_checkpoint(tmp_path, "v3", fp8=True, mtp=True, num_shards=3)
    assert time.perf_counter() - start < 1.0


def test_invalid_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only for v3"):
        write_checkpoint(tmp_path, "v2", fp8=True)
    with pytest.raises(ValueError, match="unknown tiny variant"):
        tiny_config("v4")
    with pytest.raises(ValueError, match="num_shards"):
        write_checkpoint(tmp_path, "qwen2", num_shards=10_000)


# ----------------------------------------------------------------------------- FP8


def fp8_weight_names(files: dict) -> set[str]:
    return {name for name, tensor in files.items() if tensor.dtype == torch.float8_e4m3fn}


def naive_dequantize(quantized: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[i, j] = q[i, j] * scale_inv[i // B, j // B], one element at a time."""
    values, scales = quantized.float().tolist(), scale_inv.tolist()
    rows = [[q * scales[i // BLOCK][j // BLOCK] for j, q in enumerate(row)] for i, row in enumerate(values)]
    return torch.tensor(rows)


def fp8_tolerance(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    # e4m3: 3 mantissa bits, so rounding costs at most 2^-4 relative (normals) or half the
    # smallest subnormal step, 2^-10 of the block scale.
    scale = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: weight.shape[0], : weight.shape[1]]
    return weight.abs() / 16 + scale / 1024 + 1e-12


def test_fp8_quantizes_exactly_the_decoder_projections(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3", fp8=True))
    quantized = fp8_weight_names(files)
    for name in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                 "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.experts.15.down_proj",
                 "mlp.shared_experts.up_proj"):
        assert f"model.layers.2.{name}.weight" in quantized, name
    assert "model.layers.0.mlp.gate_proj.weight" in quantized
    assert len(quantized) == 3 * 5 + 3 + 2 * (16 * 3 + 3)  # attention, dense MLP, routed + shared experts
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.kv_a_layernorm.weight"):
        assert files[name].dtype == torch.bfloat16, name
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert {name.removesuffix("_scale_inv") for name in files if name.endswith("_scale_inv")} == quantized


def test_fp8_scales_use_the_ceil_grid_with_partial_blocks(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3", fp8=True))
    partial_rows = partial_cols = 0
    for name in fp8_weight_names(files):
        rows, cols = files[name].shape
        scale_inv = files[name + "_scale_inv"]
        assert scale_inv.dtype == torch.float32
        assert scale_inv.shape == (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), name
        assert (scale_inv > 0).all()
        partial_rows += rows % BLOCK != 0
        partial_cols += cols % BLOCK != 0
    assert partial_rows and partial_cols
    assert files["model.layers.1.self_attn.kv_b_proj.weight"].shape == (84, 40)  # 84 = 2*32+20, 40 = 32+8


def test_fp8_block_maxima_reach_448(tiny_checkpoint):
    # scale = amax / 448, so each block's largest magnitude quantizes to exactly 448.
    files = read_files(tiny_checkpoint("v3", fp8=True))
    quantized = files["model.layers.1.self_attn.kv_b_proj.weight"].float()  # [84, 40]
    for row in range(0, 84, BLOCK):
        for col in range(0, 40, BLOCK):
            assert quantized[row : row + BLOCK, col : col + BLOCK].abs().max() == 448


def test_naive_fp8_dequantization_reproduces_the_weights(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3", fp8=True))
    original = build_tensors("v3")
    for name in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.o_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.experts.7.gate_proj.weight"):
        scale_inv = files[name + "_scale_inv"]
        restored = naive_dequantize(files[name], scale_inv)
        error = (restored - original[name]).abs()
        assert (error <= fp8_tolerance(original[name], scale_inv)).all(), name
        assert error.max() > 0  # it really went through fp8


def test_fp8_checkpoint_keeps_every_other_tensor(tiny_checkpoint):
    fp8 = read_files(tiny_checkpoint("v3", fp8=True))
    plain = read_files(tiny_checkpoint("v3"))
    assert {name for name in fp8 if not name.endswith("_scale_inv")} == plain.keys()
    for name in plain.keys() - fp8_weight_names(fp8):
        assert torch.equal(fp8[name], plain[name]), name
    config = json.loads((tiny_checkpoint("v3", fp8=True) / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                             "quant_method": "fp8", "weight_block_size": [32, 32]}


# ----------------------------------------------------------------------------- MTP


MTP_SHAPES = {
    "enorm.weight": (72,), "hnorm.weight": (72,), "eh_proj.weight": (72, 144),
    "shared_head.norm.weight": (72,), "shared_head.head.weight": (397, 72),
    "embed_tokens.weight": (397, 72), "input_layernorm.weight": (72,),
    "post_attention_layernorm.weight": (72,), "self_attn.q_a_proj.weight": (56, 72),
    "self_attn.kv_b_proj.weight": (84, 40), "mlp.gate.weight": (16, 72),
    "mlp.gate.e_score_correction_bias": (16,), "mlp.experts.15.down_proj.weight": (72, 40),
    "mlp.shared_experts.gate_proj.weight": (40, 72),
}


def test_mtp_layer_sits_at_index_num_hidden_layers(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3", mtp=True))
    mtp = {name.removeprefix("model.layers.3."): t for name, t in files.items() if ".layers.3." in name}
    for name, shape in MTP_SHAPES.items():
        assert mtp[name].shape == shape, name
    # MTP-only 4, embed/head copies 2, attention 7, layer norms 2, router 2, experts 48, shared 3
    assert len(mtp) == 4 + 2 + 7 + 2 + 2 + 3 * 16 + 3
    assert torch.equal(mtp["embed_tokens.weight"], files["model.embed_tokens.weight"])
    assert torch.equal(mtp["shared_head.head.weight"], files["lm_head.weight"])
    assert not any(".layers.3." in name for name in read_files(tiny_checkpoint("v3")))
    assert json.loads((tiny_checkpoint("v3") / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_transformers_ignores_the_mtp_layer(tiny_checkpoint):
    path = tiny_checkpoint("v3", mtp=True)
    model, info = load_model(path)
    assert model.config.num_nextn_predict_layers == 1
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(key.startswith("model.layers.3.") for key in info["unexpected_keys"])
    assert torch.equal(logits_of(path), logits_of(tiny_checkpoint("v3")))


def test_fp8_mtp_layer_quantizes_its_decoder_but_not_eh_proj(tiny_checkpoint):
    files = read_files(tiny_checkpoint("v3", fp8=True, mtp=True))
    assert files["model.layers.3.self_attn.q_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert files["model.layers.3.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert files["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.3.eh_proj.weight_scale_inv" not in files


# ----------------------------------------------------------------------------- shards


def test_shard_index_matches_shard_contents(tiny_checkpoint):
    path = tiny_checkpoint("v3", fp8=True, mtp=True, num_shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard_files = sorted(file.name for file in path.glob("*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    contents, total_size = {}, 0
    for file in shard_files:
        with safe_open(path / file, framework="pt") as handle:
            names = list(handle.keys())
            total_size += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names)
        assert len(names) > 10, file
        contents.update(dict.fromkeys(names, file))
    assert index["weight_map"] == contents
    layer_files = {}
    for name, file in contents.items():
        if name.startswith("model.layers."):
            layer_files.setdefault(name.split(".")[2], set()).add(file)
    assert max(len(files) for files in layer_files.values()) == 2  # split by size: a layer straddles
    assert index["metadata"]["total_size"] == total_size
    for name in contents:
        if name.endswith("_scale_inv"):
            assert contents[name] == contents[name.removesuffix("_scale_inv")], name


def test_sharded_checkpoint_loads_like_the_single_file(tiny_checkpoint):
    sharded = tiny_checkpoint("v2", num_shards=2)
    assert not (sharded / "model.safetensors").exists()
    assert not any(load_model(sharded)[1].values())
    assert torch.equal(logits_of(sharded), logits_of(tiny_checkpoint("v2")))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tiny_checkpoint):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_checkpoint("llama") / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 397
    for text in ("The quick brown fox.", "def add(a, b):\n    return a + b\n", "héllo wörld 🙂 ∑ 漢字"):
        ids = tokenizer.encode(text).ids
        assert ids[0] == 0  # bos prepended, as add_bos_token says
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("the model and the tokens").ids) < 10  # 24 bytes: merges happened
    for position, token in enumerate(SPECIAL_TOKENS):
        ids = tokenizer.encode(f"a{token}b", add_special_tokens=False).ids
        assert len(ids) == 3 and ids[1] == tokenizer.token_to_id(token), token
        assert position >= 2 or ids[1] == position  # bos 0, eos 1, as in DeepSeek-V3/R1


def test_tokenizer_training_is_deterministic():
    # The trainer is Rust with per-process hash seeds: compare against a fresh process too.
    script = "from dsedge.testing.tokenizer import tokenizer_json; print(tokenizer_json(), end='')"
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert fresh.stdout == tokenizer_json() == tokenizer_json.__wrapped__()


def test_transformers_tokenizer_and_r1_chat_template(tiny_checkpoint):
    path = tiny_checkpoint("v3")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert tokenizer.pad_token_id == config["eos_token_id"]
    assert tokenizer.chat_template == DEEPSEEK_R1_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>greet</think>Hello"},
                {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
                    "<｜User｜>Bye<｜Assistant｜>")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 0 and ids[-1] == tokenizer.convert_tokens_to_ids("<｜Assistant｜>")
    assert tokenizer.decode(ids) == text
