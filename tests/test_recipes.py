"""Recipes: first-match rules, safety rules, presets on every architecture, strict parsing of files."""

import json
import subprocess
import sys

import pytest

from dsedge.compress.recipes import PRESETS, SAFETY_RULES, Recipe, Rule, load_recipe, parse_recipe, preset
from dsedge.errors import UserError
from dsedge.models.registry import spec_from_config
from dsedge.quantformat.scheme import QuantScheme
from dsedge.targets import RECIPE_PRESETS
from dsedge.testing.tiny import VARIANTS, tiny_config

INT4 = QuantScheme(4, 128)
INT8 = QuantScheme(8, None)


def spec(variant, **kwargs):
    return spec_from_config(tiny_config(variant, **kwargs))


def test_first_match_wins_exact_and_regex():
    recipe = Recipe("r", (Rule("model.layers.0.mlp.down_proj", None),
                          Rule(r"re:.*\.down_proj", INT8),
                          Rule("re:.*", INT4)))
    assert recipe.scheme_for("model.layers.0.mlp.down_proj") is None
    assert recipe.scheme_for("model.layers.1.mlp.down_proj") == INT8
    assert recipe.scheme_for("model.layers.1.mlp.up_proj") == INT4
    # fullmatch: a regex does not match a prefix of the name
    assert Recipe("r", (Rule(r"re:model\.layers\.1", INT4),)).scheme_for("model.layers.1.mlp.up_proj") is None


@pytest.mark.parametrize("name", ["model.norm", "model.layers.2.mlp.gate",
                                  "model.layers.2.input_layernorm", "model.layers.1.self_attn.kv_a_layernorm",
                                  "model.layers.3.shared_head.head", "model.layers.3.embed_tokens",
                                  "model.layers.3.enorm"])
def test_safety_rules_beat_any_recipe(name):
    recipe = Recipe("greedy", (Rule("re:.*", INT4), Rule(name, INT4)))
    assert recipe.scheme_for(name) is None
    assert recipe.rule_for(name) in SAFETY_RULES


def test_lm_head_is_kept_unless_a_rule_names_it_exactly():
    assert Recipe("all", (Rule("re:.*", INT4),)).scheme_for("lm_head") is None
    assert Recipe("regex", (Rule("re:lm_.*", INT4),)).scheme_for("lm_head") is None
    assert Recipe("named", (Rule("re:.*", INT4), Rule("lm_head", INT8))).scheme_for("lm_head") == INT8
    for preset_name in ("int4-g32", "int4-experts"):
        assert preset(preset_name).scheme_for("lm_head") is None
    # int8 and int4(-g128) name them (held-out perplexity within 0.5% on the demo models, docs/compress.md): the
    # embedding int8 RTN in all three, the head int8 RTN in int8 and int4 g128 GPTQ in the int4 presets
    assert preset("int8").scheme_for("lm_head") == QuantScheme(8, None, method="rtn")
    for preset_name in ("int4", "int4-g128"):
        assert preset(preset_name).scheme_for("lm_head") == QuantScheme(4, 128, method="gptq")
    for preset_name in ("int8", "int4", "int4-g128"):
        assert preset(preset_name).scheme_for("model.embed_tokens") == QuantScheme(8, None, method="rtn")


def test_safety_rules_leave_the_linears_alone():
    recipe = Recipe("all", (Rule("re:.*", INT4),))
    for name in ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts.3.gate_proj",
                 "model.layers.1.mlp.shared_experts.up_proj", "model.layers.0.self_attn.q_a_proj",
                 "model.layers.3.eh_proj"]:
        assert recipe.scheme_for(name) == INT4, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_presets_plan_every_architecture(variant):
    s = spec(variant, mtp=variant == "v3")
    linears = {t.name.removesuffix(".weight") for t in s.expected_tensors(include_mtp=True) if t.linear}
    for name in PRESETS:
        plan = load_recipe(name).plan(s, include_mtp=True)
        assert set(plan) == linears  # only linears, never the router/norms/embeddings/head
        if name in ("fp16", "none"):
            assert all(v is None for v in plan.values())
        else:
            assert all(v is not None for v in plan.values()), name


def test_int4_experts_preset():
    plan = load_recipe("int4-experts").plan(spec("v3"))
    for name, scheme in plan.items():
        routed = ".mlp.experts." in name
        assert (scheme.bits, scheme.group_size) == ((4, 128) if routed else (8, None)), name
    assert sum(".mlp.experts." in n for n in plan) == 2 * 16 * 3  # every expert of both MoE layers


def test_preset_shapes_and_method_override():
    assert load_recipe("int4").rules == load_recipe("int4-g128").rules
    assert load_recipe("int4-g32").scheme_for("model.layers.0.mlp.up_proj").group_size == 32
    assert load_recipe("int8").scheme_for("model.layers.0.mlp.up_proj") == QuantScheme(8, None, method="rtn")
    rtn = load_recipe("int4-experts").with_method("rtn")
    assert rtn.method == "rtn" and all(r.quant.method == "rtn" for r in rtn.rules)
    with pytest.raises(UserError):
        rtn.with_method("awq")


def test_presets_cover_the_targets_default_recipes():
    assert set(RECIPE_PRESETS) <= set(PRESETS)
    assert all(isinstance(d, str) and d for d in PRESETS.values())


def test_json_round_trip_and_method_default(tmp_path):
    data = {"name": "mine", "method": "gptq", "rules": [
        {"match": r"re:.*experts\.\d+\..*", "quant": {"bits": 4, "group_size": 32, "symmetric": False}},
        {"match": "model.layers.0.self_attn.o_proj", "quant": None},
        {"match": "re:.*", "quant": {"bits": 8, "method": "rtn"}}]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    recipe = load_recipe(path)
    assert recipe.rules[0].quant == QuantScheme(4, 32, False, "gptq")  # the recipe's method fills in
    assert recipe.rules[2].quant.method == "rtn"  # a rule's own method is kept
    assert parse_recipe(recipe.to_json()) == recipe
    assert Recipe.from_json(json.loads(json.dumps(recipe.to_json()))) == recipe


def test_toml_recipe(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "t"\nmethod = "rtn"\n'
                    "[[rules]]\nmatch = 're:.*\\.mlp\\.experts\\.\\d+\\..*'\nquant = { bits = 4, group_size = 64 }\n"
                    '[[rules]]\nmatch = "re:.*self_attn.*"\nquant = "none"\n'
                    '[[rules]]\nmatch = "re:.*"\nquant = { bits = 8 }\n')
    recipe = load_recipe(path)
    assert recipe.scheme_for("model.layers.1.mlp.experts.0.up_proj") == QuantScheme(4, 64)
    assert recipe.scheme_for("model.layers.1.self_attn.o_proj") is None
    assert recipe.scheme_for("model.layers.1.mlp.shared_experts.up_proj") == INT8


BAD_RECIPES = [
    ({"rules": []}, "non-empty 'rules'"),
    ({"rules": [{"match": "re:.*", "quant": {"bits": 3}}]}, r"rules\[0\]"),
    ({"rules": [{"match": "re:.*", "quant": {"bits": 4, "group_size": -32}}]}, "group_size"),
    ({"rules": [{"match": "re:(", "quant": None}]}, "invalid regex"),
    ({"rules": [{"match": "re:.*", "quant": None}], "method": "awq"}, "method"),
    ({"rules": [{"match": "re:.*", "quant": None}], "rulez": []}, "did you mean 'rules'"),
    ({"rules": [{"match": "re:.*", "qaunt": None}]}, "unknown key"),
    ({"rules": [{"match": "x.weight", "quant": None}]}, "names a tensor"),
    ({"rules": [{"match": "", "quant": None}]}, "non-empty string"),
    ({"rules": [{"match": "re:.*"}]}, "both 'match' and 'quant'"),
    ({"rules": [{"match": "re:.*", "quant": {"bits": 4, "group": 32}}]}, "unknown key"),
    ({"rules": [{"match": "re:.*", "quant": None}], "schema_version": 9}, "schema_version"),
    ([1, 2], "must hold an object"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECIPES)
def test_bad_recipes_are_user_errors_naming_the_file(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as info:
        load_recipe(path)
    assert str(path) in info.value.where


def test_bad_names_and_files(tmp_path):
    with pytest.raises(UserError, match="neither a recipe preset") as info:
        load_recipe("int4-g1288")
    assert "int4-g128" in info.value.hint
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rules = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(broken)


def test_recipes_do_not_import_torch():
    code = ("import sys, dsedge.compress.recipes, dsedge.quantformat.packing, dsedge.quantformat.config, "
            "dsedge.models.checkpoint; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
