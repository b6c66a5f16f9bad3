"""The bundle contract: role I/O declared once, the typed manifest, schema 2, padded names, the placement ranking."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from dsedge.cli import main
from dsedge.contract import (
    DTYPES,
    EXPERTS,
    LAYER,
    GraphShapes,
    TensorSpec,
    decoder_io,
    layer_graph_name,
    partition_name,
)
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.export.graph import ELEM_TYPES
from dsedge.manifest import (
    SCHEMA_VERSION,
    BundleError,
    CacheLayout,
    GraphEntry,
    Placement,
    RankedPartition,
    parse_contract,
    read_manifest,
    write_manifest,
)

_DTYPE_OF = {code: name for name, code in ELEM_TYPES.items()}


def _actual(values) -> list[TensorSpec]:
    """An ONNX graph's inputs/outputs as TensorSpecs (symbolic dims by name, fixed dims by size)."""
    out = []
    for v in values:
        dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in v.type.tensor_type.shape.dim)
        out.append(TensorSpec(v.name, _DTYPE_OF[v.type.tensor_type.elem_type], dims))
    return out


def assert_declared_io_matches_onnx(bundle) -> None:
    """Every graph's manifest inputs/outputs are its ONNX file's, in order: names, dtypes and dims (so ranks)."""
    manifest = read_manifest(bundle)
    assert manifest.contract.graphs
    for graph in manifest.contract.graphs:
        model = onnx.load(str(manifest.path(graph.file)), load_external_data=False)
        assert _actual(model.graph.input) == list(graph.inputs), graph.name
        assert _actual(model.graph.output) == list(graph.outputs), graph.name
        # a file another graph wrote (a tied head's or the MTP draft's shared embedding) counts under that graph
        own = [graph.file, *(f for f in graph.data_files if f == graph.file + ".data")]
        assert graph.bytes == sum(manifest.files[f]["bytes"] for f in own), graph.name


@pytest.fixture(scope="module")
def small_bundle(tiny_checkpoint, tmp_path_factory):
    """A partitioned v3 bundle (exported without validation: only its manifest is under test here)."""
    out = tmp_path_factory.mktemp("contract") / "b"
    export_bundle(tiny_checkpoint("v3"), out, max_context=32, layout="partitioned", experts_per_partition=4,
                  validate=False)
    return out


def _edited(src, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _shapes(**over) -> GraphShapes:
    return GraphShapes(**{"layers": 2, "hidden": 8, "vocab": 32, "rope_width": 2, "top_k": 2,
                          "cache_tensors": ("key", "value"), "cache_dims": ("B", 2, "S", 4)} | over)


def test_contract_round_trips_through_the_manifest(tmp_path):
    """write_manifest → read_manifest gives back the same dataclasses (with the hashes filled in)."""
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "decoder.onnx").write_bytes(b"graph")
    (tmp_path / "graphs" / "decoder.onnx.data").write_bytes(b"weights!")
    sig = decoder_io(_shapes())
    graph = GraphEntry("decoder", "decoder", "graphs/decoder.onnx", ("graphs/decoder.onnx.data",), 13, sig.inputs,
                       sig.outputs)
    placement = Placement(100, 10, 5, 0, 0, "uniform (no calibration data)", (RankedPartition("p", 3, False),))
    written = write_manifest(tmp_path, {"layout": "monolithic", "max_context": 16, "model": {
        "num_hidden_layers": 2, "vocab_size": 32}, "cache": CacheLayout("kv", ("key", "value"), ("B", 2, "S", 4),
                                                                        "float16"),
        "graphs": [graph], "placement": placement, "notes": ["kept as written"]})
    manifest = read_manifest(tmp_path)
    assert manifest.contract == written
    assert written.graphs[0].sha256 == manifest.files["graphs/decoder.onnx"]["sha256"]
    assert written.graphs[0].inputs == sig.inputs and written.placement == placement
    assert manifest.data["schema_version"] == SCHEMA_VERSION == 2 and manifest.data["notes"] == ["kept as written"]
    assert parse_contract(json.loads((tmp_path / "manifest.json").read_text())) == written


def test_exported_manifest_is_declared_io_and_reparses(small_bundle):
    assert_declared_io_matches_onnx(small_bundle)
    contract = read_manifest(small_bundle).contract
    roles = [g.role for g in contract.graphs]
    assert roles[0] == "prelude" and roles[-1] == "head" and roles.count(LAYER) == 3
    assert all(t.dtype in DTYPES for g in contract.graphs for t in (*g.inputs, *g.outputs))


@pytest.mark.parametrize(("edit", "key", "problem"), [
    (lambda d: d["graphs"][1].pop("bytes"), "graphs[1].bytes", "lacks key"),
    (lambda d: d.__setitem__("max_context", "32"), "max_context", "must be int"),
    (lambda d: d["cache"].pop("tensors"), "cache.tensors", "lacks key"),
    (lambda d: d["graphs"][0]["inputs"][0].__setitem__("dtype", "float64"), "graphs[0].inputs[0].dtype", "not one of"),
    (lambda d: d["graphs"][2]["outputs"][0].__setitem__("dims", "B,T"), "graphs[2].outputs[0].dims", "must be list"),
    (lambda d: d["placement"]["ranking"][0].pop("bytes"), "placement.ranking[0].bytes", "lacks key"),
    (lambda d: d["graphs"].pop(0), "'prelude' graph", "lack"),
    (lambda d: d["files"]["graphs/head.onnx"].pop("sha256"), "files['graphs/head.onnx'].sha256", "lacks key"),
])
def test_missing_or_mistyped_key_names_it(small_bundle, tmp_path, capsys, edit, key, problem):
    from dsedge.runtime import load_bundle

    path = _edited(small_bundle, tmp_path, edit)
    with pytest.raises(BundleError) as err:
        load_bundle(path, verify=False)
    assert key in err.value.what and problem in err.value.what and "re-export" in err.value.hint
    assert isinstance(err.value, UserError) and err.value.exit_code == 3
    assert main(["run", str(path), "-p", "x", "-n", "1", "--json"]) == 3
    assert key in json.loads(capsys.readouterr().out)["error"]["message"]


def test_schema_1_bundle_asks_for_a_re_export(small_bundle, tmp_path, capsys):
    from dsedge.runtime import load_bundle

    path = _edited(small_bundle, tmp_path, lambda d: d.__setitem__("schema_version", 1))
    with pytest.raises(BundleError, match=r"written by an older dsedge \(schema 1\); re-export it with this version"):
        load_bundle(path)
    assert main(["run", str(path), "-p", "x", "-n", "1"]) == 3
    assert "older dsedge (schema 1)" in capsys.readouterr().err


def test_layer_and_expert_names_sort_in_layer_order():
    from dsedge.export.partitioned import partitions_for
    from dsedge.models.published import published_config
    from dsedge.models.registry import spec_from_config

    spec = spec_from_config(published_config("deepseek-v3"))  # 61 layers, 256 routed experts
    parts = partitions_for(spec, 4)
    names = [p.name for p in parts]
    assert names[:2] == ["layer.03.experts.000-003", "layer.03.experts.004-007"]
    assert sorted(names) == names  # layer order, then expert order
    layers = [layer_graph_name(i, spec.num_hidden_layers) for i in range(spec.num_hidden_layers)]
    assert layers[2] == "layer.02" and sorted(layers) == layers
    assert partition_name(2, 4, 8, 12, 256) == "layer.02.experts.004-007"
    assert layer_graph_name(3, 10) == "layer.3" and layer_graph_name(3, 11) == "layer.03"  # width of the largest


def test_partition_files_are_named_after_the_padded_names(small_bundle):
    contract = read_manifest(small_bundle).contract
    parts = contract.graphs_in(EXPERTS)
    assert [p.name for p in parts] == sorted(p.name for p in parts)
    assert parts[0].name == "layer.1.experts.00-03"  # v3 fixture: 3 layers, 16 experts
    assert all(p.file == f"graphs/experts/{p.name}.onnx" for p in parts)


def test_runtime_budget_takes_the_prefix_of_export_s_ranking(small_bundle):
    """Under an explicit budget the resident set is the hottest-first prefix of the exported ranking that fits
    in the budget less the largest partition (room for one loaded on demand)."""
    from dsedge.runtime import load_bundle

    ranking = read_manifest(small_bundle).contract.placement.ranking
    assert all(r.resident for r in ranking)  # exported without a target: everything resident
    largest = max(r.bytes for r in ranking)
    budget = largest + ranking[0].bytes + ranking[1].bytes + ranking[2].bytes // 2
    engine = load_bundle(small_bundle, memory_budget_bytes=budget, verify=False)
    assert engine.experts.resident == {ranking[0].name, ranking[1].name}
    assert list(engine.experts.loaded) == [ranking[0].name, ranking[1].name]
    assert load_bundle(small_bundle, verify=False).experts.resident == {r.name for r in ranking}
