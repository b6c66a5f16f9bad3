"""The token embedding as ``com.microsoft::GatherBlockQuantized``, and a tied LM head over the same bytes.

Checkpoints keep the embedding float (transformers 5.24 cannot load a packed ``Embedding``:
``dsedge.quantformat.config.EXPORT_EMBEDDING_KEY``), so it is quantized here, round-to-nearest and symmetric,
when a recipe recorded a scheme for it or ``--quantize-embedding`` asks: ``int8`` (one scale per row) or
``int4`` (groups of 32 along the hidden width).

One layout serves both ops (checked on onnxruntime 1.32's CPU kernels, tests/test_quantized_embedding.py):
MatMulNBits' ``B`` ``[V, blocks, block·bits/8]`` (uint8, unsigned codes q + 2^(b−1), the last block zero-padded)
is also valid ``data`` for GatherBlockQuantized with ``gather_axis=0, quantize_axis=2`` and scales
``[V, blocks, 1]``: the gathered rows come out ``[B, T, blocks, block]`` and are reshaped (and sliced when the
width is not a multiple of the block) to ``[B, T, H]``. So a tied head (``tie_word_embeddings``) stores the
codes once; only the scales are kept twice (``[V·blocks]`` for MatMulNBits), a 1/(block·bits/8·4)-th of them.
Without a zero-point input both ops take the symmetric default 2^(b−1), which is why only symmetric schemes
are accepted here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dsedge.errors import UserError
from dsedge.export.graph import MS_DOMAIN, GraphBuilder
from dsedge.export.quantized import MIN_BLOCK, AccuracyLevel, QuantizedWeight, matmul_nbits_arrays
from dsedge.quantformat.config import export_embedding_scheme
from dsedge.quantformat.scheme import QuantScheme

__all__ = ["EMBEDDING", "EMBEDDING_OPTIONS", "RequantizedEmbedding", "embedding_initializers", "embedding_lookup",
           "embedding_scheme", "quantize_embedding", "tied_quantized_head"]

EMBEDDING = "model.embed_tokens.weight"
CODES = "model.embed_tokens.qweight"  # shared by GatherBlockQuantized and a tied head's MatMulNBits
GATHER_SCALES = "model.embed_tokens.scales"  # [V, blocks, 1]
HEAD_SCALES = "model.embed_tokens.head_scales"  # [V·blocks], MatMulNBits' layout
EMBEDDING_OPTIONS = {"int8": QuantScheme(8, None), "int4": QuantScheme(4, 32)}
_OPTION_HINT = "use --quantize-embedding int8, int4 or none"


def embedding_scheme(option: str | None, config: dict) -> QuantScheme | None:
    """The embedding's scheme for this export: ``option`` (``--quantize-embedding``: int8, int4, none) when
    given, else what the recipe recorded in config.json, else None (kept float)."""
    if option is None:
        scheme = export_embedding_scheme(config)
    elif option == "none":
        return None
    elif option in EMBEDDING_OPTIONS:
        scheme = EMBEDDING_OPTIONS[option]
    else:
        raise UserError(f"unknown embedding quantization {option!r}", where="--quantize-embedding", hint=_OPTION_HINT)
    if scheme is not None:
        _check_scheme(scheme)
    return scheme


def _check_scheme(scheme: QuantScheme) -> None:
    if not scheme.symmetric:
        raise UserError(f"the embedding can only be quantized symmetrically, not {scheme.label}",
                        where="model.embed_tokens", hint="drop symmetric=false from the recipe's embedding rule")
    g = scheme.group_size
    if g is not None and (g < MIN_BLOCK or g & (g - 1)):
        raise UserError(f"embedding group size {g} is not a power of two ≥ {MIN_BLOCK}", where="model.embed_tokens",
                        hint="GatherBlockQuantized and MatMulNBits take blocks of 16, 32, 64, 128, …")


def quantize_embedding(weight, scheme: QuantScheme, accuracy_level: AccuracyLevel = 4) -> QuantizedWeight:
    """``weight`` [V, H] float → its round-to-nearest codes (compress's RTN, groups along H), as a tied head's
    MatMulNBits would read them at ``accuracy_level``. ``weight``: a float array, or a checkpoint whose
    embedding is read and quantized a block of rows at a time (``Checkpoint.row_blocks``: a 151936-row
    vocabulary without its whole float copy — the float temporaries of quantizing it at once were GBs)."""
    import torch  # reason: compress's RTN is torch; the exporter reads checkpoints through torch anyway

    from dsedge.compress.quant import quantize_by_rows  # reason: torch, imported only on this path

    _check_scheme(scheme)
    rtn = scheme.with_method("rtn")
    if isinstance(weight, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        return QuantizedWeight.from_tensor(quantize_by_rows(tensor, rtn), accuracy_level)
    rows = weight.tensors[EMBEDDING].shape[0]
    out = None
    for start, block in weight.row_blocks(EMBEDDING):  # each block's codes and scales written into the whole
        part = QuantizedWeight.from_tensor(quantize_by_rows(block, rtn), accuracy_level)
        if out is None:
            out = replace(part, q=np.empty((rows, part.q.shape[1]), np.int8),
                          scale=np.empty((rows, part.scale.shape[1]), part.scale.dtype))
        out.q[start:start + block.shape[0]] = part.q
        out.scale[start:start + block.shape[0]] = part.scale
    return out


class RequantizedEmbedding:
    """The export-quantized embedding for the validation reference, recomputed from the checkpoint a block of
    rows at a time: RTN is deterministic per row, so these are the codes the bundle stores, dequantized —
    and validation holds no copy of them next to the loaded bundle (0.2 GB at int8 for a 151936-row
    vocabulary)."""

    def __init__(self, ckpt, scheme: QuantScheme, accuracy_level: AccuracyLevel = 4):
        self.ckpt, self.scheme, self.accuracy_level = ckpt, scheme, accuracy_level
        self.shape = tuple(ckpt.tensors[EMBEDDING].shape) if EMBEDDING in ckpt.tensors else None

    @property
    def bits(self) -> int:
        return self.scheme.bits

    def row_blocks(self):
        import torch  # reason: the reference is torch

        for start, block in self.ckpt.row_blocks(EMBEDDING):
            codes = quantize_embedding(block.numpy(), self.scheme, self.accuracy_level)  # rows are independent
            yield start, torch.from_numpy(codes.dequantize())


def embedding_lookup(g: GraphBuilder, embedding, ids: str) -> str:
    """Hidden states [B, T, H] for token ids [B, T]: Gather over a float matrix, GatherBlockQuantized over a
    :class:`QuantizedWeight` (its initializers named as in this module, for a tied head to share)."""
    if not isinstance(embedding, QuantizedWeight):
        return g.op("Gather", g.weight(EMBEDDING, embedding), ids, axis=0)
    arrays, attrs = matmul_nbits_arrays(embedding)
    vocab, hidden = embedding.shape
    blocks = arrays["B"].shape[1]
    codes = g._initializer(CODES, arrays["B"])  # uint8 bytes pass through as stored (never cast to half)
    scales = g.weight(GATHER_SCALES, arrays["scales"].reshape(vocab, blocks, 1))
    rows = g.op("GatherBlockQuantized", codes, ids, scales, domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                block_size=attrs["block_size"], bits=embedding.bits)  # [B, T, blocks, block]
    hidden_states = g.op("Reshape", rows, g.const([0, 0, -1]))
    if blocks * attrs["block_size"] != hidden:  # the zero-padded tail of the last block
        hidden_states = g.slice_last(hidden_states, 0, hidden)
    return hidden_states


def tied_quantized_head(g: GraphBuilder, x: str, embedding: QuantizedWeight) -> str:
    """Logits [B, T, V] = x @ Eᵀ as MatMulNBits over the embedding's codes (``CODES``, already in the graph:
    the lookup's own, or the prelude's referenced by a partitioned head) and its own copy of the scales."""
    arrays, attrs = matmul_nbits_arrays(embedding)
    return g.op("MatMulNBits", x, CODES, g.weight(HEAD_SCALES, arrays["scales"]), domain=MS_DOMAIN,
                accuracy_level=embedding.accuracy_level, **attrs)


def embedding_initializers(names) -> list[str]:
    """Of a graph's initializer names, those a tied head reads from the prelude: the float matrix or the codes."""
    return [n for n in names if n in (EMBEDDING, CODES)]
