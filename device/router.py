"""The learned router score: its parameters, its forward pass and its JSON file. Pure numpy,
no I/O except :func:`load_router` / :func:`save_router`.

A router is a small logistic regression or MLP on features of the edge logits (the
feature columns are computed by :func:`edge_infer.scores.router_features`), trained
by ``edge-infer calibrate`` on labelled validation data. Its output is the predicted
probability that the edge answer is right (or that the cloud would NOT fix it): higher
means keep on the device, like every other score.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from .errors import EdgeInferError

#: Router feature groups (computed by ``edge_infer.scores.router_features``). Widths depend on
#: the number of classes C.
FEATURES: dict[str, Callable[[int], int]] = {
    "probs_sorted": lambda c: c,       # softmax probabilities, largest first
    "logits_sorted": lambda c: c,      # logits, largest first
    "max_prob": lambda c: 1,           # p1
    "margin": lambda c: 1,             # p1 - p2
    "logit_margin": lambda c: 1,       # z1 - z2
    "entropy": lambda c: 1,            # 1 - H / log C
    "predicted_class": lambda c: c,    # one-hot of argmax (class-dependent reliability)
    "probs": lambda c: c,              # softmax probabilities in class order (confusable pairs)
}
ROUTER_TARGETS: tuple[str, ...] = ("edge_correct", "cloud_not_fixing")
ACTIVATIONS: tuple[str, ...] = ("tanh", "relu")
ROUTER_FORMAT = "edge-infer-router"
ROUTER_VERSION = 1


class RouterFileError(EdgeInferError, ValueError):
    """A router JSON file is missing or malformed; the message names the file and the field."""

    exit_code = 2


@dataclass(frozen=True)
class DenseLayer:
    weights: tuple[tuple[float, ...], ...]   # (inputs, outputs)
    bias: tuple[float, ...]                  # (outputs,)

    @property
    def n_in(self) -> int:
        return len(self.weights)

    @property
    def n_out(self) -> int:
        return len(self.bias)


@dataclass(frozen=True)
class RouterParams:
    """A feed-forward router: standardised features -> [dense -> activation]* -> dense -> sigmoid.

    One layer is logistic regression; two or more make a tiny MLP. The output is the
    predicted probability of ``target``: ``edge_correct`` (the edge answer is right) or
    ``cloud_not_fixing`` (offloading would not turn a wrong edge answer into a right one).
    Either way higher = keep on the device.
    """
    num_classes: int
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    layers: tuple[DenseLayer, ...]
    activation: str = "tanh"
    temperature: float = 1.0        # applied to the logits before the probability features
    target: str = "edge_correct"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def n_features(self) -> int:
        return feature_width(self.features, self.num_classes)


def feature_width(features: tuple[str, ...] | list[str], num_classes: int) -> int:
    return sum(FEATURES[f](num_classes) for f in features)


# ----------------------------------------------------------------------------- forward pass

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free and exact enough


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    return np.tanh(x) if activation == "tanh" else np.maximum(x, 0.0)


@dataclass(frozen=True, eq=False)
class FittedRouter:
    """A router as arrays: standardisation and dense layers over a raw feature matrix.

    What calibration fits (on any features: the bench also tries others) and what
    the device evaluates; :class:`RouterParams` is its serialisable form.
    """
    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activation: str

    @classmethod
    def from_params(cls, params: RouterParams) -> FittedRouter:
        return cls(
            mean=np.asarray(params.mean, dtype=np.float64), scale=np.asarray(params.scale, dtype=np.float64),
            weights=tuple(np.asarray(l.weights, dtype=np.float64).reshape(l.n_in, l.n_out) for l in params.layers),
            biases=tuple(np.asarray(l.bias, dtype=np.float64) for l in params.layers),
            activation=params.activation,
        )

    def predict(self, features: np.ndarray) -> np.ndarray:
        return router_forward((features - self.mean) / self.scale, self.weights, self.biases, self.activation)


def router_forward(x_std: np.ndarray, weights: tuple[np.ndarray, ...], biases: tuple[np.ndarray, ...],
                   activation: str) -> np.ndarray:
    """Standardised features (N, F) -> (N,) probabilities."""
    h = x_std
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w + b
        if i < len(weights) - 1:
            h = _activate(h, activation)
    return _sigmoid(h[:, 0])


# ----------------------------------------------------------------------------- router files

def router_to_dict(params: RouterParams) -> dict[str, Any]:
    return {
        "format": ROUTER_FORMAT,
        "version": ROUTER_VERSION,
        "num_classes": params.num_classes,
        "features": list(params.features),
        "temperature": params.temperature,
        "target": params.target,
        "activation": params.activation,
        "mean": list(params.mean),
        "scale": list(params.scale),
        "layers": [{"weights": [list(row) for row in l.weights], "bias": list(l.bias)} for l in params.layers],
        "meta": params.meta,
    }


_KEYS = {"format", "version", "num_classes", "features", "temperature", "target", "activation", "mean", "scale",
         "layers", "meta"}
_OPTIONAL = {"temperature", "target", "activation", "meta"}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RouterFileError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _vector(value: Any, n: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise RouterFileError(f"{where} must be a list of {n} numbers, got {got}")
    return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value))


def router_from_dict(data: Any, source: str = "router") -> RouterParams:
    """Validate a decoded router JSON object strictly; errors name ``source`` and the field."""
    def err(msg: str) -> RouterFileError:
        return RouterFileError(f"{source}: {msg}. Write a new one with `edge-infer calibrate`.")

    if not isinstance(data, dict):
        raise err("expected a JSON object")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise err(f"unknown field(s) {', '.join(map(repr, unknown))}")
    missing = sorted(_KEYS - _OPTIONAL - set(data))
    if missing:
        raise err(f"missing field(s) {', '.join(map(repr, missing))}")
    if data["format"] != ROUTER_FORMAT:
        raise err(f"'format' must be {ROUTER_FORMAT!r}, got {data['format']!r}")
    if data["version"] != ROUTER_VERSION or isinstance(data["version"], bool):
        raise err(f"'version' {data['version']!r} is not supported (this version reads {ROUTER_VERSION})")
    c = data["num_classes"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 2:
        raise err(f"'num_classes' must be an integer >= 2, got {c!r}")
    feats = data["features"]
    if not isinstance(feats, list) or not feats or not all(isinstance(f, str) for f in feats):
        raise err("'features' must be a non-empty list of feature names")
    bad = [f for f in feats if f not in FEATURES]
    if bad:
        raise err(f"'features' has unknown name(s) {', '.join(map(repr, bad))}; known: {', '.join(FEATURES)}")
    if len(set(feats)) != len(feats):
        raise err("'features' lists a name twice")
    width = feature_width(feats, c)
    try:
        t = _number(data.get("temperature", 1.0), "'temperature'")
        if t <= 0:
            raise RouterFileError("'temperature' must be > 0")
        mean = _vector(data["mean"], width, "'mean'")
        scale = _vector(data["scale"], width, "'scale'")
        if any(s <= 0 for s in scale):
            raise RouterFileError("'scale' values must all be > 0")
        layers_raw = data["layers"]
        if not isinstance(layers_raw, list) or not layers_raw:
            raise RouterFileError("'layers' must be a non-empty list of {weights, bias}")
        layers = []
        n_in = width
        for i, layer in enumerate(layers_raw):
            where = f"'layers[{i}]'"
            if not isinstance(layer, dict) or set(layer) != {"weights", "bias"}:
                raise RouterFileError(f"{where} must be an object with exactly 'weights' and 'bias'")
            rows = layer["weights"]
            if not isinstance(rows, list) or len(rows) != n_in:
                raise RouterFileError(f"{where}.weights must have {n_in} rows (one per input)")
            bias = layer["bias"]
            if not isinstance(bias, list) or not bias:
                raise RouterFileError(f"{where}.bias must be a non-empty list of numbers")
            n_out = len(bias)
            weights = tuple(_vector(r, n_out, f"{where}.weights[{j}]") for j, r in enumerate(rows))
            layers.append(DenseLayer(weights, _vector(bias, n_out, f"{where}.bias")))
            n_in = n_out
        if n_in != 1:
            raise RouterFileError(f"the last layer must have 1 output, it has {n_in}")
    except RouterFileError as exc:
        raise err(str(exc)) from None
    activation = data.get("activation", "tanh")
    if activation not in ACTIVATIONS:
        raise err(f"'activation' must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    target = data.get("target", "edge_correct")
    if target not in ROUTER_TARGETS:
        raise err(f"'target' must be one of {', '.join(ROUTER_TARGETS)}, got {target!r}")
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise err("'meta' must be an object")
    return RouterParams(num_classes=c, features=tuple(feats), mean=mean, scale=scale, layers=tuple(layers),
                        activation=activation, temperature=t, target=target, meta=meta)


def load_router(path: str | Path) -> RouterParams:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RouterFileError(f"router file {path} not found: set [policy] router_file to the router JSON written "
                              "by `edge-infer calibrate`, or choose another [policy] score") from None
    except OSError as exc:
        raise RouterFileError(f"router file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RouterFileError(f"router file {path} is not valid JSON: {exc}") from None
    return router_from_dict(data, f"router file {path}")


def save_router(params: RouterParams, path: str | Path) -> None:
    path = Path(path)
    data = router_to_dict(params)
    router_from_dict(json.loads(json.dumps(data)), str(path))   # never write a file we would refuse to read
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
