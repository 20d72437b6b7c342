"""Inference backends, one file each, found by name through a registry.

Entries are import paths, resolved only when asked for, so the package
imports (and its tests run) on machines without pycoral or tensorrt.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..modelcard import ModelCard


class BackendError(RuntimeError):
    """A backend cannot be created or has failed; the message says what to do."""


class Backend(Protocol):
    name: str
    #: e.g. "ai-edge-litert 2.3.0", for status lines and reports
    runtime: str

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run one batch-of-one input tensor; return the raw output tensor (1, classes)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendOptions:
    runtime: str = "auto"
    num_threads: int = 1


#: name -> "module:factory". The Edge TPU and TensorRT backends join here.
REGISTRY: dict[str, str] = {
    "tflite-cpu": "edge_infer.backends.tflite_cpu:create",
}


def available() -> dict[str, str]:
    """name -> "ok" or the reason it cannot load on this machine."""
    result = {}
    for name, target in REGISTRY.items():
        module_name = target.split(":")[0]
        try:
            module = importlib.import_module(module_name)
            probe = getattr(module, "probe", None)
            result[name] = probe() if probe else "ok"
        except ImportError as exc:
            result[name] = f"unavailable: {exc}"
    return result


def create_backend(name: str, card: ModelCard, model_bytes: bytes, options: BackendOptions) -> Backend:
    target = REGISTRY.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(sorted(REGISTRY))}")
    module_name, factory = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from exc
    return getattr(module, factory)(card, model_bytes, options)
