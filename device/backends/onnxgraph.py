"""What an .onnx file holds: its inputs, outputs, operators and weight types, read from the bytes.

The TensorRT backend needs three facts before it builds an engine, and on a
device with neither the ``onnx`` package nor onnxruntime: the model's one input
and output (name, element type, dimensions: is the batch dimension dynamic?),
and its precision. Under strong typing, which is all TensorRT 11 offers and
what this project builds with on TensorRT 10 too, the precision is the file's:
QuantizeLinear/DequantizeLinear nodes make an INT8 engine, float16 weights an
FP16 one. So the file itself says which engine it makes, and the card that
names it cannot be mistaken for another precision's.

Read by hand, like :mod:`.tflitemodel` reads TFLite files: the protobuf wire
format (varints and length-delimited fields) and six message types of
``onnx.proto`` (ModelProto, GraphProto, NodeProto, TensorProto,
ValueInfoProto, TypeProto) are a few dozen lines of bounds-checked reads.
Only the main graph is read (no subgraphs of If/Loop nodes: the edge models
have none), and weights kept in external data files are counted by type only.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import BackendError

#: onnx.TensorProto.DataType -> numpy-style names (the ones a card or TensorRT tensor can have, and a few more)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16", 17: "float8e4m3fn"}
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
PRECISIONS = ("fp32", "fp16", "int8")

# field numbers in onnx.proto (onnx/onnx.proto3; stable since IR version 3)
_MODEL_IR_VERSION, _MODEL_OPSET, _MODEL_GRAPH = 1, 8, 7
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_NODE_OP_TYPE, _NODE_DOMAIN = 4, 7
_TENSOR_DATA_TYPE, _TENSOR_NAME = 2, 8
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: ``dims`` holds ints, or the symbolic name ("batch"), or None (unknown)."""

    name: str
    dtype: str
    dims: tuple[int | str | None, ...]

    @property
    def batch_is_dynamic(self) -> bool:
        return bool(self.dims) and not (isinstance(self.dims[0], int) and self.dims[0] > 0)


@dataclass(frozen=True)
class OnnxGraph:
    ir_version: int
    #: (domain, version) of each operator set the model imports ("" is the default ONNX domain)
    opsets: tuple[tuple[str, int], ...]
    #: the inputs that are not initializers (older exporters list the weights as inputs too)
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    #: (op_type, nodes), most frequent first; custom domains as "domain.op_type"
    op_counts: tuple[tuple[str, int], ...]
    #: (element type, initializers): what the weights are stored as
    initializer_types: tuple[tuple[str, int], ...]

    def count(self, op: str) -> int:
        return dict(self.op_counts).get(op, 0)

    @property
    def quantized(self) -> bool:
        """Explicitly quantized: both QuantizeLinear and DequantizeLinear nodes."""
        return all(self.count(op) for op in QDQ_OPS)

    @property
    def precision(self) -> str:
        """The engine TensorRT makes of it, strongly typed: int8 (Q/DQ), fp16 (float16 weights) or fp32."""
        if self.quantized:
            return "int8"
        if dict(self.initializer_types).get("float16", 0):
            return "fp16"
        return "fp32"

    def summary(self) -> str:
        ops = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in self.op_counts) or "none"
        return f"{self.precision} ONNX graph, {sum(n for _, n in self.op_counts)} nodes ({ops})"


class _Malformed(Exception):
    pass


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"a varint runs past its message at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"a varint longer than 10 bytes at byte {pos}")


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of one message: value is an int, or (start, end) of a length-delimited
    field's bytes."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed(f"a field of {n} bytes at byte {pos} runs past its message")
            yield number, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            pos += 8
            yield number, wire, None
        elif wire == 5:
            pos += 4
            yield number, wire, None
        else:   # 3/4: groups, which onnx.proto never uses; 6/7 do not exist
            raise _Malformed(f"wire type {wire} at byte {pos}")
        if pos > end:
            raise _Malformed("a fixed-size field runs past its message")


def _string(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0]:span[1]].decode("utf-8", errors="replace")


def _signed(value: int) -> int:
    """An int64 field's varint as the signed number (negative numbers are 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _dims(buf: bytes, span: tuple[int, int]) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for number, wire, value in _fields(buf, *span):
        if number != _SHAPE_DIM or wire != 2:
            continue
        dim: int | str | None = None
        for n, w, v in _fields(buf, *value):
            if n == _DIM_VALUE and w == 0:
                dim = _signed(v)
            elif n == _DIM_PARAM and w == 2:
                dim = _string(buf, v)
        dims.append(dim)
    return tuple(dims)


def _value_info(buf: bytes, span: tuple[int, int]) -> TensorInfo:
    name, dtype, dims = "", "unknown", ()
    for number, wire, value in _fields(buf, *span):
        if number == _VALUE_NAME and wire == 2:
            name = _string(buf, value)
        elif number == _VALUE_TYPE and wire == 2:
            for n, w, v in _fields(buf, *value):
                if n != _TYPE_TENSOR or w != 2:
                    continue   # sequence/map types: left "unknown", which no card accepts
                for tn, tw, tv in _fields(buf, *v):
                    if tn == _TENSOR_ELEM_TYPE and tw == 0:
                        dtype = ELEM_TYPES.get(tv, f"onnx type {tv}")
                    elif tn == _TENSOR_SHAPE and tw == 2:
                        dims = _dims(buf, tv)
    return TensorInfo(name, dtype, dims)


def _node(buf: bytes, span: tuple[int, int]) -> str:
    op, domain = "", ""
    for number, wire, value in _fields(buf, *span):
        if number == _NODE_OP_TYPE and wire == 2:
            op = _string(buf, value)
        elif number == _NODE_DOMAIN and wire == 2:
            domain = _string(buf, value)
    return f"{domain}.{op}" if domain not in ("", "ai.onnx") else op


def _initializer(buf: bytes, span: tuple[int, int]) -> tuple[str, str]:
    name, dtype = "", "unknown"
    for number, wire, value in _fields(buf, *span):
        if number == _TENSOR_DATA_TYPE and wire == 0:
            dtype = ELEM_TYPES.get(value, f"onnx type {value}")
        elif number == _TENSOR_NAME and wire == 2:
            name = _string(buf, value)
    return name, dtype


def inspect_onnx(data: bytes, where: str = "the model") -> OnnxGraph:
    """The main graph of an .onnx file. Raises BackendError (exit 2) for bytes that are not one."""
    try:
        ir_version, opsets, graph = 0, [], None
        for number, wire, value in _fields(data):
            if number == _MODEL_IR_VERSION and wire == 0:
                ir_version = value
            elif number == _MODEL_OPSET and wire == 2:
                domain, version = "", 0
                for n, w, v in _fields(data, *value):
                    if n == _OPSET_DOMAIN and w == 2:
                        domain = _string(data, v)
                    elif n == _OPSET_VERSION and w == 0:
                        version = v
                opsets.append((domain, version))
            elif number == _MODEL_GRAPH and wire == 2:
                graph = value
        if graph is None or not ir_version:
            raise _Malformed("no graph" if ir_version else "no ir_version")
        ops: Counter[str] = Counter()
        weights: Counter[str] = Counter()
        weight_names: set[str] = set()
        inputs, outputs = [], []
        for number, wire, value in _fields(data, *graph):
            if wire != 2:
                continue
            if number == _GRAPH_NODE:
                ops[_node(data, value)] += 1
            elif number == _GRAPH_INITIALIZER:
                name, dtype = _initializer(data, value)
                weight_names.add(name)
                weights[dtype] += 1
            elif number == _GRAPH_INPUT:
                inputs.append(_value_info(data, value))
            elif number == _GRAPH_OUTPUT:
                outputs.append(_value_info(data, value))
    except _Malformed as exc:
        raise BackendError(f"{where} is not a valid ONNX model ({exc}); it may be truncated or damaged, or not "
                           "an .onnx file: copy it again and check its sha256 against the card") from None
    if not ops:
        raise BackendError(f"{where} is not an ONNX model (its graph has no nodes; {len(data)} bytes): point the "
                           "card at the .onnx file the exporter wrote")

    def by_count(c: Counter[str]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    return OnnxGraph(ir_version=ir_version, opsets=tuple(opsets),
                     inputs=tuple(i for i in inputs if i.name not in weight_names), outputs=tuple(outputs),
                     op_counts=by_count(ops), initializer_types=by_count(weights))
