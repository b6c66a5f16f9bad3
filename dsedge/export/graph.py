"""A small ONNX graph builder: named values, initializers from numpy, one call per node.

We build graphs directly instead of tracing PyTorch: routing must stay data-dependent (a trace freezes
it), quantized weights must go in as quantized operators, and expert partitions are separate graphs —
all easier to state op by op (the approach onnxruntime-genai's model builder takes too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dsedge.contract import Signature
from dsedge.export.quantized import QuantizedWeight, matmul_nbits_arrays, stack_rows
from dsedge.manifest import GraphEntry

OPSET = 21
MS_DOMAIN = "com.microsoft"
FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL
ELEM_TYPES = {"float32": FLOAT, "float16": FLOAT16, "int64": INT64, "bool": BOOL}  # contract dtype → ONNX

Dim = int | str | None


EXTERNAL_THRESHOLD = 1024  # smaller tensors (shapes, axes) stay inline: shape inference must read them
PAGE = 4096
PAGE_ALIGN_FROM = 1024 * 1024


class GraphBuilder:
    """Accumulates nodes, inputs, outputs and initializers; ``model()`` returns the ModelProto.

    With ``data_path`` every large initializer is written to that file as soon as it is added and the
    graph keeps only a reference (ONNX external data: location, offset, length). Export memory then
    follows the layer being built instead of the whole model, and no second serialization pass runs.
    Tensors of 1 MiB and more start on a page boundary, so onnxruntime can memory-map them.
    """

    def __init__(self, name: str, data_path: Path | None = None, half: bool = False):
        self.name = name
        # Activation/weight precision: fp16 keeps norms, softmax, routing and expert sums in fp32 (as
        # transformers does in half precision), everything else in fp16.
        self.half = half
        self.act = FLOAT16 if half else FLOAT
        self.data_path = data_path
        self._data = open(data_path, "wb") if data_path else None  # noqa: SIM115 — closed in model()
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._const_cache: dict[tuple, str] = {}
        self._renamed: dict[str, str] = {}  # node outputs renamed to the graph output they became
        self._count = 0
        self._once: dict[str, str] = {}  # values computed once per graph and reused by every layer (once)
        # Prefix of node names ("layers.3/"): onnxruntime's profiler reports node names, so a profile can
        # attribute a one-graph decoder's time to layers.
        self.scope = ""

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def once(self, key: str, make) -> str:
        """The value ``make()`` builds, built on first use and reused after: a tensor every layer needs
        alike (e.g. a zero point shaped [B, H, T, 1]) costs its nodes once per step, not once per layer."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]

    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Declare ``value`` a graph output called ``name``. A value a node computes is renamed in place (an
        Identity is a kernel call per step — 9 of ds3bench's decode, one copying the logits); a graph input,
        an initializer or a value already bound to another output goes through an Identity."""
        value, bound = self._renamed.get(value, value), {o.name for o in self.outputs}
        if value != name and (value in bound or not self._rename_produced(value, name)):
            self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def _rename_produced(self, value: str, name: str) -> bool:
        """Rename a node's output ``value`` to ``name`` everywhere; False when no node produces it."""
        producer = next((n for n in reversed(self.nodes) if value in n.output), None)
        if producer is None:
            return False
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, v in enumerate(names):
                    if v == value:
                        names[i] = name
        self._renamed[value] = name
        return True

    def declare_inputs(self, signature: Signature) -> None:
        """The graph's inputs, exactly as its role declares them (dsedge.contract)."""
        for t in signature.inputs:
            self.input(t.name, ELEM_TYPES[t.dtype], t.dims)

    def declare_outputs(self, signature: Signature, values: dict[str, str]) -> None:
        """The graph's outputs in their declared order, each bound to the value computed for it."""
        missing = [t.name for t in signature.outputs if t.name not in values]
        if missing:
            raise ValueError(f"graph {self.name}: no value for declared output(s) {missing}")
        for t in signature.outputs:
            self.output(values[t.name], t.name, ELEM_TYPES[t.dtype], t.dims)

    def weight(self, name: str, array: np.ndarray, *, keep_fp32: bool = False) -> str:
        """A named initializer (weights: kept under a readable name for partitioning and debugging).

        Float weights follow the graph precision unless ``keep_fp32`` (the router, as DeepSeek keeps it).
        """
        if self.half and not keep_fp32 and array.dtype == np.float32:
            array = array.astype(np.float16)
        return self._initializer(name, array)

    def _initializer(self, name: str, array: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape (1,); keep scalars scalar.
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        if self._data is None or array.nbytes < EXTERNAL_THRESHOLD:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            self.initializers.append(self._external(name, array))
        return name

    def _external(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        # Page-align large tensors (memory-mappable); cache-line-align small ones so padding stays small.
        padding = -self._offset % (PAGE if array.nbytes >= PAGE_ALIGN_FROM else 64)
        self._data.write(b"\0" * padding)
        self._offset += padding
        self._data.write(memoryview(array).cast("B"))
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.data_path.name), ("offset", self._offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self._offset += array.nbytes
        return tensor

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_cache:
            self._const_cache[key] = self._initializer(self.fresh("const"), array)
        return self._const_cache[key]

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        names = [out] if out else [self.fresh(op_type.lower()) for _ in range(outputs)]
        inputs = [self._renamed.get(i, i) if i else "" for i in inputs]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain or None,
                                           name=self.fresh(f"{self.scope}{op_type}"), **attrs))
        return names[0] if outputs == 1 else names

    def model(self) -> onnx.ModelProto:
        if self._data is not None:
            self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="dsedge")
        model.ir_version = 10
        return model

    # --- precision -----------------------------------------------------------------------------
    def to_float(self, x: str) -> str:
        return self.op("Cast", x, to=FLOAT) if self.half else x

    def to_act(self, x: str) -> str:
        return self.op("Cast", x, to=FLOAT16) if self.half else x

    # --- composite helpers used by every architecture ------------------------------------------
    def linear(self, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None, *,
               keep_fp32: bool = False) -> str:
        """x @ Wᵀ (+ b); W is stored transposed [in, out] so MatMul reads it row-major.

        A ``QuantizedWeight`` becomes one MatMulNBits node over its repacked integer codes.
        """
        if isinstance(weight, QuantizedWeight):
            return self.matmul_nbits(x, weight, name, bias)
        y = self.op("MatMul", x, self.weight(name, np.ascontiguousarray(weight.T), keep_fp32=keep_fp32))
        if bias is not None:  # onnxruntime fuses MatMul + Add into one Gemm-like kernel itself
            y = self.op("Add", y, self.weight(name + ".bias", bias, keep_fp32=keep_fp32))
        return y

    def matmul_nbits(self, x: str, weight: QuantizedWeight, name: str, bias: np.ndarray | None = None) -> str:
        """One MatMulNBits; a bias is the op's own input (index 5: added inside the kernel, no Add node)."""
        arrays, attrs = matmul_nbits_arrays(weight)
        inputs = [x, self._initializer(name + ".qweight", arrays["B"]),
                  self.weight(name + ".scales", arrays["scales"]),
                  self._initializer(name + ".qzeros", arrays["zero_points"]) if "zero_points" in arrays else None]
        if bias is not None:
            inputs += [None, self.weight(name + ".bias", bias)]
        while inputs[-1] is None:
            inputs.pop()
        return self.op("MatMulNBits", *inputs, domain=MS_DOMAIN, accuracy_level=weight.accuracy_level, **attrs)

    def rms_norm(self, x: str, weight: np.ndarray, name: str, eps: float) -> str:
        """RMSNorm as the reference computes it: x · rsqrt(mean(x²) + eps) in fp32, then · w.

        One onnxruntime ``SimplifiedLayerNormalization`` kernel (its RMSNorm; stash_type 1 = statistics in
        fp32, as transformers computes them in half precision too) instead of six elementwise nodes: a MoE
        decoder layer has four norms, and at decode time every node costs a few microseconds of dispatch.
        """
        return self.op("SimplifiedLayerNormalization", x, self.weight(name, weight), axis=-1, epsilon=eps,
                       stash_type=1)

    def add_rms_norm(self, x: str, delta: str | None, weight: np.ndarray, name: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + delta), x + delta) as one ``SkipSimplifiedLayerNormalization`` (the residual add fused
        into the norm that follows it); without ``delta``, a plain RMSNorm of x and x itself."""
        if delta is None:
            return self.rms_norm(x, weight, name, eps), x
        normed, total = self.fresh("skip_norm"), self.fresh("residual")
        self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, delta, self.weight(name, weight)],
                                           [normed, "", "", total], domain=MS_DOMAIN, epsilon=eps,
                                           name=self.fresh(f"{self.scope}SkipSimplifiedLayerNormalization")))
        return normed, total

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def fused_linears(self, x: str, weights: list, biases: list, names: list[str], fused_name: str) -> list[str]:
        """x @ Wᵢᵀ (+ bᵢ) for projections of one input: one MatMul / MatMulNBits over the stacked rows and a
        Split (each node costs dispatch time at decode), or one product each when they are stored differently."""
        stacked = stack_rows(weights)
        if stacked is None:
            return [self.linear(x, wt, name, b) for wt, b, name in zip(weights, biases, names, strict=True)]
        bias = None
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(wt.shape[0], np.float32)
                                   for wt, b in zip(weights, biases, strict=True)])
        y = self.linear(x, stacked, fused_name, bias)
        sizes = [wt.shape[0] for wt in weights]
        return list(self.op("Split", y, self.const(sizes), axis=-1, outputs=len(sizes)))

    def swiglu_mlp(self, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str) -> str:
        """down(silu(gate·x) ⊙ up·x), gate and up as one product when stored alike (``fused_linears``: one GEMV
        of twice the width reads the same bytes as two and costs one dispatch less; benchmarks/README.md)."""
        gated, linear = self.fused_linears(x, [gate, up], [None, None], [name + ".gate_proj", name + ".up_proj"],
                                           name + ".gate_up_proj")
        return self.linear(self.op("Mul", self.silu(gated), linear), down, name + ".down_proj")

    def slice_last(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.const([start]), self.const([end]), self.const([-1]))

    def shape_dim(self, x: str, axis: int) -> str:
        """A 1-element int64 tensor holding x.shape[axis]."""
        return self.op("Shape", x, start=axis, end=axis + 1)


def save_graph(build, signature: Signature, root: Path, folder: str, name: str, role: str, *,
               layer: int | None = None, experts: tuple[int, int] | None = None) -> GraphEntry:
    """Build a graph with its weights streamed to ``name.onnx.data``, save it, return its manifest entry.

    The one writer of graph entries, for both layouts: ``build(data_path)`` returns the ModelProto, whose
    inputs/outputs are ``signature``'s (the graph declared them through ``declare_inputs/outputs``).
    """
    (root / folder).mkdir(parents=True, exist_ok=True)
    rel = f"{folder}/{name}.onnx"
    data = root / (rel + ".data")
    model = build(data)
    onnx.save_model(model, root / rel)
    if data.exists() and data.stat().st_size == 0:
        data.unlink()  # every weight was small enough to stay inline
    data_files = (rel + ".data",) if data.exists() else ()
    size = (root / rel).stat().st_size + sum((root / f).stat().st_size for f in data_files)
    return GraphEntry(name=name, role=role, file=rel, data_files=data_files, bytes=size, inputs=signature.inputs,
                      outputs=signature.outputs, layer=layer, experts=experts)
