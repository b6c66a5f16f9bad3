"""`export` + the runtime's load_bundle: every variant against transformers, the latent cache, tampering."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_contract import assert_declared_io_matches_onnx

from dsedge.cli import main
from dsedge.errors import CheckFailed, UserError
from dsedge.export.bundle import export_bundle
from dsedge.manifest import BundleError, write_manifest
from dsedge.models.reference import load_reference_model
from dsedge.runtime import load_bundle

# Every architecture and routing variant, FP8 with partial blocks, MTP present, sharded.
EXPORT_CASES = [
    ("v2_lite", {}),
    ("v2", {}),
    ("v3", {}),
    ("v3", {"fp8": True, "mtp": True, "num_shards": 2}),
    ("qwen2", {}),
    ("llama", {}),
]


def case_id(case):
    variant, kwargs = case
    return "-".join([variant, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.fixture(scope="session")
def bundles(tiny_checkpoint, tmp_path_factory):
    """Each case exported once per session (validation inside export included)."""
    built = {}

    def get(variant, **kwargs):
        key = case_id((variant, kwargs))
        if key not in built:
            out = tmp_path_factory.mktemp("bundles") / key
            built[key] = (export_bundle(tiny_checkpoint(variant, **kwargs), out, max_context=96), out)
        return built[key]

    return get


@pytest.mark.parametrize("case", EXPORT_CASES, ids=case_id)
def test_export_validates_every_variant(bundles, case):
    report, path = bundles(case[0], **case[1])
    assert {c["name"] for c in report.validation} == {"prefill", "decode_vs_recompute", "greedy_16",
                                                      "batch2_left_padding", "batch2_greedy_16"}
    assert all(c["passed"] for c in report.validation)
    assert all(c["max_abs_err"] <= 1e-4 for c in report.validation if c["max_abs_err"] is not None)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["layout"] == "monolithic"
    decoder, *draft = manifest["graphs"]  # a checkpoint with an MTP layer also gets its draft graph
    assert [g["role"] for g in draft] == (["draft"] if case[1].get("mtp") else [])
    assert decoder["role"] == "decoder" and decoder["bytes"] == sum(
        manifest["files"][f]["bytes"] for f in (decoder["file"], *decoder["data_files"]))
    assert_declared_io_matches_onnx(path)


@pytest.mark.parametrize("case", [c for c in EXPORT_CASES if not c[1].get("fp8")], ids=case_id)
def test_runtime_matches_transformers_independently(bundles, tiny_checkpoint, case):
    """Outside export's own validation: load the bundle and compare with from_pretrained's model."""
    _, path = bundles(case[0], **case[1])
    engine = load_bundle(path)
    model = load_reference_model(tiny_checkpoint(case[0], **case[1]))
    prompt = [3, 17, 99, 250, 4, 8, 15, 16, 23, 42, 108, 7]
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert np.abs(engine.logits(prompt) - want).max() <= 1e-4
    assert engine.greedy(prompt, 16) == generated[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant, width", [("v3", 40 + 8), ("v2_lite", 40 + 8)])
def test_deepseek_cache_is_latent(bundles, variant, width):
    """Per token per layer the cache holds kv_lora_rank + qk_rope_head_dim values, nothing per head."""
    _, path = bundles(variant)
    engine = load_bundle(path)
    cache = engine.new_cache(batch=1, max_len=10)
    assert engine.cache_layout["kind"] == "mla_latent"
    assert len(cache.buffers) == engine.layers
    assert all(buf.shape == (1, 10, width) for buf in cache.buffers.values())
    engine.forward(np.asarray([[5, 6, 7]]), np.ones((1, 3), np.int64), cache)
    assert cache.length == 3


def test_prompt_longer_than_context_is_refused(bundles):
    _, path = bundles("qwen2")
    with pytest.raises(UserError, match="max context"):
        load_bundle(path).greedy(list(range(2, 90)), 10)


def copy_bundle(bundles, tmp_path, variant="v2"):
    _, path = bundles(variant)
    dst = tmp_path / "bundle"
    shutil.copytree(path, dst)
    return dst


def test_tampered_expert_weight_fails_sha256(bundles, tmp_path):
    path = copy_bundle(bundles, tmp_path)
    data = path / "graphs" / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one byte in the middle of the weights
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256") as err:
        load_bundle(path)
    assert err.value.exit_code == 3


def test_manifest_path_leaving_the_bundle_is_refused(bundles, tmp_path):
    path = copy_bundle(bundles, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["graphs"][0]["file"] = "../decoder.onnx"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a relative path inside the bundle|not listed"):
        load_bundle(path, verify=False)


def test_external_data_location_leaving_the_bundle_is_refused(bundles, tmp_path):
    import onnx

    path = copy_bundle(bundles, tmp_path)
    graph = path / "graphs" / "decoder.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../../outside.data"
    onnx.save(model, str(graph))
    manifest = json.loads((path / "manifest.json").read_text())
    write_manifest(path, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})  # re-hash
    with pytest.raises(BundleError, match="outside the bundle|not a relative path"):
        load_bundle(path)


def test_bad_schema_and_missing_manifest(bundles, tmp_path):
    path = copy_bundle(bundles, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(BundleError, match=r"newer dsedge \(schema 99"):
        load_bundle(path)
    (path / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 1}))
    with pytest.raises(BundleError, match=r"older dsedge \(schema 1\); re-export it") as err:
        load_bundle(path)
    assert err.value.exit_code == 3
    (path / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(path)


def test_existing_output_refused_and_overwrite(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_bundle(ckpt, out, max_context=32, validate=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(UserError, match="is not a dsedge bundle"):  # --overwrite replaces only a bundle
        export_bundle(ckpt, out, max_context=32, validate=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory may be written into
    export_bundle(ckpt, out, max_context=32, validate=False, overwrite=True)
    first = (out / "manifest.json").read_bytes()
    export_bundle(ckpt, out, max_context=16, validate=False, overwrite=True)
    assert (out / "manifest.json").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directories or lock left


def _perturbed_graph_weights(monkeypatch, layer: int, name: str):
    """Export builds its graphs from weights with one tensor of ``layer`` scaled by 1.5; the reference (read
    by its own loader) keeps the checkpoint's: a wrong exported layer, as a bug in a graph builder would be."""
    from dsedge.export import bundle

    original = bundle._layer_weights

    def perturbed(*args, **kwargs):
        weights = original(*args, **kwargs)

        def read(i):
            w = weights(i)
            if i == layer:
                w[name] = w[name] * 1.5
            return w

        return read

    monkeypatch.setattr(bundle, "_layer_weights", perturbed)


@pytest.mark.parametrize("layout", ["monolithic", "partitioned"])
def test_a_wrong_layer_fails_validation_exits_4_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                   layout):
    _perturbed_graph_weights(monkeypatch, 1, "model.layers.1.self_attn.o_proj.weight")
    out = tmp_path / "b"
    with pytest.raises(CheckFailed, match="prefill.*max abs error") as failure:
        export_bundle(tiny_checkpoint("v2"), out, max_context=48, layout=layout, experts_per_partition=4)
    if layout == "partitioned":  # each layer is its own graph: validation names the first one that departs
        assert "layer 1 is the first whose output departs" in failure.value.message
    else:
        assert "--layout partitioned to locate the layer" in failure.value.message
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["export", str(tiny_checkpoint("v2")), "-o", str(out), "--max-context", "48", "--layout", layout,
                 "--json"]) == 4
    assert json.loads(capsys.readouterr().out)["error"]["exit_code"] == 4


def test_the_located_layer_follows_the_perturbation(tiny_checkpoint, tmp_path, monkeypatch):
    _perturbed_graph_weights(monkeypatch, 2, "model.layers.2.self_attn.o_proj.weight")
    with pytest.raises(CheckFailed, match="layer 2 is the first whose output departs"):
        export_bundle(tiny_checkpoint("v3"), tmp_path / "b", max_context=48, layout="partitioned",
                      experts_per_partition=4)


def test_interrupted_export_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    from dsedge.export import bundle

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "_copy_tokenizer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint("v3"), tmp_path / "b", max_context=32)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_errors(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(UserError, match="layout"):
        export_bundle(tiny_checkpoint("v3"), tmp_path / "b", layout="sideways")
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "b")]) == 3
    assert "no checkpoint directory or known name" in capsys.readouterr().err


def test_cli_export_human_output(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint("v2_lite")), "-o", str(tmp_path / "b"), "--max-context", "64"]) == 0
    captured = capsys.readouterr()
    assert "greedy_16" in captured.out and "ok" in captured.out
    assert "export: layer 1/3" in captured.err  # progress on stderr


def test_runtime_import_is_torch_free(bundles):
    _, path = bundles("v3")
    code = ("import sys\nfrom dsedge.runtime import load_bundle\n"
            f"engine = load_bundle({str(path)!r})\n"
            "print(engine.greedy([5, 6, 7], 4))\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("[")


# --- partitioned layout -------------------------------------------------------------------------

PARTITIONED_CASES = [("v2_lite", {}), ("v2", {}), ("v3", {"fp8": True, "mtp": True}), ("llama", {})]


@pytest.fixture(scope="session")
def partitioned(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(variant, **kwargs):
        key = case_id((variant, kwargs))
        if key not in built:
            out = tmp_path_factory.mktemp("partitioned") / key
            report = export_bundle(tiny_checkpoint(variant, **kwargs), out, max_context=64, layout="partitioned",
                                   experts_per_partition=4)
            built[key] = (report, out)
        return built[key]

    return get


@pytest.mark.parametrize("case", PARTITIONED_CASES, ids=case_id)
def test_partitioned_export_validates(partitioned, case):
    report, path = partitioned(case[0], **case[1])
    assert all(c["passed"] for c in report.validation)
    manifest = json.loads((path / "manifest.json").read_text())
    assert_declared_io_matches_onnx(path)
    roles = [g["role"] for g in manifest["graphs"]]
    assert roles.count("prelude") == 1 and roles.count("head") == 1 and roles.count("layer") == 3
    assert all(g["bytes"] > 0 for g in manifest["graphs"])
    parts = [g for g in manifest["graphs"] if g["role"] == "experts"]
    trunk_and_parts = [g["name"] for g in manifest["graphs"] if g["role"] in ("layer", "experts")]
    assert sorted(trunk_and_parts) == trunk_and_parts  # written in layer order, which is also name order
    if case[0] == "llama":
        assert not parts
        return
    # every routed expert of every MoE layer lives in exactly one partition with its own data file
    spec = manifest["model"]
    for layer in spec["moe"]["moe_layers"]:
        covered = sorted(e for g in parts if g["layer"] == layer for e in range(*g["experts"]))
        assert covered == list(range(spec["moe"]["n_routed_experts"]))
    assert all(g["data_files"] and g["data_files"][0] in manifest["files"] for g in parts)
    # no calibration frequencies: ranked in layer order, each with its bytes; no target: all resident
    assert manifest["placement"]["ranking"] == [{"name": g["name"], "bytes": g["bytes"], "resident": True}
                                                for g in parts]


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_partitioned_under_small_budget_gives_identical_tokens(partitioned, bundles, variant):
    _, path = partitioned(variant)
    parts = [g for g in json.loads((path / "manifest.json").read_text())["graphs"] if g["role"] == "experts"]
    budget = 2 * max(g["bytes"] for g in parts)  # two partitions of the 6 (or 8) a model has
    assert budget < sum(g["bytes"] for g in parts)
    small = load_bundle(path, memory_budget_bytes=budget)
    prompt = [5, 9, 33, 120, 7, 64, 2, 18]
    monolithic = load_bundle(bundles(variant)[1])
    assert small.greedy(prompt, 12) == monolithic.greedy(prompt, 12)
    np.testing.assert_allclose(small.logits(prompt), monolithic.logits(prompt), atol=1e-5)
    stats = small.experts.stats
    assert stats.misses > 0 and stats.evictions > 0 and stats.bytes_loaded > 0
    assert small.experts.loaded_bytes <= budget


def test_partitioned_runs_only_chosen_partitions(partitioned):
    """The partitions run are exactly those holding an expert the router chose (read from the layer outputs)."""
    _, path = partitioned("v3", fp8=True, mtp=True)
    engine = load_bundle(path, compose=False)  # graph by graph (tests/test_compose.py: the composed graph)
    chosen: dict[int, set[int]] = {}
    for i, session in enumerate(engine.layer_sessions):
        def recording(values, in_place=None, run=session.run_with, layer=i):
            result = run(values, in_place)
            if "expert_ids" in result:
                chosen.setdefault(layer, set()).update(int(e) for e in result["expert_ids"].ravel())
            return result

        session.run_with = recording
    engine.greedy([11], 1)  # one token: top-4 of 16 experts in at most 2 of the 4 groups (= partitions) per layer
    holding = {p.name for layer, ids in chosen.items() for p in engine.partitions_by_layer[layer]
               if any(p.experts[0] <= e < p.experts[1] for e in ids)}
    every = {p.name for parts in engine.partitions_by_layer.values() for p in parts}
    assert set(chosen) == {1, 2} and holding < every  # two MoE layers, and some partitions hold no chosen expert
    assert set(engine.experts.stats.calls) == holding
    assert all(n == 1 for n in engine.experts.stats.calls.values())  # one forward pass: each ran once
    assert engine.experts.stats.hit_rate == 1.0  # no budget: all resident, no misses


def test_placement_plan_respects_budget():
    from dsedge.export.partitioned import RUNTIME_OVERHEAD_BYTES, placement_plan
    from dsedge.manifest import GraphEntry

    def entry(name, role, size):
        return GraphEntry(name, role, f"{name}.onnx", (), size, (), (), layer=0, experts=(0, 1))

    graphs = [entry("trunk", "layer", 1000)] + [entry(f"p{i}", "experts", 100) for i in range(10)]
    plan = placement_plan(graphs, budget=1000 + 50 + RUNTIME_OVERHEAD_BYTES + 350, kv_bytes=50,
                          frequencies={"p9": 0.9, "p3": 0.5, "p7": 0.4, "p1": 0.1})
    assert [p.name for p in plan.ranking][:5] == ["p9", "p3", "p7", "p1", "p0"]  # hottest first, then layer order
    assert plan.resident == ["p9", "p3", "p7"]  # 3 × 100 bytes fit in 350
    assert plan.resident_expert_bytes == 300 and plan.expert_bytes == 1000 and plan.trunk_bytes == 1000
    assert plan.resident_within(250) == ["p9", "p3"]  # the runtime's rule: the prefix that fits


def test_unsupported_config_options_are_refused():
    from dsedge.export.bundle import _check_supported
    from dsedge.models.published import published_config
    from dsedge.models.registry import spec_from_config

    with pytest.raises(UserError, match="mlp_bias"):
        _check_supported(spec_from_config(published_config("r1-distill-llama-8b") | {"mlp_bias": True}))
    with pytest.raises(UserError, match="rope type 'longrope'"):
        config = published_config("r1-distill-qwen-7b") | {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
        _check_supported(spec_from_config(config))
    _check_supported(spec_from_config(published_config("deepseek-v3")))  # the real configs pass


def test_moe_op_path_is_exact_for_v3_and_refused_for_v2(tiny_checkpoint, tmp_path):
    """onnxruntime's fused MoE op, fed our exact routing, is a validated alternative path for V3/R1."""
    report = export_bundle(tiny_checkpoint("v3"), tmp_path / "b", max_context=48, expert_path="moe_op")
    assert all(c["passed"] for c in report.validation)
    with pytest.raises(UserError, match="norm_topk_prob"):
        export_bundle(tiny_checkpoint("v2"), tmp_path / "c", max_context=48, expert_path="moe_op")


def _decoder_ops(bundle) -> set[str]:
    import onnx

    manifest = json.loads((bundle / "manifest.json").read_text())
    decoder = next(g for g in manifest["graphs"] if g["role"] == "decoder")
    return {n.op_type for n in onnx.load(str(bundle / decoder["file"]), load_external_data=False).graph.node}


def test_default_expert_path_is_the_moe_op_where_exact_and_dispatch_elsewhere(bundles, tiny_checkpoint, tmp_path):
    """V3/R1 float experts (fp32 or fp16) run as one MoE op per layer by default; V2 (unnormalised weights, which the op
    cannot take) keeps per-expert dispatch; asking for dispatch on V3 still gets it, validated."""
    _, v3 = bundles("v3")
    assert "MoE" in _decoder_ops(v3) and "NonZero" not in _decoder_ops(v3)
    _, v2 = bundles("v2")
    assert "MoE" not in _decoder_ops(v2) and "NonZero" in _decoder_ops(v2)
    report = export_bundle(tiny_checkpoint("v3"), tmp_path / "d", max_context=48, expert_path="dispatch")
    assert all(c["passed"] for c in report.validation)
    assert "MoE" not in _decoder_ops(tmp_path / "d") and "NonZero" in _decoder_ops(tmp_path / "d")
    report = export_bundle(tiny_checkpoint("v3"), tmp_path / "h", max_context=48, dtype="fp16")
    assert all(c["passed"] for c in report.validation) and "MoE" in _decoder_ops(tmp_path / "h")


@pytest.mark.parametrize("variant, layout", [("v3", "monolithic"), ("v2", "partitioned"), ("llama", "monolithic")])
def test_fp16_export_within_tolerance(tiny_checkpoint, bundles, tmp_path, variant, layout):
    """fp16 weights, activations and cache (norms, softmax, router, expert sums in fp32): ≤ 5e-3 vs fp32."""
    report = export_bundle(tiny_checkpoint(variant), tmp_path / "b", max_context=96, dtype="fp16", layout=layout,
                           experts_per_partition=4)
    assert all(c["passed"] for c in report.validation)
    assert all(c["max_abs_err"] <= 5e-3 for c in report.validation if c["max_abs_err"] is not None)
    assert_declared_io_matches_onnx(tmp_path / "b")
    engine = load_bundle(tmp_path / "b")
    assert all(buf.dtype == np.float16 for buf in engine.new_cache(max_len=4).buffers.values())
    fp32_bytes = bundles(variant)[0].bundle_bytes
    assert report.bundle_bytes < 0.6 * fp32_bytes  # weights stored in half the bytes


def test_the_moe_op_holds_each_expert_as_slices_of_its_intermediate_units(bundles):
    """Every float expert is MOE_OP_SPLIT sub-experts (so the CPU kernel's per-thread ranges of expert slots
    each get the same share of a token's chosen experts), k multiplied alike; the v3 bundle validated."""
    import onnx

    from dsedge.export.moe import MOE_OP_SPLIT

    report, v3 = bundles("v3")
    assert all(c["passed"] for c in report.validation)
    manifest = json.loads((v3 / "manifest.json").read_text())
    decoder = next(g for g in manifest["graphs"] if g["role"] == "decoder")
    graph = onnx.load(str(v3 / decoder["file"]), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    moe, hidden = manifest["model"]["moe"], manifest["model"]["hidden_size"]
    experts, width = moe["n_routed_experts"], moe["moe_intermediate_size"]
    for node in (n for n in graph.node if n.op_type == "MoE"):
        k = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "k")
        assert k == moe["num_experts_per_tok"] * MOE_OP_SPLIT
        assert dims[node.input[2]] == [MOE_OP_SPLIT * experts, 2 * width // MOE_OP_SPLIT, hidden]
        assert dims[node.input[4]] == [MOE_OP_SPLIT * experts, hidden, width // MOE_OP_SPLIT]
