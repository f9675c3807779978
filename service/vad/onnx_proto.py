"""Just enough of ONNX's protobuf encoding to read a model's tensors and write a small graph.

The ``onnx`` package is not part of our stack, and we need two things only: the float tensors
of ``silero_vad.onnx`` (its weights) and a way to hand onnxruntime a graph we build from them
(:mod:`service.vad.dense`). Protobuf's wire format is simple enough to do both by hand: a field
is a varint key ``(number << 3) | wire type`` followed by a varint, 8 or 4 fixed bytes, or a
length-prefixed payload. Field numbers are those of ``onnx/onnx.proto``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

# onnx.proto field numbers used here.
MODEL_IR_VERSION, MODEL_PRODUCER, MODEL_GRAPH, MODEL_OPSET = 1, 2, 7, 8
OPSET_DOMAIN, OPSET_VERSION = 1, 2
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 2, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_I, ATTR_S, ATTR_T, ATTR_G, ATTR_INTS, ATTR_TYPE = 1, 3, 4, 5, 6, 8, 20
ATTR_TYPE_INT, ATTR_TYPE_STRING, ATTR_TYPE_INTS = 2, 3, 7
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_INT64_DATA = 1, 2, 4, 7
TENSOR_NAME, TENSOR_RAW_DATA = 8, 9
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_ELEM_TYPE, TENSOR_SHAPE, SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2, 1, 1, 2

FLOAT, INT32, INT64 = 1, 6, 7  # TensorProto.DataType
_DTYPES: dict[int, np.dtype[np.generic]] = {
    FLOAT: np.dtype("<f4"),
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
}

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

Field = tuple[int, int, int | bytes]


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(data: bytes) -> Iterator[Field]:
    """``(number, wire type, value)`` for each field of one message, in order."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == VARINT:
            value, i = _varint(data, i)
        elif wire == FIXED64:
            value, i = data[i : i + 8], i + 8
        elif wire == FIXED32:
            value, i = data[i : i + 4], i + 4
        elif wire == LENGTH:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_varints(data: bytes) -> list[int]:
    out, i = [], 0
    while i < len(data):
        value, i = _varint(data, i)
        out.append(value)
    return out


def read_tensor(data: bytes) -> tuple[str, npt.NDArray[np.generic] | None]:
    """A TensorProto's name and its value (float32 or int64), or None for other types."""
    dims: list[int] = []
    name, dtype, raw = "", 0, b""
    floats: list[bytes] = []  # float_data: packed, or one fixed32 per element
    ints: list[int] = []  # int64_data: packed, or one varint per element
    for number, _, value in fields(data):
        if number == TENSOR_DIMS:
            dims.extend([value] if isinstance(value, int) else _packed_varints(value))
        elif number == TENSOR_DATA_TYPE:
            assert isinstance(value, int)
            dtype = value
        elif number == TENSOR_NAME:
            assert isinstance(value, bytes)
            name = value.decode()
        elif number == TENSOR_RAW_DATA:
            assert isinstance(value, bytes)
            raw = value
        elif number == TENSOR_FLOAT_DATA:
            assert isinstance(value, bytes)
            floats.append(value)
        elif number == TENSOR_INT64_DATA:
            ints.extend([value] if isinstance(value, int) else _packed_varints(value))
    if dtype not in _DTYPES:
        return name, None
    if raw or floats:
        array = np.frombuffer(raw or b"".join(floats), dtype=_DTYPES[dtype]).copy()
    else:  # varints are unsigned on the wire: int64 values above 2**63 are negatives
        array = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in ints], dtype=np.int64)
    return name, array.reshape(dims)


def read_tensors(model: bytes) -> dict[str, npt.NDArray[np.generic]]:
    """Every named float32/int64 tensor of a ModelProto: initializers and ``Constant`` nodes'
    values, in the main graph and in subgraphs (``If`` branches), keyed by their own names."""
    out: dict[str, npt.NDArray[np.generic]] = {}
    for number, _, value in fields(model):
        if number == MODEL_GRAPH:
            assert isinstance(value, bytes)
            _graph_tensors(value, out)
    return out


def _graph_tensors(graph: bytes, out: dict[str, npt.NDArray[np.generic]]) -> None:
    for number, _, value in fields(graph):
        if number == GRAPH_INITIALIZER:
            assert isinstance(value, bytes)
            name, array = read_tensor(value)
            if array is not None:
                out[name] = array
        elif number == GRAPH_NODE:
            assert isinstance(value, bytes)
            _node_tensors(value, out)


def _node_tensors(node: bytes, out: dict[str, npt.NDArray[np.generic]]) -> None:
    node_fields = list(fields(node))
    outputs = [v.decode() for n, _, v in node_fields if n == NODE_OUTPUT and isinstance(v, bytes)]
    is_constant = any(n == NODE_OP_TYPE and v == b"Constant" for n, _, v in node_fields)
    for number, _, value in node_fields:
        if number != NODE_ATTRIBUTE or not isinstance(value, bytes):
            continue
        for a_number, _, a_value in fields(value):
            if a_number == ATTR_T and is_constant and outputs and isinstance(a_value, bytes):
                _, array = read_tensor(a_value)
                if array is not None:
                    out[outputs[0]] = array
            elif a_number == ATTR_G and isinstance(a_value, bytes):
                _graph_tensors(a_value, out)


# -- writing ---------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields encode negatives as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | VARINT) + _encode_varint(value)


def _bytes(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _encode_varint(number << 3 | LENGTH) + _encode_varint(len(data)) + data


def tensor(name: str, array: npt.ArrayLike) -> bytes:
    """A TensorProto (float32 or int64) with its data as ``raw_data`` (little-endian)."""
    a = np.asarray(array)
    code = INT64 if np.issubdtype(a.dtype, np.integer) else FLOAT
    a = np.ascontiguousarray(a, dtype=_DTYPES[code])
    dims = b"".join(_int(TENSOR_DIMS, d) for d in a.shape)
    return (
        dims
        + _int(TENSOR_DATA_TYPE, code)
        + _bytes(TENSOR_NAME, name)
        + _bytes(TENSOR_RAW_DATA, a.tobytes())
    )


def attribute_int(name: str, value: int) -> bytes:
    return _bytes(ATTR_NAME, name) + _int(ATTR_I, value) + _int(ATTR_TYPE, ATTR_TYPE_INT)


def attribute_str(name: str, value: str) -> bytes:
    return _bytes(ATTR_NAME, name) + _bytes(ATTR_S, value) + _int(ATTR_TYPE, ATTR_TYPE_STRING)


def attribute_ints(name: str, values: Sequence[int]) -> bytes:
    packed = b"".join(_int(ATTR_INTS, v) for v in values)
    return _bytes(ATTR_NAME, name) + packed + _int(ATTR_TYPE, ATTR_TYPE_INTS)


def node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    name: str = "",
    attributes: Sequence[bytes] = (),
) -> bytes:
    return (
        b"".join(_bytes(NODE_INPUT, i) for i in inputs)
        + b"".join(_bytes(NODE_OUTPUT, o) for o in outputs)
        + _bytes(NODE_NAME, name or outputs[0])
        + _bytes(NODE_OP_TYPE, op_type)
        + b"".join(_bytes(NODE_ATTRIBUTE, a) for a in attributes)
    )


def value_info(name: str, shape: Sequence[int | str], elem_type: int = FLOAT) -> bytes:
    """A typed graph input or output; a ``str`` dimension is symbolic (``"batch"``)."""
    dims = b"".join(
        _bytes(SHAPE_DIM, _bytes(DIM_PARAM, d) if isinstance(d, str) else _int(DIM_VALUE, d))
        for d in shape
    )
    tensor_type = _int(TENSOR_ELEM_TYPE, elem_type) + _bytes(TENSOR_SHAPE, dims)
    return _bytes(VALUE_NAME, name) + _bytes(VALUE_TYPE, _bytes(TYPE_TENSOR, tensor_type))


def model(
    *,
    nodes: Sequence[bytes],
    initializers: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    name: str,
    opset: int = 17,
    ir_version: int = 8,
) -> bytes:
    """A serialized ModelProto with one graph in the default (``ai.onnx``) domain."""
    graph = (
        b"".join(_bytes(GRAPH_NODE, n) for n in nodes)
        + _bytes(GRAPH_NAME, name)
        + b"".join(_bytes(GRAPH_INITIALIZER, t) for t in initializers)
        + b"".join(_bytes(GRAPH_INPUT, i) for i in inputs)
        + b"".join(_bytes(GRAPH_OUTPUT, o) for o in outputs)
    )
    opset_id = _bytes(OPSET_DOMAIN, "") + _int(OPSET_VERSION, opset)
    return (
        _int(MODEL_IR_VERSION, ir_version)
        + _bytes(MODEL_PRODUCER, "streamer")
        + _bytes(MODEL_GRAPH, graph)
        + _bytes(MODEL_OPSET, opset_id)
    )
