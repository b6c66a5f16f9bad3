"""One onnxruntime graph for a partitioned bundle whose experts are all resident.

A partitioned bundle runs its prelude, one trunk graph per layer, the layer's experts and the head as
separate sessions, wired by the engine in Python: ds3bench int4 made 17 session runs per token and ran at
0.77× / 0.86× of the monolithic graph even with fused layer experts and one thread pool (issue #12). When
no budget evicts anything that wiring is fixed, so it can be written down as one graph: this module renames
each stage graph's values under its stage (``layers.3/…``, the prefix the monolithic graph's nodes carry, so
the node profiler splits time by layer the same way), connects them by the names the engine passes, and
adds the engine's residual sum. The initializers keep their external-data references: they point at the same
verified files, with locations made relative to the bundle root, so no byte is copied or written.

The composed graph computes what the engine's loop computes: the same kernels on the same weights, and the
routed sum ``residual + Σ routed`` as the engine does it (float32, the partitions added in order, cast back
to the activation type).

The runtime does not depend on the ``onnx`` package, so the graphs are edited at the protobuf wire level
(the reader is ``dsedge.onnx_refs``); every field that is not renamed is copied byte for byte. Field numbers,
from onnx/onnx.proto (github.com/onnx/onnx @ f7546912):

- ModelProto: ir_version = 1, producer_name = 2, graph = 7, opset_import = 8, functions = 25
- OperatorSetIdProto: domain = 1, version = 2
- GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12, value_info = 13,
  sparse_initializer = 15
- NodeProto: input = 1, output = 2, name = 3, op_type = 4, attribute = 5, domain = 7
- AttributeProto: name = 1, i = 3, t = 5, g = 6, tensors = 10, graphs = 11, type = 20 (INT = 2)
- TensorProto: name = 8, external_data = 13 (StringStringEntryProto: key = 1, value = 2)
- ValueInfoProto: name = 1, type = 2; TypeProto: tensor_type = 1; TypeProto.Tensor: elem_type = 1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from dsedge.onnx_refs import message_fields, value_info_type
from dsedge.onnx_refs import tensor_name as _tensor_name
from dsedge.onnx_wire import bytes_field as _bytes_field
from dsedge.onnx_wire import group as _group
from dsedge.onnx_wire import message as _message
from dsedge.onnx_wire import raw_field as _raw_field
from dsedge.onnx_wire import varint_field as _varint_field

FLOAT = 1  # TensorProto.DataType (the residual sum's precision)
_INT_ATTRIBUTE = 2  # AttributeProto.AttributeType.INT


class NotComposable(ValueError):
    """A stage graph this composer does not rewrite (subgraphs, functions, sparse initializers, attribute tensors
    stored externally): the engine runs the bundle graph by graph instead."""


@dataclass
class Stage:
    """One graph of the bundle: ``prefix`` names its values in the composed graph, ``folder`` (relative to the
    bundle root) is where its external-data locations were resolved."""

    prefix: str
    model: bytes
    folder: str


class Composer:
    """Builds the composed graph stage by stage. ``values`` maps an engine-level name (hidden, cos,
    present.3.latent, …) to the composed graph's value that currently holds it."""

    def __init__(self, global_outputs: set[str]):
        self.values: dict[str, str] = {}
        self.types: dict[str, int] = {}  # element type of each stage output, as the stage declares it
        self._declared: dict[str, bytes] = {}  # each stage output's ValueInfoProto (type and shape)
        self.global_outputs = global_outputs  # names kept as they are: presents, logits, final_hidden
        self.opsets: dict[bytes, int] = {}
        self.ir_version = 0
        self._inputs: dict[str, bytes] = {}  # graph input name → its ValueInfoProto
        self._nodes: list[bytes] = []
        self._initializers: list[bytes] = []
        self._outputs: list[bytes] = []
        self._node_names: set[str] = set()
        # (type, dims, file, offset, length) of each external initializer → its name: a tensor two stages
        # reference (a tied head's embedding matrix) is one initializer, its bytes loaded once
        self._by_reference: dict[bytes, str] = {}

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def add(self, stage: Stage) -> dict[str, str]:
        """Append ``stage``; returns its outputs (engine name → composed value name)."""
        graph = self._read_model(stage)
        parts = _group(message_fields(memoryview(graph)))
        if 15 in parts:
            raise NotComposable(f"{stage.prefix}: sparse initializers")
        inputs = [_value_info(v) for v in parts.get(11, [])]
        outputs = [_value_info(v) for v in parts.get(12, [])]
        rename = {name: self._input(name, raw) for name, _, raw in inputs}
        produced = {name: name if name in self.global_outputs else f"{stage.prefix}/{name}" for name, _, _ in outputs}

        alias: dict[str, str] = {}  # initializers that are an earlier stage's (the same bytes of the same file)

        def name(value: str) -> str:
            if not value:
                return value  # an omitted optional input
            return rename.get(value) or produced.get(value) or alias.get(value) or f"{stage.prefix}/{value}"

        for tensor in parts.get(5, []):
            own = _tensor(tensor, name, stage.folder)
            key = _external_key(own)
            if key is not None and key in self._by_reference:  # a tied head reads the prelude's embedding
                alias[_tensor_name(tensor)] = self._by_reference[key]
                continue
            if key is not None:
                self._by_reference[key] = name(_tensor_name(tensor))
            self._initializers.append(own)
        for node in parts.get(1, []):
            self._nodes.append(self._node_copy(node, name, stage.prefix))
        out = {}
        for value, elem_type, raw in outputs:
            target = produced[value]
            if value in rename:  # an output that is one of the stage's inputs: passed through
                self.node("Identity", [rename[value]], [target])
            if value in self.global_outputs:
                self._outputs.append(_rename_value_info(raw, target))
            self.types[target] = elem_type
            self._declared[target] = raw
            out[value] = target
        self.values.update(out)
        return out

    def residual_sum(self, prefix: str, residual: str, routed: list[str]) -> str:
        """The engine's ``(residual + Σ routed).astype(residual's type)``: the partitions' float32 outputs added
        in order, reshaped to the residual's shape, the sum done in float32."""
        total = routed[0]
        for i, more in enumerate(routed[1:]):
            total = self.node("Add", [total, more], [f"{prefix}/routed_sum_{i}"])
        shape = self.node("Shape", [residual], [f"{prefix}/residual_shape"])
        total = self.node("Reshape", [total, shape], [f"{prefix}/routed_shaped"])
        act = self.types[residual]
        if act == FLOAT:
            hidden = self.node("Add", [residual, total], [f"{prefix}/hidden"])
        else:
            wide = self.node("Cast", [residual], [f"{prefix}/residual_f32"], to=FLOAT)
            summed = self.node("Add", [wide, total], [f"{prefix}/hidden_f32"])
            hidden = self.node("Cast", [summed], [f"{prefix}/hidden"], to=act)
        self.types[hidden] = act
        return hidden

    def expose(self, value: str) -> None:
        """Make a stage's internal ``value`` an output of the graph too (the engine reads routing from it)."""
        self._outputs.append(_rename_value_info(self._declared[value], value))

    def node(self, op: str, inputs: list[str], outputs: list[str], **int_attrs: int) -> str:
        fields = [_bytes_field(1, i) for i in inputs] + [_bytes_field(2, o) for o in outputs]
        fields += [_bytes_field(3, self._unique(outputs[0])), _bytes_field(4, op)]
        fields += [_message(5, _bytes_field(1, key) + _varint_field(3, value) + _varint_field(20, _INT_ATTRIBUTE))
                   for key, value in int_attrs.items()]
        self._nodes.append(b"".join(fields))
        return outputs[0]

    def model(self) -> bytes:
        graph = b"".join([*(_message(1, n) for n in self._nodes), _bytes_field(2, "decoder"),
                          *(_message(5, t) for t in self._initializers),
                          *(_message(11, v) for v in self._inputs.values()),
                          *(_message(12, v) for v in self._outputs)])
        opsets = [_message(8, (_bytes_field(1, domain) if domain else b"") + _varint_field(2, version))
                  for domain, version in sorted(self.opsets.items())]
        return b"".join([_varint_field(1, self.ir_version), _bytes_field(2, "dsedge.runtime.compose"),
                         _message(7, graph), *opsets])

    # --- one stage's messages ---------------------------------------------------------------------
    def _read_model(self, stage: Stage) -> memoryview:
        graph = None
        for field, wire, value in message_fields(memoryview(stage.model)):
            if field == 1 and wire == 0:
                self.ir_version = max(self.ir_version, value)
            elif field == 8 and wire == 2:
                opset = _group(message_fields(value))
                domain = bytes(opset.get(1, [b""])[-1])
                self.opsets[domain] = max(self.opsets.get(domain, 0), int(opset.get(2, [0])[-1]))
            elif field == 7 and wire == 2:
                graph = value
            elif field in (20, 25):
                raise NotComposable(f"{stage.prefix}: training info or functions")
        if graph is None:
            raise NotComposable(f"{stage.prefix}: no graph")
        return graph

    def _node_copy(self, node: memoryview, name, prefix: str) -> bytes:
        out, label = [], ""
        for field, wire, value in message_fields(node):
            if field in (1, 2) and wire == 2:
                out.append(_bytes_field(field, name(bytes(value).decode())))
            elif field == 3 and wire == 2:
                label = bytes(value).decode()
            elif field == 5 and wire == 2:
                if any(f in (6, 11, 22, 23) or f in (5, 10) and _external(t) for f, _, t in message_fields(value)):
                    raise NotComposable(f"{prefix}: an attribute holding a graph, a sparse or an external tensor")
                out.append(_message(5, value))
            else:
                out.append(_raw_field(field, wire, value))
            if field == 4 and wire == 2 and not label:
                label = bytes(value).decode()
        return b"".join(out) + _bytes_field(3, self._unique(f"{prefix}/{label}"))

    def _input(self, name: str, raw: bytes) -> str:
        """Where a stage input comes from: a value an earlier stage produced, else an input of the graph."""
        if name in self.values:
            return self.values[name]
        self._inputs.setdefault(name, raw)
        return name

    def _unique(self, wanted: str) -> str:
        name, n = wanted, 1
        while name in self._node_names:
            n += 1
            name = f"{wanted}_{n}"
        self._node_names.add(name)
        return name


def _tensor(tensor: memoryview, name, folder: str) -> bytes:
    """An initializer renamed, its external-data location made relative to the bundle root (the composed graph
    has no file of its own: onnxruntime resolves its locations from the folder the session is told)."""
    out = []
    for field, wire, value in message_fields(tensor):
        if field == 8 and wire == 2:
            out.append(_bytes_field(8, name(bytes(value).decode())))
        elif field == 13 and wire == 2:
            entry = _group(message_fields(value))
            key = bytes(entry.get(1, [b""])[-1])
            text = bytes(entry.get(2, [b""])[-1]).decode()
            if key == b"location" and folder not in ("", "."):
                text = str(PurePosixPath(folder) / text)
            out.append(_message(13, _bytes_field(1, key) + _bytes_field(2, text)))
        else:
            out.append(_raw_field(field, wire, value))
    return b"".join(out)


def _external_key(tensor: bytes) -> bytes | None:
    """Everything but the name of an external-data TensorProto (dims, type, location, offset, length): equal
    keys are the same bytes of the same file. None for a tensor stored inline."""
    fields = list(message_fields(memoryview(tensor)))
    if not any(f == 14 and w == 0 and v == 1 for f, w, v in fields):
        return None
    return b"".join(_raw_field(f, w, v) for f, w, v in fields if f != 8)


def _external(tensor: memoryview) -> bool:
    """Whether a TensorProto's data_location (field 14) is EXTERNAL (1)."""
    return any(f == 14 and w == 0 and v == 1 for f, w, v in message_fields(tensor))


def _value_info(raw: memoryview) -> tuple[str, int, bytes]:
    """(name, element type, the message) of a ValueInfoProto."""
    return (*value_info_type(raw), bytes(raw))


def _rename_value_info(raw: bytes, name: str) -> bytes:
    rest = [_raw_field(f, w, v) for f, w, v in message_fields(memoryview(raw)) if f != 1]
    return _bytes_field(1, name) + b"".join(rest)


def stage_prefix(role: str, layer: int | None = None, experts: tuple[int, int] | None = None) -> str:
    """``prelude``/``head``, ``layers.3`` (the monolithic graph's layer prefix, which the node profiler parses),
    ``layers.3.experts`` (a fused layer) or ``layers.3.experts.0-8`` (a partition)."""
    if layer is None:
        return role
    if role == "layer":
        return f"layers.{layer}"
    return f"layers.{layer}.experts" if experts is None else f"layers.{layer}.experts.{experts[0]}-{experts[1]}"
