"""compressed-tensors pack-quantized layout: bit packing, round trips through the library itself, config.

Only the tests that compare against the compressed-tensors library itself skip without it (per test);
our own packing, config and checkpoint-reader tests always run.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsedge.compress.quant import quantize_rtn
from dsedge.compress.recipes import load_recipe
from dsedge.errors import CheckpointError, UserError
from dsedge.quantformat.config import quantization_config, read_quantization_config
from dsedge.quantformat.layout import packed_shapes, storage_group
from dsedge.quantformat.packing import pack, pack_bits, regroup, unpack, unpack_bits
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import dequantize


def weight(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(7, 45), (16, 3), (9, 2), (24, 72)])
def test_bit_packing_matches_compressed_tensors(bits, shape):
    ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    values = torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    for dim in (0, 1):
        ours = pack_bits(values, bits, dim=dim)
        assert torch.equal(ours, ct_helpers.pack_to_int32(values, bits, packed_dim=dim))
        assert torch.equal(unpack_bits(ours, bits, shape[dim], dim=dim), values)
        assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), values)


def test_storage_group_for_partial_groups():
    assert storage_group(QuantScheme(4, 32), 128) == 32
    assert storage_group(QuantScheme(4, 32), 72) == 8  # gcd: every stored group inside one of ours
    assert storage_group(QuantScheme(4, 128), 224) == 32  # the demo model's hidden size
    assert storage_group(QuantScheme(4, 128), 144) == 16
    assert storage_group(QuantScheme(4, 32), 100) == 4
    assert storage_group(QuantScheme(4, 128), 40) is None  # one group per row: the channel strategy
    assert storage_group(QuantScheme(8, None), 40) is None


# (name, bits, group, symmetric, [out, in]): partial last groups, whole-row groups, int4/int8, sym/asym.
MODULES = [
    ("model.layers.0.self_attn.q_b_proj", 4, 32, True, (24, 72)),
    ("model.layers.0.self_attn.kv_b_proj", 4, 128, False, (84, 100)),
    ("model.layers.0.self_attn.o_proj", 8, None, True, (72, 36)),
    ("model.layers.0.mlp.gate_proj", 8, 64, False, (40, 128)),
    ("model.layers.0.mlp.up_proj", 4, 128, True, (40, 72)),
    ("model.layers.0.mlp.down_proj", 4, 32, False, (16, 100)),
    ("model.layers.1.mlp.experts.0.down_proj", 4, 64, True, (72, 224)),
    ("model.layers.1.mlp.experts.1.down_proj", 8, 32, False, (12, 144)),
]


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory):
    """A checkpoint directory holding MODULES packed by us, plus an unquantized linear and a norm."""
    path = tmp_path_factory.mktemp("packed")
    quantized, tensors = {}, {}
    for i, (name, bits, group, symmetric, shape) in enumerate(MODULES):
        qt = quantize_rtn(weight(*shape, seed=i), QuantScheme(bits, group, symmetric))
        quantized[name] = qt
        tensors.update(pack(name, qt))
    kept = {"model.layers.0.self_attn.q_a_proj.weight": weight(8, 72, seed=99), "model.norm.weight": torch.ones(72)}
    tensors.update(kept)
    config = {"model_type": "llama",
              "quantization_config": quantization_config(load_recipe("int4").name, quantized,
                                                         ["model.layers.0.self_attn.q_a_proj"])}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / "model.safetensors"))
    return path, quantized, kept, config


def test_compressed_tensors_decompresses_what_we_write(packed_checkpoint):
    """The library's own model-free decompressor reproduces our dequantized weights.

    It computes ``(q - zero_point) · scale`` in the scale's dtype, float16: the product of a small
    integer and a float16 scale is exact in float32, so its result is exactly ours rounded to float16.
    """
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    path, quantized, kept, config = packed_checkpoint
    QuantizationConfig.model_validate(config["quantization_config"])  # the library's schema accepts it
    dequantizer = CompressedTensorsDequantizer(path, dtype=torch.float32)
    out = dequantizer.validate(load_file(str(path / "model.safetensors")))  # also: no orphan qparams
    for name, qt in quantized.items():
        ours = dequantize(qt)
        assert torch.equal(out[name + ".weight"], ours.half().float()), name
        assert (out[name + ".weight"] - ours).abs().max() <= ours.abs().max() * 2 ** -11
    for name, tensor in kept.items():
        assert torch.equal(out[name], tensor)


def test_unpack_round_trip_is_exact(packed_checkpoint):
    path, quantized, _, config = packed_checkpoint
    tensors = load_file(str(path / "model.safetensors"))
    schemes = read_quantization_config(config)
    assert set(schemes) == set(quantized)
    for name, qt in quantized.items():
        mine = {k: v for k, v in tensors.items() if k.startswith(name + ".")}
        got = unpack(mine, schemes[name])
        assert got.scheme == qt.scheme  # the recipe's group size, not the stored one
        assert torch.equal(got.q, qt.q) and torch.equal(got.scale, qt.scale)
        assert (got.zero_point is None) == (qt.zero_point is None)
        if qt.zero_point is not None:
            assert torch.equal(got.zero_point, qt.zero_point)
        assert torch.equal(dequantize(unpack(mine)), dequantize(qt))  # scheme inferred from shapes
        assert qt.nbytes_packed == sum(t.numel() * t.element_size() for t in mine.values())


def test_packed_shapes_and_dtypes(packed_checkpoint):
    path, quantized, _, _ = packed_checkpoint
    tensors = load_file(str(path / "model.safetensors"))
    for name, qt in quantized.items():
        for key, shape in packed_shapes(qt.scheme, qt.shape).items():
            assert tuple(tensors[f"{name}.{key}"].shape) == shape, (name, key)
        assert tensors[name + ".weight_packed"].dtype == torch.int32
        assert tensors[name + ".weight_scale"].dtype == torch.float16
        assert tensors[name + ".weight_shape"].tolist() == list(qt.shape)


def test_quantization_config_block(packed_checkpoint):
    _, quantized, _, config = packed_checkpoint
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["model.layers.0.self_attn.q_a_proj"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(quantized)  # each module in exactly one group
    by_target = {t: g["weights"] for g in qc["config_groups"].values() for t in g["targets"]}
    assert by_target["model.layers.0.self_attn.o_proj"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None, "dynamic": False,
        "actorder": None, "observer": "minmax"}
    assert by_target["model.layers.0.self_attn.q_b_proj"]["group_size"] == 8  # 72 columns in groups of 32
    assert by_target["model.layers.0.mlp.gate_proj"]["group_size"] == 64
    assert qc["dsedge"]["recipe"] == "int4"


def test_quantization_config_needs_shapes_for_grouped_schemes():
    with pytest.raises(ValueError, match="shape"):
        quantization_config(None, {"m": QuantScheme(4, 32)}, [])
    qc = quantization_config(None, {"m": QuantScheme(4, 32), "n": QuantScheme(8, None)}, [], shapes={"m": (8, 72)})
    assert read_quantization_config({"quantization_config": qc}) == {"m": QuantScheme(4, 32),
                                                                     "n": QuantScheme(8, None)}


def test_read_foreign_configs_with_regex_targets_and_ignore():
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}},
          "ignore": ["lm_head", "re:.*mlp.gate$"]}
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate", "lm_head"]
    assert read_quantization_config({"quantization_config": qc}, names) == {
        "model.layers.0.mlp.up_proj": QuantScheme(4, 128)}
    with pytest.raises(UserError, match="module names"):
        read_quantization_config({"quantization_config": qc})
    assert read_quantization_config({"quantization_config": {"quant_method": "fp8"}}) == {}
    assert read_quantization_config({}) == {}
    for bad in [{**qc, "format": "float-quantized"},
                {**qc, "config_groups": {"g": {"targets": ["x"], "weights": {"num_bits": 8, "type": "float"}}}},
                {**qc, "config_groups": {"g": {"targets": ["x"], "weights": {"num_bits": 8},
                                               "input_activations": {"num_bits": 8}}}}]:
        with pytest.raises(UserError):
            read_quantization_config({"quantization_config": bad}, names)


def test_regroup_only_when_exact():
    qt = quantize_rtn(weight(8, 72, seed=3), QuantScheme(4, 8))
    with pytest.raises(ValueError):
        regroup(qt, 32)  # independent groups of 8 do not share scales
    nominal = quantize_rtn(weight(8, 72, seed=3), QuantScheme(4, 32))
    stored = unpack(pack("m", nominal), QuantScheme(4, 8))  # read as stored: 9 groups of 8
    assert stored.n_groups == 9
    back = regroup(stored, 32)
    assert back.n_groups == 3 and torch.equal(back.scale, nominal.scale)
    with pytest.raises(ValueError):
        regroup(stored, 24)  # groups of 24 would straddle our groups of 32


def test_unpack_rejects_inconsistent_tensors():
    tensors = pack("m", quantize_rtn(weight(16, 64, seed=4), QuantScheme(4, 32)))
    with pytest.raises(CheckpointError, match="weight_scale"):
        unpack(tensors, QuantScheme(4, 64))
    with pytest.raises(CheckpointError, match="weight_packed"):
        unpack(tensors, QuantScheme(8, 32))
    with pytest.raises(CheckpointError, match="lacks weight_scale"):
        unpack({k: v for k, v in tensors.items() if not k.endswith("weight_scale")})


# ----------------------------------------------------------------------------- compressed checkpoints


def write_compressed(src, dst, recipe, *, drop=(), extra=None, config_edit=None):
    """Quantize ``src``'s linears by ``recipe`` (RTN) into a pack-quantized checkpoint at ``dst``.

    ``drop``: stored tensor names to leave out; ``extra``: tensors to add; ``config_edit(config)``.
    """
    from dsedge.models.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    plan = recipe.plan(ckpt.spec, include_mtp=ckpt.has_mtp)
    tensors, quantized, ignore = {}, {}, []
    for name, tensor in ckpt.iter_tensors(include_mtp=True):
        module = name.removesuffix(".weight")
        scheme = plan.get(module) if name.endswith(".weight") else None
        if scheme is None:
            tensors[name] = tensor
            ignore += [module] if module in plan else []
            continue
        quantized[module] = quantize_rtn(tensor, scheme)
        tensors.update(pack(module, quantized[module]))
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (extra or {})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(recipe.name, quantized, ignore)
    if config_edit:
        config_edit(config)
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"))
    return quantized


def asym_int4_g32():
    from dsedge.compress.recipes import Recipe, Rule

    return Recipe("asym", (Rule("re:.*", QuantScheme(4, 32, symmetric=False)),))


@pytest.mark.parametrize(("variant", "kwargs", "recipe"), [
    ("v3", {"mtp": True, "fp8": True}, "int4-experts"),
    ("qwen2", {}, "asym"),
    ("v2_lite", {}, "int8"),
])
def test_checkpoint_reads_compressed_checkpoints(tiny_checkpoint, tmp_path, variant, kwargs, recipe):
    from dsedge.models.checkpoint import Checkpoint

    src = tiny_checkpoint(variant, **kwargs)
    quantized = write_compressed(src, tmp_path / "c", asym_int4_g32() if recipe == "asym" else load_recipe(recipe))
    plain, ckpt = Checkpoint(src), Checkpoint(tmp_path / "c")
    report = ckpt.validate()
    assert report.quantized_modules == len(quantized) > 0 and report.tensors_checked == plain.validate().tensors_checked
    assert ckpt.quantization == {m: qt.scheme for m, qt in quantized.items()}
    assert sorted(ckpt.layer_names(1)) == sorted(plain.layer_names(1))
    assert sorted(ckpt.non_layer_names()) == sorted(plain.non_layer_names())
    state = ckpt.state_dict(include_mtp=True)
    assert set(state) == set(plain.state_dict(include_mtp=True))
    for module, qt in quantized.items():
        assert torch.equal(state[module + ".weight"], dequantize(qt)), module
        got = ckpt.quantized(module + ".weight")
        assert torch.equal(got.q, qt.q) and torch.equal(got.scale, qt.scale) and got.scheme == qt.scheme
    assert ckpt.quantized("model.norm.weight") is None and plain.quantized("model.layers.0.mlp.down_proj") is None
    assert plain.quantization == {} and not plain.is_compressed and ckpt.is_compressed
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        ckpt.quantized("model.layers.0.no_such_proj")


def test_reference_model_runs_on_a_compressed_checkpoint(tiny_checkpoint, tmp_path):
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model

    src = tiny_checkpoint("v3")
    write_compressed(src, tmp_path / "c", load_recipe("int4-experts"))
    model = reference_model(Checkpoint(tmp_path / "c"))
    down = model.model.layers[1].mlp.experts.down_proj[3]
    qt = Checkpoint(tmp_path / "c").quantized("model.layers.1.mlp.experts.3.down_proj")
    assert torch.equal(down, dequantize(qt))


EXPERT = "model.layers.1.mlp.experts.2.down_proj"


@pytest.mark.parametrize(("change", "message"), [
    ({"drop": [EXPERT + ".weight_scale"]}, f"missing tensor {EXPERT}.weight_scale"),
    ({"extra": {EXPERT + ".weight_scale": torch.ones(72, 2, dtype=torch.float16)}}, r"expected F16/BF16/F32\[72, 1\]"),
    ({"extra": {EXPERT + ".weight": torch.zeros(72, 40)}}, f"unexpected tensor {EXPERT}.weight "),
    ({"drop": [EXPERT + ".weight_packed"]}, f"missing tensor {EXPERT}.weight_packed"),
    ({"config_edit": lambda c: c["quantization_config"]["config_groups"]["group_0"]["targets"].append(
        "model.layers.1.mlp.experts.99.up_proj")}, "quantizes model.layers.1.mlp.experts.99.up_proj"),
])
def test_broken_compressed_checkpoints_fail_validation(tiny_checkpoint, tmp_path, change, message):
    from dsedge.models.checkpoint import Checkpoint

    write_compressed(tiny_checkpoint("v3"), tmp_path / "c", load_recipe("int4-experts"), **change)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(tmp_path / "c").validate()


def test_non_finite_scales_are_refused(tiny_checkpoint, tmp_path):
    from dsedge.models.checkpoint import Checkpoint

    bad = torch.full((72, 1), float("nan"), dtype=torch.float16)
    write_compressed(tiny_checkpoint("v3"), tmp_path / "c", load_recipe("int4-experts"),
                     extra={EXPERT + ".weight_scale": bad})
    ckpt = Checkpoint(tmp_path / "c")
    ckpt.validate()  # shapes and dtypes are fine
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        ckpt.read(EXPERT + ".weight")


def test_transformers_loads_our_dense_checkpoint_with_identical_logits(tiny_checkpoint, tmp_path):
    """transformers + compressed-tensors (``from_pretrained``) run our file; logits equal our reference's.

    Known limits of that path (compressed-tensors 0.20.1, transformers 5), not of the format: asymmetric
    zero points — its meta-device loader expects them unpacked while its own compressor (and vLLM) pack
    them — and per-expert MoE weights, which transformers 5 fuses into non-Linear modules.
    """
    pytest.importorskip("compressed_tensors")  # transformers reads pack-quantized checkpoints through it
    import transformers

    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model

    write_compressed(tiny_checkpoint("qwen2"), tmp_path / "c", load_recipe("int4-g32"))  # 72, 148: partial groups
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    ours = reference_model(Checkpoint(tmp_path / "c"))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
