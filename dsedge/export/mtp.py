"""DeepSeek-V3's multi-token-prediction (MTP) module as the bundle's draft graph (role ``draft``).

The module (technical report §2.2; README_WEIGHTS.md) is layer ``num_hidden_layers`` of the checkpoint: at
position i, eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]) with h_i the main model's final hidden state (the
decoder's FINAL_HIDDEN output), one decoder layer with MLA and its own MoE — built by the same code as the
main layers, so its cache is the same latent layout — then shared_head.norm and the output head. Its I/O is
``contract.draft_io``; dsedge.testing.mtp_reference is the independent PyTorch reference it is validated
against. The module's embedding and output head are the main model's (the V3 checkpoint stores copies; a
compressed one does not): the draft graph references the main graph's initializers — the same external-data
file, offset and length, as a tied head references the prelude's embedding in the partitioned layout — instead
of writing the matrices again. A tensor is shared only when its bytes are identical to the main graph's, so a
module trained with its own head keeps its own copy and the outputs never change.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
import onnx

from dsedge.contract import (
    ATTENTION_MASK,
    DRAFT,
    DRAFT_HIDDEN,
    FINAL_HIDDEN,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    draft_io,
    past_name,
    present_name,
)
from dsedge.export.decoder import (
    WeightsFn,
    allowed_mask,
    attention_block,
    cache_spec,
    graph_shapes,
    lm_head,
    positional,
)
from dsedge.export.embedding import embedding_lookup
from dsedge.export.graph import GraphBuilder, save_graph
from dsedge.export.moe import moe_block
from dsedge.export.quantized import QuantizedWeight
from dsedge.manifest import GraphEntry
from dsedge.models.rope import cos_sin_tables
from dsedge.models.spec import ModelSpec

log = logging.getLogger(__name__)
EMBEDDING = "model.embed_tokens.weight"


def graph_initializer(root: Path, graph: GraphEntry, name: str) -> tuple[onnx.TensorProto, tuple[str, ...]]:
    """Initializer ``name`` of a written graph as a reference (its data stays in the graph's file) and the bundle
    files it lives in, for another graph to point at."""
    model = onnx.load_model(str(root / graph.file), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor, ()
    return tensor, graph.data_files


class SharedTensors:
    """The external initializers of already written graphs (in the draft's folder), by name: a draft tensor with
    the same name, dtype, shape and bytes is referenced from there instead of written again."""

    def __init__(self, root: Path, graphs: list[GraphEntry], folder: str):
        self.root, self.folder = root, folder
        self.tensors: dict[str, onnx.TensorProto] = {}
        self.used: set[str] = set()  # bundle-relative data files the draft references
        for graph in graphs:
            if PurePosixPath(graph.file).parent != PurePosixPath(folder):
                continue  # locations are relative to the graph's folder: only a sibling's can be pointed at
            model = onnx.load_model(str(root / graph.file), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    self.tensors.setdefault(t.name, t)

    def reference(self, name: str, array: np.ndarray) -> onnx.TensorProto | None:
        """The written tensor ``name`` when it holds exactly ``array``; None otherwise."""
        tensor = self.tensors.get(name)
        if tensor is None or tuple(tensor.dims) != array.shape \
                or tensor.data_type != onnx.helper.np_dtype_to_tensor_dtype(array.dtype):
            return None
        where = {e.key: e.value for e in tensor.external_data}
        rel = f"{self.folder}/{where['location']}"
        offset, length = int(where.get("offset", 0)), int(where["length"])
        if length != array.nbytes:
            return None
        with open(self.root / rel, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if view[offset:offset + length] != memoryview(np.ascontiguousarray(array)).cast("B"):
                log.info("export: draft tensor %s differs from the main graph's: the draft keeps its own copy", name)
                return None
        self.used.add(rel)
        return tensor


class SharingBuilder(GraphBuilder):
    """A GraphBuilder whose large initializers point at ``shared``'s identical tensors where there are any."""

    def __init__(self, name: str, data_path: Path | None, half: bool, shared: SharedTensors | None):
        super().__init__(name, data_path, half)
        self.shared = shared

    def _initializer(self, name: str, array: np.ndarray) -> str:
        reference = self.shared.reference(name, array) if self.shared and self._data is not None else None
        if reference is None:
            return super()._initializer(name, array)
        self.initializers.append(reference)
        return name


def build_draft(spec: ModelSpec, weights: WeightsFn, *, max_positions: int, name: str = DRAFT,
                data_path: Path | None = None, half: bool = False,
                shared: SharedTensors | None = None, expert_path: str = "dispatch") -> onnx.ModelProto:
    """The first MTP module as one graph; ``weights(num_hidden_layers)`` gives its tensors. The embedding, head
    and RoPE tables carry the main graph's initializer names, so ``shared`` can point them at its copies.
    ``expert_path``: its MoE block's, as the decoder's (dsedge.export.moe.moe_block)."""
    g = SharingBuilder(name, data_path, half, shared)
    signature = draft_io(graph_shapes(spec, half))
    g.declare_inputs(signature)
    cache = cache_spec(spec)
    layer = spec.num_hidden_layers
    p = f"model.layers.{layer}."
    w, top = weights(layer), weights(None)
    table = w.get(p + "embed_tokens.weight", top[EMBEDDING])
    # a quantized main embedding is looked up as the decoder does (GatherBlockQuantized over the same codes and
    # scales, so the draft references them rather than storing a float copy)
    embed = None if isinstance(table, QuantizedWeight) else g.weight(EMBEDDING, table)
    looked_up = embedding_lookup(g, table, INPUT_IDS) if embed is None else g.op("Gather", embed, INPUT_IDS, axis=0)
    head_top = dict(top)  # lm_head() reads the head from here; the module's own copy (if stored) wins
    if p + "shared_head.head.weight" in w and not spec.tie_word_embeddings:
        head_top["lm_head.weight"] = w[p + "shared_head.head.weight"]
    eps = spec.rms_norm_eps
    emb = g.rms_norm(looked_up, w[p + "enorm.weight"], p + "enorm", eps)
    hid = g.rms_norm(FINAL_HIDDEN, w[p + "hnorm.weight"], p + "hnorm", eps)
    x = g.linear(g.op("Concat", emb, hid, axis=-1), w[p + "eh_proj.weight"], p + "eh_proj")
    past = [past_name(0, t) for t in cache.names]
    cos, sin = cos_sin_tables(spec, max_positions)
    past_len = g.shape_dim(past[0], cache.shape.index("S"))
    allowed = allowed_mask(g, POSITION_IDS, ATTENTION_MASK, past_len)
    pos = positional(g, spec, POSITION_IDS, g.weight("rope.cos", cos), g.weight("rope.sin", sin), allowed, past_len)
    g.scope = "mtp/"
    x, h, presents = attention_block(g, spec, w, layer, x, past, pos)
    mlp = moe_block(g, spec, w, p + "mlp.", h, expert_path) if spec.is_moe_layer(layer) else g.swiglu_mlp(
        h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"], p + "mlp")
    x = g.op("Add", x, mlp)
    g.scope = ""
    normed = g.rms_norm(x, w[p + "shared_head.norm.weight"], p + "shared_head.norm", eps)
    values = {present_name(0, t): v for t, v in zip(cache.names, presents, strict=True)}
    values |= {LOGITS: g.to_float(lm_head(g, spec, normed, head_top, embed)), DRAFT_HIDDEN: x}
    g.declare_outputs(signature, values)
    return g.model()


def write_draft(spec: ModelSpec, weights: WeightsFn, root: Path, folder: str, *, max_positions: int,
                half: bool = False, shares: list[GraphEntry] = (), expert_path: str = "dispatch") -> GraphEntry:
    """Build and save the draft graph; its manifest entry (role ``draft``, layer = the MTP layer's index).

    ``shares``: the written main graphs (decoder, or prelude and head) whose identical tensors it references.
    Their data files are listed as the draft's too (hashed, checked as its external data), but their bytes
    count once, under the graph that wrote them."""
    shared = SharedTensors(root, list(shares), folder)

    def build(data: Path):
        return build_draft(spec, weights, max_positions=max_positions, data_path=data, half=half, shared=shared,
                           expert_path=expert_path)

    entry = save_graph(build, draft_io(graph_shapes(spec, half)), root, folder, DRAFT, DRAFT,
                       layer=spec.num_hidden_layers)
    borrowed = tuple(sorted(shared.used - set(entry.data_files)))
    return replace(entry, data_files=entry.data_files + borrowed)


def draft_feeds(next_ids: np.ndarray, hidden: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Validation helper: the token inputs of a cache-less draft run (mask all ones)."""
    return {INPUT_IDS: next_ids.astype(np.int64), FINAL_HIDDEN: hidden, POSITION_IDS: positions.astype(np.int64),
            ATTENTION_MASK: np.ones_like(next_ids, dtype=np.int64)}
