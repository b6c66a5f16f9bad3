"""Untrusted files: the ONNX external-data walker in every place a tensor can sit, safetensors headers the
reference library refuses, config values out of range, special files; each case also through the CLI (exit 3)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dsedge.cli import main
from dsedge.errors import CheckpointError, ConfigError
from dsedge.manifest import BundleError, Manifest, file_entry, write_manifest
from dsedge.models.config import INT_RANGES, read_config_file
from dsedge.models.registry import spec_from_config
from dsedge.models.safetensors_file import read_header
from dsedge.onnx_refs import MAX_DEPTH, external_data_locations
from dsedge.runtime.bundle import verified_graph_path
from dsedge.verified import VerifiedFiles

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

# The real published configs in ../shared/configs beside the checkout (CI lays shared/ beside its clone); the
# built-in published configs are tested below either way.
SHARED_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "configs"
CONFIGS = sorted((p for p in SHARED_CONFIGS.glob("*.json") if "model_type" in json.loads(p.read_text())), key=str)


# --- the ONNX external-data walker ---------------------------------------------------------------

def external(location: str, name: str = "", dtype=np.float32) -> TensorProto:
    """A tensor whose data lives at ``location`` (data_location EXTERNAL, as onnx.save writes it)."""
    tensor = numpy_helper.from_array(np.zeros(4, dtype), name or location)
    set_external_data(tensor, location=location, offset=0, length=tensor.ByteSize())
    tensor.ClearField("raw_data")
    return tensor


def sparse(prefix: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(external(f"{prefix}_values.bin"),
                                     external(f"{prefix}_indices.bin", dtype=np.int64), [8])


def graph(name: str, nodes=(), initializers=(), sparse_initializers=()) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    g = helper.make_graph(list(nodes), name, [], [out], initializer=list(initializers))
    g.sparse_initializer.extend(sparse_initializers)
    return g


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def model(main_graph: onnx.GraphProto, functions=(), training=()) -> bytes:
    m = helper.make_model(main_graph, functions=list(functions))
    m.training_info.extend(training)
    return m.SerializeToString()


def constant(**attrs) -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["y"], **attrs)


def function_with(nodes, defaults=()) -> onnx.FunctionProto:
    fn = helper.make_function("local", "F", [], ["y"], list(nodes), [helper.make_opsetid("", 21)])
    fn.attribute_proto.extend(defaults)
    return fn


# position → (serialized model, the locations it must report)
POSITIONS = {
    "initializer": lambda: (model(graph("g", initializers=[external("init.bin")])), {"init.bin"}),
    "sparse_initializer": lambda: (model(graph("g", sparse_initializers=[sparse("si")])),
                                   {"si_values.bin", "si_indices.bin"}),
    "constant_value": lambda: (model(graph("g", [constant(value=external("t.bin"))])), {"t.bin"}),
    "constant_sparse_value": lambda: (model(graph("g", [constant(sparse_value=sparse("sv"))])),
                                      {"sv_values.bin", "sv_indices.bin"}),
    "attribute_tensors": lambda: (model(graph("g", [helper.make_node(
        "Op", [], ["y"], domain="custom", ts=[external("ts0.bin"), external("ts1.bin")])])), {"ts0.bin", "ts1.bin"}),
    "attribute_sparse_tensors": lambda: (model(graph("g", [helper.make_node(
        "Op", [], ["y"], domain="custom", sts=[sparse("st0"), sparse("st1")])])),
        {"st0_values.bin", "st0_indices.bin", "st1_values.bin", "st1_indices.bin"}),
    "if_subgraph": lambda: (model(graph("g", [helper.make_node(
        "If", ["c"], ["y"], then_branch=graph("then", initializers=[external("then.bin")]),
        else_branch=graph("else", [constant(value=external("else.bin"))]))])), {"then.bin", "else.bin"}),
    "nested_subgraphs": lambda: (model(graph("g", [helper.make_node(
        "If", ["c"], ["y"], then_branch=graph("then", [helper.make_node(
            "Loop", ["n", "c"], ["y"], body=graph("body", sparse_initializers=[sparse("deep")]))]),
        else_branch=graph("else"))])), {"deep_values.bin", "deep_indices.bin"}),
    "attribute_graphs": lambda: (model(graph("g", [helper.make_node(
        "Op", [], ["y"], domain="custom", gs=[graph("a", initializers=[external("gs.bin")])])])), {"gs.bin"}),
    "function_node": lambda: (model(graph("g"), functions=[function_with([constant(value=external("fn.bin"))])]),
                              {"fn.bin"}),
    "function_subgraph": lambda: (model(graph("g"), functions=[function_with([helper.make_node(
        "If", ["c"], ["y"], then_branch=graph("t", initializers=[external("fn_then.bin")]),
        else_branch=graph("e"))])]), {"fn_then.bin"}),
    "function_default_attribute": lambda: (model(graph("g"), functions=[function_with(
        [], [helper.make_attribute("alpha", external("fn_default.bin"))])]), {"fn_default.bin"}),
    "training_info": lambda: (model(graph("g"), training=[onnx.TrainingInfoProto(
        initialization=graph("init", initializers=[external("train_init.bin")]),
        algorithm=graph("algo", [constant(sparse_value=sparse("train"))]))]),
        {"train_init.bin", "train_values.bin", "train_indices.bin"}),
}


@pytest.mark.parametrize("position", POSITIONS)
def test_walker_finds_external_data_in(position):
    data, expected = POSITIONS[position]()
    assert external_data_locations(data) == expected


def test_walker_finds_every_position_at_once():
    everything = [POSITIONS[p]() for p in POSITIONS]
    m = onnx.ModelProto()
    for data, _ in everything:
        m.MergeFromString(data)  # repeated fields concatenate, a repeated optional graph merges: all kept
    assert external_data_locations(m.SerializeToString()) == set().union(*(e for _, e in everything))


def test_walker_matches_onnx_on_plain_initializers():
    tensors = [external(f"w{i}.bin") for i in range(3)] + [numpy_helper.from_array(np.ones(2, np.float32), "inl")]
    data = model(graph("g", initializers=tensors))
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    m = onnx.load_from_string(data)
    theirs = {e.value for t in _get_all_tensors(m) if uses_external_data(t) for e in t.external_data
              if e.key == "location"}
    assert external_data_locations(data) == theirs == {"w0.bin", "w1.bin", "w2.bin"}


def test_external_tensor_without_location_is_reported():
    tensor = external("x.bin", name="weight")
    del tensor.external_data[:]
    tensor.external_data.add(key="offset", value="0")
    with pytest.raises(ValueError, match="'weight' has data_location EXTERNAL but no external_data location"):
        external_data_locations(model(graph("g", sparse_initializers=[
            helper.make_sparse_tensor(tensor, external("i.bin", dtype=np.int64), [8])])))


def test_walker_refuses_deep_nesting_and_lengths_past_the_end():
    def wrap(field: int, payload: bytes) -> bytes:  # one length-delimited protobuf field
        return encode_varint(field << 3 | 2) + encode_varint(len(payload)) + payload

    # graph → node → attribute → graph … by hand: the onnx package itself refuses to build this deep
    deep = wrap(5, external("deep.bin").SerializeToString())
    for _ in range(MAX_DEPTH // 3):
        deep = wrap(1, wrap(5, wrap(6, deep)))
    with pytest.raises(ValueError, match="nested deeper"):
        external_data_locations(wrap(7, deep))
    shallow = wrap(5, external("deep.bin").SerializeToString())
    for _ in range(MAX_DEPTH // 3 - 2):
        shallow = wrap(1, wrap(5, wrap(6, shallow)))
    assert external_data_locations(wrap(7, shallow)) == {"deep.bin"}

    data = model(graph("g", initializers=[external("w.bin")]))
    with pytest.raises(ValueError, match="declares|truncated"):
        external_data_locations(data[:-3])
    with pytest.raises(ValueError, match="varint"):
        external_data_locations(b"\x3a" + b"\xff" * 11)  # field 7 (graph), length varint never ends
    with pytest.raises(ValueError, match="declares 1000 bytes"):
        external_data_locations(b"\x3a\xe8\x07" + b"\x00" * 10)


def door(root, *rels):
    """A manifest whose verified door lists exactly ``rels`` under ``root`` (their hashes as they are now)."""
    files = {rel: file_entry(root, rel) for rel in rels}
    return Manifest(root, {"files": files}, None, VerifiedFiles(root, files, b"", error=BundleError))


def test_verified_graph_path_refuses_sparse_external_data_outside(tmp_path):
    data = model(graph("g", sparse_initializers=[helper.make_sparse_tensor(
        external("../outside.bin"), external("idx.bin", dtype=np.int64), [8])]))
    (tmp_path / "graph.onnx").write_bytes(data)
    (tmp_path / "idx.bin").write_bytes(b"\0" * 32)
    def manifest():  # the verified door over these two files (contents hashed: mode "recorded")
        return door(tmp_path, "graph.onnx", "idx.bin")

    with pytest.raises(BundleError, match="not a relative path inside the bundle"):
        verified_graph_path(manifest(), SimpleNamespace(name="g", file="graph.onnx"))
    (tmp_path / "graph.onnx").write_bytes(data[:40])
    with pytest.raises(BundleError, match="not a valid ONNX file"):
        verified_graph_path(manifest(), SimpleNamespace(name="g", file="graph.onnx"))


@pytest.mark.parametrize(("offset", "length", "message"), [
    (10**9, 16, r"reads bytes \[1000000000, 1000000016\) of w\.bin, which has 64"),  # past the end
    (60, 16, r"reads bytes \[60, 76\) of w\.bin, which has 64"),  # straddles the end
    (65, None, r"reads bytes \[65, 65\) of w\.bin"),  # to the end of the file, from beyond it
    ("-8", 16, "not a non-negative integer"),
    ("0x10", 16, "not a non-negative integer"),
])
def test_external_data_outside_its_file_is_refused_before_onnxruntime(tmp_path, offset, length, message):
    """A re-hashed bundle whose graph points past the end of a listed file: exit 3 naming the tensor and the
    range, where onnxruntime would fail deep inside session creation (an internal error)."""
    tensor = external("w.bin", "weights")
    del tensor.external_data[:]
    entries = {"location": "w.bin", "offset": str(offset)} | ({} if length is None else {"length": str(length)})
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    (tmp_path / "graph.onnx").write_bytes(model(graph("g", initializers=[tensor])))
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    manifest = door(tmp_path, "graph.onnx", "w.bin")
    with pytest.raises(BundleError, match=message) as caught:
        verified_graph_path(manifest, SimpleNamespace(name="g", file="graph.onnx"))
    assert caught.value.exit_code == 3


def test_external_data_inside_its_file_passes(tmp_path):
    tensor = external("w.bin", "weights")  # offset 0, length 16 of 64 bytes
    (tmp_path / "graph.onnx").write_bytes(model(graph("g", initializers=[tensor])))
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    manifest = door(tmp_path, "graph.onnx", "w.bin")
    assert verified_graph_path(manifest, SimpleNamespace(name="g", file="graph.onnx")) == tmp_path / "graph.onnx"


# --- safetensors headers -------------------------------------------------------------------------

def write_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def f32(begin, end, shape=None):
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4],
            "data_offsets": [begin, end]}


GOOD = {"a": f32(0, 8), "b": f32(8, 16), "__metadata__": {"format": "pt"}}

# name → (header, data, the message it must give)
BAD_HEADERS = {
    "overlap": ({"a": f32(0, 8), "b": f32(4, 12)}, 12, r"overlap tensor a"),
    "alias": ({"a": f32(0, 8), "b": f32(0, 8)}, 8, r"overlap tensor"),
    "gap": ({"a": f32(0, 8), "b": f32(12, 20)}, 20, r"4 unused bytes after tensor a"),
    "not_from_zero": ({"a": f32(4, 12)}, 12, r"unused bytes at the start"),
    "trailing": ({"a": f32(0, 8)}, 12, r"4 bytes after the last tensor"),
    "string_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, 8, "data_offsets"),
    "float_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, "data_offsets"),
    "bool_offsets": ({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, 1, "data_offsets"),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, "data_offsets"),
    "bool_shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "float_shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "negative_shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "string_shape": ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "begin_after_end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, "begin is after end"),
    "entry_not_object": ({"a": [1, 2]}, 0, "malformed tensor entry"),
    "dtype_not_string": ({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    "metadata_not_strings": ({"a": f32(0, 8), "__metadata__": {"format": 1}}, 8, "__metadata__"),
}


def test_good_header_is_read(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", GOOD, bytes(16))
    tensors = read_header(tmp_path / "x.safetensors")
    assert {n: (t.offset - t.offset + t.nbytes, t.shape) for n, t in tensors.items()} == {"a": (8, (2,)),
                                                                                         "b": (8, (2,))}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_header_is_refused_as_the_reference_does(tmp_path, case):
    header, size, message = BAD_HEADERS[case]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, header, bytes(size))
    with pytest.raises(CheckpointError, match=message) as err:
        read_header(path)
    assert str(path) in err.value.where and err.value.exit_code == 3
    safetensors = pytest.importorskip("safetensors")
    with pytest.raises(Exception) as ref:  # the reference library refuses the same file
        safetensors.safe_open(str(path), "numpy")
    assert not isinstance(ref.value, CheckpointError)


def test_deeply_nested_and_duplicate_headers(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nests 100001 levels deep, more than the 8 allowed"):
        read_header(path)
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
          b'"data_offsets": [0, 4]}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        read_header(path)
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        read_header(fifo)  # would block forever if opened
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="directory"):
        read_header(tmp_path / "dir.safetensors")
    with pytest.raises(CheckpointError, match="device"):
        read_header(__import__("pathlib").Path("/dev/zero"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config_file(fifo)


# --- config values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_published_config_is_still_accepted(path):
    spec_from_config(read_config_file(path), str(path))


def test_published_configs_sit_well_inside_the_limits():
    from dsedge.models.published import PUBLISHED_CONFIGS

    for name, config in PUBLISHED_CONFIGS.items():
        spec_from_config(config, name)
        for key, (_, high) in INT_RANGES.items():
            if isinstance(config.get(key), int):
                assert config[key] * 4 <= high, (name, key)


def v3(**changes):
    from dsedge.models.published import published_config

    config = published_config("deepseek-v3")
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_routed_experts": 1e9}, r"'n_routed_experts' = 1000000000 is outside the allowed range 1\.\.8192"),
    ({"n_routed_experts": 8192, "num_hidden_layers": 1000}, r"8192000 expert MLPs, above the limit of 262144"),
    ({"max_position_embeddings": -1}, r"'max_position_embeddings' = -1 is outside the allowed range 1\.\."),
    ({"num_hidden_layers": 10 ** 6}, r"'num_hidden_layers' = 1000000 is outside the allowed range 1\.\.1024"),
    ({"hidden_size": 2 ** 40}, r"'hidden_size' = 1099511627776 is outside"),
    ({"vocab_size": 0}, r"'vocab_size' = 0 is outside"),
    ({"rms_norm_eps": float("nan")}, r"'rms_norm_eps' must be a finite number, got nan"),
    ({"rope_theta": float("inf")}, r"'rope_theta' must be a finite number"),
    ({"rms_norm_eps": -1e-6}, r"'rms_norm_eps' = -1e-06 is outside the allowed range \(0, 1\]"),
    ({"num_attention_heads": True}, r"'num_attention_heads' should be int, got True"),
    ({"rms_norm_eps": "1e-6"}, r"'rms_norm_eps' should be float, got '1e-6'"),
    ({"intermediate_size": 1.5}, r"'intermediate_size' should be int, got 1.5"),
    ({"eos_token_id": "</s>"}, r"'eos_token_id' should be int"),
    ({"eos_token_id": [1, -5]}, r"'eos_token_id' = -5 is outside"),
    ({"rope_scaling": {"type": 7}}, r"'rope_type' should be str"),
    ({"rope_scaling": {"type": "yarn", "factor": float("inf")}}, r"'factor' must be a finite number"),
])
def test_config_values_out_of_range_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        spec_from_config(v3(**changes), "config.json")
    assert err.value.exit_code == 3


def test_config_file_nesting_and_size(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "qwen2", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(ConfigError, match="nests 50001 levels deep, more than the 32 allowed"):
        read_config_file(path)
    path.write_text('{"vocab_size": 1' + "0" * 5000 + "}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(path)


# --- every case above through the CLI: exit 3 and a message naming the file / field --------------------

def copy_of(tiny_checkpoint, tmp_path, variant="v3", **kwargs):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(variant, **kwargs), dst)
    return dst


def edit_header(path, edit):
    """Rewrite ``path``'s safetensors header after ``edit(header)``, keeping the data bytes."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def first_tensors(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def overlap(header):
    a, b = first_tensors(header)[:2]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0],
                                 header[a]["data_offsets"][0] + header[b]["data_offsets"][1]
                                 - header[b]["data_offsets"][0]]


def offsets_as(kind):
    def edit(header):
        name = first_tensors(header)[0]
        header[name]["data_offsets"] = [kind(o) for o in header[name]["data_offsets"]]
    return edit


def deep_header(path):
    raw = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def edit_config(**changes):
    def edit(ckpt):
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps(config | changes))
    return edit


def deep_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "deepseek_v3", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


SHARD = "model.safetensors"
# case → (damage to the checkpoint, the file or field the message must name)
CLI_CASES = {
    "overlapping_offsets": (lambda c: edit_header(c / SHARD, overlap), SHARD),
    "string_offsets": (lambda c: edit_header(c / SHARD, offsets_as(str)), "data_offsets"),
    "float_offsets": (lambda c: edit_header(c / SHARD, offsets_as(float)), "data_offsets"),
    "deeply_nested_header": (lambda c: deep_header(c / SHARD), SHARD),
    "deeply_nested_config": (deep_config, "config.json"),
    "config_n_routed_experts_1e9": (edit_config(n_routed_experts=1e9), "n_routed_experts"),
    "config_negative_max_position_embeddings": (edit_config(max_position_embeddings=-1), "max_position_embeddings"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_with_exit_3(tiny_checkpoint, tmp_path, capsys, case):
    damage, named = CLI_CASES[case]
    ckpt = copy_of(tiny_checkpoint, tmp_path)
    damage(ckpt)
    assert main(["inspect", str(ckpt), "--json"]) == 3
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["exit_code"] == 3 and named in f"{error['message']} {error['where']}"
    if "config" in case:  # plan reads only config.json, never the shards
        assert main(["plan", str(ckpt), "--target", "gpu-24g"]) == 3
        assert named in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("file", [SHARD, "config.json"])
def test_cli_refuses_a_fifo_without_blocking(tiny_checkpoint, tmp_path, file):
    ckpt = copy_of(tiny_checkpoint, tmp_path)
    (ckpt / file).unlink()
    os.mkfifo(ckpt / file)
    # A subprocess, so that a regression hangs only it (killed by the timeout), not the test session.
    done = subprocess.run([sys.executable, "-m", "dsedge", "inspect", str(ckpt)], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 3, done.stderr
    assert file in done.stderr and "not a regular file" in done.stderr


def test_cli_refuses_a_rehashed_bundle_with_sparse_external_data_outside(tiny_checkpoint, tmp_path, capsys):
    from dsedge.export.bundle import export_bundle

    bundle = tmp_path / "bundle"
    export_bundle(tiny_checkpoint("qwen2"), bundle, max_context=32, validate=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph_file = bundle / manifest["graphs"][0]["file"]
    (tmp_path / "secret.bin").write_bytes(bytes(64))
    m = onnx.load(str(graph_file), load_external_data=False)
    depth = len(manifest["graphs"][0]["file"].split("/"))
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        external("../" * depth + "secret.bin", name="stolen"), numpy_helper.from_array(np.arange(4), "idx"), [8]))
    onnx.save(m, str(graph_file))
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})  # re-hash
    assert main(["run", str(bundle), "-p", "hi", "-n", "1", "--json"]) == 3
    error = json.loads(capsys.readouterr().out)["error"]
    assert "external data of " + manifest["graphs"][0]["file"] in error["message"]
    assert "secret.bin" in error["message"]


def test_a_rehashed_graph_onnxruntime_cannot_load_exits_3(tiny_checkpoint, tmp_path, capsys):
    """Hashes match (whoever edited the graph re-hashed the manifest), the paths are inside, but onnxruntime
    refuses the model: the bundle's fault, named, not an internal error."""
    from dsedge.cli import main
    from dsedge.export.bundle import export_bundle

    export_bundle(tiny_checkpoint("qwen2"), tmp_path / "b", max_context=16, validate=False)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    graph = manifest["graphs"][0]
    proto = onnx.load(str(tmp_path / "b" / graph["file"]), load_external_data=False)
    proto.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(proto, str(tmp_path / "b" / graph["file"]))
    manifest["files"][graph["file"]] = file_entry(tmp_path / "b", graph["file"])
    graph["sha256"] = manifest["files"][graph["file"]]["sha256"]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run", str(tmp_path / "b"), "-p", "hi", "-n", "2", "--json"]) == 3
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "BundleError" and "onnxruntime cannot load graph" in error["message"]
    assert "NoSuchOperator" in error["message"] and error["where"].endswith(graph["file"])
