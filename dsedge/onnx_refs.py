"""List the external-data file locations an ONNX model refers to, without the onnx package.

The runtime must reject a tampered graph whose external data points outside its bundle, but it does not
depend on ``onnx``. ONNX files are protobuf; this walks only the fields on the way to
``TensorProto.external_data`` (onnx/onnx.proto3: ModelProto.graph = 7, GraphProto.node = 1,
.initializer = 5, NodeProto.attribute = 5, AttributeProto.t = 5, .g = 6, .tensors = 10, .graphs = 11,
TensorProto.external_data = 13, StringStringEntryProto key = 1 / value = 2).
"""

from __future__ import annotations

from collections.abc import Iterator


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _sub(buf: bytes, number: int) -> Iterator[bytes]:
    for field, wire, value in _fields(buf):
        if field == number and wire == 2:
            yield value


def _tensor_locations(tensor: bytes) -> Iterator[str]:
    for entry in _sub(tensor, 13):
        kv = {f: v for f, w, v in _fields(entry) if w == 2}
        if kv.get(1) == b"location":
            yield kv.get(2, b"").decode("utf-8")


def _graph_locations(graph: bytes) -> Iterator[str]:
    for tensor in _sub(graph, 5):
        yield from _tensor_locations(tensor)
    for node in _sub(graph, 1):
        for attribute in _sub(node, 5):
            for tensor in (*_sub(attribute, 5), *_sub(attribute, 10)):
                yield from _tensor_locations(tensor)
            for subgraph in (*_sub(attribute, 6), *_sub(attribute, 11)):
                yield from _graph_locations(subgraph)


def external_data_locations(model_bytes: bytes) -> set[str]:
    """Every external-data ``location`` in an ONNX ModelProto (nested subgraphs included)."""
    return {loc for graph in _sub(model_bytes, 7) for loc in _graph_locations(graph)}
