"""dsedge compress: every variant end to end, expert coverage, GPTQ vs RTN in the pipeline, the streamed
forward against the reference, output format, refusal of bad input, and no output after an interruption."""

import json
import re

import pytest
import torch

from dsedge.cli import main
from dsedge.compress import pipeline
from dsedge.compress.calibration import load_calibration
from dsedge.compress.layers import build_layer, classes_for, hf_config
from dsedge.compress.pipeline import compress
from dsedge.compress.recipes import load_recipe
from dsedge.errors import UserError
from dsedge.models.checkpoint import Checkpoint

FAST = {"calib_tokens": 128, "heldout_tokens": 128, "seq_len": 64}  # tiny models: seconds per run

VARIANT_CASES = [("v2_lite", {}), ("v2", {}), ("v3", {}), ("v3", {"fp8": True, "mtp": True}), ("qwen2", {}),
                 ("llama", {})]


def case_id(case):
    variant, kwargs = case
    return "-".join([variant, *(k for k in kwargs)])


def dequantized(path, module: str) -> torch.Tensor:
    """A weight of a compressed checkpoint as dsedge's reader returns it (dequantized)."""
    return Checkpoint(path).read(module + ".weight")


@pytest.mark.parametrize("recipe,method", [("int8", "rtn"), ("int4-g32", "gptq")])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=case_id)
def test_compress_every_variant(tiny_checkpoint, tmp_path, case, recipe, method):
    variant, kwargs = case
    src = tiny_checkpoint(variant, **kwargs)
    report = compress(src, tmp_path / "out", recipe=recipe, method=method, **FAST)
    out = tmp_path / "out"
    spec = Checkpoint(src).spec
    has_mtp = Checkpoint(src).has_mtp  # the MTP layer is compressed too (tests/test_mtp_compressed.py)
    planned = {m: s for m, s in load_recipe(recipe).plan(spec, include_mtp=has_mtp).items() if s is not None}
    head_quantized = load_recipe(recipe).scheme_for("lm_head") is not None  # the int8/int4 presets quantize it
    assert report.quantized_modules == len(planned) + head_quantized  # every selected linear, experts included
    assert (report.lm_head is not None) == head_quantized
    assert {s for layer in report.layers for s in (m["scheme"] for m in layer["modules"].values())} == \
        {load_recipe(recipe).with_method(method).scheme_for(next(iter(planned))).label}
    sqnr = [m["sqnr_db"] for layer in report.layers for m in layer["modules"].values()]
    assert min(sqnr) > (38 if recipe == "int8" else 14)  # int8 per channel ~44 dB, int4 g32 ~17 dB on N(0, σ)
    assert report.bytes_after < report.bytes_before
    q = report.quality
    assert q["compressed"]["perplexity"] < q["original"]["perplexity"] * (1.01 if recipe == "int8" else 1.05)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config.get("num_nextn_predict_layers", 0) == (1 if has_mtp else 0)  # the MTP layer is kept
    assert {"recipe.json", "compress_report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    Checkpoint(out).validate()
    if spec.moe:
        _check_every_expert_quantized(report, spec)


def _check_every_expert_quantized(report, spec):
    """Every routed expert of every MoE layer (gate, up, down) is in the report with a scheme; every
    calibration token was routed to top-k experts."""
    for layer in report.layers:
        experts = {k for k in layer["modules"] if ".experts." in k}
        expected = {f"mlp.experts.{e}.{p}" for e in range(spec.moe.n_routed_experts)
                    for p in ("gate_proj", "up_proj", "down_proj")} if layer["moe"] else set()
        assert experts == expected, layer["layer"]
        if layer["moe"]:
            assert sum(layer["experts"]["routed_tokens"]) == FAST["calib_tokens"] * spec.moe.num_experts_per_tok
    moe_layers = len(spec.moe_layers) + sum(1 for layer in report.layers if layer.get("mtp"))
    assert report.quantized_experts == moe_layers * spec.moe.n_routed_experts


@pytest.mark.parametrize("statistics", ["all-tokens", "routed"])
def test_unrouted_expert_is_calibrated_on_all_tokens_and_not_wiped(tiny_checkpoint, tmp_path, statistics):
    """An expert the router never picks (correction bias -10) gets all-token statistics: non-zero, sane SQNR.
    With routed statistics it is the fallback, named in a warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("v3"), src)
    tensors = load_file(src / "model.safetensors")
    for layer in (1, 2):
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][5] = -10.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    report = compress(src, tmp_path / "out", recipe="int4-experts", expert_statistics=statistics, **FAST)
    ckpt = Checkpoint(src)
    for layer in report.layers[1:]:
        assert layer["experts"]["routed_tokens"][5] == 0
        assert (5 in layer["experts"]["all_token_statistics"]) == (statistics == "routed")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer['layer']}.mlp.experts.5.{proj}"
            got = dequantized(tmp_path / "out", name)
            original = ckpt.read(name + ".weight")
            assert (got.abs().sum(dim=0) > 0).all()  # no column wiped
            assert layer["modules"][f"mlp.experts.5.{proj}"]["sqnr_db"] > 14
            assert torch.nn.functional.cosine_similarity(got.flatten(), original.flatten(), dim=0) > 0.98
    assert any("fewer than" in w for w in report.warnings) == (statistics == "routed")


def _layer_output_error(src, out, calibset, index: int) -> float:
    """MSE between the original and the compressed layer ``index`` on held-out windows' embeddings."""
    ckpt, comp = Checkpoint(src), Checkpoint(out)
    classes, config = classes_for(ckpt.spec.model_type), hf_config(ckpt.spec.config)
    prefix = f"model.layers.{index}."
    original = {n.removeprefix(prefix): ckpt.read(n) for n in ckpt.layer_names(index)}
    compressed = {n.removeprefix(prefix): comp.read(n) for n in comp.layer_names(index)}
    runner = pipeline.LayerRunner(classes, config, calibset.seq_len)
    x = ckpt.read("model.embed_tokens.weight")[calibset.heldout]
    want = runner.run(build_layer(classes, config, index, original), x)
    got = runner.run(build_layer(classes, config, index, compressed), x)
    return float((want - got).pow(2).mean())


def test_gptq_beats_rtn_on_held_out_layer_output(tiny_checkpoint, tmp_path):
    """Same layer, same held-out windows: the GPTQ layer's output error is below RTN's."""
    src = tiny_checkpoint("qwen2")
    kwargs = {"recipe": "int4-g32", "calib_tokens": 512, "heldout_tokens": 256, "seq_len": 64, "evaluate": False}
    compress(src, tmp_path / "rtn", method="rtn", **kwargs)
    compress(src, tmp_path / "gptq", method="gptq", **kwargs)
    calibset = load_calibration(src / "tokenizer.json", None, calib_tokens=512, heldout_tokens=256, seq_len=64)
    rtn = _layer_output_error(src, tmp_path / "rtn", calibset, 0)
    gptq = _layer_output_error(src, tmp_path / "gptq", calibset, 0)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("variant", ["v3", "qwen2"])
def test_streamed_forward_matches_reference_model(tiny_checkpoint, tmp_path, variant):
    """Layer-by-layer transformers layers + our head = the whole transformers model, on the held-out windows."""
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn
    from dsedge.models.reference import load_reference_model

    src = tiny_checkpoint(variant)
    report = compress(src, tmp_path / "out", recipe="none", **FAST)
    calibset = load_calibration(src / "tokenizer.json", None, calib_tokens=128, heldout_tokens=128, seq_len=64)
    ids = calibset.heldout.reshape(-1).tolist()
    want = evaluate_perplexity(torch_logits_fn(load_reference_model(src)), ids, window=64, batch_size=8)
    got = report.quality["original"]
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    assert got["top1_accuracy"] == want.top1_accuracy
    assert report.quality["compressed"]["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
    assert report.quality["top1_agreement"] == 1.0


def test_compressed_tensors_library_reproduces_dequantized_weights(tiny_checkpoint, tmp_path):
    """Our output through compressed-tensors' own parser and pack-quantized decompressor: every quantized
    weight equals our dequantization of it, rounded to the float16 the library computes in (int4 g128 experts
    with partial groups, int8 per channel)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    src = tiny_checkpoint("v3")
    out = tmp_path / "out"
    report = compress(src, out, recipe="int4-experts", **FAST)
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(out / "model.safetensors")
    checked = 0
    packed = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    for scheme in config.config_groups.values():
        # targets are family patterns (re:, compressed-tensors' re.match) or exact names
        for module in [m for m in packed if any(re.match(t[3:], m) if t.startswith("re:") else t == m
                                                 for t in scheme.targets)]:
            local = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".weight_")}
            weight = compressor.decompress(local, scheme)["weight"]
            ours = _reference_dequantized(tensors, module)
            # The library multiplies in the scales' dtype (the model's bf16): one rounding of the same exact product.
            assert torch.equal(weight, ours.to(weight.dtype)), module
            checked += 1
    assert checked == report.quantized_modules


def test_transformers_loads_dense_output_and_agrees_with_the_report(tiny_checkpoint, tmp_path):
    """transformers + compressed-tensors load our output (from_pretrained) and score the held-out windows as
    the streamed report did: the report's compressed perplexity is what a standard loader sees."""
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn
    from dsedge.models.reference import load_reference_model

    src = tiny_checkpoint("qwen2")
    report = compress(src, tmp_path / "out", recipe="int4-g32", **FAST)
    calibset = load_calibration(src / "tokenizer.json", None, calib_tokens=128, heldout_tokens=128, seq_len=64)
    model = load_reference_model(tmp_path / "out")
    got = evaluate_perplexity(torch_logits_fn(model), calibset.heldout.reshape(-1).tolist(), window=64, batch_size=8)
    assert got.perplexity == pytest.approx(report.quality["compressed"]["perplexity"], rel=1e-3)


def _reference_dequantized(tensors: dict, module: str) -> torch.Tensor:
    from dsedge.quantformat.packing import unpack
    from dsedge.quantformat.tensor import dequantize

    return dequantize(unpack({k: v for k, v in tensors.items() if k.startswith(module + ".weight_")}, where=module))


# --- pruning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,fraction,per_group_after", [("v2_lite", 0.2, 8), ("v2", 0.34, 2), ("v3", 0.25, 3)])
def test_pruning_keeps_groups_balanced_and_loads(tiny_checkpoint, tmp_path, variant, fraction, per_group_after):
    from dsedge.models.reference import load_reference_model

    src = tiny_checkpoint(variant)
    ckpt = Checkpoint(src)
    moe = ckpt.spec.moe
    report = compress(src, tmp_path / "out", recipe="none", prune_experts=fraction, **FAST)
    out = tmp_path / "out"
    groups = moe.n_group if moe.routing != "greedy" else 1
    after = per_group_after * groups
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == after == report.pruning["experts_after"]
    pruned = Checkpoint(out)
    pruned.validate()
    per_group = moe.n_routed_experts // groups
    for layer in ckpt.spec.moe_layers:
        kept = config["dsedge_pruning"]["kept_experts"][str(layer)]
        assert kept == report.pruning["kept_experts"][str(layer)] == sorted(kept)
        assert [sum(1 for e in kept if e // per_group == g) for g in range(groups)] == [per_group_after] * groups
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(pruned.read(p + "gate.weight"), ckpt.read(p + "gate.weight")[kept])
        if moe.has_correction_bias:
            assert torch.equal(pruned.read(p + "gate.e_score_correction_bias"),
                               ckpt.read(p + "gate.e_score_correction_bias")[kept])
        for new, old in enumerate(kept):  # kept experts are unchanged, renumbered
            assert torch.equal(pruned.read(f"{p}experts.{new}.down_proj.weight"),
                               ckpt.read(f"{p}experts.{old}.down_proj.weight"))
        saliency = report.layers[layer]["experts"]["saliency"]
        for g in range(groups):  # the removed experts of a group are its least salient
            ids = range(g * per_group, (g + 1) * per_group)
            assert max(saliency[e] for e in ids if e not in kept) <= min(saliency[e] for e in kept if e in ids)
    model = load_reference_model(out)  # transformers' from_pretrained, no remote code
    assert model.config.n_routed_experts == after
    ids = torch.tensor([[0, 5, 9, 40, 7, 100]])
    assert torch.isfinite(model(ids).logits).all()


def test_pruning_with_quantization_loads_in_dsedge(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("v3")
    report = compress(src, tmp_path / "out", recipe="int4-experts", prune_experts=0.25, **FAST)
    Checkpoint(tmp_path / "out").validate()
    assert report.quantized_experts == 2 * 12


# --- CLI, bad input, interruption -------------------------------------------------------------

def _cli(*args) -> tuple[int, dict]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["compress", *map(str, args), "--json", "--calib-tokens", "64", "--heldout-tokens", "64",
                     "--seq-len", "64"])
    return code, json.loads(buffer.getvalue())


def test_cli_compress_json(tiny_checkpoint, tmp_path):
    code, result = _cli(tiny_checkpoint("v2_lite"), "-o", tmp_path / "out", "--recipe", "int8")
    assert code == 0 and result["ok"] and result["quantized_experts"] == 20
    assert json.loads((tmp_path / "out" / "compress_report.json").read_text())["recipe"]["name"] == "int8"


@pytest.mark.parametrize("problem", ["recipe", "recipe-file", "binary-calib", "empty-calib", "short-calib",
                                     "prune", "prune-dense", "exists"])
def test_bad_input_exits_3(tiny_checkpoint, tmp_path, problem):
    src = tiny_checkpoint("v3" if problem != "prune-dense" else "qwen2")
    out = tmp_path / "out"
    args = [src, "-o", out]
    if problem == "recipe":
        args += ["--recipe", "int3"]
    elif problem == "recipe-file":
        (tmp_path / "r.json").write_text('{"rules": [{"match": "re:.*", "quant": {"bits": 5}}]}')
        args += ["--recipe", tmp_path / "r.json"]
    elif problem.endswith("calib"):
        data = {"binary-calib": b"\x00\x01\x02" * 100, "empty-calib": b"  \n", "short-calib": b"too short"}[problem]
        (tmp_path / "c.txt").write_bytes(data)
        args += ["--calib", tmp_path / "c.txt"]
    elif problem.startswith("prune"):
        args += ["--prune-experts", "0.9" if problem == "prune" else "0.25"]
    elif problem == "exists":
        out.mkdir()
    code, result = _cli(*args)
    assert code == 3 and not result["ok"], result
    assert result["error"]["exit_code"] == 3
    assert (problem == "exists") == out.exists()


def test_interrupted_compress_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    original = pipeline._Run._layer

    def fail_on_second_layer(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return original(self, i, *args)

    monkeypatch.setattr(pipeline._Run, "_layer", fail_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_checkpoint("v3"), tmp_path / "out", recipe="int8", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_existing_output(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="is not a compressed checkpoint"):  # never an arbitrary folder
        compress(tiny_checkpoint("llama"), tmp_path / "out", recipe="int8", overwrite=True, evaluate=False, **FAST)
    assert (tmp_path / "out" / "stale.txt").read_text() == "old"
    compress(tiny_checkpoint("llama"), tmp_path / "new", recipe="int8", evaluate=False, **FAST)
    (tmp_path / "new" / "stale.txt").write_text("old")
    compress(tiny_checkpoint("llama"), tmp_path / "new", recipe="int8", overwrite=True, evaluate=False, **FAST)
    assert not (tmp_path / "new" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_target_picks_a_recipe_that_fits(tiny_checkpoint, tmp_path):
    report = compress(tiny_checkpoint("v2"), tmp_path / "out", target="arm-sbc-8g", evaluate=False, **FAST)
    assert report.recipe["name"] == "int8"  # a 1 MB model fits anything at the highest-precision preset


def test_help_lists_presets_and_recipe_format(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = capsys.readouterr().out
    for name in ("int8", "int4-g32", "int4-g128", "int4-experts", "none"):
        assert f"  {name} " in text
    assert "first match wins" in text and "--prune-experts" in text and "examples:" in text


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_recipe_naming_lm_head_quantizes_it_and_export_runs_it_as_matmul_nbits(method, tiny_checkpoint, tmp_path):
    """The head is kept by default; a rule naming it exactly opts it in (the fast path llama.cpp's Q files take)."""
    import json as _json

    import onnx

    from dsedge.export.bundle import export_bundle
    from dsedge.models.checkpoint import Checkpoint

    recipe = tmp_path / "head.json"
    recipe.write_text(_json.dumps({"name": "int8+head", "rules": [
        {"match": "lm_head", "quant": {"bits": 8, "method": method}}, {"match": "re:.*", "quant": {"bits": 8}}]}))
    out = tmp_path / "c"
    report = compress(tiny_checkpoint("llama"), out, recipe=str(recipe), calib_tokens=64, heldout_tokens=64)
    assert report.lm_head["scheme"].startswith("int8") and report.lm_head["sqnr_db"] > 30
    assert Checkpoint(out).quantized("lm_head") is not None
    assert "lm_head" not in _json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    export_bundle(out, tmp_path / "b", max_context=64, accuracy_level=0)  # validated against the reference
    graph = onnx.load(str(tmp_path / "b" / "graphs" / "decoder.onnx"), load_external_data=False).graph
    assert any(i.name == "lm_head.qweight" for i in graph.initializer)
