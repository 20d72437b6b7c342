"""What calibration fits on the validation split: the softmax temperature and the learned
router (logistic regression or a small MLP, cross-fitted). Pure numpy, no I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..router import DenseLayer, FittedRouter, RouterParams, feature_width
from ..scores import ScoreParams, make_scorer, router_features


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


DEFAULT_TRAINING = RouterTraining()


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
