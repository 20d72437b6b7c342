"""Per-class thresholds: one threshold per predicted edge class, for classes that differ in
difficulty (Fashion-MNIST's shirt, pullover and coat). Pure numpy.

Ten free thresholds fitted to one validation curve would fit its noise, so the thresholds are
one family with one free parameter. A logistic model with an intercept per predicted class
and one shared slope,

    P(keep-label | score s, predicted class c) = sigmoid(a_c + b * logit(s)),

(the keep-label is the router's: the edge answer is right, or the cloud would not fix it)
says how much a given score is worth in each class. Keeping the inputs whose modelled
probability is at least q is a per-class threshold on the score itself,

    t_c(q) = sigmoid((logit(q) - a_c) / b),

so the device needs only the table, on the score it already computes. q is chosen for the
target like a threshold on any score: on **cross-fitted** validation values (each input
scored by a model fitted on the other folds, as for the router), so the choice and the
comparison are not made on the model's own fit. The deployed table comes from the model
refit on all of validation at that q.

The table is chosen only when its kept share at the target beats the same score's single
threshold on validation beyond noise: the paired bootstrap of :mod:`.curves`, whole 95%
interval above zero, as for choosing a score.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .curves import BootstrapDiff, OperatingPoint, bootstrap_kept_difference, offload_curve
from .fitting import RouterTraining, fit_router_arrays, fold_indices, router_labels
from .threshold import Target, select_threshold

log = logging.getLogger(__name__)

#: scores are clipped to [EPS, 1 - EPS] before the logit (max-softmax reaches 1.0)
EPS = 1e-9

CLASS_THRESHOLD_MODES = ("auto", "on", "off")


def score_logit(score: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(score, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(s) - np.log1p(-s)


@dataclass(frozen=True)
class ClassModel:
    """``keep-logit = intercepts[c] + slope * logit(score)`` for predicted class c."""
    intercepts: tuple[float, ...]
    slope: float
    seen: tuple[bool, ...]          # the class was predicted at least once in the fit data

    def keep_probability(self, score: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        z = np.asarray(self.intercepts)[np.asarray(predicted)] + self.slope * score_logit(score)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))

    def thresholds(self, level: float, fallback: float) -> tuple[float, ...]:
        """The score threshold per class that keeps exactly the inputs with keep probability >= ``level``.
        A class never predicted in the fit data gets ``fallback`` (the score's single threshold)."""
        if not self.slope > 0:
            raise ValueError("the class model's slope is not positive: the score does not rank the inputs")
        q = min(max(level, 1e-12), 1.0 - 1e-12)
        lq = math.log(q) - math.log1p(-q)
        out = []
        for a, seen in zip(self.intercepts, self.seen):
            if not seen:
                out.append(float(fallback))
                continue
            u = (lq - a) / self.slope
            out.append(float(1.0 / (1.0 + math.exp(-u))) if u > -700 else 0.0)
        return tuple(min(max(t, 0.0), 1.0) for t in out)


def fit_class_model(score: np.ndarray, predicted: np.ndarray, keep: np.ndarray, num_classes: int,
                    l2: float = 1e-3) -> ClassModel:
    """Fit the logistic model (standardised features, Newton's method, the router's fitter)."""
    pred = np.asarray(predicted, dtype=np.int64)
    onehot = np.zeros((len(pred), num_classes))
    onehot[np.arange(len(pred)), pred] = 1.0
    x = np.concatenate([score_logit(score)[:, None], onehot], axis=1)
    fitted = fit_router_arrays(x, keep, RouterTraining(model="logistic", l2=l2))
    w = fitted.weights[0][:, 0] / fitted.scale        # back to raw features
    base = float(fitted.biases[0][0] - np.dot(w, fitted.mean))
    seen = tuple(bool(v) for v in np.bincount(pred, minlength=num_classes)[:num_classes] > 0)
    return ClassModel(tuple(float(base + w[1 + c]) for c in range(num_classes)), float(w[0]), seen)


def apply_thresholds(score: np.ndarray, predicted: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The device's rule: offload where ``score < thresholds[predicted class]``."""
    return np.asarray(score, dtype=np.float64) < np.asarray(thresholds, dtype=np.float64)[np.asarray(predicted)]


def evaluate_thresholds(score: np.ndarray, predicted: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray,
                        thresholds: Sequence[float], level: float) -> OperatingPoint:
    off = apply_thresholds(score, predicted, thresholds)
    acc = float(np.where(off, np.asarray(cloud_ok, dtype=bool), np.asarray(edge_ok, dtype=bool)).mean())
    return OperatingPoint(float(level), int(off.sum()), len(off), acc)


@dataclass(frozen=True)
class ClassThresholdFit:
    """Per-class thresholds for one score: fitted, compared with its single threshold, chosen or not."""
    score: str
    mode: str                                  # auto, on, off
    chosen: bool
    note: str
    thresholds: tuple[float, ...] | None = None    # by label index
    level: float | None = None                 # q, the keep probability the table cuts at
    model: ClassModel | None = None            # refit on all of validation
    val_cross_fitted: OperatingPoint | None = None   # q on the cross-fitted values (how q was chosen)
    val: OperatingPoint | None = None          # the deployed table on validation (in-sample)
    test: OperatingPoint | None = None         # the deployed table on test
    single_val: OperatingPoint | None = None   # the score's single threshold, for comparison
    single_test: OperatingPoint | None = None
    gain: BootstrapDiff | None = None          # kept share, cross-fitted table minus single threshold, on val

    def by_label(self, labels: Sequence[str]) -> dict[str, float] | None:
        return None if self.thresholds is None else dict(zip(labels, self.thresholds))

    def to_dict(self, labels: Sequence[str]) -> dict[str, Any]:
        pt = lambda p: None if p is None else p.to_dict()
        return {
            "score": self.score, "mode": self.mode, "chosen": self.chosen, "note": self.note,
            "thresholds": self.by_label(labels), "keep_probability_level": self.level,
            "model": None if self.model is None else {
                "slope": self.model.slope, "intercepts": dict(zip(labels, self.model.intercepts))},
            "validation_cross_fitted": pt(self.val_cross_fitted), "validation": pt(self.val), "test": pt(self.test),
            "single_threshold": {"validation": pt(self.single_val), "test": pt(self.single_test)},
            "validation_gain_vs_single_threshold": None if self.gain is None else self.gain.to_dict(),
        }


@dataclass(frozen=True)
class ClassData:
    """One split as per-class thresholds see it: the base score, the edge's predicted class, and
    whether the edge and the cloud are right."""
    score: np.ndarray
    predicted: np.ndarray
    edge_ok: np.ndarray
    cloud_ok: np.ndarray


def fit_class_thresholds(name: str, val: ClassData, test: ClassData, target: Target, num_classes: int,
                         single_val: OperatingPoint | None, single_test: OperatingPoint | None,
                         mode: str = "auto", keep_target: str = "edge_correct", folds: int = 5, seed: int = 0,
                         resamples: int = 300, l2: float = 1e-3) -> ClassThresholdFit:
    """Fit per-class thresholds on ``val`` for ``target`` on score ``name`` (see the module
    docstring); ``single_*``: the score's single threshold on each split. ``mode``: ``auto``
    chooses them only beyond noise, ``on`` always (when they meet the target), ``off`` never."""
    if mode not in CLASS_THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {', '.join(CLASS_THRESHOLD_MODES)}, got {mode!r}")
    skip = lambda why: ClassThresholdFit(name, mode, False, why, single_val=single_val, single_test=single_test)
    if mode == "off":
        return skip("off (--class-thresholds off)")
    if not target.is_accuracy:
        return skip("only for an accuracy target (--target cloud or --target-accuracy)")
    if single_val is None:
        return skip("the score's single threshold does not meet the target on validation")
    y = router_labels(val.edge_ok, val.cloud_ok, keep_target)
    minority = int(min(y.sum(), len(y) - y.sum()))
    if minority < 2 * folds:
        return skip(f"only {minority} validation inputs of the rarer kind for {keep_target!r}; per-class "
                    f"thresholds need at least {2 * folds} (more labelled data)")
    oof = np.empty(len(y))
    for part in fold_indices(len(y), folds, seed):
        train = np.ones(len(y), dtype=bool)
        train[part] = False
        oof[part] = fit_class_model(val.score[train], val.predicted[train], y[train], num_classes,
                                    l2).keep_probability(val.score[part], val.predicted[part])
    model = fit_class_model(val.score, val.predicted, y, num_classes, l2)
    if not model.slope > 0:
        return skip(f"the fitted slope on {name} is {model.slope:.3g}: the score does not rank keep over offload")
    curve = offload_curve(oof, val.edge_ok, val.cloud_ok)
    point = select_threshold(curve, target)
    if point is None:
        return skip("the cross-fitted per-class thresholds do not reach the target on validation")
    level = float(point.threshold)
    thresholds = model.thresholds(level, fallback=single_val.threshold)
    gain = None
    if resamples > 0:
        gain = bootstrap_kept_difference(
            {"single": np.asarray(val.score, dtype=np.float64), "per_class": oof}, val.edge_ok, val.cloud_ok,
            reference="single", resamples=resamples, seed=seed,
            target_accuracy=None if target.kind == "cloud" else target.value,
            accuracy_offset=target.tolerance)["per_class"]
    val_point = evaluate_thresholds(val.score, val.predicted, val.edge_ok, val.cloud_ok, thresholds, level)
    test_point = evaluate_thresholds(test.score, test.predicted, test.edge_ok, test.cloud_ok, thresholds, level)
    gain_text = ("" if gain is None else
                 f"; validation gain {(point.kept_share - single_val.kept_share) * 100:+.1f} pp kept, 95% interval "
                 f"[{gain.low * 100:+.1f}, {gain.high * 100:+.1f}] (paired bootstrap)")
    if mode == "on":
        chosen, note = True, "written as requested (--class-thresholds on)" + gain_text
    elif gain is not None and gain.significant:
        chosen, note = True, "chosen: the gain over the single threshold is beyond noise" + gain_text
    else:
        chosen, note = False, "not chosen: the gain over the single threshold is within noise" + gain_text
    log.info("per-class thresholds on %s: %s", name, note)
    return ClassThresholdFit(name, mode, chosen, note, thresholds=thresholds, level=level, model=model,
                           val_cross_fitted=point, val=val_point, test=test_point, single_val=single_val,
                           single_test=single_test, gain=gain)
