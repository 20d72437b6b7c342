"""What a .tflite file holds: its operators, and how many of them the Edge TPU runs.

edgetpu_compiler replaces every run of operators it maps to the Edge TPU with
one custom operator, ``edgetpu-custom-op``; whatever it could not map stays a
plain TFLite operator that the interpreter runs on the CPU. So the file itself
says whether it was compiled and how much is left on the CPU, without the
delegate library or a device: ``inspect_model(bytes)``.

Read by hand, not with a schema package: the ``tflite`` package on PyPI is not
a dependency of the runtime (and not installed on devices), and the schema
module inside ai-edge-litert is an internal file that pulls in ``flatbuffers``.
Four fields of the TFLite schema (operator codes, subgraphs, their operators,
each operator's code index) are a few dozen lines of bounds-checked reads, and
this way a controller can inspect a model without any TFLite runtime.

``edge-infer inspect-model MODEL.tflite`` (or ``python -m edge_infer.backends.tflitemodel``) prints the report.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from . import BackendError

#: the custom operator edgetpu_compiler puts in place of each segment it maps to the Edge TPU
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
#: TFLite's file identifier (bytes 4-8 of every model the converter writes)
FILE_IDENTIFIER = b"TFL3"
#: TFLite BuiltinOperator codes 0-161, in order (the enum is append-only; later codes are reported by number)
BUILTIN_NAMES = tuple("""
    ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE EMBEDDING_LOOKUP
    FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D LOCAL_RESPONSE_NORMALIZATION
    LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN
    SOFTMAX SPACE_TO_DEPTH SVDF TANH CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD
    UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE
    UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT LOG_SOFTMAX
    DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX MINIMUM LESS NEG PADV2 GREATER
    GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL
    NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR
    ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD
    RANGE RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL
    REVERSE_V2 ADD_N GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG
    ROUND HARD_SWISH IF WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY
    SEGMENT_SUM BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D
    IMAG REAL COMPLEX_ABS HASHTABLE HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL
    CONV_3D_TRANSPOSE VAR_HANDLE READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL
    BUCKETIZE RANDOM_UNIFORM MULTINOMIAL GELU DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD
    UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2 UNSORTED_SEGMENT_MIN SIGN BITCAST BITWISE_XOR
    RIGHT_SHIFT""".split())
_CUSTOM = 32
#: the operators that hold a model's arithmetic: one of them left on the CPU costs more than the rest together
HEAVY_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D",
                       "BATCH_MATMUL", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM"})


@dataclass(frozen=True)
class ModelOps:
    """The operators of one .tflite file, counted per subgraph node."""

    #: the schema version the file declares (3 for every current converter)
    schema_version: int
    subgraphs: int
    #: operator nodes in all subgraphs
    operators: int
    #: nodes that are ``edgetpu-custom-op``: each is one segment edgetpu_compiler mapped to the Edge TPU
    edgetpu_ops: int
    #: nodes the interpreter runs on the CPU (everything else)
    cpu_ops: int
    #: (operator name, nodes) left on the CPU, most frequent first
    cpu_op_counts: tuple[tuple[str, int], ...]

    @property
    def compiled_for_edgetpu(self) -> bool:
        return self.edgetpu_ops > 0

    @property
    def cpu_share(self) -> float:
        """Share of the file's operator nodes that run on the CPU (0.0 for an empty graph)."""
        return self.cpu_ops / self.operators if self.operators else 0.0

    @property
    def heavy_cpu_ops(self) -> tuple[str, ...]:
        """Convolutions, fully connected layers and the like that stay on the CPU."""
        return tuple(name for name, _ in self.cpu_op_counts if name in HEAVY_OPS)

    @property
    def mostly_cpu(self) -> bool:
        """More nodes on the CPU than on the Edge TPU, or any heavy operator left there.

        A node count is a proxy: one Edge TPU node holds a whole segment of the
        original graph (the exact table is in edgetpu_compiler's log), so a single
        small CPU op beside it is not "mostly"; a convolution on the CPU always is.
        """
        return self.cpu_share > 0.5 or bool(self.heavy_cpu_ops)

    def summary(self) -> str:
        cpu = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in self.cpu_op_counts) or "none"
        if not self.compiled_for_edgetpu:
            return (f"not compiled for the Edge TPU (no {EDGETPU_CUSTOM_OP}): all {self.operators} operators run "
                    f"on the CPU ({cpu})")
        return (f"compiled for the Edge TPU: {self.edgetpu_ops} Edge TPU segment(s) ({EDGETPU_CUSTOM_OP}), "
                f"{self.cpu_ops} of {self.operators} operator nodes ({self.cpu_share:.0%}) on the CPU ({cpu})")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cpu_op_counts"] = dict(self.cpu_op_counts)
        d.update(compiled_for_edgetpu=self.compiled_for_edgetpu, cpu_share=round(self.cpu_share, 4),
                 heavy_cpu_ops=list(self.heavy_cpu_ops), mostly_cpu=self.mostly_cpu)
        return d


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked reads of flatbuffer tables, vectors and strings (little-endian, as the format is)."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise _Malformed(f"offset {pos} is outside the file ({len(self.buf)} bytes)")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos)

    def deref(self, pos: int) -> int:
        """The position a uoffset at ``pos`` points to."""
        return pos + self.u32(pos)

    def field(self, table: int, index: int) -> int | None:
        """The position of field ``index`` of the table at ``table``, or None when it is absent."""
        vtable = table - self._unpack("<i", table)
        vsize = self._unpack("<H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vsize:
            return None
        off = self._unpack("<H", vtable + slot)
        return table + off if off else None

    def scalar(self, table: int, index: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, index)
        return default if pos is None else self._unpack(fmt, pos)

    def vector(self, table: int, index: int, elem_size: int = 4) -> tuple[int, int]:
        """(position of the first element, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        start = self.deref(pos)
        n = self.u32(start)
        if start + 4 + n * elem_size > len(self.buf):
            raise _Malformed(f"a vector of {n} elements at {start} runs past the end of the file")
        return start + 4, n

    def tables(self, table: int, index: int) -> list[int]:
        first, n = self.vector(table, index)
        return [self.deref(first + 4 * i) for i in range(n)]

    def string(self, table: int, index: int) -> str | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        start = self.deref(pos)
        n = self.u32(start)
        if start + 4 + n > len(self.buf):
            raise _Malformed(f"a string of {n} bytes at {start} runs past the end of the file")
        return self.buf[start + 4:start + 4 + n].decode("utf-8", errors="replace")


def _op_name(builtin: int, custom: str | None) -> str:
    if builtin == _CUSTOM:
        return custom or "CUSTOM (unnamed)"
    return BUILTIN_NAMES[builtin] if 0 <= builtin < len(BUILTIN_NAMES) else f"BUILTIN_{builtin}"


def _opcode_names(r: _Reader, model: int) -> list[str]:
    names = []
    for code in r.tables(model, 1):                       # Model.operator_codes
        deprecated = r.scalar(code, 0, "<b")              # OperatorCode.deprecated_builtin_code (int8)
        builtin = r.scalar(code, 3, "<i")                 # OperatorCode.builtin_code (int32, schema >= 2.4)
        # Older files set only the int8 field; newer ones set it to 127 for codes past it. The larger is right.
        names.append(_op_name(max(deprecated, builtin), r.string(code, 1)))
    return names


def inspect_model(data: bytes, where: str = "the model") -> ModelOps:
    """Count the operators of a .tflite file. Raises BackendError (exit 2) for bytes that are not one."""
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise BackendError(f"{where} is not a TFLite model (no {FILE_IDENTIFIER.decode()} identifier at byte 4; "
                           f"{len(data)} bytes): point the card at the .tflite file edgetpu_compiler or the "
                           "TFLite converter wrote")
    r = _Reader(data)
    try:
        model = r.deref(0)
        version = r.scalar(model, 0, "<I")
        names = _opcode_names(r, model)
        used: Counter[str] = Counter()
        subgraphs = r.tables(model, 2)                    # Model.subgraphs
        for subgraph in subgraphs:
            first, n = r.vector(subgraph, 3)              # SubGraph.operators
            for i in range(n):
                index = r.scalar(r.deref(first + 4 * i), 0, "<I")   # Operator.opcode_index
                if index >= len(names):
                    raise _Malformed(f"an operator uses operator code {index}, but the file has {len(names)}")
                used[names[index]] += 1
    except (_Malformed, struct.error) as exc:
        raise BackendError(f"{where} is not a valid TFLite model ({exc}); it may be truncated or damaged: "
                           "copy it again and check its sha256 against the card") from None
    tpu = used.pop(EDGETPU_CUSTOM_OP, 0)
    cpu = tuple(sorted(used.items(), key=lambda kv: (-kv[1], kv[0])))
    return ModelOps(schema_version=version, subgraphs=len(subgraphs), operators=tpu + sum(used.values()),
                    edgetpu_ops=tpu, cpu_ops=sum(used.values()), cpu_op_counts=cpu)


def inspect_file(path: str | Path) -> ModelOps:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BackendError(f"{path} cannot be read: {exc.strerror or exc}") from None
    return inspect_model(data, str(path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help=".tflite files (e.g. model_edgetpu.tflite)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")


def run(args: argparse.Namespace) -> int:
    """Print what runs where for each model file; exit 0, 1 when one is not compiled, 2 when one is unreadable."""
    worst = 0
    for path in args.models:
        try:
            ops = inspect_file(path)
        except BackendError as exc:
            print(exc, file=sys.stderr)   # the message names the file
            worst = 2
            continue
        print(json.dumps({"file": path, **ops.as_dict()}) if args.json else f"{path}: {ops.summary()}")
        if not ops.compiled_for_edgetpu:
            worst = max(worst, 1)
    return worst


DESCRIPTION = ("Which operators of a .tflite model the Edge TPU runs, and which stay on the CPU (read from the "
               "file; no device or runtime needed). Exit 0: every file is compiled for the Edge TPU; 1: one is "
               "not; 2: one is not a readable TFLite model.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_infer.backends.tflitemodel", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
