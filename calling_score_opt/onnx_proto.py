"""The few ONNX protobuf messages cso writes and reads, in protobuf's wire format.

Why by hand: importing the ``onnx`` package takes over a second here (its ``ml_dtypes``
dependency alone about 0.9 s), more than a whole ``cso export`` of a small model should take.
The graphs cso writes use a handful of messages and fields, listed below with their field
numbers from ``onnx/onnx.proto``; the tests hold every graph written here to ``onnx``'s own
parser and ``onnx.checker``, and export checks each file by loading it into onnxruntime and
comparing its scores with the NumPy forward pass.

Reading is for files from anywhere (``cso registry register --model``): the parser only walks
the fields it needs, skips the rest, and raises :class:`OnnxFormatError` on anything malformed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Field numbers (onnx/onnx.proto).
_MODEL_IR_VERSION, _MODEL_PRODUCER, _MODEL_GRAPH, _MODEL_OPSET, _MODEL_METADATA = 1, 2, 7, 8, 14
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 2, 5, 11, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_ATTR_NAME, _ATTR_INT, _ATTR_TYPE = 1, 3, 20
_ATTR_TYPE_INT = 2
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_LOCATION = 1, 2, 8, 9, 14
_TENSOR_LOCATION_EXTERNAL = 1
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2

FLOAT = 1  # TensorProto.FLOAT
INT64 = 7  # TensorProto.INT64
_DATA_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxFormatError(ValueError):
    """The bytes are not an ONNX model this parser can read."""


# --- writing ---------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf writes negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _int(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(value)


def _bytes(number: int, value: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(value)) + value


def _str(number: int, value: str) -> bytes:
    return _bytes(number, value.encode())


@dataclass(frozen=True)
class Node:
    """One operator: ``op`` applied to ``inputs``, giving ``output`` (also its name)."""

    op: str
    inputs: Sequence[str]
    output: str
    int_attributes: Mapping[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = b"".join(_str(_NODE_INPUT, name) for name in self.inputs)
        out += _str(_NODE_OUTPUT, self.output) + _str(_NODE_NAME, self.output)
        out += _str(_NODE_OP, self.op)
        for name, value in self.int_attributes.items():
            attribute = _str(_ATTR_NAME, name) + _int(_ATTR_INT, value)
            attribute += _int(_ATTR_TYPE, _ATTR_TYPE_INT)
            out += _bytes(_NODE_ATTRIBUTE, attribute)
        return out


def tensor(name: str, value: np.ndarray[Any, Any]) -> bytes:
    """An initializer (TensorProto) holding ``value`` (float32 or int64) as raw little-endian."""
    array = np.ascontiguousarray(value)
    data_type = _DATA_TYPES.get(array.dtype)
    if data_type is None:
        raise ValueError(f"initializer {name}: dtype {array.dtype} is not float32 or int64")
    out = b"".join(_int(_TENSOR_DIMS, int(d)) for d in array.shape)
    out += _int(_TENSOR_TYPE, data_type) + _str(_TENSOR_NAME, name)
    return out + _bytes(_TENSOR_RAW, array.astype(array.dtype.newbyteorder("<")).tobytes())


def value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> bytes:
    """A graph input or output: a tensor of ``elem_type`` whose dims are sizes or names."""
    shape = b"".join(
        _bytes(_SHAPE_DIM, _int(_DIM_VALUE, d) if isinstance(d, int) else _str(_DIM_PARAM, d))
        for d in dims
    )
    tensor_type = _int(_TENSOR_TYPE_ELEM, elem_type) + _bytes(_TENSOR_TYPE_SHAPE, shape)
    return _str(_VALUE_NAME, name) + _bytes(_VALUE_TYPE, _bytes(_TYPE_TENSOR, tensor_type))


def model_bytes(
    *,
    graph_name: str,
    nodes: Sequence[Node],
    initializers: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    metadata: Mapping[str, str],
    ir_version: int,
    opset: int,
    producer: str,
) -> bytes:
    """A serialized ModelProto: one graph, the default-domain opset, string metadata."""
    graph = b"".join(_bytes(_GRAPH_NODE, node.encode()) for node in nodes)
    graph += _str(_GRAPH_NAME, graph_name)
    graph += b"".join(_bytes(_GRAPH_INITIALIZER, init) for init in initializers)
    graph += b"".join(_bytes(_GRAPH_INPUT, value) for value in inputs)
    graph += b"".join(_bytes(_GRAPH_OUTPUT, value) for value in outputs)
    out = _int(_MODEL_IR_VERSION, ir_version) + _str(_MODEL_PRODUCER, producer)
    out += _bytes(_MODEL_GRAPH, graph)
    out += _bytes(_MODEL_OPSET, _str(_OPSET_DOMAIN, "") + _int(_OPSET_VERSION, opset))
    for key, value in metadata.items():
        out += _bytes(_MODEL_METADATA, _str(_ENTRY_KEY, key) + _str(_ENTRY_VALUE, value))
    return out


# --- reading ---------------------------------------------------------------------------------


def _read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int, or the bytes of a LEN field."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFormatError("field number 0")
        if wire == _VARINT:
            value, at = _read_varint(data, at)
            yield number, wire, value
        elif wire == _LEN:
            length, at = _read_varint(data, at)
            if at + length > len(data):
                raise OnnxFormatError("a field runs past the end of its message")
            yield number, wire, data[at : at + length]
            at += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if at + size > len(data):
                raise OnnxFormatError("truncated fixed-size field")
            yield number, wire, struct.unpack_from("<q" if size == 8 else "<i", data, at)[0]
            at += size
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")


def _submessages(data: memoryview, number: int) -> list[memoryview]:
    return [v for n, w, v in _fields(data) if n == number and isinstance(v, memoryview)]


def _text(data: memoryview, number: int) -> str:
    found = _submessages(data, number)
    try:
        return bytes(found[-1]).decode() if found else ""
    except UnicodeDecodeError as exc:
        raise OnnxFormatError("a name is not UTF-8") from exc


def _integer(data: memoryview, number: int) -> int | None:
    found = [v for n, w, v in _fields(data) if n == number and isinstance(v, int)]
    if not found:
        return None
    value = found[-1]
    return value - (1 << 64) if value >= 1 << 63 else value  # int64: two's complement


@dataclass(frozen=True)
class TensorValue:
    """A graph input or output as declared: element type and dims (ints, names, or None)."""

    name: str
    elem_type: int | None
    dims: tuple[int | str | None, ...] | None  # None: no shape declared


@dataclass(frozen=True)
class ModelSummary:
    """What cso needs to know of an ONNX file to judge it against the app's contract."""

    inputs: tuple[TensorValue, ...]
    outputs: tuple[TensorValue, ...]
    metadata: dict[str, str]
    external_initializers: tuple[str, ...]  # initializers whose data lives in another file


def _value(data: memoryview) -> TensorValue:
    name, elem, dims = _text(data, _VALUE_NAME), None, None
    for type_proto in _submessages(data, _VALUE_TYPE):
        for tensor_type in _submessages(type_proto, _TYPE_TENSOR):
            elem = _integer(tensor_type, _TENSOR_TYPE_ELEM)
            shapes = _submessages(tensor_type, _TENSOR_TYPE_SHAPE)
            if shapes:
                dims = tuple(
                    _integer(dim, _DIM_VALUE)
                    if _integer(dim, _DIM_VALUE) is not None
                    else (_text(dim, _DIM_PARAM) or None)
                    for dim in _submessages(shapes[-1], _SHAPE_DIM)
                )
    return TensorValue(name, elem, dims)


def read_summary(data: bytes) -> ModelSummary:
    """Inputs, outputs, metadata and external-data use of a serialized ModelProto.

    Raises:
        OnnxFormatError: the bytes are not a well-formed ModelProto with a graph.
    """
    view = memoryview(data)
    graphs = _submessages(view, _MODEL_GRAPH)
    if _integer(view, _MODEL_IR_VERSION) is None or not graphs:
        raise OnnxFormatError("no ONNX model (it has no IR version or no graph)")
    graph = graphs[-1]
    metadata = {
        _text(entry, _ENTRY_KEY): _text(entry, _ENTRY_VALUE)
        for entry in _submessages(view, _MODEL_METADATA)
    }
    external = tuple(
        _text(init, _TENSOR_NAME)
        for init in _submessages(graph, _GRAPH_INITIALIZER)
        if _integer(init, _TENSOR_LOCATION) == _TENSOR_LOCATION_EXTERNAL
    )
    return ModelSummary(
        inputs=tuple(_value(v) for v in _submessages(graph, _GRAPH_INPUT)),
        outputs=tuple(_value(v) for v in _submessages(graph, _GRAPH_OUTPUT)),
        metadata=metadata,
        external_initializers=external,
    )
