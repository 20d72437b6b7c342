"""ONNX models with onnxruntime, on the device.

For Jetson users without TensorRT, and any device that runs an ONNX model:
the same card and preprocessing as every backend, the card's ``format`` is
``onnx``. onnxruntime is imported only inside :func:`probe` and :func:`create`
(the ``onnx`` extra), so this module loads, and the configuration validates,
without it.

A model whose batch dimension is dynamic (``["batch", 1, 28, 28]``) runs up to
``max_batch`` inputs per run in ``invoke_batch``; a static batch-of-one model
runs one at a time.
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..modelcard import ModelCard
from ..tomlcfg import in_range, option
from . import BackendError, TensorSpec, invoke_chunked

log = logging.getLogger(__name__)

#: onnxruntime's tensor type names -> the card's dtype names
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}
INSTALL = "pip install 'edge-infer[onnx]' (onnxruntime; onnxruntime-gpu for the CUDA and TensorRT providers)"


def _providers(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must name at least one execution provider, e.g. [\"CPUExecutionProvider\"]"
    bad = [p for p in value if not p.endswith("ExecutionProvider")]
    if bad:
        return f"{bad[0]!r} is not an execution provider name (they end in 'ExecutionProvider')"
    if len(set(value)) != len(value):
        return "names a provider twice"
    return None


@dataclass(frozen=True, kw_only=True)
class Options:
    """``[backend.onnxruntime]``."""

    intra_op_threads: int = option(1, help="threads one operator may use (0: onnxruntime's default, one per "
                                           "core); measure before raising it", check=in_range(0, 256))
    providers: tuple[str, ...] = option(("CPUExecutionProvider",), help="execution providers, most preferred "
                                        "first (e.g. \"CUDAExecutionProvider\", \"CPUExecutionProvider\"); each "
                                        "must be one this onnxruntime build has (`edge-infer backends`)",
                                        check=_providers)
    max_batch: int = option(32, help="most inputs one run takes when the model's batch dimension is dynamic "
                                     "(1: one at a time)", check=in_range(1, 4096))


def _import_onnxruntime() -> tuple[Any, str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError(f"onnxruntime is not installed ({exc}); install it: {INSTALL}") from None
    try:
        version = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:   # onnxruntime-gpu and vendor builds
        version = getattr(ort, "__version__", "unknown")
    return ort, f"onnxruntime {version}"


def _check_providers(ort: Any, options: Options) -> None:
    have = ort.get_available_providers()
    missing = [p for p in options.providers if p not in have]
    if missing:
        raise BackendError(f"backend.onnxruntime.providers: {', '.join(missing)} not in this onnxruntime build "
                           f"(it has {', '.join(have)}); install the build that has it (onnxruntime-gpu for "
                           "CUDA/TensorRT) or change the list")


def probe(options: Options) -> str:
    """"onnxruntime 1.32.0 on CPUExecutionProvider"; BackendError when it or a provider is missing."""
    ort, runtime = _import_onnxruntime()
    _check_providers(ort, options)
    return f"{runtime} on {', '.join(options.providers)}"


def _static(dim: Any) -> int | None:
    """An ONNX dimension as an int, None when symbolic ("batch") or unknown."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _closed(*_: object) -> Any:
    raise BackendError("the onnxruntime backend is closed")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, card: ModelCard, model_bytes: bytes, options: Options) -> None:
        ort, version = _import_onnxruntime()
        _check_providers(ort, options)
        so = ort.SessionOptions()
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        try:
            self._session = ort.InferenceSession(model_bytes, sess_options=so, providers=list(options.providers))
        except Exception as exc:   # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
            raise BackendError(f"{version} cannot load {card.file}: {exc}. Is it an ONNX model this onnxruntime "
                               "version reads?") from None
        active = self._session.get_providers()
        lost = [p for p in options.providers if p not in active and p != "CPUExecutionProvider"]
        if lost:
            # onnxruntime falls back to the CPU quietly when a GPU provider fails to start: say so instead.
            raise BackendError(f"onnxruntime could not start {', '.join(lost)} (running {', '.join(active)}); "
                               "check the GPU and its driver (nvidia-smi, tegrastats)", transient=True)
        self.runtime = f"{version} on {', '.join(active)}"
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{card.file}: has {len(inputs)} inputs and {len(outputs)} outputs; a card describes "
                               "a model with one of each")
        self.input, dynamic = self._check_input(card, inputs[0])
        self.max_batch = options.max_batch if dynamic else 1
        self._in_name, self._out_names = inputs[0].name, [outputs[0].name]
        self._run = self._session.run
        self.output = self._check_output(card, outputs[0])
        log.info("loaded %s with %s, %d intra-op thread(s), batches of up to %d", card.model_id, self.runtime,
                 options.intra_op_threads, self.max_batch)

    @staticmethod
    def _check_input(card: ModelCard, inp: Any) -> tuple[TensorSpec, bool]:
        spec = card.input
        dtype = _ONNX_DTYPES.get(inp.type, inp.type)
        shape = list(inp.shape)
        ok = len(shape) == len(spec.shape) and dtype == spec.dtype
        if ok:
            # every dimension but the batch: the card's size, or symbolic in the model (the card fixes it)
            ok = all(_static(m) in (None, c) for m, c in zip(shape[1:], spec.shape[1:]))
        batch = _static(shape[0]) if shape else None
        if ok and batch not in (None, 1):
            ok = False    # a model fixed to batches of 8 cannot answer one input
        if not ok:
            raise BackendError(f"{card.file}: input is {tuple(shape)} {dtype}, but the card says {spec.shape} "
                               f"{spec.dtype}; the card does not describe this model")
        return TensorSpec((-1 if batch is None else 1, *spec.shape[1:]), spec.dtype), batch is None

    def _check_output(self, card: ModelCard, out: Any) -> TensorSpec:
        dtype = _ONNX_DTYPES.get(out.type, out.type)
        classes = len(card.labels)
        if dtype != card.output.dtype or len(out.shape) != 2 or _static(out.shape[1]) not in (None, classes):
            raise BackendError(f"{card.file}: output is {tuple(out.shape)} {dtype}, but the card says (N, {classes}) "
                               f"{card.output.dtype} ({classes} labels)")
        # A symbolic class dimension is settled by one run, here rather than on the first input.
        probe_in = np.zeros((1, *self.input.shape[1:]), dtype=self.input.dtype)
        try:
            got = self.invoke(probe_in)
        except Exception as exc:
            raise BackendError(f"{card.file}: onnxruntime cannot run the model on a {probe_in.shape} "
                               f"{probe_in.dtype} input: {exc}") from None
        if got.shape != (1, classes):
            raise BackendError(f"{card.file}: output for one input is {got.shape}; the card has {classes} labels")
        return TensorSpec((-1 if self.max_batch > 1 else 1, classes), dtype)

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        return self._run(self._out_names, {self._in_name: tensor})[0]

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        return invoke_chunked(self.invoke, tensor, self.max_batch)

    def close(self) -> None:
        self._run = _closed
        self._session = None


def create(card: ModelCard, model_bytes: bytes, options: Options) -> OnnxRuntimeBackend:
    if card.format != "onnx":
        raise BackendError(f"backend onnxruntime runs .onnx models; {card.path} describes a {card.format} model")
    return OnnxRuntimeBackend(card, model_bytes, options)
