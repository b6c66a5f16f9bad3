"""Property-based fuzzing of every parser that reads untrusted files: any input gives a result or a UserError
(the ONNX walker: its documented ValueError), never another exception, within a deadline.

Each property runs a bounded number of examples with a per-example deadline so the file stays well under
30 s. Known bugs in parsers this file does not own are pinned as strict xfails at the end (named in the
reason), and the random strategies above them stay clear of those inputs so the rest keeps running.
"""

import json
import math
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dsedge.errors import UserError  # noqa: E402
from dsedge.manifest import MANIFEST_FILE, read_manifest  # noqa: E402
from dsedge.models.config import read_config_file  # noqa: E402
from dsedge.models.published import PUBLISHED_CONFIGS  # noqa: E402
from dsedge.models.registry import spec_from_config  # noqa: E402
from dsedge.models.safetensors_file import read_header  # noqa: E402
from dsedge.onnx_refs import external_data_locations  # noqa: E402
from dsedge.retrieval import index as index_module  # noqa: E402

FUZZ = settings(max_examples=120, deadline=1000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values: scalars of every JSON type (NaN/Infinity too: Python's json reads them), nested a few levels.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def mutate(data: bytes, draw) -> bytes:
    """One or a few byte-level edits: flips, overwrites, deletions, insertions, truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[pos] = draw(st.integers(0, 255))
        elif kind == "delete" and out:
            del out[pos:pos + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def accepts_or_user_error(fn, *args):
    try:
        return fn(*args)
    except UserError:
        return None


# --- safetensors headers ---------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


VALID_SAFETENSORS = safetensors_bytes(
    {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
     "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
     "c": {"dtype": "I8", "shape": [0], "data_offsets": [22, 22]}}, bytes(22))

entries = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "U8", "F64", "X"]) | scalars,
                                 "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
                                 "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | json_values})
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5)


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
@example(header={"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, data=bytes(6))
def test_safetensors_random_headers(tmp_path_factory, header, data):
    path = write(tmp_path_factory.mktemp("st") / "x.safetensors", safetensors_bytes(header, data))
    tensors = accepts_or_user_error(read_header, path)
    if tensors is not None:  # accepted: the tensors tile the data exactly, as the reference requires
        spans = sorted((t.offset, t.offset + t.nbytes) for t in tensors.values())
        data_start = path.stat().st_size - len(data)
        assert all(b == a for (_, a), (b, _) in zip([(0, data_start)] + spans, spans, strict=False))
        assert (spans[-1][1] if spans else data_start) == path.stat().st_size


@FUZZ
@given(data=st.binary(max_size=256))
def test_safetensors_random_bytes(tmp_path_factory, data):
    accepts_or_user_error(read_header, write(tmp_path_factory.mktemp("st") / "x.safetensors", data))


@FUZZ
@given(st.data())
def test_safetensors_mutations_of_a_valid_file(tmp_path_factory, data):
    mutated = mutate(VALID_SAFETENSORS, data.draw)
    accepts_or_user_error(read_header, write(tmp_path_factory.mktemp("st") / "x.safetensors", mutated))


# --- bundle manifest -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A bundle `dsedge export` wrote (partitioned: every part of the contract is present)."""
    from dsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("fuzz-bundle") / "b"
    export_bundle(tiny_checkpoint("v3"), out, max_context=32, layout="partitioned", experts_per_partition=4,
                  validate=False)
    return out


@pytest.fixture(scope="module")
def real_manifest(real_bundle) -> bytes:
    """manifest.json as export writes it."""
    return (real_bundle / MANIFEST_FILE).read_bytes()


def read_manifest_bytes(tmp_path_factory, raw: bytes):
    root = tmp_path_factory.mktemp("m")
    (root / MANIFEST_FILE).write_bytes(raw)
    return accepts_or_user_error(read_manifest, root)


@FUZZ
@given(value=json_values, schema=st.sampled_from([1, None]))
def test_bundle_manifest_random_json(tmp_path_factory, value, schema):
    if schema is not None and isinstance(value, dict):  # reach past the schema check too
        value = value | {"schema_version": schema}
    read_manifest_bytes(tmp_path_factory, json.dumps(value).encode())


@FUZZ
@given(st.data())
def test_bundle_manifest_mutations(tmp_path_factory, real_manifest, data):
    read_manifest_bytes(tmp_path_factory, mutate(real_manifest, data.draw))


# --- retrieval index manifest and chunk store --------------------------------------------------------------

REAL_INDEX_MANIFEST = json.dumps({
    "schema_version": index_module.SCHEMA_VERSION, "kind": index_module.KIND, "dsedge_version": "0",
    "created": "2025-01-01T00:00:00Z", "updated": "2025-01-01T00:00:00Z",
    "embedder": {"id": "e", "dim": 4, "path": "embedder"}, "params": {"M": 16, "ef_construction": 100, "ef": 50},
    "hnsw": {"library": "hnswlib", "space": "cosine", "dim": 4, "random_seed": 0, "max_elements": 1,
             "elements": 1, "deleted": 0},
    "counts": {"documents": 1, "chunks": 1}, "files": {"index.bin": {"sha256": "0" * 64, "bytes": 1}}},
    indent=2).encode()
REAL_STORE = json.dumps({"schema_version": index_module.SCHEMA_VERSION, "next_id": 1,
                         "documents": {"a.txt": {"sha256": "0" * 64, "chunks": [0]}},
                         "chunks": [{"id": 0, "doc": "a.txt", "start": 0, "end": 5, "text": "hello"}]}).encode()


def read_index_files(tmp_path_factory, manifest: bytes, store: bytes):
    root = tmp_path_factory.mktemp("idx")
    (root / index_module.MANIFEST_FILE).write_bytes(manifest)
    (root / index_module.CHUNKS_FILE).write_bytes(store)
    accepts_or_user_error(index_module._read_manifest, root)
    accepts_or_user_error(index_module._read_store, root / index_module.CHUNKS_FILE)


@FUZZ
@given(manifest=json_values, store=json_values)
def test_index_random_json(tmp_path_factory, manifest, store):
    if isinstance(manifest, dict):
        manifest |= {"kind": index_module.KIND, "schema_version": index_module.SCHEMA_VERSION}
    read_index_files(tmp_path_factory, json.dumps(manifest).encode(), json.dumps(store).encode())


@FUZZ
@given(st.data())
def test_index_mutations(tmp_path_factory, data):
    read_index_files(tmp_path_factory, mutate(REAL_INDEX_MANIFEST, data.draw), mutate(REAL_STORE, data.draw))


# --- ONNX external-data walker -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_model() -> bytes:
    """A model with external data in an initializer, a sparse initializer, a subgraph and a local function."""
    import onnx
    from test_hardening import POSITIONS

    m = onnx.ModelProto()
    for position in ("initializer", "sparse_initializer", "if_subgraph", "function_node", "training_info"):
        m.MergeFromString(POSITIONS[position]()[0])
    return m.SerializeToString()


def walk(data: bytes):
    try:
        locations = external_data_locations(data)
    except ValueError:
        return None
    assert all(isinstance(loc, str) and loc for loc in locations)
    return locations


@FUZZ
@given(data=st.binary(max_size=512))
def test_onnx_walker_random_bytes(data):
    walk(data)


@FUZZ
@given(st.data())
def test_onnx_walker_mutations_of_a_real_model(real_model, data):
    pytest.importorskip("onnx")
    walk(mutate(real_model, data.draw))


# --- config.json and spec building --------------------------------------------------------------------------

INTERESTING = st.one_of(json_values, st.integers(-3, 3), st.sampled_from([1e9, 2 ** 31, 2 ** 63, -1, 0.5]),
                        st.floats(allow_nan=True, allow_infinity=True))


@FUZZ
@given(name=st.sampled_from(sorted(PUBLISHED_CONFIGS)), data=st.data())
def test_spec_from_mutated_published_configs(name, data):
    config = json.loads(json.dumps(PUBLISHED_CONFIGS[name]))
    keys = sorted(config)
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(keys) | st.sampled_from(["rope_scaling", "quantization_config",
                                                                 "eos_token_id", "head_dim"]))
        if data.draw(st.booleans()):
            config[key] = data.draw(INTERESTING)
        else:
            config.pop(key, None)
    spec = accepts_or_user_error(spec_from_config, config, "config.json")
    if spec is not None:  # accepted: every size it plans from is positive and finite
        assert spec.num_hidden_layers >= 1 and spec.max_position_embeddings >= 1
        assert math.isfinite(spec.rms_norm_eps) and math.isfinite(spec.rope.theta)


@FUZZ
@given(data=st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_file_random_content(tmp_path_factory, data):
    path = write(tmp_path_factory.mktemp("cfg") / "config.json", data)
    config = accepts_or_user_error(read_config_file, path)
    if config is not None:
        accepts_or_user_error(spec_from_config, config, str(path))


# --- bugs the fuzzing found, fixed: each stays a test ----------------------------------------------------

DEEP = b'{"schema_version": 1, "files": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"schema_version": 1' + b"0" * 5000 + b', "files": {}}'


@pytest.mark.parametrize("raw", [DEEP, HUGE_INT], ids=["deep", "huge_int"])
def test_bundle_manifest_unbounded_json_is_a_user_error(tmp_path, raw):
    (tmp_path / MANIFEST_FILE).write_bytes(raw)
    with pytest.raises(UserError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("entry", [{}, [1, 2], 5, {"bytes": "1", "sha256": 3}], ids=["no_keys", "list", "int", "types"])
def test_bundle_manifest_bad_file_entry_is_a_user_error(real_bundle, tmp_path, entry):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(real_bundle, copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    data["files"][next(iter(data["files"]))] = entry
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError, match="files"):
        read_manifest(copy).verify()


@pytest.mark.parametrize("which", ["manifest", "store"])
@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b"1" + b"0" * 5000], ids=["deep", "huge_int"])
def test_index_unbounded_json_is_a_user_error(tmp_path, which, raw):
    if which == "manifest":
        (tmp_path / index_module.MANIFEST_FILE).write_bytes(raw)
        with pytest.raises(UserError):
            index_module._read_manifest(tmp_path)
    else:
        (tmp_path / index_module.CHUNKS_FILE).write_bytes(raw)
        with pytest.raises(UserError):
            index_module._read_store(tmp_path / index_module.CHUNKS_FILE)
