"""Offload curves: what each threshold of a score does on a labelled set (inputs offloaded,
hybrid accuracy), the share kept at an accuracy, a perfect router's bound, AUC, and the paired
bootstrap that says whether one score keeps more than another beyond noise. Pure numpy."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


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


def bootstrap_kept_difference(scores: Mapping[str, np.ndarray], edge_ok: np.ndarray | Mapping[str, np.ndarray],
                              cloud_ok: np.ndarray,
                              reference: str = "max_softmax", resamples: int = 500, seed: int = 0,
                              target_accuracy: float | None = None,
                              accuracy_offset: float = 0.0) -> dict[str, BootstrapDiff]:
    """How much more each score keeps on the device than ``reference`` at the same accuracy
    (the cloud's accuracy on each resample minus ``accuracy_offset``, unless ``target_accuracy``
    is given), read off the curves of each resample. Measures the noise of the comparison.

    ``edge_ok`` is one array when all scores rank the same edge model's answers, or one array
    per score when they belong to different edge models: each resample then rebuilds every
    model's curve from the same resampled inputs, so the pairing holds across models too."""
    c = np.asarray(cloud_ok, dtype=bool)
    if isinstance(edge_ok, Mapping):
        missing = [k for k in scores if k not in edge_ok]
        if missing:
            raise ValueError(f"no edge answers for score(s) {', '.join(missing)}")
        e = {k: np.asarray(edge_ok[k], dtype=bool) for k in scores}
    else:
        e = dict.fromkeys(scores, np.asarray(edge_ok, dtype=bool))
    rng = np.random.default_rng(seed)
    n = len(c)
    diffs: dict[str, list[float]] = {k: [] for k in scores if k != reference}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        acc = float(c[idx].mean()) - accuracy_offset if target_accuracy is None else target_accuracy
        ref = kept_share_at(offload_curve(scores[reference][idx], e[reference][idx], c[idx]), acc)
        for k, found in diffs.items():
            other = kept_share_at(offload_curve(scores[k][idx], e[k][idx], c[idx]), acc)
            if ref is not None and other is not None:
                found.append(other - ref)
    out = {}
    for k, d in diffs.items():
        arr = np.asarray(d) if d else np.asarray([np.nan])
        out[k] = BootstrapDiff(k, reference, float(np.mean(arr)), float(np.percentile(arr, 2.5)),
                               float(np.percentile(arr, 97.5)), len(d))
    return out
