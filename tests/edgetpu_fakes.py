"""Edge TPU stand-ins for machines without one: synthetic .tflite files and a fake delegate library.

The .tflite files are written with the TFLite schema module that ships inside
ai-edge-litert (and the ``flatbuffers`` package it depends on): an independent
writer for the hand-written reader in ``edge_infer.backends.tflitemodel``.
The fake delegate (fake_edgetpu.c, built with the system C compiler) has
libedgetpu's two plugin entry points, so the real runtime's ``load_delegate``
loads it: it opens "no device" (returns NULL, as libedgetpu does) or a delegate
that claims no operator.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FAKE_SOURCE = Path(__file__).parent / "integration" / "fake_edgetpu.c"


def schema():
    return pytest.importorskip("ai_edge_litert.schema_py_generated", reason="the TFLite schema ships in ai-edge-litert")


def _finish(model) -> bytes:
    import flatbuffers
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _code(s, name: str):
    code = s.OperatorCodeT()
    if not hasattr(s.BuiltinOperator, name):   # a custom operator, e.g. "edgetpu-custom-op"
        code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
        code.customCode = name
    else:
        number = getattr(s.BuiltinOperator, name)
        code.builtinCode = number
        code.deprecatedBuiltinCode = min(number, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    return code


def synthetic_model(ops: list[str], *, subgraphs: int = 1) -> bytes:
    """A graph-only .tflite (no tensors) whose operators are ``ops`` in order, in each of ``subgraphs``."""
    s = schema()
    names = sorted(set(ops))
    model = s.ModelT()
    model.version = 3
    model.operatorCodes = [_code(s, n) for n in names]
    model.subgraphs = []
    for _ in range(subgraphs):
        sg = s.SubGraphT()
        sg.operators = []
        for name in ops:
            op = s.OperatorT()
            op.opcodeIndex = names.index(name)
            sg.operators.append(op)
        model.subgraphs.append(sg)
    return _finish(model)


def with_first_op_on_the_edgetpu(model_bytes: bytes) -> bytes:
    """The same model with its first operator replaced by ``edgetpu-custom-op`` (what a partial compile looks
    like to the file reader; only a real Edge TPU delegate could run it)."""
    s = schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(model_bytes, 0))
    model.operatorCodes.append(_code(s, "edgetpu-custom-op"))
    op = model.subgraphs[0].operators[0]
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.builtinOptionsType, op.builtinOptions = 0, None
    return _finish(model)


def build_fake_delegate(folder: Path) -> Path:
    """libfake_edgetpu.so built from fake_edgetpu.c; skips where there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc) to build the fake Edge TPU delegate")
    out = folder / "libfake_edgetpu.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(FAKE_SOURCE)], check=True,
                   capture_output=True)
    return out
