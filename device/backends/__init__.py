"""Inference backends, one file each, found by name through a registry.

A backend is one module, light at import (its runtime library is imported only
inside ``create()`` and ``probe()``), that defines:

- ``Options``: a frozen dataclass of :func:`edge_infer.tomlcfg.option` fields,
  its ``[backend.<name>]`` config table;
- ``probe(options) -> str``: the runtime that would run ("onnxruntime 1.32.0"),
  or :class:`BackendError` saying what to install; it loads no model;
- ``create(card, model_bytes, options) -> Backend``: the model loaded and
  checked against its card (a mismatch is a :class:`BackendError`, exit 2).

Registry entries are import paths, resolved only when asked for, so the
package imports (and its tests run) on machines without pycoral, tensorrt or
onnxruntime. Adding a backend is that module plus one line in
:data:`REGISTRY`; docs/backends.md walks through the onnxruntime one.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import EdgeInferError
from ..modelcard import ModelCard


class BackendError(EdgeInferError, RuntimeError):
    """A backend cannot be created or has failed; the message says what to do.

    Exit code 2 by default (the operator must act: install a runtime, fix the
    card or the config), so systemd stops restarting. ``transient=True`` marks
    hardware that may come back by itself (an unplugged Edge TPU, a GPU being
    reset): those exit 1 unless told otherwise, and a restart may cure them.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None, transient: bool | None = None) -> None:
        if exit_code is None and transient:
            exit_code = 1
        super().__init__(message, exit_code=exit_code, transient=transient)


@dataclass(frozen=True)
class TensorSpec:
    """A backend's view of its model's input or output tensor."""

    shape: tuple[int, ...]   # -1: dynamic (the batch dimension)
    dtype: str               # numpy dtype name: int8, uint8, float32


class Backend(Protocol):
    name: str
    #: e.g. "ai-edge-litert 2.3.0", for status lines and reports
    runtime: str
    input: TensorSpec
    output: TensorSpec
    #: most inputs one run of the model takes: 1 for batch-of-one models
    max_batch: int

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """One batch-of-one input tensor (card layout and dtype) -> the raw output (1, classes)."""

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        """(N, ...) inputs -> raw outputs (N, classes), any N >= 1, run ``max_batch`` at a time."""

    def close(self) -> None:
        """Release the model; safe to call twice. Invoking afterwards raises BackendError."""


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives; nothing here is imported until it is used."""

    module: str
    #: card formats it runs ("tflite", "onnx"); check-config compares the card without loading anything
    formats: tuple[str, ...]
    factory: str = "create"
    options: str = "Options"
    probe: str = "probe"
    #: one line for `edge-infer backends` and the docs
    summary: str = ""
    #: drives hardware that can fail or vanish under the process (USB/PCIe Edge TPU, a GPU):
    #: such backends run isolated in a child process unless `[model] isolate = false`
    accelerator: bool = False


#: name -> entry. A new backend joins here, one line each.
REGISTRY: dict[str, BackendEntry] = {
    "tflite-cpu": BackendEntry("edge_infer.backends.tflite_cpu", ("tflite",),
                               summary="TFLite on the CPU (ai-edge-litert or tflite-runtime)"),
    "onnxruntime": BackendEntry("edge_infer.backends.onnxrt", ("onnx",),
                                summary="ONNX models with onnxruntime (CPU, or CUDA/TensorRT providers)"),
    "edgetpu": BackendEntry("edge_infer.backends.edgetpu", ("tflite",),
                            summary="Coral Edge TPU (USB, PCIe/M.2, Dev Board): libedgetpu as a TFLite delegate, "
                                    "for models compiled by edgetpu_compiler", accelerator=True),
    "tensorrt": BackendEntry("edge_infer.backends.tensorrt", ("onnx",),
                             summary="NVIDIA GPU (Jetson, x86-64): a TensorRT engine built from the ONNX model and "
                                     "cached; FP16 or INT8 by the model's own types (Q/DQ)", accelerator=True),
}


def unknown_backend_message(name: str, *, named: bool = True) -> str:
    """'unknown backend ...; known backends: ...', with a suggestion for a typo."""
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = f"unknown backend {name!r}" if named else "unknown backend"
    return f"{what}{hint}; known backends: {', '.join(sorted(REGISTRY))}"


def entry(name: str) -> BackendEntry:
    found = REGISTRY.get(name)
    if found is None:
        raise BackendError(unknown_backend_message(name))
    return found


def _module(name: str) -> Any:
    try:
        return importlib.import_module(entry(name).module)
    except ImportError as exc:   # the module itself is light; this is a broken install
        raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from exc


def options_class(name: str) -> type:
    """The frozen dataclass of backend ``name``'s ``[backend.<name>]`` table (imports only its light module)."""
    return getattr(_module(name), entry(name).options)


def default_options(name: str) -> Any:
    return options_class(name)()


def _checked_options(name: str, options: Any) -> Any:
    cls = options_class(name)
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise TypeError(f"backend {name!r} takes {cls.__module__}.{cls.__qualname__}, "
                        f"not {type(options).__module__}.{type(options).__qualname__}")
    return options


def check_backend(name: str, options: Any = None, card: ModelCard | None = None) -> str:
    """What check-config and start ask before loading a model: the backend is known, runs
    this card's format, and its runtime is installed here. Returns the runtime that would
    run; raises BackendError (exit 2) naming the fix."""
    known = entry(name)
    if card is not None:
        _check_format(name, card)
    options = _checked_options(name, options)
    return getattr(_module(name), known.probe)(options)


def _check_format(name: str, card: ModelCard) -> None:
    formats = entry(name).formats
    if card.format not in formats:
        runs_it = ", ".join(n for n, e in sorted(REGISTRY.items()) if card.format in e.formats) or "none"
        raise BackendError(f"backend {name} runs {' or '.join(formats)} models; {card.path} describes a "
                           f"{card.format} model (backends that run it: {runs_it})")


def available() -> dict[str, str]:
    """name -> "ok (runtime)" or "unavailable: the reason" on this machine, default options."""
    result = {}
    for name in REGISTRY:
        try:
            result[name] = f"ok ({check_backend(name)})"
        except BackendError as exc:
            result[name] = f"unavailable: {exc}"
    return result


def create_backend(name: str, card: ModelCard, model_bytes: bytes, options: Any = None) -> Backend:
    """Load ``model_bytes`` (described by ``card``) on backend ``name``.

    ``options``: that backend's ``Options`` (``None``: its defaults).
    """
    known = entry(name)
    options = _checked_options(name, options)
    _check_format(name, card)
    return getattr(_module(name), known.factory)(card, model_bytes, options)


def backend_telemetry(name: str, options: Any = None) -> list[dict[str, Any]]:
    """The hardware readings backend ``name`` offers for the status (its module's optional
    ``telemetry(options) -> list[dict]``: temperature, throttling); [] when it has none or they
    cannot be read. Reads no model and opens no device, so the service calls it beside an
    isolated child."""
    module = _module(name)
    read = getattr(module, "telemetry", None)
    if read is None:
        return []
    try:
        return list(read(_checked_options(name, options)))
    except OSError:
        return []


def invoke_each(backend: Backend, tensor: np.ndarray) -> np.ndarray:
    """``invoke_batch`` for batch-of-one backends: one invoke per input, outputs stacked."""
    if len(tensor) == 1:
        return backend.invoke(tensor)
    return np.concatenate([backend.invoke(tensor[i:i + 1]) for i in range(len(tensor))])


def invoke_chunked(run: Any, tensor: np.ndarray, max_batch: int) -> np.ndarray:
    """``invoke_batch`` for batching backends: ``run`` on at most ``max_batch`` inputs at a time."""
    if len(tensor) <= max_batch:
        return run(tensor)
    return np.concatenate([run(tensor[i:i + max_batch]) for i in range(0, len(tensor), max_batch)])


def __getattr__(attr: str) -> Any:
    # Older callers: BackendOptions(runtime, num_threads) was the one, TFLite-shaped, options record.
    if attr == "BackendOptions":
        from .tflite_cpu import Options
        return Options
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
