"""Pure pieces of the cascade-aware edge recipe (train_cascade.py): the augmentation, the
training targets, the reference loss, and the cascade metrics a variant is judged by.

numpy only (plus the runtime's own offload-curve code, edge_infer.calibration.curves), so the
unit test runs in the development venv without TensorFlow; train_cascade.py checks its
TensorFlow loss against :func:`cascade_loss` before it trains.

The cascade rule is the device's: keep the edge label when the max-softmax of the edge
logits is >= t, else take the cloud label; t is chosen on validation for the cloud's
validation accuracy (what ``edge-infer calibrate --target cloud`` does) and measured on test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_infer.calibration.curves import (
    BootstrapDiff, auc, bootstrap_kept_difference, evaluate_threshold, kept_share_at, offload_curve,
)
from edge_infer.calibration.threshold import Target, select_threshold

NUM_CLASSES = 10


# ---------------------------------------------------------------- augmentation

def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 2,
            flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random crop with ``pad`` zero pixels each side, and a random horizontal flip.

    images: uint8 (N, H, W). Returns (augmented uint8 (N, H, W), flipped bool (N,)); the
    flipped mask says which teacher view (plain or mirrored) belongs to each image.
    """
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flipped = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
    rows = dy[:, None] + np.arange(h)[None, :]                 # (N, H)
    cols = dx[:, None] + np.arange(w)[None, :]                 # (N, W)
    cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out, flipped


# ---------------------------------------------------------------- targets and loss

def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


@dataclass(frozen=True)
class LossConfig:
    """The per-sample training loss.

    base = distill_weight * T^2 * KL(teacher_T || student_T) + (1 - distill_weight) * CE(label)
    On a sample the student gets wrong (and, with ``gate_only_cloud_right``, the cloud gets
    right: only there does offloading help), the loss becomes
    (1 - gate_weight) * base + gate_weight * KL(student || uniform): the Gatekeeper idea
    (arXiv 2502.19335), be unsure where you are wrong, so max-softmax ranks the errors.
    gate_weight 0 is plain distillation; distill_weight 0 and gate_weight 0 is plain CE.
    """
    temperature: float = 3.0
    distill_weight: float = 0.7
    gate_weight: float = 0.0
    gate_only_cloud_right: bool = True

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("distill_weight", "gate_weight"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "distill_weight": self.distill_weight,
                "gate_weight": self.gate_weight, "gate_only_cloud_right": self.gate_only_cloud_right}


def pack_targets(labels: np.ndarray, teacher_logits: np.ndarray, cloud_ok: np.ndarray,
                 temperature: float) -> np.ndarray:
    """float32 (N, C + 2): the teacher's softened probabilities, the label, cloud-right (0/1).

    Keras passes one y_true array to a loss; this is its layout (see :func:`unpack_targets`).
    """
    q = softmax(teacher_logits, temperature)
    return np.concatenate([q, np.asarray(labels, np.float64)[:, None],
                           np.asarray(cloud_ok, np.float64)[:, None]], axis=1).astype(np.float32)


def unpack_targets(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = y.shape[1] - 2
    return y[:, :c], y[:, c].astype(np.int64), y[:, c + 1] > 0.5


def cascade_loss(student_logits: np.ndarray, y: np.ndarray, cfg: LossConfig) -> np.ndarray:
    """The per-sample loss of :class:`LossConfig` (the reference the TensorFlow loss must match)."""
    q, labels, cloud_ok = unpack_targets(np.asarray(y, dtype=np.float64))
    t = cfg.temperature
    logp_t = log_softmax(student_logits, t)
    kd = (q * (np.log(np.maximum(q, 1e-12)) - logp_t)).sum(axis=1) * t * t
    logp = log_softmax(student_logits)
    ce = -logp[np.arange(len(labels)), labels]
    base = cfg.distill_weight * kd + (1.0 - cfg.distill_weight) * ce
    if cfg.gate_weight == 0.0:
        return base
    kl_uniform = (np.exp(logp) * logp).sum(axis=1) + np.log(logp.shape[1])
    gated = np.argmax(student_logits, axis=1) != labels
    if cfg.gate_only_cloud_right:
        gated &= cloud_ok
    return np.where(gated, (1.0 - cfg.gate_weight) * base + cfg.gate_weight * kl_uniform, base)


# ---------------------------------------------------------------- cascade metrics

def max_softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=1)


@dataclass(frozen=True)
class CascadeMetrics:
    """One edge model beside the cloud model, on validation and test.

    ``*_kept`` is the share of inputs kept on the device at the threshold chosen on
    validation for the cloud's validation accuracy (minus ``tolerance``); None where the
    target is unreachable on validation.
    """
    tolerance: float
    threshold: float | None
    val_kept: float | None
    val_hybrid_accuracy: float | None
    test_kept: float | None
    test_hybrid_accuracy: float | None
    edge_val_accuracy: float
    edge_test_accuracy: float
    cloud_val_accuracy: float
    cloud_test_accuracy: float
    val_auc: float | None      # max-softmax ranking edge-right above edge-wrong
    test_auc: float | None
    test_kept_at_cloud_test: float | None   # read off the test curve itself (not a deployable point)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def cascade_metrics(edge: dict[str, np.ndarray], cloud: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    tolerance: float = 0.0) -> CascadeMetrics:
    """edge/cloud: logits per split ("val", "test"); labels: the true labels per split."""
    score = {s: max_softmax(edge[s]) for s in ("val", "test")}
    edge_ok = {s: edge[s].argmax(1) == labels[s] for s in ("val", "test")}
    cloud_ok = {s: cloud[s].argmax(1) == labels[s] for s in ("val", "test")}
    cloud_val = float(cloud_ok["val"].mean())
    cloud_test = float(cloud_ok["test"].mean())
    val_curve = offload_curve(score["val"], edge_ok["val"], cloud_ok["val"])
    point = select_threshold(val_curve, Target("cloud", max(cloud_val - tolerance, 0.0), tolerance))
    test_point = (None if point is None
                  else evaluate_threshold(score["test"], edge_ok["test"], cloud_ok["test"], point.threshold))
    test_curve = offload_curve(score["test"], edge_ok["test"], cloud_ok["test"])
    return CascadeMetrics(
        tolerance=tolerance,
        threshold=None if point is None else point.threshold,
        val_kept=None if point is None else point.kept_share,
        val_hybrid_accuracy=None if point is None else point.accuracy,
        test_kept=None if test_point is None else test_point.kept_share,
        test_hybrid_accuracy=None if test_point is None else test_point.accuracy,
        edge_val_accuracy=float(edge_ok["val"].mean()),
        edge_test_accuracy=float(edge_ok["test"].mean()),
        cloud_val_accuracy=cloud_val,
        cloud_test_accuracy=cloud_test,
        val_auc=auc(score["val"], edge_ok["val"]),
        test_auc=auc(score["test"], edge_ok["test"]),
        test_kept_at_cloud_test=kept_share_at(test_curve, cloud_test - tolerance),
    )


def paired_kept_bootstrap(logits_a: np.ndarray, logits_b: np.ndarray, cloud_logits: np.ndarray,
                          labels: np.ndarray, tolerance: float = 0.0, resamples: int = 1000,
                          seed: int = 0) -> BootstrapDiff:
    """Is edge model B better for the cascade than edge model A on this labelled set? The paired
    bootstrap of calibrate (kept share of B minus A at the cloud's accuracy minus ``tolerance`` on
    each resample), with each model's own answers: both curves are rebuilt from the same inputs."""
    answers = {"a": logits_a.argmax(1) == labels, "b": logits_b.argmax(1) == labels}
    return bootstrap_kept_difference({"a": max_softmax(logits_a), "b": max_softmax(logits_b)}, answers,
                                     cloud_logits.argmax(1) == labels, reference="a", resamples=resamples,
                                     seed=seed, accuracy_offset=tolerance)["b"]
