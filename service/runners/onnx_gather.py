"""One-node ONNX graphs encoded by hand, so serving needs no `onnx` package.

The protobuf wire format is simple enough for two fixed graphs: `out = Gather(data, indices, axis=0)`
(survivors' rows) and `out = Concat(part0, ..., axis=0)` (flights merged by continuous batching).
Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, ValueInfoProto, TypeProto).
"""

from __future__ import annotations

IR_VERSION = 8
OPSET = 13
INT64 = 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: list[str]) -> bytes:
    shape = b"".join(_field_bytes(1, _field_bytes(2, d)) for d in dims)  # Dimension.dim_param
    tensor = _field_varint(1, elem_type) + _field_bytes(2, shape)
    return _field_bytes(1, name) + _field_bytes(2, _field_bytes(1, tensor))


def build_concat(elem_type: int, rank: int, parts: int) -> bytes:
    """Serialized ModelProto: out = Concat(part0, ..., part{parts-1}, axis=0) of rank-`rank` tensors."""
    dims = [f"d{i}" for i in range(rank)]
    names = [f"part{i}" for i in range(parts)]
    axis = _field_bytes(1, "axis") + _field_varint(3, 0) + _field_varint(20, 2)  # AttributeProto: name, i, type INT
    node = b"".join(_field_bytes(1, name) for name in names) + _field_bytes(2, "out") + _field_bytes(3, "concat") \
        + _field_bytes(4, "Concat") + _field_bytes(5, axis)
    graph = (
        _field_bytes(1, node)
        + _field_bytes(2, "concat_rows")
        + b"".join(_field_bytes(11, _value_info(name, elem_type, [f"n{i}", *dims[1:]])) for i, name in enumerate(names))
        + _field_bytes(12, _value_info("out", elem_type, ["n", *dims[1:]]))
    )
    return _model(graph)


def build(elem_type: int, rank: int) -> bytes:
    """Serialized ModelProto gathering rows (axis 0) of a rank-`rank` tensor of ONNX type `elem_type`."""
    dims = [f"d{i}" for i in range(rank)]
    node = _field_bytes(1, "data") + _field_bytes(1, "indices") + _field_bytes(2, "out") + _field_bytes(3, "gather") + _field_bytes(4, "Gather")
    graph = (
        _field_bytes(1, node)
        + _field_bytes(2, "compact_rows")
        + _field_bytes(11, _value_info("data", elem_type, dims))
        + _field_bytes(11, _value_info("indices", INT64, ["n"]))
        + _field_bytes(12, _value_info("out", elem_type, ["n", *dims[1:]]))
    )
    return _model(graph)


def _model(graph: bytes) -> bytes:
    """ModelProto around a serialized GraphProto: IR version, producer, default-domain opset."""
    opset = _field_bytes(1, "") + _field_varint(2, OPSET)
    return _field_varint(1, IR_VERSION) + _field_bytes(2, "exitserve") + _field_bytes(7, graph) + _field_bytes(8, opset)
