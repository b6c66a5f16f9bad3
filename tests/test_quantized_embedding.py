"""The token embedding and the LM head quantized: recipe rules that name them, the checkpoint transformers still
loads, GatherBlockQuantized / MatMulNBits in both bundle layouts (tied heads sharing the embedding's codes), and
plan counting their bytes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dsedge.compress.recipes import EMBEDDING, Recipe, Rule
from dsedge.errors import UserError
from dsedge.export.embedding import CODES, embedding_lookup, embedding_scheme, quantize_embedding, tied_quantized_head
from dsedge.export.graph import GraphBuilder
from dsedge.planning import blocked_bytes
from dsedge.quantformat.config import EXPORT_EMBEDDING_KEY
from dsedge.quantformat.scheme import QuantScheme

INT4, INT8 = QuantScheme(4, 32), QuantScheme(8, None)
FAST = {"calib_tokens": 128, "heldout_tokens": 128, "seq_len": 64}


def test_the_embedding_is_quantized_only_by_a_rule_naming_it():
    assert Recipe("all", (Rule("re:.*", INT4),)).scheme_for(EMBEDDING) is None
    assert Recipe("regex", (Rule("re:model\\.embed.*", INT4),)).scheme_for(EMBEDDING) is None
    assert Recipe("named", (Rule("re:.*", INT4), Rule(EMBEDDING, INT8))).scheme_for(EMBEDDING) == INT8
    # the MTP layer's own embedding stays float whatever is named
    assert Recipe("mtp", (Rule("model.layers.3.embed_tokens", INT8),)).scheme_for("model.layers.3.embed_tokens") is None


def _run(g: GraphBuilder, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(4, 128), QuantScheme(8, None), QuantScheme(8, 64)])
def test_one_copy_of_the_codes_serves_gather_and_tied_head(scheme):
    """onnxruntime 1.32's CPU kernels: GatherBlockQuantized over MatMulNBits' B layout returns the dequantized
    rows exactly, also when the width (224) is not a multiple of the block; the head's MatMulNBits over the
    same initializer (level 0) is x @ Eᵀ of those rows."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 224)).astype(np.float32)
    weight = quantize_embedding(table, scheme, accuracy_level={4: 0, 8: 0})  # float compute: exact
    g = GraphBuilder("t")
    ids = g.input("ids", onnx.TensorProto.INT64, [2, 3])
    x = g.input("x", onnx.TensorProto.FLOAT, [1, 2, 224])
    g.output(embedding_lookup(g, weight, ids), "rows", onnx.TensorProto.FLOAT, [2, 3, 224])
    g.output(tied_quantized_head(g, x, weight), "logits", onnx.TensorProto.FLOAT, [1, 2, 50])
    token_ids, hidden = np.array([[0, 7, 49], [3, 3, 1]]), rng.standard_normal((1, 2, 224)).astype(np.float32)
    rows, logits = _run(g, {"ids": token_ids, "x": hidden})
    dequantized = weight.dequantize()
    np.testing.assert_array_equal(rows, dequantized[token_ids])
    np.testing.assert_allclose(logits, hidden @ dequantized.T, rtol=1e-5, atol=1e-4)
    assert sum(1 for t in g.initializers if t.name == CODES) == 1
    # and it is round-to-nearest: every value within about half a step of its row's or group's scale
    group = scheme.group_size or table.shape[1]
    amax = np.repeat(np.abs(table.reshape(50, -1, group)).max(axis=2), group, axis=1) if table.shape[1] % group == 0 \
        else np.abs(table).max(axis=1, keepdims=True)  # a padded last group: bound by the row's range
    step = amax / ((2 ** scheme.bits - 1) / 2)
    # (a little over half: the largest magnitude is clamped to the code range after the 16-bit scale rounding)
    assert np.all(np.abs(dequantized - table) <= step * 0.6)
    assert not np.array_equal(dequantized, table)


def test_the_option_overrides_the_recipe_and_bad_schemes_are_user_errors():
    recorded = {EXPORT_EMBEDDING_KEY: QuantScheme(8, 64).to_json()}
    assert embedding_scheme(None, recorded) == QuantScheme(8, 64)
    assert embedding_scheme("int4", recorded) == QuantScheme(4, 32)
    assert embedding_scheme("none", recorded) is None
    assert embedding_scheme(None, {}) is None
    with pytest.raises(UserError, match="unknown embedding quantization"):
        embedding_scheme("int3", {})
    with pytest.raises(UserError, match="symmetrically"):
        embedding_scheme(None, {EXPORT_EMBEDDING_KEY: QuantScheme(4, 32, symmetric=False).to_json()})
    with pytest.raises(UserError, match="power of two"):
        embedding_scheme(None, {EXPORT_EMBEDDING_KEY: QuantScheme(4, 48).to_json()})


def _graphs(bundle) -> dict[str, onnx.GraphProto]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {g["role"] + ("" if g["role"] != "layer" else str(g["layer"])): onnx.load(
        str(bundle / g["file"]), load_external_data=False).graph for g in manifest["graphs"]}


def _ops(graph) -> set[str]:
    return {n.op_type for n in graph.node}


def test_compress_records_the_embedding_rule_quantizes_the_head_and_transformers_still_loads(tiny_checkpoint, tmp_path):
    """The head is packed in the checkpoint (its config group, out of ``ignore``); the embedding stays float there
    (transformers 5.24 cannot load a packed Embedding) with its scheme recorded, which export then applies."""
    from dsedge.compress.calibration import load_calibration
    from dsedge.compress.pipeline import compress
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn
    from dsedge.export.bundle import export_bundle
    from dsedge.inspection import inspect_checkpoint
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import load_reference_model

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "int4+head+embedding", "rules": [
        {"match": "lm_head", "quant": {"bits": 4, "group_size": 32}},
        {"match": "model.embed_tokens", "quant": {"bits": 4, "group_size": 32}},
        {"match": "re:.*", "quant": {"bits": 4, "group_size": 32}}]}))
    src, out = tiny_checkpoint("qwen2"), tmp_path / "c"
    report = compress(src, out, recipe=str(recipe), **FAST)
    config = json.loads((out / "config.json").read_text())
    assert config[EXPORT_EMBEDDING_KEY]["bits"] == 4
    qc = config["quantization_config"]
    assert "lm_head" not in qc["ignore"] and any("lm_head" in g["targets"] for g in qc["config_groups"].values())
    ckpt = Checkpoint(out)
    assert ckpt.quantized("lm_head") is not None and ckpt.quantized("model.embed_tokens") is None
    inspected = inspect_checkpoint(out)
    assert inspected.quantized_modules["int4-g32"] == len(ckpt.quantization)  # the head among them
    assert any("embedding as int4-g32" in note for note in inspected.notes)
    model = load_reference_model(out)  # transformers' own from_pretrained
    calibset = load_calibration(src / "tokenizer.json", None, **FAST)
    got = evaluate_perplexity(torch_logits_fn(model), calibset.heldout.reshape(-1).tolist(), window=64, batch_size=8)
    assert got.perplexity == pytest.approx(report.quality["compressed"]["perplexity"], rel=1e-3)

    bundle = tmp_path / "b"
    export_bundle(out, bundle, max_context=64)  # validates against the reference with the embedding dequantized
    graph = _graphs(bundle)["decoder"]
    names = {t.name for t in graph.initializer}
    assert "GatherBlockQuantized" in _ops(graph) and "Gather" not in {
        n.op_type for n in graph.node if n.input and n.input[0] == "model.embed_tokens.weight"}
    assert CODES in names and "model.embed_tokens.weight" not in names and "lm_head.qweight" in names
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["embedding"].startswith("int4-g32")
    # --quantize-embedding none keeps it float again
    export_bundle(out, tmp_path / "float", max_context=64, quantize_embedding="none", validate=False)
    assert "model.embed_tokens.weight" in {t.name for t in _graphs(tmp_path / "float")["decoder"].initializer}


@pytest.mark.parametrize("layout", ["monolithic", "partitioned"])
@pytest.mark.parametrize("option", ["int8", "int4"])
def test_a_tied_float_checkpoint_exports_one_quantized_copy_for_gather_and_head(tiny_checkpoint, tmp_path, layout,
                                                                               option):
    from dsedge.export.bundle import export_bundle

    src = tiny_checkpoint("qwen2", tied=True)
    bundle = tmp_path / "b"
    report = export_bundle(src, bundle, max_context=64, layout=layout, quantize_embedding=option)  # validated
    assert report.validation and all(c["passed"] for c in report.validation)
    graphs = _graphs(bundle)
    lookup = graphs["decoder" if layout == "monolithic" else "prelude"]
    head = graphs["decoder" if layout == "monolithic" else "head"]
    assert "GatherBlockQuantized" in _ops(lookup)
    matmuls = [n for n in head.node if n.op_type == "MatMulNBits" and n.input[1] == CODES]
    assert len(matmuls) == 1 and "Gemm" not in _ops(head)
    everywhere = [t.name for g in graphs.values() for t in g.initializer]
    assert everywhere.count(CODES) == (1 if layout == "monolithic" else 2)  # the head's is a reference
    if layout == "partitioned":
        manifest = json.loads((bundle / "manifest.json").read_text())
        by_role = {g["role"]: g for g in manifest["graphs"]}
        assert set(by_role["prelude"]["data_files"]) <= set(by_role["head"]["data_files"])
    float_bundle = tmp_path / "f"
    export_bundle(src, float_bundle, max_context=64, layout=layout, validate=False)
    # the float matrix gave way to one set of codes and two sets of scales (gather's and the head's)
    config = json.loads((src / "config.json").read_text())
    shape, quant = (config["vocab_size"], config["hidden_size"]), {"int8": (8, None), "int4": (4, 32)}[option]
    saved = shape[0] * shape[1] * 4 - blocked_bytes(shape, quant, 4, scale_copies=2)
    # graph files only: the validated bundle's manifest also holds its checks (partitioned: both ways)
    assert _graph_bytes(float_bundle) - _graph_bytes(bundle) == pytest.approx(saved, abs=4096)


def _graph_bytes(bundle) -> int:
    return sum(f.stat().st_size for f in (bundle / "graphs").rglob("*") if f.is_file())


@pytest.mark.parametrize("layout", ["monolithic", "partitioned"])
def test_plan_counts_a_quantized_head_and_embedding_as_export_writes_them(tiny_checkpoint, tmp_path, layout,
                                                                          monkeypatch):
    """plan's int8 row with the head int8 and the embedding int4 (patched in) within 3% of the export."""
    from dsedge import planning
    from dsedge.compress.pipeline import compress
    from dsedge.export.bundle import export_bundle

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "int8+head", "rules": [
        {"match": "lm_head", "quant": {"bits": 8}},
        {"match": "model.embed_tokens", "quant": {"bits": 4, "group_size": 32}},
        {"match": "re:.*", "quant": {"bits": 8}}]}))
    compress("qwen2-tiny", tmp_path / "c", recipe=str(recipe), evaluate=False, calib_tokens=256, method="rtn")
    report = export_bundle(tmp_path / "c", tmp_path / "b", validate=False, max_context=512, layout=layout)
    monkeypatch.delitem(planning.HEAD_QUANT, "int8")  # "before": an int8 row with a float head and embedding
    monkeypatch.delitem(planning.EMBEDDING_QUANT, "int8")
    before = {r.scheme: r for r in planning.plan("qwen2-tiny", context=512, layout=layout).precisions}["int8"]
    monkeypatch.setitem(planning.HEAD_QUANT, "int8", (8, None))
    monkeypatch.setitem(planning.EMBEDDING_QUANT, "int8", (4, 32))
    row = {r.scheme: r for r in planning.plan("qwen2-tiny", context=512, layout=layout).precisions}["int8"]
    assert row.weight_bytes == pytest.approx(report.bundle_bytes, rel=0.03)
    assert before.weight_bytes > report.bundle_bytes * 1.2  # the float head and embedding, counted before
    assert row.active_bytes_per_token < before.active_bytes_per_token
