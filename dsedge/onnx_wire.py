"""Protobuf wire-format encoding for the runtime's ONNX graph rewrites, without the onnx package.

The reader is ``dsedge.onnx_refs.message_fields``; these write fields back (dsedge.runtime.compose composes a
partitioned bundle's graphs into one, dsedge.runtime.streamed swaps an expert partition's QMoE for a custom op).
Encoding as in https://protobuf.dev/programming-guides/encoding/: a key is ``field << 3 | wire type``, varints
are little-endian base-128, length-delimited fields carry their size as a varint."""

from __future__ import annotations


def group(fields) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for field, _, value in fields:
        grouped.setdefault(field, []).append(value)
    return grouped


def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement, as protobuf writes them
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def varint_field(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def message(field: int, payload) -> bytes:
    payload = bytes(payload)
    return key(field, 2) + varint(len(payload)) + payload


def bytes_field(field: int, text: str | bytes) -> bytes:
    return message(field, text.encode() if isinstance(text, str) else text)


def raw_field(field: int, wire: int, value) -> bytes:
    """A field re-encoded as it was read (varints decode to their unsigned value, which encodes back to the
    same bytes)."""
    if wire == 0:
        return varint_field(field, value)
    if wire == 2:
        return message(field, value)
    return key(field, wire) + bytes(value)
