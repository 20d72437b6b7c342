"""Calibration maths: temperature fitting, offload curves, threshold selection, the
learned router, and the frozen records of a calibration report. Pure numpy, no I/O.

Conventions: a *score* is a confidence per input, higher = more confident; the
device offloads an input when ``score < threshold``. Offloading input i replaces
the edge answer by the cloud answer, so the hybrid accuracy at a threshold is
``mean(where(score < t, cloud_ok, edge_ok))``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .router import DenseLayer, FittedRouter, RouterParams, feature_width
from .scores import SCORES, ScoreParams, make_scorer, router_features

log = logging.getLogger(__name__)

#: The router's default inputs: what the logits say about confidence, plus the
#: predicted class (some classes are much less reliable than others).
DEFAULT_ROUTER_FEATURES: tuple[str, ...] = (
    "probs_sorted", "logits_sorted", "margin", "logit_margin", "entropy", "predicted_class",
)


# ----------------------------------------------------------------------------- temperature

def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    tol: float = 1e-5) -> float:
    """The temperature T that minimises the validation NLL of ``softmax(logits / T)``.

    The NLL is convex in beta = 1/T, so a golden-section search over beta finds the
    minimum on [1/hi, 1/lo]. Returns a value clipped to [lo, hi].
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on an empty set")
    f = lambda beta: nll(logits, labels, 1.0 / beta)
    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol * max(1.0, a):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(np.clip(1.0 / ((a + b) / 2.0), lo, hi))


# ----------------------------------------------------------------------------- curves and points

@dataclass(frozen=True)
class OperatingPoint:
    """One threshold on one data set."""
    threshold: float
    offloaded: int
    n: int
    accuracy: float

    @property
    def offloaded_share(self) -> float:
        return self.offloaded / self.n if self.n else 0.0

    @property
    def kept_share(self) -> float:
        return 1.0 - self.offloaded_share

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "offloaded": self.offloaded, "n": self.n,
                "offloaded_share": round(self.offloaded_share, 6), "kept_share": round(self.kept_share, 6),
                "accuracy": round(self.accuracy, 6)}


@dataclass(frozen=True, eq=False)
class OffloadCurve:
    """Every distinct operating point of a score on a data set, by increasing offload.

    ``thresholds[j]`` offloads exactly the ``offloaded[j]`` inputs whose score is below
    it; ``accuracy[j]`` is the hybrid accuracy then. Inputs with equal scores always
    fall on the same side, so only cuts between distinct values are points.
    """
    thresholds: np.ndarray   # float64, increasing
    offloaded: np.ndarray    # int64, increasing, from 0 to n
    accuracy: np.ndarray     # float64
    n: int

    def __len__(self) -> int:
        return len(self.thresholds)

    def point(self, j: int) -> OperatingPoint:
        return OperatingPoint(float(self.thresholds[j]), int(self.offloaded[j]), self.n, float(self.accuracy[j]))

    @property
    def offloaded_share(self) -> np.ndarray:
        return self.offloaded / max(self.n, 1)

    def best(self) -> OperatingPoint:
        """The highest accuracy reachable, at the least offloading that reaches it."""
        return self.point(int(np.argmax(self.accuracy)))   # argmax takes the first = least offloaded

    def sampled(self, steps: int = 100) -> list[dict[str, float]]:
        """The curve at offload shares 0, 1/steps, ..., 1 (the last point at or below each share)."""
        out = []
        for i in range(steps + 1):
            j = int(np.searchsorted(self.offloaded, i / steps * self.n + 1e-9, side="right")) - 1
            out.append({"offloaded_share": round(i / steps, 6), "accuracy": round(float(self.accuracy[max(j, 0)]), 6)})
        return out


def _check_inputs(score: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray) -> tuple[np.ndarray, ...]:
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    e = np.asarray(edge_ok, dtype=bool).reshape(-1)
    c = np.asarray(cloud_ok, dtype=bool).reshape(-1)
    if not (len(s) == len(e) == len(c)):
        raise ValueError(f"score, edge_ok and cloud_ok differ in length ({len(s)}, {len(e)}, {len(c)})")
    if len(s) == 0:
        raise ValueError("no inputs")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, e, c


def offload_curve(score: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray) -> OffloadCurve:
    s, e, c = _check_inputs(score, edge_ok, cloud_ok)
    n = len(s)
    order = np.argsort(s, kind="stable")
    ss = s[order]
    cum_edge = np.concatenate([[0], np.cumsum(e[order])])
    cum_cloud = np.concatenate([[0], np.cumsum(c[order])])
    starts = np.flatnonzero(np.concatenate([[True], ss[1:] > ss[:-1]]))   # first index of each distinct value
    uniq = ss[starts]
    ks = np.concatenate([starts, [n]])
    # thresholds: below the smallest value for k = 0; between neighbours otherwise; above the largest for k = n
    below = np.concatenate([[np.nan], uniq[:-1]])
    mid = (below + uniq) / 2.0
    mid = np.where(mid > below, mid, uniq)         # neighbours so close that the midpoint rounds down
    thresholds = np.concatenate([mid, [1.0 if uniq[-1] < 1.0 else float(np.nextafter(uniq[-1], np.inf))]])
    thresholds[0] = min(0.0, float(uniq[0]))
    accuracy = (cum_cloud[ks] + (cum_edge[n] - cum_edge[ks])) / n
    return OffloadCurve(thresholds.astype(np.float64), ks.astype(np.int64), accuracy.astype(np.float64), n)


def evaluate_threshold(score: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, threshold: float) -> OperatingPoint:
    """What a threshold does on a data set: offload where ``score < threshold``."""
    s, e, c = _check_inputs(score, edge_ok, cloud_ok)
    off = s < threshold
    return OperatingPoint(float(threshold), int(off.sum()), len(s), float(np.where(off, c, e).mean()))


def kept_share_at(curve: OffloadCurve, accuracy: float) -> float | None:
    """The largest share kept on the device with hybrid accuracy >= ``accuracy``; None if unreachable."""
    ok = np.flatnonzero(curve.accuracy >= accuracy - 1e-12)
    return None if len(ok) == 0 else 1.0 - float(curve.offloaded[ok[0]]) / curve.n


def oracle_score(edge_ok: np.ndarray, cloud_ok: np.ndarray) -> np.ndarray:
    """A perfect router's score: lowest where the cloud fixes the edge answer, middle where
    offloading changes nothing, highest where the cloud would break a right answer. Values are
    all distinct (ties broken by position) so the oracle can offload any number of fixes."""
    gain = np.asarray(cloud_ok, dtype=np.int64) - np.asarray(edge_ok, dtype=np.int64)   # 1, 0, -1
    n = len(gain)
    return ((1 - gain) * n + np.arange(n)) / (3.0 * n)


# ----------------------------------------------------------------------------- targets and selection

TARGET_KINDS = ("cloud", "accuracy", "max_offload_share")


@dataclass(frozen=True)
class Target:
    """What the threshold must achieve on validation.

    ``cloud``: hybrid accuracy >= the cloud model's (``value`` is that accuracy);
    ``accuracy``: hybrid accuracy >= ``value``; both with the least offloading.
    ``max_offload_share``: offload at most ``value`` of the inputs, with the best accuracy.
    """
    kind: str
    value: float
    tolerance: float = 0.0    # cloud target only: value = cloud accuracy - tolerance

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        if not (0.0 <= self.value <= 1.0):
            raise ValueError(f"target value must be between 0 and 1, got {self.value}")

    @property
    def is_accuracy(self) -> bool:
        return self.kind in ("cloud", "accuracy")

    def describe(self) -> str:
        if self.kind == "cloud" and self.tolerance:
            return (f"reach the cloud model's validation accuracy minus {self.tolerance * 100:.2f} pp "
                    f"({self.value:.4f}) with the least offloading")
        if self.kind == "cloud":
            return f"reach the cloud model's validation accuracy ({self.value:.4f}) with the least offloading"
        if self.kind == "accuracy":
            return f"reach accuracy {self.value:.4f} with the least offloading"
        return f"best accuracy offloading at most {self.value:.1%} of the inputs"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "tolerance": self.tolerance, "description": self.describe()}


def select_threshold(curve: OffloadCurve, target: Target) -> OperatingPoint | None:
    """The operating point that meets ``target`` (see :class:`Target`); None if none does."""
    if target.is_accuracy:
        ok = np.flatnonzero(curve.accuracy >= target.value - 1e-12)
        return None if len(ok) == 0 else curve.point(int(ok[0]))
    within = np.flatnonzero(curve.offloaded <= target.value * curve.n + 1e-9)
    if len(within) == 0:   # cannot happen: offloading nothing is always within budget
        return None
    best = within[np.argmax(curve.accuracy[within])]   # first = least offloaded among equals
    return curve.point(int(best))


def choose_score(val_points: Mapping[str, OperatingPoint | None], target: Target,
                 order: Iterable[str] = SCORES, gains: Mapping[str, "BootstrapDiff"] | None = None,
                 reference: str = "max_softmax") -> str | None:
    """The score to deploy: most kept on the device on validation at an accuracy target; best
    validation accuracy within an offload budget (then most kept). Ties go to the earlier,
    simpler score in ``order``. None when no score meets the target.

    With ``gains`` (paired bootstrap of each score's kept share minus the reference's), a score
    other than the reference is chosen only if its whole 95% interval is above zero: a gain
    within noise does not justify deploying a more complex score."""
    best_name, best_key = None, None
    for name in order:
        p = val_points.get(name)
        if p is None:
            continue
        if gains is not None and name != reference and val_points.get(reference) is not None:
            g = gains.get(name)
            if g is None or not g.significant:
                continue
        key = (p.kept_share,) if target.is_accuracy else (round(p.accuracy, 12), p.kept_share)
        if best_key is None or key > best_key:
            best_name, best_key = name, key
    return best_name


# ----------------------------------------------------------------------------- the router

ROUTER_MODELS = ("logistic", "mlp")


@dataclass(frozen=True)
class RouterTraining:
    """How to train the router. ``model``: logistic regression (Newton's method) or an MLP with
    one hidden layer (full-batch Adam); ``l2``: weight penalty on standardised features."""
    model: str = "logistic"
    features: tuple[str, ...] = DEFAULT_ROUTER_FEATURES
    target: str = "edge_correct"
    hidden: int = 16
    activation: str = "tanh"
    l2: float = 1e-3
    steps: int = 1500
    learning_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in ROUTER_MODELS:
            raise ValueError(f"router model must be one of {', '.join(ROUTER_MODELS)}, got {self.model!r}")


def router_labels(edge_ok: np.ndarray, cloud_ok: np.ndarray, target: str) -> np.ndarray:
    """1 = keep on the device. ``edge_correct``: the edge is right; ``cloud_not_fixing``:
    offloading would not turn a wrong edge answer into a right one."""
    e = np.asarray(edge_ok, dtype=bool)
    c = np.asarray(cloud_ok, dtype=bool)
    if target == "edge_correct":
        return e.astype(np.float64)
    if target == "cloud_not_fixing":
        return (e | ~c).astype(np.float64)
    raise ValueError(f"unknown router target {target!r}; choose edge_correct or cloud_not_fixing")


def _bce_grad_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -40, 40)))
    n = len(y)
    reg = np.full(len(w), l2)
    reg[-1] = 0.0                                      # no penalty on the bias
    grad = x.T @ (p - y) / n + reg * w
    hess = (x * (p * (1 - p))[:, None]).T @ x / n + np.diag(reg + 1e-9)
    return grad, hess


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int = 100) -> tuple[np.ndarray, float]:
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(xb.shape[1])
    for _ in range(max_iter):
        grad, hess = _bce_grad_logistic(xb, y, w, l2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


def _fit_mlp(x: np.ndarray, y: np.ndarray, cfg: RouterTraining) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(cfg.seed)
    f, h = x.shape[1], cfg.hidden
    params = [rng.normal(0, 1 / math.sqrt(f), (f, h)), np.zeros(h), rng.normal(0, 1 / math.sqrt(h), (h, 1)), np.zeros(1)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    n = len(y)
    yc = y[:, None]
    for step in range(1, cfg.steps + 1):
        w1, c1, w2, c2 = params
        pre = x @ w1 + c1
        act = np.tanh(pre) if cfg.activation == "tanh" else np.maximum(pre, 0.0)
        out = act @ w2 + c2
        p = 1.0 / (1.0 + np.exp(-np.clip(out, -40, 40)))
        d_out = (p - yc) / n
        g_w2 = act.T @ d_out + cfg.l2 * w2
        g_c2 = d_out.sum(axis=0)
        d_act = d_out @ w2.T
        d_pre = d_act * (1 - act ** 2) if cfg.activation == "tanh" else d_act * (pre > 0)
        g_w1 = x.T @ d_pre + cfg.l2 * w1
        g_c1 = d_pre.sum(axis=0)
        for i, g in enumerate((g_w1, g_c1, g_w2, g_c2)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            params[i] = params[i] - cfg.learning_rate * (m[i] / (1 - b1 ** step)) / (np.sqrt(v[i] / (1 - b2 ** step)) + eps)
    w1, c1, w2, c2 = params
    return (w1, w2), (c1, c2)


def fit_router_arrays(features: np.ndarray, y: np.ndarray, cfg: RouterTraining) -> FittedRouter:
    """Standardise ``features`` (N, F) and fit the router model of ``cfg`` to 0/1 labels ``y``."""
    feats = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(feats) != len(y):
        raise ValueError("features and labels differ in length")
    mean = feats.mean(axis=0)
    scale = feats.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    x = (feats - mean) / scale
    if cfg.model == "logistic":
        w, b = _fit_logistic(x, y, cfg.l2)
        weights, biases = (w[:, None],), (np.array([b]),)
    else:
        weights, biases = _fit_mlp(x, y, cfg)
    return FittedRouter(mean, scale, tuple(weights), tuple(biases), cfg.activation)


def train_router(logits: np.ndarray, y: np.ndarray, cfg: RouterTraining, temperature: float = 1.0,
                 meta: dict[str, Any] | None = None) -> RouterParams:
    """Fit a router on (N, C) edge logits and 0/1 keep-labels ``y`` (see :func:`router_labels`)."""
    logits = np.asarray(logits, dtype=np.float64)
    fitted = fit_router_arrays(router_features(logits, cfg.features, temperature), y, cfg)
    layers = tuple(DenseLayer(tuple(tuple(float(v) for v in row) for row in wt), tuple(float(v) for v in bs))
                   for wt, bs in zip(fitted.weights, fitted.biases))
    num_classes = logits.shape[1]
    assert len(fitted.mean) == feature_width(cfg.features, num_classes)
    return RouterParams(num_classes=num_classes, features=tuple(cfg.features), mean=tuple(map(float, fitted.mean)),
                        scale=tuple(map(float, fitted.scale)), layers=layers, activation=cfg.activation,
                        temperature=float(temperature), target=cfg.target, meta=dict(meta or {}))


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    if folds < 2 or folds > n:
        raise ValueError(f"need 2 <= folds <= {n}, got {folds}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def cross_fit_router(logits: np.ndarray, y: np.ndarray, cfg: RouterTraining, temperature: float = 1.0,
                     folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold router scores: each input is scored by a router that never saw it, so a
    threshold chosen on these scores is not chosen on the router's own training fit."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    oof = np.empty(len(y))
    for part in fold_indices(len(y), folds, seed):
        train = np.ones(len(y), dtype=bool)
        train[part] = False
        params = train_router(logits[train], y[train], cfg, temperature)
        oof[part] = make_scorer("router", ScoreParams(router=params))(logits[part])
    return oof


def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the 0/1 labels ``y`` (ties count half)."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ss = s[order]
    # average ranks over ties
    starts = np.flatnonzero(np.concatenate([[True], ss[1:] > ss[:-1]]))
    ends = np.concatenate([starts[1:], [len(s)]])
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# ----------------------------------------------------------------------------- report records

@dataclass(frozen=True)
class ScoreResult:
    """One score, its threshold chosen on validation and what that threshold does on test."""
    score: str
    val: OperatingPoint | None            # None: the target is unreachable on validation
    test: OperatingPoint | None
    val_best: OperatingPoint              # the best accuracy this score can reach on validation
    test_best: OperatingPoint
    test_kept_at_target: float | None     # reading the test curve itself at the test target (optimistic)
    val_auc: float | None                 # how well the score ranks edge-correct above edge-wrong
    test_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        gap = None
        if self.val is not None and self.test is not None:
            gap = {"accuracy": round(self.test.accuracy - self.val.accuracy, 6),
                   "kept_share": round(self.test.kept_share - self.val.kept_share, 6)}
        return {
            "score": self.score,
            "validation": None if self.val is None else self.val.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
            "gap_test_minus_validation": gap,
            "best_reachable": {"validation": self.val_best.to_dict(), "test": self.test_best.to_dict()},
            "test_curve_kept_share_at_target": None if self.test_kept_at_target is None
            else round(self.test_kept_at_target, 6),
            "auc_edge_correct": {"validation": self.val_auc, "test": self.test_auc},
        }


def evaluate_score(name: str, val_score: np.ndarray, test_score: np.ndarray, val_edge_ok: np.ndarray,
                   val_cloud_ok: np.ndarray, test_edge_ok: np.ndarray, test_cloud_ok: np.ndarray,
                   target: Target, test_target_accuracy: float | None = None) -> tuple[ScoreResult, OffloadCurve,
                                                                                        OffloadCurve]:
    """Choose the threshold on validation, apply it to test. ``test_target_accuracy``: the
    accuracy the test curve is read at (the cloud's test accuracy for a cloud target)."""
    val_curve = offload_curve(val_score, val_edge_ok, val_cloud_ok)
    test_curve = offload_curve(test_score, test_edge_ok, test_cloud_ok)
    val_point = select_threshold(val_curve, target)
    test_point = None if val_point is None else evaluate_threshold(test_score, test_edge_ok, test_cloud_ok,
                                                                   val_point.threshold)
    kept = None
    if target.is_accuracy:
        kept = kept_share_at(test_curve, target.value if test_target_accuracy is None else test_target_accuracy)
    result = ScoreResult(
        score=name, val=val_point, test=test_point, val_best=val_curve.best(), test_best=test_curve.best(),
        test_kept_at_target=kept, val_auc=auc(val_score, val_edge_ok), test_auc=auc(test_score, test_edge_ok),
    )
    return result, val_curve, test_curve


@dataclass(frozen=True)
class BootstrapDiff:
    """Paired bootstrap over inputs of kept share at the target accuracy, score minus reference."""
    score: str
    reference: str
    mean: float
    low: float     # 2.5th percentile
    high: float    # 97.5th percentile
    resamples: int

    @property
    def significant(self) -> bool:
        """The whole 95% interval is above zero."""
        return bool(self.low > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "reference": self.reference, "mean": round(self.mean, 6),
                "ci95": [round(self.low, 6), round(self.high, 6)], "resamples": self.resamples,
                "significant": self.significant}


def bootstrap_kept_difference(scores: Mapping[str, np.ndarray], edge_ok: np.ndarray, cloud_ok: np.ndarray,
                              reference: str = "max_softmax", resamples: int = 500, seed: int = 0,
                              target_accuracy: float | None = None,
                              accuracy_offset: float = 0.0) -> dict[str, BootstrapDiff]:
    """How much more each score keeps on the device than ``reference`` at the same accuracy
    (the cloud's accuracy on each resample minus ``accuracy_offset``, unless ``target_accuracy``
    is given), read off the curves of each resample. Measures the noise of the comparison."""
    e = np.asarray(edge_ok, dtype=bool)
    c = np.asarray(cloud_ok, dtype=bool)
    rng = np.random.default_rng(seed)
    n = len(e)
    diffs: dict[str, list[float]] = {k: [] for k in scores if k != reference}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        acc = float(c[idx].mean()) - accuracy_offset if target_accuracy is None else target_accuracy
        ref = kept_share_at(offload_curve(scores[reference][idx], e[idx], c[idx]), acc)
        for k, found in diffs.items():
            other = kept_share_at(offload_curve(scores[k][idx], e[idx], c[idx]), acc)
            if ref is not None and other is not None:
                found.append(other - ref)
    out = {}
    for k, d in diffs.items():
        arr = np.asarray(d) if d else np.asarray([np.nan])
        out[k] = BootstrapDiff(k, reference, float(np.mean(arr)), float(np.percentile(arr, 2.5)),
                               float(np.percentile(arr, 97.5)), len(d))
    return out


# ----------------------------------------------------------------------------- the whole calibration

@dataclass(frozen=True)
class Split:
    """One labelled split: edge logits (N, C), true labels, and the cloud's predicted labels."""
    logits: np.ndarray
    labels: np.ndarray
    cloud_pred: np.ndarray

    def __post_init__(self) -> None:
        if self.logits.ndim != 2 or not (len(self.logits) == len(self.labels) == len(self.cloud_pred)):
            raise ValueError(f"split arrays disagree: logits {self.logits.shape}, labels {self.labels.shape}, "
                             f"cloud predictions {self.cloud_pred.shape}")

    @property
    def edge_ok(self) -> np.ndarray:
        return self.logits.argmax(axis=1) == self.labels

    @property
    def cloud_ok(self) -> np.ndarray:
        return self.cloud_pred == self.labels

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class OracleResult:
    """A perfect router that offloads exactly the inputs the cloud fixes (an upper bound)."""
    val_kept_at_target: float | None
    test_kept_at_target: float | None
    test_best: OperatingPoint

    def to_dict(self) -> dict[str, Any]:
        return {"validation_kept_share_at_target": self.val_kept_at_target,
                "test_kept_share_at_target": self.test_kept_at_target, "test_best": self.test_best.to_dict()}


@dataclass(frozen=True, eq=False)
class Calibration:
    target: Target
    test_target_accuracy: float | None
    edge_accuracy: dict[str, float]          # split -> accuracy
    cloud_accuracy: dict[str, float]
    temperature: float
    router: RouterParams | None
    router_note: str
    results: dict[str, ScoreResult]
    curves: dict[str, dict[str, OffloadCurve]]   # score -> split -> curve
    chosen: str | None
    oracle: OracleResult
    sizes: dict[str, int]
    values: dict[str, dict[str, np.ndarray]]      # score -> split -> per-input score (val: cross-fitted router)
    oracle_curves: dict[str, OffloadCurve]        # split -> the oracle router's curve
    val_gain: dict[str, BootstrapDiff]            # kept share vs max_softmax on validation, with its noise

    @property
    def chosen_result(self) -> ScoreResult | None:
        return None if self.chosen is None else self.results[self.chosen]


def resolve_target(kind: str, value: float | None, cloud_val_accuracy: float, tolerance: float = 0.0) -> Target:
    if kind == "cloud":
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be between 0 and 1 (accuracy points, e.g. 0.0025), got {tolerance}")
        return Target("cloud", max(cloud_val_accuracy - tolerance, 0.0), tolerance)
    if value is None:
        raise ValueError(f"target {kind} needs a value")
    return Target(kind, float(value))


def calibrate_arrays(val: Split, test: Split, target_kind: str = "cloud", target_value: float | None = None,
                     scores: Iterable[str] = SCORES, router_cfg: RouterTraining = RouterTraining(),
                     folds: int = 5, seed: int = 0, resamples: int = 300, tolerance: float = 0.0) -> Calibration:
    """Fit the temperature and the router on ``val``, choose a threshold per score on ``val``
    for the target, report each on ``test``, and pick the score to deploy. ``tolerance``: for the
    cloud target, how far below the cloud's accuracy is acceptable (accuracy points)."""
    scores = tuple(scores)
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown score(s) {', '.join(unknown)}; choose from {', '.join(SCORES)}")
    if val.logits.shape[1] != test.logits.shape[1]:
        raise ValueError("validation and test logits have different class counts")
    cloud_val = float(val.cloud_ok.mean())
    target = resolve_target(target_kind, target_value, cloud_val, tolerance)
    test_target = float(test.cloud_ok.mean()) - target.tolerance if target.kind == "cloud" else (
        target.value if target.is_accuracy else None)

    temperature = fit_temperature(val.logits, val.labels)
    log.info("temperature fitted on validation: %.4f (NLL %.4f -> %.4f)", temperature,
             nll(val.logits, val.labels), nll(val.logits, val.labels, temperature))
    params = ScoreParams(temperature=temperature)
    score_values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    router: RouterParams | None = None
    router_note = "not requested"
    for name in scores:
        if name != "router":
            f = make_scorer(name, params)
            score_values[name] = (f(val.logits), f(test.logits))
            continue
        y = router_labels(val.edge_ok, val.cloud_ok, router_cfg.target)
        minority = int(min(y.sum(), len(y) - y.sum()))
        if minority < 2 * folds:
            router_note = (f"skipped: only {minority} validation inputs of the rarer kind for target "
                           f"{router_cfg.target!r}; a router needs at least {2 * folds} (more labelled data)")
            log.warning("router %s", router_note)
            continue
        oof = cross_fit_router(val.logits, y, router_cfg, temperature, folds=folds, seed=seed)
        router = train_router(val.logits, y, router_cfg, temperature, meta={
            "model": router_cfg.model, "hidden": router_cfg.hidden if router_cfg.model == "mlp" else 0,
            "l2": router_cfg.l2, "trained_on": len(y), "cross_fit_folds": folds, "seed": seed})
        score_values[name] = (oof, make_scorer("router", ScoreParams(router=router))(test.logits))
        router_note = (f"{router_cfg.model} on {', '.join(router_cfg.features)}; target {router_cfg.target}; "
                       f"validation scores are {folds}-fold cross-fitted, the deployed router is refit on all "
                       f"{len(y)} validation inputs")

    results: dict[str, ScoreResult] = {}
    curves: dict[str, dict[str, OffloadCurve]] = {}
    for name, (sv, st) in score_values.items():
        res, cv, ct = evaluate_score(name, sv, st, val.edge_ok, val.cloud_ok, test.edge_ok, test.cloud_ok,
                                     target, test_target)
        results[name] = res
        curves[name] = {"val": cv, "test": ct}

    ov = offload_curve(oracle_score(val.edge_ok, val.cloud_ok), val.edge_ok, val.cloud_ok)
    ot = offload_curve(oracle_score(test.edge_ok, test.cloud_ok), test.edge_ok, test.cloud_ok)
    oracle = OracleResult(
        val_kept_at_target=kept_share_at(ov, target.value) if target.is_accuracy else None,
        test_kept_at_target=kept_share_at(ot, test_target) if test_target is not None else None,
        test_best=ot.best())
    val_gain: dict[str, BootstrapDiff] = {}
    if target.is_accuracy and "max_softmax" in score_values and len(score_values) > 1 and resamples > 0:
        val_gain = bootstrap_kept_difference(
            {k: v for k, (v, _) in score_values.items()}, val.edge_ok, val.cloud_ok, reference="max_softmax",
            resamples=resamples, seed=seed, target_accuracy=None if target.kind == "cloud" else target.value,
            accuracy_offset=target.tolerance)
    chosen = choose_score({k: r.val for k, r in results.items()}, target, order=SCORES,
                          gains=val_gain if val_gain else None)
    return Calibration(
        target=target, test_target_accuracy=test_target,
        edge_accuracy={"val": float(val.edge_ok.mean()), "test": float(test.edge_ok.mean())},
        cloud_accuracy={"val": cloud_val, "test": float(test.cloud_ok.mean())},
        temperature=temperature, router=router, router_note=router_note, results=results, curves=curves,
        chosen=chosen, oracle=oracle, sizes={"val": len(val), "test": len(test)},
        values={k: {"val": v, "test": t} for k, (v, t) in score_values.items()},
        oracle_curves={"val": ov, "test": ot}, val_gain=val_gain)
