"""The classification head of an int8 .tflite model: its last FULLY_CONNECTED layer, read and rewritten.

``edge-infer retrain`` fine-tunes only this layer (docs/closed-loop.md), so it needs three
things from the file, all without a training framework: the head's int8 weights, int32 bias
and quantization scales (:func:`find_head`); a copy of the model whose output is the head's
*input* (the feature vector, :func:`feature_model`), which the interpreter then computes with
the same kernels the device runs; and a copy with new weights, bias and scales written over
the old ones (:func:`write_head`).

Writing in place keeps every size and offset of the flatbuffer: a head has the same shape
before and after, so the weight and bias bytes and the per-channel scale vectors are
overwritten where they are, and nothing else in the file moves. The reads are the
bounds-checked ones of :mod:`edge_infer.backends.tflitemodel` (no schema package). Only
what the shipped edge models use is accepted: one subgraph with one output produced by a
FULLY_CONNECTED layer without a fused activation, int8 features and weights (symmetric,
per-tensor or per-channel), an int32 bias and an int8 output; anything else is refused with
the reason, never half-written.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..backends.tflitemodel import FILE_IDENTIFIER, _Malformed, _opcode_names, _Reader
from ..errors import EdgeInferError
from .headfit import QuantHead

#: TFLite TensorType codes used here
INT32, INT8 = 2, 9
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}
#: BuiltinOptions union tag of FullyConnectedOptions
_FC_OPTIONS = 8


class HeadError(EdgeInferError):
    """The model has no head this tool can read or rewrite; the message says why (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the subgraph, with where its constant bytes and scales sit in the file."""
    index: int
    name: str
    type: int
    shape: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    #: file position and length of the tensor's constant data (0, 0: none, an activation)
    data_pos: int
    data_len: int
    #: file position of the first float32 of its quantization scale vector
    scale_pos: int

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type, f"type {self.type}")


@dataclass(frozen=True)
class Head:
    """The FULLY_CONNECTED layer that produces the model's output."""
    features: TensorInfo
    weights: TensorInfo
    bias: TensorInfo
    output: TensorInfo
    #: file position of the subgraph's output entry (an int32 tensor index)
    output_slot: int

    @property
    def classes(self) -> int:
        return self.weights.shape[0]

    @property
    def width(self) -> int:
        """Features per input (the layer's input size)."""
        return self.weights.shape[1]

    @property
    def per_channel(self) -> bool:
        return len(self.weights.scales) > 1

    def weights_int8(self, model: bytes) -> np.ndarray:
        w = self.weights
        return np.frombuffer(model, np.int8, w.data_len, w.data_pos).reshape(self.classes, self.width).copy()

    def bias_int32(self, model: bytes) -> np.ndarray:
        b = self.bias
        return np.frombuffer(model, "<i4", self.classes, b.data_pos).astype(np.int32)


def _i32_vector(r: _Reader, table: int, index: int) -> tuple[int, list[int]]:
    pos, n = r.vector(table, index, 4)
    return pos, [struct.unpack_from("<i", r.buf, pos + 4 * i)[0] for i in range(n)]


def _tensor(r: _Reader, tensors: list[int], buffers: list[int], index: int, where: str) -> TensorInfo:
    if not 0 <= index < len(tensors):
        raise HeadError(f"{where}: the head names tensor {index}, but the subgraph has {len(tensors)}")
    t = tensors[index]
    _, shape = _i32_vector(r, t, 0)
    ttype = r.scalar(t, 1, "<b")
    buf = r.scalar(t, 2, "<I")
    name = r.string(t, 3) or f"tensor {index}"
    scales: tuple[float, ...] = ()
    zps: tuple[int, ...] = ()
    qdim, scale_pos = 0, 0
    q = r.field(t, 4)
    if q is not None:
        qt = r.deref(q)
        scale_pos, ns = r.vector(qt, 2, 4)
        scales = struct.unpack_from(f"<{ns}f", r.buf, scale_pos) if ns else ()
        zp_pos, nz = r.vector(qt, 3, 8)
        zps = struct.unpack_from(f"<{nz}q", r.buf, zp_pos) if nz else ()
        qdim = r.scalar(qt, 6, "<i")
    data_pos = data_len = 0
    if buf:
        if buf >= len(buffers):
            raise HeadError(f"{where}: tensor {name!r} names buffer {buf}, but the file has {len(buffers)}")
        data_pos, data_len = r.vector(buffers[buf], 0, 1)
        if data_len == 0 and r.scalar(buffers[buf], 1, "<Q"):
            raise HeadError(f"{where}: tensor {name!r} keeps its data outside the flatbuffer (a model over 2 GB); "
                            "this tool rewrites small models only")
    return TensorInfo(index, name, ttype, tuple(shape), tuple(float(s) for s in scales), tuple(int(z) for z in zps),
                      qdim, data_pos, data_len, scale_pos if scales else 0)


def find_head(model: bytes, where: str = "the model") -> Head:
    """The FULLY_CONNECTED layer producing the model's only output. Raises HeadError (exit 2)."""
    if len(model) < 8 or model[4:8] != FILE_IDENTIFIER:
        raise HeadError(f"{where} is not a TFLite model (no {FILE_IDENTIFIER.decode()} identifier at byte 4)")
    r = _Reader(model)
    try:
        root = r.deref(0)
        names = _opcode_names(r, root)
        subgraphs = r.tables(root, 2)
        if len(subgraphs) != 1:
            raise HeadError(f"{where} has {len(subgraphs)} subgraphs; only a single-subgraph classifier is supported")
        sg = subgraphs[0]
        tensors = r.tables(sg, 0)
        buffers = r.tables(root, 4)
        out_pos, outputs = _i32_vector(r, sg, 2)
        if len(outputs) != 1:
            raise HeadError(f"{where} has {len(outputs)} outputs; the head of a classifier with one logits output "
                            "is what can be fine-tuned")
        producer = None
        for op in r.tables(sg, 3):
            _, op_outputs = _i32_vector(r, op, 2)
            if outputs[0] in op_outputs:
                producer = op
        if producer is None:
            raise HeadError(f"{where}: no operator produces the output tensor")
        code = r.scalar(producer, 0, "<I")
        op_name = names[code] if code < len(names) else f"operator code {code}"
        if op_name != "FULLY_CONNECTED":
            raise HeadError(f"{where}: the output is made by {op_name}, not FULLY_CONNECTED; only a model that ends "
                            "in a fully connected layer with logits out (no SOFTMAX) can be fine-tuned this way")
        _, inputs = _i32_vector(r, producer, 1)
        if len(inputs) != 3 or inputs[2] < 0:
            raise HeadError(f"{where}: the FULLY_CONNECTED head has no bias tensor; it cannot be rewritten in place")
        activation = 0
        if r.scalar(producer, 3, "<B") == _FC_OPTIONS and (opt := r.field(producer, 4)) is not None:
            options = r.deref(opt)
            activation = r.scalar(options, 0, "<b")
            if r.scalar(options, 1, "<b"):
                raise HeadError(f"{where}: the head's weights are in a shuffled format; only the default is read")
        if activation:
            raise HeadError(f"{where}: the head has a fused activation (code {activation}); logits need none")
        feats, weights, bias = (_tensor(r, tensors, buffers, i, where) for i in inputs)
        output = _tensor(r, tensors, buffers, outputs[0], where)
        # The converter may point equal constants at one buffer: rewriting it would change them all.
        own = {r.scalar(tensors[weights.index], 2, "<I"), r.scalar(tensors[bias.index], 2, "<I")}
        shared = [i for i, t in enumerate(tensors)
                  if i not in (weights.index, bias.index) and r.scalar(t, 2, "<I") in own]
    except (_Malformed, struct.error, IndexError) as exc:
        raise HeadError(f"{where} is not a valid TFLite model ({exc})") from None
    if shared:
        raise HeadError(f"{where}: the head's weight or bias buffer is shared with tensor {shared[0]}; rewriting it "
                        "would change that tensor too")
    _check(feats, weights, bias, output, where)
    return Head(feats, weights, bias, output, out_pos)


def _check(feats: TensorInfo, weights: TensorInfo, bias: TensorInfo, output: TensorInfo, where: str) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise HeadError(f"{where}: {what}; the head must be a full-int8 FULLY_CONNECTED layer "
                            "(int8 features, weights and output, int32 bias), as the TFLite converter writes")
    need(weights.type == INT8 and len(weights.shape) == 2 and weights.data_len == weights.shape[0] * weights.shape[1],
         f"the head's weights are {weights.type_name} {list(weights.shape)} with {weights.data_len} data bytes")
    classes, width = weights.shape
    need(feats.type == INT8 and feats.data_len == 0 and int(np.prod(feats.shape)) == width
         and len(feats.scales) == 1 and len(feats.zero_points) == 1,
         f"the head's input is {feats.type_name} {list(feats.shape)}, not {width} int8 features of one scale")
    need(len(weights.scales) in (1, classes) and weights.quantized_dimension == 0
         and all(z == 0 for z in weights.zero_points),
         "the head's weights are not symmetric per-tensor or per-output-channel int8")
    need(bias.type == INT32 and bias.shape == (classes,) and bias.data_len == 4 * classes
         and len(bias.scales) == len(weights.scales),
         f"the head's bias is {bias.type_name} {list(bias.shape)} with {len(bias.scales)} scales")
    need(output.type == INT8 and int(np.prod(output.shape)) == classes and len(output.scales) == 1,
         f"the head's output is {output.type_name} {list(output.shape)}, not {classes} int8 logits")


def feature_model(model: bytes, head: Head) -> bytes:
    """A copy of the model whose one output is the head's input: the int8 feature vector.

    Only the subgraph's output entry changes (one int32); the layers and their kernels are
    those of the model itself, so the features are what the device computes before its head.
    """
    out = bytearray(model)
    struct.pack_into("<i", out, head.output_slot, head.features.index)
    return bytes(out)


def write_head(model: bytes, head: Head, q_weights: np.ndarray, weight_scales: np.ndarray,
               q_bias: np.ndarray) -> bytes:
    """A copy of the model with the head's int8 weights, their scales and the int32 bias replaced.

    The bias scale of each channel is the features' scale times that channel's weight scale,
    as TFLite requires; it is written beside the weights' scales. Raises HeadError for values
    of the wrong shape or type (nothing is written then).
    """
    q_weights = np.asarray(q_weights)
    q_bias = np.asarray(q_bias)
    scales = np.asarray(weight_scales, dtype=np.float32).reshape(-1)
    if q_weights.dtype != np.int8 or q_weights.shape != (head.classes, head.width):
        raise HeadError(f"new head weights must be int8 {head.classes}x{head.width}, got {q_weights.dtype} "
                        f"{q_weights.shape}")
    if q_bias.dtype != np.int32 or q_bias.shape != (head.classes,):
        raise HeadError(f"new head bias must be int32 ({head.classes},), got {q_bias.dtype} {q_bias.shape}")
    if len(scales) != len(head.weights.scales) or not np.all(np.isfinite(scales)) or not np.all(scales > 0):
        raise HeadError(f"new head needs {len(head.weights.scales)} positive weight scale(s), got {scales.tolist()}")
    bias_scales = (np.float32(head.features.scales[0]) * scales).astype("<f4")
    out = bytearray(model)
    out[head.weights.data_pos:head.weights.data_pos + head.weights.data_len] = q_weights.tobytes()
    out[head.bias.data_pos:head.bias.data_pos + head.bias.data_len] = q_bias.astype("<i4").tobytes()
    out[head.weights.scale_pos:head.weights.scale_pos + 4 * len(scales)] = scales.astype("<f4").tobytes()
    out[head.bias.scale_pos:head.bias.scale_pos + 4 * len(scales)] = bias_scales.tobytes()
    return bytes(out)


def read_quant_head(model: bytes, head: Head) -> QuantHead:
    """The head's int8 weights, bias and quantization as a :class:`~edge_infer.tools.headfit.QuantHead`."""
    return QuantHead(head.weights_int8(model), np.asarray(head.weights.scales, np.float32), head.bias_int32(model),
                     head.features.scales[0], head.features.zero_points[0], head.output.scales[0],
                     head.output.zero_points[0])
