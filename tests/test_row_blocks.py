"""Vocabulary-sized matrices a block of rows at a time (issue 13: a 151936 × 1536 embedding or head is 0.9 GB
per float32 copy): every blocked path gives exactly what the whole-matrix path gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsedge.compress import quant
from dsedge.compress.pipeline import compress
from dsedge.compress.quant import HessianAccumulator, quantize, quantize_by_rows
from dsedge.export import quantized as export_quantized
from dsedge.export.embedding import RequantizedEmbedding, quantize_embedding
from dsedge.export.quantized import QuantizedWeight, matmul_nbits_arrays
from dsedge.models import checkpoint as checkpoint_module
from dsedge.models.checkpoint import Checkpoint
from dsedge.models.reference import StreamedReference
from dsedge.quantformat import packing
from dsedge.quantformat.scheme import QuantScheme
from dsedge.testing.tiny import write_checkpoint


def _whole(ckpt: Checkpoint, name: str, elements: int) -> torch.Tensor:
    blocks = list(ckpt.row_blocks(name, elements))
    assert len(blocks) > 1 and [s for s, _ in blocks] == sorted(s for s, _ in blocks)
    return torch.cat([b for _, b in blocks])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_row_blocks_of_a_plain_and_an_fp8_tensor_are_the_read(tmp_path, dtype):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3", fp8=True, dtype=dtype))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.experts.0.up_proj.weight"):
        assert torch.equal(_whole(ckpt, name, 3 * ckpt.read(name).shape[1] + 5), ckpt.read(name)), name


@pytest.mark.parametrize("head,rest", [({"bits": 8}, {"bits": 8}),
                                       ({"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 32}),
                                       ({"bits": 4, "group_size": 32, "symmetric": False}, {"bits": 8})],
                         ids=["int8", "int4-g32", "int4-asym"])
def test_row_blocks_of_a_quantized_module_are_its_dequantized_read(tmp_path, head, rest):
    src = write_checkpoint(tmp_path / "c", "qwen2")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "blocks", "method": "rtn", "rules": [
        {"match": "lm_head", "quant": head}, {"match": "re:.*", "quant": rest}]}))
    compress(src, tmp_path / "q", recipe=str(recipe), method="rtn", evaluate=False, calib_tokens=64)
    ckpt = Checkpoint(tmp_path / "q")
    for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        assert ckpt.quantized(name) is not None, name
        assert torch.equal(_whole(ckpt, name, 7 * ckpt.read(name).shape[1]), ckpt.read(name)), name


def test_quantize_by_rows_is_quantize(monkeypatch):
    w = torch.randn(300, 96) * 0.05
    monkeypatch.setattr(quant, "ROW_BLOCK_ELEMENTS", 96 * 64)  # 5 blocks
    for scheme in (QuantScheme(8, None, True), QuantScheme(4, 32, False)):
        whole, blocked = quantize(w, scheme), quantize_by_rows(w, scheme)
        assert torch.equal(whole.q, blocked.q) and torch.equal(whole.scale, blocked.scale)
        assert (whole.zero_point is None) == (blocked.zero_point is None)
        if whole.zero_point is not None:
            assert torch.equal(whole.zero_point, blocked.zero_point)
    hessian = HessianAccumulator(96)
    hessian.add(torch.randn(512, 96))
    gptq = QuantScheme(4, 32, True, method="gptq")
    factorisations = []
    real_factor = quant._inverse_hessian_cholesky
    monkeypatch.setattr(quant, "_inverse_hessian_cholesky", lambda *a: factorisations.append(1) or real_factor(*a))
    whole, blocked = quantize(w, gptq, hessian), quantize_by_rows(w, gptq, hessian)
    # GPTQ's rows are independent: the same integers up to float rounding in the blocked matmuls
    assert (whole.q != blocked.q).float().mean() < 1e-3 and blocked.shape == whole.shape
    assert len(factorisations) == 2  # once per call, not once per row block (V3's head: 221 blocks of 7168²)
    empty = HessianAccumulator(96)  # no samples: every block falls back to RTN, as quantize does
    assert torch.equal(quantize_by_rows(w, gptq, empty).q, quantize(w, QuantScheme(4, 32, True)).q)


def test_chunked_bit_packing_and_matmul_nbits_arrays_are_exact(monkeypatch):
    values = torch.randint(-8, 8, (200, 72), dtype=torch.int8)
    whole = packing.pack_bits(values, 4)
    monkeypatch.setattr(packing, "PACK_CHUNK", 72 * 16)
    assert torch.equal(packing.pack_bits(values, 4), whole)
    assert torch.equal(packing.unpack_bits(whole, 4, 72), values)
    weight = QuantizedWeight.from_tensor(quantize(torch.randn(200, 72), QuantScheme(4, 16, True)))
    arrays, _ = matmul_nbits_arrays(weight)
    monkeypatch.setattr(export_quantized, "ROWS_ELEMENTS", 72 * 9)
    blocked, _ = matmul_nbits_arrays(weight)
    assert all(np.array_equal(arrays[k], blocked[k]) for k in arrays)


def test_embedding_quantized_from_row_blocks_and_the_reference_reading_it(tmp_path, monkeypatch):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", "v3", tied=True))
    name, scheme = "model.embed_tokens.weight", QuantScheme(8, None, True)
    dense = ckpt.read(name).numpy()
    whole = quantize_embedding(dense, scheme)
    monkeypatch.setattr(checkpoint_module, "ROW_BLOCK_ELEMENTS", 5 * dense.shape[1])
    blocked = quantize_embedding(ckpt, scheme)
    assert np.array_equal(whole.q, blocked.q) and np.array_equal(whole.scale, blocked.scale)
    # the reference over the quantized embedding = over its dense dequantized matrix (tied head included)
    ids = [[3, 7, 7, 1, 30], [0, 2, 9, 4, 5]]
    by_matrix = StreamedReference(ckpt, embedding=_WholeMatrix(whole.dequantize()))
    requantized = StreamedReference(ckpt, embedding=RequantizedEmbedding(ckpt, scheme))  # holds no codes
    assert torch.equal(requantized.embed(ids), torch.from_numpy(whole.dequantize())[torch.tensor(ids)])
    hidden = requantized.embed(ids)
    torch.testing.assert_close(requantized.logits(hidden), by_matrix.logits(hidden), rtol=1e-6, atol=1e-6)
    plain = StreamedReference(ckpt)
    assert torch.equal(plain.embed(ids), torch.from_numpy(dense)[torch.tensor(ids)])


class _WholeMatrix:
    """An embedding override as one block: what the blocked reference must agree with."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix

    def row_blocks(self):
        yield 0, torch.from_numpy(np.ascontiguousarray(self.matrix, dtype=np.float32))
