"""Held weights (compress/held.py): stored bytes upcast to exactly what a float32 read gives; packed
integers to exactly what ``dequantize`` gives; the held experts loop equal to transformers' fused one."""

from __future__ import annotations

import pytest
import torch

from dsedge.compress.held import Held, HeldExperts, HeldFloat, HeldQuantized
from dsedge.compress.layers import build_layer, classes_for, hf_config
from dsedge.compress.quant import quantize
from dsedge.errors import CheckpointError
from dsedge.models.checkpoint import Checkpoint
from dsedge.quantformat.scheme import QuantScheme
from dsedge.quantformat.tensor import dequantize
from dsedge.testing.tiny import write_checkpoint


@pytest.mark.parametrize("fp8", [False, True])
def test_stored_tensor_upcasts_to_the_float32_read(tmp_path, fp8):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3", fp8=fp8))
    names = [n for n in ckpt.layer_names(1) if n.endswith("_proj.weight")]
    for name in names:
        stored = ckpt.read_stored(name)
        assert torch.equal(stored.float(), ckpt.read(name))
        assert stored.nbytes < ckpt.read(name).numel() * 4  # held smaller than float32
    assert any(ckpt.read_stored(n).scale_inv is not None for n in names) == fp8


def test_stored_tensor_refuses_nan_on_upcast(tmp_path):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3"))
    stored = ckpt.read_stored("model.layers.0.mlp.down_proj.weight")
    stored.stored[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        stored.float()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_held_quantized_is_the_dequantized_weight(bits, symmetric):
    w = torch.randn(40, 72) * 0.02
    qt = quantize(w, QuantScheme(bits, 32, symmetric), None, scale_dtype=torch.float16)
    held = HeldQuantized(qt)
    assert torch.equal(held.float(), dequantize(qt))
    if bits < 8:
        assert held.packed.numel() * 4 * 8 == pytest.approx(w.numel() * bits, rel=0.2)


def test_held_experts_match_transformers_fused_experts(tmp_path):
    """The same layer built from float32 tensors (transformers' fused experts) and from held weights."""
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3", fp8=True))
    classes, config, prefix = classes_for("deepseek_v3"), hf_config(ckpt.spec.config), "model.layers.1."
    names = ckpt.layer_names(1)
    plain = build_layer(classes, config, 1, {n.removeprefix(prefix): ckpt.read(n) for n in names})
    held = build_layer(classes, config, 1, {n.removeprefix(prefix): Held(ckpt.read_stored(n))
                                            if n.endswith("_proj.weight") else ckpt.read(n) for n in names})
    assert isinstance(held.mlp.experts, HeldExperts) and not list(held.mlp.experts.parameters())
    x = torch.randn(2, 8, config.hidden_size)
    mask = torch.zeros(1, 1, 8, 8).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -1e30)
    rotary = classes.rotary(config)(x, torch.arange(8)[None])
    with torch.no_grad():
        want = plain(x, attention_mask=mask, position_ids=torch.arange(8)[None], position_embeddings=rotary)
        got = held(x, attention_mask=mask, position_ids=torch.arange(8)[None], position_embeddings=rotary)
    assert torch.equal(got, want)


def test_held_slot_swaps_what_the_module_computes_with():
    slot = Held(HeldFloat(torch.ones(3, 4)))
    slot.replace(HeldFloat(torch.zeros(3, 4)))
    assert torch.equal(slot.float(), torch.zeros(3, 4)) and slot.shape == (3, 4)
