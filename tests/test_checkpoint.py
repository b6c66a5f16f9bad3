"""The streamed checkpoint reader: every variant against transformers, FP8, MTP, sharding, bad input."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from dsedge.cli import main
from dsedge.errors import CheckpointError, ConfigError
from dsedge.models.checkpoint import Checkpoint
from dsedge.models.fp8 import dequantize_fp8_blocks
from dsedge.models.reference import load_reference_model, on_disk_state_dict
from dsedge.testing.tiny import VARIANTS, build_tensors

# Every checkpoint shape the reader must handle; the meta-test checks each architecture appears here.
CHECKPOINT_CASES = [
    *[(v, {}) for v in VARIANTS],
    *[(v, {"style": "transformers"}) for v in VARIANTS],
    ("v3", {"mtp": True, "num_shards": 3}),
    ("v2", {"num_shards": 2}),
    ("qwen2", {"num_shards": 2, "dtype": "float32"}),
]


def case_id(case):
    variant, kwargs = case
    return "-".join([variant, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=case_id)
def test_reader_matches_transformers(tiny_checkpoint, case):
    variant, kwargs = case
    path = tiny_checkpoint(variant, **kwargs)
    ckpt = Checkpoint(path)
    report = ckpt.validate()
    ours = ckpt.state_dict()
    reference = on_disk_state_dict(load_reference_model(path))
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor.float()), name
    assert report.has_mtp == kwargs.get("mtp", False)


def test_fp8_dequant_matches_naive_reference_with_partial_blocks():
    """576 × 7168 is V3's kv_a_proj_with_mqa: a 5 × 56 scale grid whose last row of blocks is partial."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 7168, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(5, 56, generator=gen) + 0.01
    got = dequantize_fp8_blocks(weight, scale, (128, 128)).numpy()
    rows, cols = np.indices(weight.shape)
    naive = weight.float().numpy() * scale.numpy()[rows // 128, cols // 128]  # W[i,j] = q[i,j] · s[i//B, j//B]
    assert np.array_equal(got, naive)


def test_fp8_dequant_rejects_wrong_grid():
    with pytest.raises(CheckpointError, match=r"expected \[5, 56\]"):
        dequantize_fp8_blocks(torch.zeros(576, 7168, dtype=torch.float8_e4m3fn), torch.ones(4, 56), (128, 128))


def test_fp8_checkpoint_dequantizes_per_element(tiny_checkpoint):
    path = tiny_checkpoint("v3", fp8=True, num_shards=2)
    ckpt = Checkpoint(path)
    report = ckpt.validate()
    assert report.fp8_tensors > 0 and ckpt.is_fp8
    original = build_tensors("v3")
    block = ckpt.spec.fp8_block_size
    for name, info in ckpt.tensors.items():
        if info.dtype != "F8_E4M3":
            continue
        q, s = ckpt.read_raw(name).float(), ckpt.read_raw(name + "_scale_inv").float()
        rows, cols = q.shape
        naive = torch.empty(rows, cols)
        for i in range(rows):  # the literal per-element definition, partial edge blocks included
            for j in range(0, cols):
                naive[i, j] = q[i, j] * s[i // block[0], j // block[1]]
        got = ckpt.read(name)
        assert torch.equal(got, naive), name
        # and it is the original weight to e4m3 precision (3 mantissa bits: relative step 1/8)
        assert torch.allclose(got, original[name].float(), rtol=0.07, atol=float(s.max()) * 2), name
        break  # one full per-element check; the vectorised test above covers the real-size grid


def test_fp8_values_all_close_to_original(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint("v3", fp8=True))
    original = build_tensors("v3")
    fp8_names = [n for n, t in ckpt.tensors.items() if t.dtype == "F8_E4M3"]
    assert any(n.endswith("experts.0.gate_proj.weight") for n in fp8_names)
    for name in fp8_names:
        err = (ckpt.read(name) - original[name].float()).abs().max()
        assert err <= original[name].abs().max() / 8, name


def test_mtp_skipped_by_default_and_yielded_on_request(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint("v3", mtp=True, num_shards=3))
    assert [i for i, _ in ckpt.iter_layers()] == [0, 1, 2]
    layers = dict(ckpt.iter_layers(include_mtp=True))
    assert list(layers) == [0, 1, 2, 3]
    assert "model.layers.3.eh_proj.weight" in layers[3]
    assert "model.layers.3.mlp.experts.15.down_proj.weight" in layers[3]
    assert not any(n.startswith("model.layers.3.") for n, _ in ckpt.iter_tensors())


def test_layer_streaming_reads_one_layer(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint("v2", num_shards=2))
    layer = ckpt.read_layer(1)
    assert all(n.startswith("model.layers.1.") for n in layer)
    assert "model.layers.1.mlp.experts.11.up_proj.weight" in layer
    assert set(ckpt.non_layer_names()) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


# --- bad input ----------------------------------------------------------------------------------

def copy_of(tiny_checkpoint, tmp_path, variant="v3", **kwargs):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(variant, **kwargs), dst)
    return dst


def rewrite_tensors(path, file_name, edit):
    """Rewrite one safetensors file after ``edit(dict_of_tensors)``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / file_name)
    edit(tensors)
    save_file(tensors, path / file_name)


def expect_error(path, match, *, read=None):
    with pytest.raises(CheckpointError, match=match) as err:
        ckpt = Checkpoint(path)
        ckpt.validate()
        if read:
            ckpt.read(read)
    assert err.value.exit_code == 3
    return err.value


def test_missing_shard(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, num_shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    err = expect_error(path, "model-00002-of-00002.safetensors is missing")
    assert "copy the missing shard" in err.hint


def test_truncated_shard_names_the_tensor(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    err = expect_error(path, "tensor data ends at byte")
    assert "model.safetensors: " in err.where


@pytest.mark.parametrize("corruption", ["garbage", "short", "huge_length", "bad_offsets"])
def test_corrupt_header(tiny_checkpoint, tmp_path, corruption):
    path = copy_of(tiny_checkpoint, tmp_path, variant="qwen2")
    file = path / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if corruption == "garbage":
        data = data[:8] + b"{not json" + data[17:]
    elif corruption == "short":
        data = data[:5]
    elif corruption == "huge_length":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    else:
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    file.write_bytes(data)
    expect_error(path, "header|bytes|offsets|too short")


def test_shape_mismatch_names_the_tensor(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="llama")
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(path, "model.safetensors", lambda t: t.__setitem__(name, t[name][:-4].clone()))
    err = expect_error(path, name)
    assert "expected [" in err.message


def test_missing_and_extra_tensors_are_listed(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="v2_lite")
    gone = "model.layers.2.mlp.experts.4.up_proj.weight"

    def edit(t):
        del t[gone]
        t["model.layers.2.mlp.experts.99.up_proj.weight"] = torch.zeros(3, 3)

    rewrite_tensors(path, "model.safetensors", edit)
    err = expect_error(path, "missing tensor")
    assert gone in err.message and "experts.99" in err.message


def test_nan_weights_are_refused_on_read(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="qwen2")
    name = "model.layers.0.mlp.down_proj.weight"

    def edit(t):
        t[name] = t[name].clone()
        t[name][3, 5] = float("nan")

    rewrite_tensors(path, "model.safetensors", edit)
    err = expect_error(path, "NaN/Inf", read=name)
    assert name in err.message and "[3, 5]" in err.message


def test_fp8_weight_without_scale(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, fp8=True)
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_tensors(path, "model.safetensors", lambda t: t.pop(name + "_scale_inv"))
    expect_error(path, f"{name}: FP8 weight .* without its")
    with pytest.raises(CheckpointError, match="has no"):
        Checkpoint(path).read(name)


def test_unknown_model_type_and_missing_config(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt_oss"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt_oss'"):
        Checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        Checkpoint(path)


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="llama")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    err = expect_error(path, "no safetensors weights")
    assert "pickle" in err.hint


def test_index_disagreeing_with_shards(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="v2", num_shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f.endswith("00001-of-00002.safetensors"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(path, "different exports|places")


def test_index_path_leaving_the_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    path = copy_of(tiny_checkpoint, tmp_path, variant="v2", num_shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(path, "not a plain file name")


@pytest.mark.parametrize("damage", ["missing_shard", "truncated", "unknown_type"])
def test_cli_bad_input_exit_code_3(tiny_checkpoint, tmp_path, capsys, damage):
    path = copy_of(tiny_checkpoint, tmp_path, num_shards=2)
    shard = path / "model-00001-of-00002.safetensors"
    if damage == "missing_shard":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["inspect", str(path), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["error"]["exit_code"] == 3 and out["error"]["where"]
    assert main(["inspect", str(path)]) == 3
    assert "error:" in capsys.readouterr().err
