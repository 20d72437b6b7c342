"""Test-time views: a model card may ask for its model to be run on a few shifted or mirrored
copies of each input, and the answers averaged. Pure numpy, no I/O.

Why: near the cloud's accuracy, where the threshold is chosen, averaging the softmax over a
few views lets more inputs stay on the device (the shipped Fashion-MNIST model on the image
and its four one-pixel shifts: 63.1% -> 68.3% of test inputs kept at the cloud's accuracy,
bench/offload_curve.py; docs/inputs.md has the whole measurement, including where it does not
help). It costs one invoke per view, which is why it is the model card's choice (the
thresholds are calibrated on it) and never a default.

A view acts on the *fitted* image (uint8, the model's height and width, after colour
conversion and resizing), before normalisation and quantization: the content moves, the
border it uncovers is black (0), as a shifted photo's padding would be. The views' answers
are combined as the log of their mean softmax, which every confidence score takes as
logits (``softmax(log p) == p``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: at most this many views per input (each is one invoke of the model)
MAX_VIEWS = 16


@dataclass(frozen=True)
class View:
    """One copy of the input: mirrored left-right first (``mirror``), then its content moved
    ``dy`` pixels down and ``dx`` pixels right (negative: up, left)."""
    dy: int = 0
    dx: int = 0
    mirror: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.dy or self.dx or self.mirror)


def apply_view(fitted: np.ndarray, view: View) -> np.ndarray:
    """One fitted image (H, W) or (H, W, C) seen through ``view``; same shape and dtype."""
    img = fitted[:, ::-1] if view.mirror else fitted
    dy, dx = view.dy, view.dx
    if not (dy or dx):
        return np.ascontiguousarray(img)
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def expand(fitted: np.ndarray, views: tuple[View, ...]) -> np.ndarray:
    """The fitted image through each view -> (V, H, W[, C])."""
    return np.stack([apply_view(fitted, v) for v in views])


def combine(view_logits: np.ndarray) -> np.ndarray:
    """(V, C) score logits, one row per view -> (C,) float32: the log of the views' mean softmax."""
    z = np.asarray(view_logits, dtype=np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"expected (views, classes) logits, got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return np.log(np.maximum(p.mean(axis=0), 1e-12)).astype(np.float32)
