"""List the external-data file locations an ONNX model refers to, without the onnx package.

The runtime must reject a tampered graph whose external data points outside its bundle, but it does not
depend on ``onnx``. ONNX files are protobuf; this walks every message type that can hold a TensorProto
and only the fields on the way to one, so that no tensor onnxruntime would load escapes the check.

Field numbers, from onnx/onnx.proto (github.com/onnx/onnx @ f7546912):

- ModelProto: graph = 7, training_info = 20, functions = 25
- TrainingInfoProto: initialization = 1, algorithm = 2 (both GraphProto)
- GraphProto: node = 1, initializer = 5, sparse_initializer = 15
- NodeProto: attribute = 5
- AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23
- FunctionProto: node = 7, attribute_proto = 11 (default attribute values)
- SparseTensorProto: values = 1, indices = 2 (both TensorProto)
- TensorProto: name = 8, external_data = 13, data_location = 14 (DataLocation.EXTERNAL = 1)
- StringStringEntryProto: key = 1, value = 2

A malformed file raises ValueError (callers turn it into their own UserError): a declared length past
the end of the buffer, an over-long varint, a group wire type (ONNX uses none), nesting deeper than
``MAX_DEPTH`` messages, or a tensor marked EXTERNAL without a location.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# Message nesting limit. protobuf's own parsers stop at 100; the deepest graph dsedge exports nests
# a few If/Loop bodies (model → graph → node → attribute → graph … ≈ 4 levels per body).
MAX_DEPTH = 100
_MAX_VARINT_BYTES = 10  # a 64-bit varint never needs more
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# message type → {field number: message type of that (length-delimited) field}; "tensor" is the leaf.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor",
                  23: "sparse_tensor"},
    "function": {7: "node", 11: "attribute"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
}


@dataclass(frozen=True)
class ExternalRange:
    """One tensor's external data: its bytes [offset, offset + length) of ``location`` (length None: to the
    end of the file, as onnxruntime reads it)."""

    tensor: str
    location: str
    offset: int
    length: int | None


def external_data_locations(model_bytes: bytes) -> set[str]:
    """Every external-data ``location`` in an ONNX ModelProto, wherever a TensorProto can sit."""
    return {r.location for r in external_data_ranges(model_bytes)}


def external_data_ranges(model_bytes: bytes) -> list[ExternalRange]:
    """Every external-data reference (location, offset, length) in an ONNX ModelProto, wherever a TensorProto
    can sit; an offset or length that is not a non-negative integer raises ValueError."""
    return list(_locations(memoryview(model_bytes), "model", 0))


def _locations(buf: memoryview, kind: str, depth: int) -> Iterator[ExternalRange]:
    if depth > MAX_DEPTH:
        raise ValueError(f"protobuf messages nested deeper than {MAX_DEPTH} levels")
    if kind == "tensor":
        yield from _tensor_locations(buf)
        return
    children = _CHILDREN[kind]
    for field, wire, value in _fields(buf):
        child = children.get(field)
        if child is not None and wire == 2:  # a known field with another wire type is an unknown field
            yield from _locations(value, child, depth + 1)


def _tensor_locations(tensor: memoryview) -> Iterator[ExternalRange]:
    name, data_location, locations, where = b"", 0, [], {}
    for field, wire, value in _fields(tensor):
        if field == 8 and wire == 2:
            name = bytes(value)
        elif field == 14 and wire == 0:
            data_location = value  # protobuf: the last occurrence of a scalar field wins
        elif field == 13 and wire == 2:
            key, entry = _string_entry(value)
            if key == b"location":
                locations.append(entry)
            elif key in (b"offset", b"length"):
                where[key] = entry  # onnxruntime reads the last entry of each key
    label = name.decode("utf-8", "replace")
    if data_location == _EXTERNAL and not locations:
        raise ValueError(f"tensor {label!r} has data_location EXTERNAL but no external_data location")
    offset, length = _count(where.get(b"offset", b"0"), label, "offset"), where.get(b"length")
    length = None if length is None else _count(length, label, "length")
    for location in locations:
        if not location:
            raise ValueError(f"tensor {label!r} has an empty external_data location")
        try:
            yield ExternalRange(label, location.decode("utf-8"), offset, length)
        except UnicodeDecodeError:
            raise ValueError(f"tensor {label!r} has an external_data location that is not UTF-8") from None


def _count(raw: bytes, tensor: str, key: str) -> int:
    """A non-negative decimal integer, as an external_data offset or length must be."""
    text = raw.decode("ascii", "replace")
    if not text.isdigit():
        raise ValueError(f"tensor {tensor!r} has external_data {key} {text[:40]!r}, not a non-negative integer")
    return int(text)


def _string_entry(entry: memoryview) -> tuple[bytes, bytes]:
    """(key, value) of a StringStringEntryProto; the last occurrence of each wins, as in protobuf."""
    kv = {1: b"", 2: b""}
    for field, wire, value in _fields(entry):
        if field in kv and wire == 2:
            kv[field] = bytes(value)
    return kv[1], kv[2]


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values are views."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if size > end - pos:
                raise ValueError(f"protobuf field {field} declares {size} bytes but {end - pos} remain")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if width > end - pos:
                raise ValueError("truncated protobuf message")
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return result, pos + i + 1
    raise ValueError(f"varint longer than {_MAX_VARINT_BYTES} bytes")


def initializer_dims(model_bytes: bytes, name: str) -> tuple[int, ...] | None:
    """The dims of the main graph's initializer ``name`` (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.dims = 1, packed or not), or None when the graph has no such initializer."""
    wanted = name.encode("utf-8")
    for field, wire, graph in _fields(memoryview(model_bytes)):
        if field != 7 or wire != 2:
            continue
        for gfield, gwire, tensor in _fields(graph):
            if gfield == 5 and gwire == 2:
                dims, tensor_name = _tensor_dims(tensor)
                if tensor_name == wanted:
                    return dims
    return None


def _tensor_dims(tensor: memoryview) -> tuple[tuple[int, ...], bytes]:
    dims: list[int] = []
    name = b""
    for field, wire, value in _fields(tensor):
        if field == 8 and wire == 2:
            name = bytes(value)
        elif field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed repeated int64
            pos = 0
            while pos < len(value):
                dim, pos = _varint(value, pos)
                dims.append(dim)
    return tuple(dims), name


def tensor_dims(tensor: memoryview) -> tuple[int, ...]:
    """A TensorProto's dims (packed or not)."""
    return _tensor_dims(memoryview(tensor))[0]


def tensor_external_range(tensor: memoryview) -> ExternalRange | None:
    """A TensorProto's external data (its last location, as onnxruntime reads it), or None when it is stored
    inline."""
    ranges = list(_tensor_locations(memoryview(tensor)))
    return ranges[-1] if ranges else None


def tensor_name(tensor: memoryview) -> str:
    """A TensorProto's name (field 8; the last occurrence wins, as in protobuf)."""
    name = b""
    for field, wire, value in _fields(memoryview(tensor)):
        if field == 8 and wire == 2:
            name = bytes(value)
    return name.decode()


def value_info_type(raw: memoryview) -> tuple[str, int]:
    """(name, tensor element type) of a ValueInfoProto (name = 1, type = 2 → tensor_type = 1 → elem_type = 1;
    0 when it declares no tensor type)."""
    name, elem_type = b"", 0
    for field, wire, value in _fields(memoryview(raw)):
        if field == 1 and wire == 2:
            name = bytes(value)
        elif field == 2 and wire == 2:
            for tfield, twire, tensor_type in _fields(value):
                if tfield == 1 and twire == 2:
                    for efield, ewire, elem in _fields(tensor_type):
                        if efield == 1 and ewire == 0:
                            elem_type = elem
    return name.decode(), int(elem_type)


message_fields = _fields  # the field reader, for dsedge.runtime.compose's rewriting of stage graphs
