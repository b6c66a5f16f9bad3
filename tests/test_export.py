"""`export` + the runtime's load_bundle: every variant against transformers, the latent cache, tampering."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsedge.cli import main
from dsedge.errors import CheckFailed, UserError
from dsedge.export.bundle import export_bundle
from dsedge.manifest import BundleError, write_manifest
from dsedge.runtime import load_bundle
from dsedge.testing.reference import load_reference_model

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
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(path)
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
    export_bundle(ckpt, out, max_context=32, validate=False, overwrite=True)
    assert (out / "manifest.json").exists() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directories left


def test_failed_validation_exits_4_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from dsedge.export import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", 1e-12)
    out = tmp_path / "b"
    with pytest.raises(CheckFailed, match="prefill.*max abs error"):
        export_bundle(tiny_checkpoint("v2"), out, max_context=48)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["export", str(tiny_checkpoint("v2")), "-o", str(out), "--max-context", "48", "--json"]) == 4
    assert json.loads(capsys.readouterr().out)["error"]["exit_code"] == 4


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
    assert "checkpoint directory not found" in capsys.readouterr().err


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
