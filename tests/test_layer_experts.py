"""Partitioned bundles hold each quantized MoE layer's experts once: a fused layer_experts graph (one QMoE over
every expert) whose file the expert partitions reference by rows; the runtime runs the fused graph when the
whole layer is resident and the partitions under a budget, with the same tokens either way."""

import json

import numpy as np
import onnx
import pytest

from dsedge.compress.pipeline import compress
from dsedge.export.bundle import export_bundle
from dsedge.manifest import BundleError
from dsedge.runtime import load_bundle


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    """int8 (per channel: QMoE-able at the fixtures' widths) partitioned bundles of the v2 and v3 fixtures, two
    experts per partition (int4 at the bench layout: tests/test_qmoe.py)."""
    out = {}
    for variant in ("v2", "v3"):
        root = tmp_path_factory.mktemp(f"fused-{variant}")
        compress(tiny_checkpoint(variant), root / "ckpt", recipe="int8", calib_tokens=64, evaluate=False)
        report = export_bundle(root / "ckpt", root / "b", max_context=48, layout="partitioned",
                               experts_per_partition=2)
        out[variant] = (root / "b", report)
    return out


def _graphs(bundle, role):
    return [g for g in json.loads((bundle / "manifest.json").read_text())["graphs"] if g["role"] == role]


def _external(path):
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_partitions_reference_the_fused_file_and_hold_no_copy(bundles, variant):
    bundle, _ = bundles[variant]
    fused = {g["layer"]: g for g in _graphs(bundle, "layer_experts")}
    parts = _graphs(bundle, "experts")
    assert fused and {p["layer"] for p in parts} == set(fused)
    for part in parts:
        layer = fused[part["layer"]]
        assert part["data_files"] == layer["data_files"]  # the fused file, listed (so hashed) for the partition
        assert not (bundle / (part["file"] + ".data")).exists()
        refs = _external(bundle / part["file"])
        assert refs and {r["location"] for r in refs.values()} == {layer["data_files"][0].rsplit("/", 1)[-1]}
        whole = _external(bundle / layer["file"])
        first, last = part["experts"]
        for name, ref in refs.items():  # rows [first, last) of the fused tensor of the same name
            rows = int(whole[name]["length"]) // fused_rows(bundle / layer["file"], name)
            assert int(ref["offset"]) == int(whole[name]["offset"]) + first * rows
            assert int(ref["length"]) == (last - first) * rows
    # the experts are stored once: the partitions' bytes are their shares of the fused graphs' files
    data = sum((bundle / f).stat().st_size for g in fused.values() for f in g["data_files"])
    shares = sum(p["bytes"] - (bundle / p["file"]).stat().st_size for p in parts)
    assert 0.95 * data <= shares <= data  # the file's alignment padding is nobody's share


def fused_rows(path, name):
    return next(t.dims[0] for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.name == name)


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_validation_checks_both_ways_through_the_bundle(bundles, variant):
    _, report = bundles[variant]
    names = {c["name"] for c in report.validation}
    assert {"prefill", "partitions.prefill", "partitions.layer_0", "partitions.batch2_greedy_16"} <= names
    assert all(c["passed"] for c in report.validation)


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_fused_and_partitioned_runs_agree(bundles, variant):
    bundle, _ = bundles[variant]
    fused = load_bundle(bundle, compose=False)  # graph by graph, the fused layer graphs
    assert fused.fused and not fused.experts.loaded  # every layer fused, no partition session
    split = load_bundle(bundle, fuse_layers=False, compose=False)
    assert not split.fused and split.experts.loaded
    prompt = [5, 9, 13, 2, 7, 11]
    np.testing.assert_allclose(fused.logits(prompt), split.logits(prompt), rtol=0, atol=2e-4)
    assert fused.greedy(prompt, 12) == split.greedy(prompt, 12)
    assert fused.experts.stats.hits > 0 and fused.experts.stats.misses == 0  # counted as resident partitions


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_a_budget_runs_the_partitions_of_layers_that_do_not_fit(bundles, variant):
    bundle, _ = bundles[variant]
    everything = load_bundle(bundle)
    parts = everything.manifest.contract.placement.ranking
    one_partition = max(p.bytes for p in parts)
    budget = load_bundle(bundle, memory_budget_bytes=2 * one_partition)
    assert not budget.fused  # no layer's partitions all fit
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert budget.greedy(prompt, 10) == everything.greedy(prompt, 10)
    assert budget.experts.stats.misses > 0
    assert budget.experts.loaded_bytes <= 2 * one_partition


def test_a_changed_fused_file_is_refused_when_a_partition_first_loads(bundles, tmp_path):
    import shutil

    bundle, _ = bundles["v3"]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = copy / _graphs(copy, "layer_experts")[0]["data_files"][0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256|changed|hash"):
        engine = load_bundle(copy, memory_budget_bytes=1)
        engine.greedy([1, 2, 3], 4)
