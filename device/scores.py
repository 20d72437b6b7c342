"""Confidence scores on model outputs: the one list of score names, softmax, the device's
fast top-1, and the scorer factory the device and ``edge-infer calibrate`` share.
Pure numpy, no I/O.

Every score maps float logits ``(N, C)`` (already dequantized) to ``(N,)`` values in
[0, 1] where HIGHER means MORE confident: the device offloads an input when its score
is below the configured threshold.

=============  ==============================================================
max_softmax    the largest softmax probability (the reference method)
temperature    the largest probability of ``softmax(logits / T)``, T fitted on
               validation data by ``edge-infer calibrate``
margin         ``p1 - p2``: top-1 minus top-2 softmax probability
entropy        ``1 - H(p) / log(C)``: 1 for a one-hot answer, 0 for uniform
router         a small logistic regression or MLP on features of the logits,
               trained on labelled validation data: the predicted probability
               that the edge answer is right (or that the cloud would NOT fix
               it); see :mod:`edge_infer.router`
=============  ==============================================================

A new score is a name in :data:`SCORES` and a branch in :func:`make_scorer`; the
device configuration, ``edge-infer calibrate`` and its plot take their lists from here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .modelcard import OutputSpec
from .router import FEATURES, FittedRouter, RouterParams
from .views import combine

#: Every score, simplest first (calibration prefers the earlier one on a tie).
SCORES: tuple[str, ...] = ("max_softmax", "temperature", "margin", "entropy", "router")

Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float


@dataclass(frozen=True)
class ScoreParams:
    temperature: float = 1.0
    router: RouterParams | None = None


# ----------------------------------------------------------------------------- model outputs

def dequantize(raw: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """Raw output tensor -> float32 values (logits or probabilities)."""
    if spec.quantization is None:
        return raw.astype(np.float32, copy=False)
    q = spec.quantization
    return (raw.astype(np.float32) - q.zero_point) * np.float32(q.scale)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` over the last axis, in the logits' float type."""
    z = logits if temperature == 1.0 else logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(raw: np.ndarray, spec: OutputSpec) -> np.ndarray:
    values = dequantize(raw, spec)
    return softmax(values) if spec.kind == "logits" else values


def as_score_logits(values: np.ndarray, kind: str) -> np.ndarray:
    """Dequantized model output -> the float32 logits the scorers take.

    ``kind`` is the card's output kind. Probabilities become log-probabilities
    (``softmax(log p) == p``), floored at 1e-7 so a zero from an int8 softmax stays finite.
    """
    x = np.asarray(values, dtype=np.float32)
    if kind == "logits":
        return x
    if kind == "probabilities":
        return np.log(np.maximum(x, np.float32(1e-7)))
    raise ValueError(f"unknown output kind {kind!r} (logits or probabilities)")


def max_softmax_batch(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probabilities -> (labels, their probabilities): max_softmax with its label."""
    labels = probs.argmax(axis=-1)
    return labels, np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]


def views_score_logits(outputs: list[np.ndarray], spec: OutputSpec) -> np.ndarray:
    """The model's raw outputs, one per test-time view, as ``spec`` describes them -> (C,) float32
    score logits: the log of the views' mean softmax (:func:`edge_infer.views.combine`)."""
    return combine(np.stack([as_score_logits(dequantize(r, spec), spec.kind).reshape(-1) for r in outputs]))


def top1(raw: np.ndarray, spec: OutputSpec) -> Prediction:
    """max_softmax(probabilities(raw, spec)) for one sample: the per-input hot path.

    For logits the top probability is 1 / sum(exp(l_i - l_max)), and for int8 logits
    the zero point cancels in the differences. On ten values plain Python is ~3x
    faster than numpy's per-call overhead (measured); the unit tests check it
    against the reference computation.
    """
    values = raw.ravel().tolist()
    label = max(range(len(values)), key=values.__getitem__)
    top = values[label]
    if spec.kind != "logits":
        q = spec.quantization
        return Prediction(label, float(top if q is None else (top - q.zero_point) * q.scale))
    scale = spec.quantization.scale if spec.quantization is not None else 1.0
    exp = math.exp
    return Prediction(label, 1.0 / sum(exp((v - top) * scale) for v in values))


# ----------------------------------------------------------------------------- the scores

def _as_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, C) with C >= 2, got {x.shape}")
    return x


def max_prob(probs: np.ndarray) -> np.ndarray:
    return probs.max(axis=1)


def top2_margin(values: np.ndarray) -> np.ndarray:
    top2 = np.partition(values, values.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def normalized_confidence_entropy(probs: np.ndarray) -> np.ndarray:
    """1 - H(p)/log(C), in [0, 1]."""
    c = probs.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    h = -plogp.sum(axis=1)
    return np.clip(1.0 - h / math.log(c), 0.0, 1.0)


def router_features(logits: np.ndarray, features: tuple[str, ...] | list[str], temperature: float = 1.0) -> np.ndarray:
    """(N, C) logits -> (N, F) raw (unstandardised) router features, groups in the given order
    (names and widths: :data:`edge_infer.router.FEATURES`)."""
    z = _as_logits(logits)
    n, c = z.shape
    probs = softmax(z, temperature)
    cols: list[np.ndarray] = []
    for name in features:
        if name == "probs_sorted":
            cols.append(-np.sort(-probs, axis=1))
        elif name == "logits_sorted":
            cols.append(-np.sort(-z, axis=1))
        elif name == "max_prob":
            cols.append(max_prob(probs)[:, None])
        elif name == "margin":
            cols.append(top2_margin(probs)[:, None])
        elif name == "logit_margin":
            cols.append(top2_margin(z)[:, None])
        elif name == "entropy":
            cols.append(normalized_confidence_entropy(probs)[:, None])
        elif name == "predicted_class":
            onehot = np.zeros((n, c))
            onehot[np.arange(n), z.argmax(axis=1)] = 1.0
            cols.append(onehot)
        elif name == "probs":
            cols.append(probs)
        else:
            raise ValueError(f"unknown router feature {name!r}; known: {', '.join(FEATURES)}")
    return np.concatenate(cols, axis=1) if cols else np.zeros((n, 0))


def make_scorer(name: str, params: ScoreParams = ScoreParams()) -> Scorer:
    """The confidence function the device and ``edge-infer calibrate`` both use.

    Returns ``f(logits (N, C)) -> (N,) float64`` in [0, 1], higher = more confident.
    """
    if name == "max_softmax":
        return lambda logits: max_prob(softmax(_as_logits(logits)))
    if name == "temperature":
        t = float(params.temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {params.temperature!r}")
        return lambda logits: max_prob(softmax(_as_logits(logits), t))
    if name == "margin":
        return lambda logits: top2_margin(softmax(_as_logits(logits)))
    if name == "entropy":
        return lambda logits: normalized_confidence_entropy(softmax(_as_logits(logits)))
    if name == "router":
        router = params.router
        if router is None:
            raise ValueError("score 'router' needs router parameters: set [policy] router_file to the router JSON "
                             "written by `edge-infer calibrate`")
        fitted = FittedRouter.from_params(router)

        def score(logits: np.ndarray) -> np.ndarray:
            z = _as_logits(logits)
            if z.shape[1] != router.num_classes:
                raise ValueError(f"the router was trained for {router.num_classes} classes, the logits have "
                                 f"{z.shape[1]}: recalibrate for this model")
            return fitted.predict(router_features(z, router.features, router.temperature))

        return score
    raise ValueError(f"unknown score {name!r}; choose one of: {', '.join(SCORES)}")
