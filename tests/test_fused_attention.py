"""GroupQueryAttention over whole cache buffers (head sizes its kernel takes): exact, in place, no copies."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.decode import DecodeState, left_padded
from dsedge.testing.tiny import write_checkpoint


def _with_head_dim(tmp, variant: str, head_dim: int):
    """A tiny ``variant`` checkpoint re-initialized with ``head_dim`` (the fixtures' 12/20 are not multiples of 8)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = write_checkpoint(tmp / f"{variant}-base", variant)
    config = json.loads((base / "config.json").read_text())
    config["head_dim"] = head_dim
    out = tmp / f"{variant}-hd{head_dim}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base / name).exists():
            (out / name).write_bytes((base / name).read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["head_dim"] = head_dim
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def fused(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fused-{request.param}")
    ckpt = _with_head_dim(tmp, request.param, 16)
    out = tmp / "bundle"
    report = export_bundle(ckpt, out, max_context=64)
    return report, out


def test_gqa_bundle_validates_and_uses_one_attention_node_per_layer(fused):
    report, path = fused
    assert all(c["passed"] for c in report.validation)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["cache"]["shape"][2] == "M"
    model = onnx.load(str(path / manifest["graphs"][0]["file"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = manifest["model"]["num_hidden_layers"]
    assert ops.count("GroupQueryAttention") == layers and ops.count("RotaryEmbedding") == 2 * layers
    assert "Softmax" not in ops and "Transpose" not in ops


def test_decode_writes_into_the_cache_buffers(fused):
    """A step reads and writes the same arrays: no buffer is replaced, the new entries land at the end."""
    _, path = fused
    engine = load_bundle(path)
    cache = engine.new_cache(max_len=32)
    before = dict(cache.buffers)
    ids = np.array([[3, 17, 99, 250, 4]])
    engine.forward(ids, np.ones_like(ids), cache)
    engine.forward(np.array([[8]]), np.ones((1, 6), np.int64), cache)
    assert all(cache.buffers[k] is before[k] for k in before)
    assert all(np.abs(buf[:, :, :6]).max() > 0 and not buf[:, :, 6:].any() for buf in cache.buffers.values())


def test_batched_chunk_after_cache_matches_recompute(fused):
    """Batch 2, several tokens after a cache (one token at a time inside): same logits as one prefill."""
    _, path = fused
    engine = load_bundle(path)
    rows = [[5, 9, 33, 120, 7, 64, 2], [11, 12, 13, 14, 15, 16, 17]]
    ids, mask = left_padded(rows)
    full = engine.forward(ids, mask, engine.new_cache(batch=2, max_len=8))
    state = DecodeState(engine, engine.new_cache(batch=2, max_len=8), np.zeros((2, 0), np.int64))
    first = state.forward(ids[:, :3], mask[:, :3])
    rest = state.forward(ids[:, 3:], mask[:, 3:])
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-4)


def test_load_bundle_spins_a_monolithic_bundle_unless_told_not_to(fused):
    _, path = fused
    assert load_bundle(path).session_config.spin is True
    assert load_bundle(path, spin=False).session_config.spin is False


def test_fp16_gqa_bundle_validates(tmp_path):
    """Half precision through GroupQueryAttention and RotaryEmbedding (bias at fp16's lowest, not −inf)."""
    ckpt = _with_head_dim(tmp_path, "qwen2", 16)
    report = export_bundle(ckpt, tmp_path / "b16", max_context=64, dtype="fp16")
    assert all(c["passed"] for c in report.validation)
    engine = load_bundle(tmp_path / "b16")
    assert engine.cache_layout["shape"][2] == "M"
    assert all(buf.dtype == np.float16 for buf in engine.new_cache(max_len=8).buffers.values())


def test_last_only_prefill_runs_the_head_for_the_last_position(fused):
    """logits_from = T − 1: the graph returns one row, equal to the last row of a full prefill."""
    _, path = fused
    engine = load_bundle(path)
    ids = np.array([[3, 17, 99, 250, 4, 8]])
    full = engine.forward(ids, np.ones_like(ids), engine.new_cache(max_len=8))
    last = engine.forward(ids, np.ones_like(ids), engine.new_cache(max_len=8), last_only=True)
    assert full.shape[1] == 6 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_caches_used_in_turn_on_one_engine_give_the_logits_of_fresh_engines(fused):
    """The IO binding is kept across runs with each cache bound once (session.BoundRuns): switching between
    caches of different lengths and batch sizes, and dropping one, must not leave a step reading another's."""
    _, path = fused
    engine = load_bundle(path)
    prompts = {"a": [[3, 17, 99, 250, 4]], "b": [[8, 8, 1], [5, 6, 7]], "c": [[40, 41, 42, 43, 44, 45, 46]]}
    states = {k: DecodeState(engine, engine.new_cache(batch=len(p), max_len=16), np.zeros((len(p), 0), np.int64))
              for k, p in prompts.items()}
    got = {k: [] for k in prompts}
    for k in ("a", "b", "c"):
        got[k].append(states[k].forward(np.array(prompts[k]), last_only=True))
    del states["c"]  # its buffers are freed; the next cache may land at their addresses
    states["d"] = DecodeState(engine, engine.new_cache(batch=1, max_len=16), np.zeros((1, 0), np.int64))
    got["d"] = [states["d"].forward(np.array(prompts["c"]), last_only=True)]
    for step in range(3):
        for k in ("b", "a", "d"):
            rows = len(got[k][0])
            got[k].append(states[k].forward(np.full((rows, 1), 11 + step), last_only=True))
    for k in ("a", "b", "d"):
        fresh = load_bundle(path)
        state = DecodeState(fresh, fresh.new_cache(batch=len(got[k][0]), max_len=16),
                            np.zeros((len(got[k][0]), 0), np.int64))
        want = [state.forward(np.array(prompts["c" if k == "d" else k]), last_only=True)]
        want += [state.forward(np.full((len(got[k][0]), 1), 11 + step), last_only=True) for step in range(3)]
        for observed, expected in zip(got[k], want, strict=True):
            np.testing.assert_array_equal(observed, expected)
