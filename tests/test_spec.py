"""Model specs: parsing every architecture variant, parameter counts against DeepSeek's published figures."""

import copy
import warnings

import pytest

from dsedge.errors import ConfigError
from dsedge.models.params import count_params
from dsedge.models.published import PUBLISHED_CONFIGS, published_config
from dsedge.models.registry import ARCHITECTURES, spec_from_config

# name → (total B, total with MTP B, active B), DeepSeek's / the model cards' published figures.
PUBLISHED_SIZES = {
    "deepseek-v3": (671, 685, 37),
    "deepseek-r1": (671, 685, 37),
    "deepseek-v2": (236, 236, 21),
    "deepseek-v2-lite": (15.7, 15.7, 2.4),
    "r1-distill-qwen-1.5b": (1.78, 1.78, None),
    "r1-distill-qwen-7b": (7.62, 7.62, None),
    "r1-distill-llama-8b": (8.03, 8.03, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_param_counts(name):
    total, with_mtp, active = PUBLISHED_SIZES[name]
    counts = count_params(spec_from_config(published_config(name)))
    assert counts.total / 1e9 == pytest.approx(total, rel=0.01)
    assert counts.total_with_mtp / 1e9 == pytest.approx(with_mtp, rel=0.01)
    if active is not None:  # published "active" figures are rounded: 37B, 21B, 2.4B
        assert counts.active / 1e9 == pytest.approx(active, rel=0.03)
    assert sum(counts.by_component.values()) == counts.total_with_mtp


def test_v3_exact_structure():
    spec = spec_from_config(published_config("deepseek-v3"))
    assert spec.moe.routing == "noaux_tc" and spec.moe.scoring_func == "sigmoid"
    assert spec.moe_layers == list(range(3, 61))
    assert spec.mtp_layers == [61]
    assert spec.mla.latent_cache_width == 576
    assert spec.fp8_block_size == (128, 128)
    assert spec.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert count_params(spec).total == 671_026_404_352  # + 14,848 correction-bias buffer values


def test_v2_variants():
    v2 = spec_from_config(published_config("deepseek-v2"))
    lite = spec_from_config(published_config("deepseek-v2-lite"))
    assert v2.moe.routing == "group_limited_greedy" and (v2.moe.n_group, v2.moe.topk_group) == (8, 3)
    assert lite.moe.routing == "greedy" and lite.mla.q_lora_rank is None
    assert v2.softmax_scale == pytest.approx(0.114721, abs=1e-6)
    names = {t.name for t in lite.expected_tensors()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.0.self_attn.q_a_proj.weight" not in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1
    assert "model.layers.1.mlp.experts.63.down_proj.weight" in names


def test_rope_parameters_and_rope_scaling_read_the_same():
    published = published_config("deepseek-v3")
    resaved = copy.deepcopy(published)
    scaling = resaved.pop("rope_scaling")
    resaved["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": resaved.pop("rope_theta"),
                                  **scaling}
    assert spec_from_config(published).rope == spec_from_config(resaved).rope


def test_unknown_model_type_lists_supported():
    with pytest.raises(ConfigError) as err:
        spec_from_config({"model_type": "mixtral"})
    assert err.value.exit_code == 3
    assert all(name in err.value.message for name in ARCHITECTURES)


def test_unknown_keys_are_tolerated():
    config = published_config("r1-distill-qwen-7b") | {"some_future_key": {"x": 1}}
    assert spec_from_config(config).config["some_future_key"] == {"x": 1}


@pytest.mark.parametrize("change, text", [
    ({"n_group": 7}, "not divisible"),
    ({"topk_group": 9}, "topk_group"),
    ({"n_routed_experts": 16, "topk_group": 1}, "reachable"),
    ({"topk_method": "sinkhorn"}, "topk_method"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
])
def test_bad_deepseek_configs(change, text):
    with pytest.raises(ConfigError, match=text):
        spec_from_config(published_config("deepseek-v2") | change)


def test_missing_required_key_names_it():
    config = published_config("deepseek-v2-lite")
    del config["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        spec_from_config(config)


def test_v3_routing_is_fixed_like_the_reference():
    """DeepSeek's V3 reference code ignores topk_method/scoring_func; so do we, with a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = spec_from_config(published_config("deepseek-v3") | {"topk_method": "greedy"})
    assert spec.moe.routing == "noaux_tc"
    assert any("noaux_tc" in str(w.message) for w in caught)


def test_moe_layer_freq_alternates():
    spec = spec_from_config(published_config("deepseek-v2-lite") | {"moe_layer_freq": 2, "num_hidden_layers": 6})
    assert spec.moe_layers == [2, 4]


def test_q_lora_rank_zero_means_none():
    spec = spec_from_config(published_config("deepseek-v2") | {"q_lora_rank": 0})
    assert spec.mla.q_lora_rank is None


def test_dense_biases():
    qwen = spec_from_config(published_config("r1-distill-qwen-1.5b"))
    llama = spec_from_config(published_config("r1-distill-llama-8b"))
    assert "model.layers.0.self_attn.k_proj.bias" in {t.name for t in qwen.expected_tensors()}
    assert not any(t.name.endswith(".bias") for t in llama.expected_tensors())
    assert llama.rope.type == "llama3" and llama.rope.factor == 8.0
    assert (qwen.num_key_value_heads, qwen.head_dim) == (2, 128)
