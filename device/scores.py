"""Confidence scores on model outputs. Pure numpy, no I/O."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .modelcard import OutputSpec


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float


def dequantize(raw: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Raw output tensor -> float32 values (logits or probabilities)."""
    if spec.quantization is None:
        return raw.astype(np.float32, copy=False)
    q = spec.quantization
    return (raw.astype(np.float32) - q.zero_point) * np.float32(q.scale)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(raw: np.ndarray, spec: OutputSpec) -> np.ndarray:
    values = dequantize(raw, spec)
    return softmax(values) if spec.kind == "logits" else values


def max_softmax(probs: np.ndarray) -> Prediction:
    """The reference score: the top class and its probability (one sample)."""
    flat = probs.reshape(-1)
    label = int(flat.argmax())
    return Prediction(label, float(flat[label]))


def max_softmax_batch(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = probs.argmax(axis=-1)
    return labels, np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]


def top1(raw: np.ndarray, spec: OutputSpec) -> Prediction:
    """max_softmax(probabilities(raw, spec)) for one sample, in fewer numpy calls (the per-input hot path).

    For logits the top probability is 1 / sum(exp(l - max(l))).
    """
    values = dequantize(raw, spec).reshape(-1)
    label = int(values.argmax())
    if spec.kind == "logits":
        return Prediction(label, float(1.0 / np.exp(values - values[label]).sum()))
    return Prediction(label, float(values[label]))
