"""Held weights (compress/held.py): stored bytes upcast to exactly what a float32 read gives; packed
integers to exactly what ``dequantize`` gives; the held experts loop equal to transformers' fused one."""

from __future__ import annotations

import pytest
import torch

from dsedge.compress.held import Held, HeldExperts, HeldFloat, HeldQuantized, LazyStored, SpilledQuantized, SpillFile
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


@pytest.mark.parametrize("fp8", [False, True])
def test_lazy_expert_reads_the_stored_bytes_each_use_and_holds_none(tmp_path, fp8):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3", fp8=fp8))
    name = next(n for n in ckpt.layer_names(1) if ".mlp.experts." in n and n.endswith("down_proj.weight"))
    lazy = LazyStored(ckpt, name)
    assert lazy.nbytes == 0 and lazy.shape == tuple(ckpt.read(name).shape)
    assert torch.equal(lazy.float(), ckpt.read(name)) and torch.equal(lazy.float(), lazy.float())


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_spilled_quantized_reads_back_what_was_held(bits, symmetric):
    spill = SpillFile()
    try:
        qts = [quantize(torch.randn(rows, 64) * 0.02, QuantScheme(bits, 32, symmetric), None,
                        scale_dtype=torch.float16) for rows in (24, 8, 40)]
        spilled = [SpilledQuantized(qt, spill) for qt in qts]  # several records, read back out of order
        for qt, held in reversed(list(zip(qts, spilled, strict=True))):
            assert held.nbytes == 0
            assert torch.equal(held.float(), HeldQuantized(qt).float())
            assert torch.equal(held.float(), dequantize(qt))
        assert spill.get(spill.put(torch.empty(0, 5))).shape == (0, 5)
    finally:
        spill.close()


def test_moe_compress_keeps_no_routed_expert_in_memory(tmp_path, monkeypatch):
    """Every routed expert is read per use and its quantized integers spilled, and the checkpoint written is
    byte for byte the one written with every expert held in memory."""
    from dsedge.compress import pipeline
    from dsedge.compress.pipeline import compress

    src = write_checkpoint(tmp_path / "c", "v3", fp8=True)
    args = {"recipe": "int4-experts", "method": "gptq", "evaluate": False, "calib_tokens": 64}
    seen: dict[str, int] = {"lazy": 0, "spilled": 0}

    def lazy(ckpt, name):
        seen["lazy"] += 1
        return LazyStored(ckpt, name)

    def spilled(qt, spill):
        seen["spilled"] += 1
        return SpilledQuantized(qt, spill)
    monkeypatch.setattr(pipeline, "LazyStored", lazy)
    monkeypatch.setattr(pipeline, "SpilledQuantized", spilled)
    compress(src, tmp_path / "lazy", **args)
    spec = Checkpoint(src).spec
    routed = sum(spec.is_moe_layer(i) for i in range(spec.num_hidden_layers)) * spec.moe.n_routed_experts * 3
    assert seen == {"lazy": routed, "spilled": routed}

    monkeypatch.setattr(pipeline, "LazyStored", lambda ckpt, name: ckpt.read_stored(name))  # held as stored
    monkeypatch.setattr(pipeline, "SpilledQuantized", lambda qt, spill: HeldQuantized(qt))
    compress(src, tmp_path / "held", **args)
    shards = sorted(p.name for p in (tmp_path / "held").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "lazy").glob("*.safetensors")) and shards
    for shard in shards:
        assert (tmp_path / "lazy" / shard).read_bytes() == (tmp_path / "held" / shard).read_bytes(), shard
