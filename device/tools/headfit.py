"""Fine-tuning a classification head in numpy: softmax regression on fixed features, and its int8 form.

Pure functions on arrays (no I/O, no clock; the only randomness is the caller's). The head
is ``logits = features @ W.T + b``; fine-tuning minimises the weighted mean cross-entropy
plus ``l2 / 2 * (|W - W0|^2 + |b - b0|^2)``, a pull toward the head the model shipped with,
so that a small archive moves the head only as far as its evidence carries. The problem is
convex and small (classes x features parameters), so plain full-batch gradient descent with
momentum from the old head converges in a few hundred steps, deterministically.

The int8 form follows TFLite's FULLY_CONNECTED: symmetric int8 weights (per output channel
when the model had that), int32 bias at scale ``features_scale * weight_scale``, and an
output requantized to the model's existing output scale and zero point (kept, so the model
card's output quantization stays true; logits beyond its range clip, as they did before).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_MAX = 127
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True, eq=False)
class FloatHead:
    weights: np.ndarray   # (C, F) float64
    bias: np.ndarray      # (C,) float64

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weights.T + self.bias


@dataclass(frozen=True, eq=False)
class QuantHead:
    """An int8 FULLY_CONNECTED head with the quantization of its input and output."""
    q_weights: np.ndarray       # (C, F) int8
    weight_scales: np.ndarray   # (C,) or (1,) float32
    q_bias: np.ndarray          # (C,) int32
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def channel_scales(self) -> np.ndarray:
        """The weight scale of each output channel, (C,) float64."""
        return np.broadcast_to(self.weight_scales.astype(np.float64), (len(self.q_bias),))

    def dequantized(self) -> FloatHead:
        s = self.channel_scales
        return FloatHead(self.q_weights.astype(np.float64) * s[:, None],
                         self.q_bias.astype(np.float64) * (np.float64(np.float32(self.input_scale)) * s))

    def features(self, q_features: np.ndarray) -> np.ndarray:
        """int8 features -> the real values they stand for (float64)."""
        return (np.asarray(q_features, np.float64) - self.input_zero_point) * self.input_scale

    def int8_logits(self, q_features: np.ndarray) -> np.ndarray:
        """What the int8 layer outputs for int8 features (N, F) -> int8 (N, C): the integer
        accumulation, then the real multiplier ``input_scale * weight_scale / output_scale``
        (TFLite's fixed-point multiplier may round a tie the other way: one step at most)."""
        x = np.asarray(q_features, np.int64) - self.input_zero_point
        acc = x @ self.q_weights.astype(np.int64).T + self.q_bias.astype(np.int64)
        mult = np.float64(np.float32(self.input_scale)) * self.channel_scales / self.output_scale
        out = np.round(acc * mult) + self.output_zero_point
        return np.clip(out, -128, 127).astype(np.int8)

    def output_logits(self, q_out: np.ndarray) -> np.ndarray:
        return (np.asarray(q_out, np.float64) - self.output_zero_point) * self.output_scale


@dataclass(frozen=True, eq=False)
class FitResult:
    head: FloatHead
    loss_start: float
    loss_end: float
    #: norm of the objective's gradient at the end (small: converged)
    grad_norm: float
    iterations: int


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _objective(head: FloatHead, x: np.ndarray, y1: np.ndarray, w: np.ndarray, start: FloatHead,
               l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    z = head.logits(x)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    dw, db = head.weights - start.weights, head.bias - start.bias
    loss = float(-(w * (y1 * logp).sum(axis=1)).sum() + l2 / 2 * ((dw ** 2).sum() + (db ** 2).sum()))
    g = (np.exp(logp) - y1) * w[:, None]
    return loss, g.T @ x + l2 * dw, g.sum(axis=0) + l2 * db


def fit_head(features: np.ndarray, labels: np.ndarray, start: FloatHead, *, sample_weight: np.ndarray | None = None,
             l2: float = 0.01, iterations: int = 300, learning_rate: float = 0.5, momentum: float = 0.9) -> FitResult:
    """Fine-tune ``start`` on (features, labels): full-batch gradient descent with momentum."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    classes = start.weights.shape[0]
    if x.ndim != 2 or x.shape[1] != start.weights.shape[1] or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not fit a head of {start.weights.shape}")
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels outside 0..{classes - 1}")
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if len(w) != len(y) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("sample weights must be non-negative, one per input, not all zero")
    w = w / w.sum()
    y1 = np.eye(classes)[y]
    head = FloatHead(start.weights.astype(np.float64).copy(), start.bias.astype(np.float64).copy())
    vw, vb = np.zeros_like(head.weights), np.zeros_like(head.bias)
    loss0, gw, gb = _objective(head, x, y1, w, start, l2)
    for _ in range(iterations):
        vw = momentum * vw - learning_rate * gw
        vb = momentum * vb - learning_rate * gb
        head = FloatHead(head.weights + vw, head.bias + vb)
        loss, gw, gb = _objective(head, x, y1, w, start, l2)
    grad = float(np.sqrt((gw ** 2).sum() + (gb ** 2).sum()))
    return FitResult(head, loss0, loss if iterations else loss0, grad, iterations)


def quantize_head(head: FloatHead, like: QuantHead) -> QuantHead:
    """``head`` in the int8 scheme of ``like``: per-channel weight scales if it has them (else one),
    each the channel's largest magnitude over 127; the input and output quantization kept."""
    w = np.asarray(head.weights, np.float64)
    if w.shape != like.q_weights.shape:
        raise ValueError(f"head of shape {w.shape} for a layer of {like.q_weights.shape}")
    per_channel = len(like.weight_scales) > 1
    peak = np.abs(w).max(axis=1) if per_channel else np.array([np.abs(w).max()])
    scales = (np.maximum(peak, 1e-12) / INT8_MAX).astype(np.float32)
    s = np.broadcast_to(scales.astype(np.float64), (w.shape[0],))
    q_w = np.clip(np.round(w / s[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    bias_scale = np.float64(np.float32(like.input_scale)) * s
    q_b = np.clip(np.round(np.asarray(head.bias, np.float64) / bias_scale), INT32_MIN, INT32_MAX).astype(np.int32)
    return QuantHead(q_w, scales, q_b, like.input_scale, like.input_zero_point, like.output_scale,
                     like.output_zero_point)
