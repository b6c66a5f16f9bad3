"""The MTP draft graph shares the main model's embedding and head: it references the main graph's external data
(file, offset, length) instead of writing the matrices again; the bundle shrinks by their bytes, every file is
still listed and verified, and the draft's outputs are those of a draft holding its own copies."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dsedge.export.bundle import _layer_weights, _resolve_expert_path, export_bundle
from dsedge.export.mtp import write_draft
from dsedge.manifest import BundleError
from dsedge.models.checkpoint import Checkpoint
from dsedge.runtime import load_bundle
from dsedge.runtime.bundle import open_manifest
from dsedge.runtime.speculative import configure

NO_PROGRESS = SimpleNamespace(advance=lambda: None)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("v3", mtp=True)


@pytest.fixture(scope="module", params=["monolithic", "partitioned"])
def bundle(checkpoint, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"shared-{request.param}") / "b"
    export_bundle(checkpoint, out, max_context=64, layout=request.param, validate=False)
    return out


def _draft_entry(bundle) -> dict:
    return next(g for g in json.loads((bundle / "manifest.json").read_text())["graphs"] if g["role"] == "draft")


def _external(path, name: str) -> dict[str, str]:
    model = onnx.load_model(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return {e.key: e.value for e in tensor.external_data}


def _own_copy_draft(checkpoint, tmp_path, layout):
    """The draft graph as it was before sharing: written with nothing to point at (and the bundle's experts path)."""
    spec = Checkpoint(checkpoint).spec
    weights = _layer_weights(Checkpoint(checkpoint), 4, NO_PROGRESS)
    path = _resolve_expert_path(Checkpoint(checkpoint), "auto", layout)
    return write_draft(spec, weights, tmp_path, "graphs", max_positions=64, expert_path=path), spec


def test_draft_references_the_main_embedding_and_head(bundle):
    layout = json.loads((bundle / "manifest.json").read_text())["layout"]
    embedding_owner, head_owner = ("decoder", "decoder") if layout == "monolithic" else ("prelude", "head")
    draft = bundle / "graphs" / "draft.onnx"
    for name, owner in (("model.embed_tokens.weight", embedding_owner), ("lm_head", head_owner)):
        mine, theirs = _external(draft, name), _external(bundle / "graphs" / f"{owner}.onnx", name)
        assert mine == theirs and mine["location"] == f"{owner}.onnx.data", name
    entry = _draft_entry(bundle)
    assert {f"graphs/{embedding_owner}.onnx.data", f"graphs/{head_owner}.onnx.data"} <= set(entry["data_files"])


def test_sharing_drops_the_embedding_and_head_bytes_and_keeps_the_outputs(bundle, checkpoint, tmp_path):
    own, spec = _own_copy_draft(checkpoint, tmp_path, json.loads((bundle / "manifest.json").read_text())["layout"])
    matrix = spec.vocab_size * spec.hidden_size * 4  # float32 [V, H]
    shared = _draft_entry(bundle)
    saved = own.bytes - shared["bytes"]
    assert 2 * matrix <= saved <= 2 * matrix + 64 * 1024  # rope tables and alignment padding on top

    rng = np.random.default_rng(1)
    ids = rng.integers(0, spec.vocab_size, size=(1, 6))
    feeds = {"input_ids": ids, "final_hidden": rng.normal(size=(1, 6, spec.hidden_size)).astype(np.float32),
             "position_ids": np.arange(6)[None], "attention_mask": np.ones((1, 6), np.int64)}
    results = []
    for path in (bundle / "graphs" / "draft.onnx", tmp_path / own.file):
        session = ort.InferenceSession(str(path))
        width = session.get_inputs()[-1].shape[-1]
        feeds["past.0.latent"] = np.zeros((1, 0, width), np.float32)
        results.append(session.run(None, feeds))
    for ours, theirs in zip(*results, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_shared_files_are_listed_and_verified(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    engine = load_bundle(bundle, verify="full")
    configure(engine, "mtp")  # opens the draft session through the verified door: its external data included
    assert engine.speculation.mode == "mtp"


def test_a_tampered_shared_file_stops_the_draft(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    entry = _draft_entry(copy)
    borrowed = next(f for f in entry["data_files"] if "draft" not in f)
    with open(copy / borrowed, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(BundleError):
        configure(load_bundle(copy, verify="full"), "mtp")


def test_a_module_with_its_own_head_keeps_its_copy(checkpoint, tmp_path):
    """Bytes decide: a head that differs from the main model's is written into the draft, not referenced."""
    ckpt = Checkpoint(checkpoint)
    spec = ckpt.spec
    base = _layer_weights(ckpt, 4, NO_PROGRESS)
    head_name = f"model.layers.{spec.num_hidden_layers}.shared_head.head.weight"

    def weights(layer):
        loaded = base(layer)
        if layer == spec.num_hidden_layers:
            loaded[head_name] = loaded.get(head_name, base(None)["lm_head.weight"]) * 2.0
        return loaded

    export_bundle(checkpoint, tmp_path / "b", max_context=64, validate=False)
    decoder = next(g for g in open_manifest(tmp_path / "b", verify=False).contract.graphs if g.role == "decoder")
    entry = write_draft(spec, weights, tmp_path / "b", "graphs2", max_positions=64, shares=[decoder])
    assert entry.data_files == ("graphs2/draft.onnx.data",)  # a different folder: nothing can be pointed at
    entry = write_draft(spec, weights, tmp_path / "b", "graphs", max_positions=64, shares=[decoder])
    draft = tmp_path / "b" / entry.file
    assert _external(draft, "lm_head")["location"] == "draft.onnx.data"
    assert _external(draft, "model.embed_tokens.weight")["location"] == "decoder.onnx.data"
