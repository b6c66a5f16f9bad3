"""The few graph-building calls the embedder converter needs: named values, inline initializers, one call per node.

Kept inside retrieval so that the converter does not import ``dsedge.export`` (export imports retrieval to
embed an index in a bundle; the reverse import made a cycle). It names nodes and constants exactly as
``dsedge.export.graph.GraphBuilder`` does, so a converted embedder is the same graph either way; the export
builder adds what decoders need (external data, fp16, quantized matmuls) on top of the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class SmallGraph:
    """Accumulates nodes, inputs, outputs and (inline) initializers; ``model()`` returns the ModelProto."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._const_cache: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape (1,); keep scalars scalar.
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = self.weight(self.fresh("const"), array)
        return self._const_cache[key]

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        names = [out] if out else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], names, domain=domain or None,
                                           name=self.fresh(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ Wᵀ (+ b); W is stored transposed [in, out] so MatMul reads it row-major."""
        y = self.op("MatMul", x, self.weight(name, np.ascontiguousarray(weight.T)))
        if bias is not None:
            y = self.op("Add", y, self.weight(name + ".bias", bias))
        return y

    def shape_dim(self, x: str, axis: int) -> str:
        """A 1-element int64 tensor holding x.shape[axis]."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="dsedge")
        model.ir_version = 10
        return model
