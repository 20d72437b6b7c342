"""A threshold with a finite-sample guarantee (``edge-infer calibrate --risk``). Pure.

The point estimate (:func:`.threshold.select_threshold`) picks the threshold whose hybrid
accuracy on validation just reaches the target; on a flat curve a few images decide it, and
on new data it lands above or below. This module picks a threshold for which the target
holds on the *population* the validation set was drawn from, with probability at least
``1 - risk`` over that draw.

Method: Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing.

- The candidate thresholds are a fixed grid (:func:`threshold_grid`), chosen before any
  data is seen, tested in a fixed order from the most conservative (keep almost nothing on
  the device) to the least (keep everything).
- For each threshold t, the null hypothesis "t violates the target" is tested with an exact
  binomial test on a loss in {0, 1} whose population mean bounds the violation:

  * ``--target cloud`` (with ``--tolerance`` tau): the loss is 1 when the input is *kept*,
    the edge is wrong and the cloud is right. The hybrid's error minus the cloud's on a new
    input is ``P(kept, edge wrong, cloud right) - P(kept, edge right, cloud wrong)``, so a
    population mean of this loss <= tau gives hybrid accuracy >= cloud accuracy - tau. It
    ignores the inputs the edge gets right and the cloud wrong: conservative, but exact, and
    on the shipped models tighter than bounding the signed difference (which must pay for
    the uncertainty of both counts).
  * ``--target-accuracy`` v: the loss is 1 when the hybrid answer is wrong; mean <= 1 - v.

  H0(t): mean loss > bound. Rejected when ``P(Binomial(n, bound) <= k) <= level`` (k: the
  losses on validation). Under H0 the binomial with the true mean is stochastically larger,
  so the test has level ``level`` exactly or below (the one-sided Clopper-Pearson test).
- Testing stops at the first threshold that is not rejected; the chosen threshold is the
  last rejected one. Fixed-sequence testing controls the family-wise error at ``level``
  with no correction for the number of thresholds, because each hypothesis is only tested
  when all earlier ones were rejected.

The guarantee: ``P(population loss at the chosen threshold > bound) <= level``, over the
draw of the calibration set, assuming calibration and deployment inputs are exchangeable
(drawn from the same distribution) and the score was fixed before the calibration data
(a temperature or router fitted on the same data voids the exactness: see ``exact``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .threshold import Target

#: Scores with nothing fitted on the calibration data: their guarantee is exact.
EXACT_SCORES: tuple[str, ...] = ("max_softmax", "margin", "entropy")

LOSS_KEPT_FIX = "kept_edge_wrong_cloud_right"
LOSS_HYBRID_WRONG = "hybrid_wrong"


# ----------------------------------------------------------------------------- binomial tails

def binomial_log_cdf(k: int, n: int, p: float) -> float:
    """``log P(Binomial(n, p) <= k)``, exact up to float rounding (a log-sum-exp over the pmf)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k < 0:
        return -math.inf
    if k >= n or p == 0.0:
        return 0.0
    if p == 1.0:
        return -math.inf
    j = np.arange(k + 1, dtype=np.float64)
    i = np.arange(1, k + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - i + 1) / i))])   # log C(n, j), j = 0..k
    terms = log_comb + j * math.log(p) + (n - j) * math.log1p(-p)
    top = float(terms.max())
    return min(0.0, top + math.log(float(np.exp(terms - top).sum())))


@lru_cache(maxsize=4096)
def binomial_upper_bound(k: int, n: int, alpha: float) -> float:
    """The one-sided Clopper-Pearson upper confidence bound at level ``1 - alpha``: the largest
    p with ``P(Binomial(n, p) <= k) >= alpha``. ``P(p_true > bound) <= alpha``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n <= 0 or k >= n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi, target = k / n, 1.0, math.log(alpha)
    for _ in range(100):   # bisection to ~1e-15: the cdf is decreasing in p
        mid = (lo + hi) / 2.0
        if binomial_log_cdf(k, n, mid) >= target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return hi


@lru_cache(maxsize=65536)
def rejects(k: int, n: int, bound: float, level: float) -> bool:
    """The exact binomial test of H0 "mean loss > bound" from ``k`` losses in ``n`` (cached: along
    the grid the count stays the same for many thresholds in a row)."""
    if bound >= 1.0:
        return True            # a loss in {0, 1} never has a mean above 1
    return binomial_log_cdf(k, n, bound) <= math.log(level)


# ----------------------------------------------------------------------------- the grid

def threshold_grid() -> np.ndarray:
    """The candidate thresholds, fixed before any data (the guarantee needs that), descending:
    every 0.001 on [0, 1], plus 1 - 10^(-j/200) for j = 0..1600 (down to 1 - 1e-8), where
    confidence scores crowd near 1."""
    fine = 1.0 - 10.0 ** (-np.arange(0, 1601) / 200.0)
    grid = np.unique(np.round(np.concatenate([np.arange(1001) / 1000.0, fine]), 15))
    return grid[::-1].copy()


# ----------------------------------------------------------------------------- the result

@dataclass(frozen=True)
class Guarantee:
    """A threshold certified for the target, or why none could be."""
    score: str
    risk: float                  # the requested 1 - confidence for the whole calibration
    level: float                 # the share of ``risk`` this score's test ran at (Bonferroni over scores)
    loss: str                    # LOSS_KEPT_FIX or LOSS_HYBRID_WRONG
    bound: float                 # the population mean of the loss the threshold guarantees not to exceed
    n: int
    threshold: float | None      # None: not even the most conservative grid threshold was certified
    losses: int                  # losses on validation at the threshold (at the first one when none)
    upper_bound: float           # the (1 - level) Clopper-Pearson bound of the loss's mean there
    tested: int                  # grid thresholds tested, the failing one included
    stopped_at: float | None     # the first threshold not certified (None: the whole grid passed)
    exact: bool                  # the score had nothing fitted on the calibration data

    @property
    def certified(self) -> bool:
        return self.threshold is not None

    def statement(self, target: Target) -> str:
        conf = f"{1 - self.risk:.0%}"
        if self.loss == LOSS_KEPT_FIX:
            what = (f"hybrid accuracy >= the cloud's - {self.bound * 100:.2f} pp" if self.bound
                    else "hybrid accuracy >= the cloud's")
        else:
            what = f"hybrid accuracy >= {1 - self.bound:.4f}"
        caveat = "" if self.exact else " (approximate: this score was fitted on the same validation data)"
        return (f"with {conf} confidence over the draw of the {self.n} validation inputs, {what} on new inputs "
                f"from the same distribution{caveat}")

    def to_dict(self, target: Target | None = None) -> dict[str, Any]:
        d = {"score": self.score, "risk": self.risk, "level": self.level, "loss": self.loss, "bound": self.bound,
             "n": self.n, "threshold": self.threshold, "losses_on_validation": self.losses,
             "upper_confidence_bound_at_threshold": round(self.upper_bound, 6), "thresholds_tested": self.tested,
             "stopped_at": self.stopped_at, "exact": self.exact, "certified": self.certified}
        if target is not None:
            d["statement"] = self.statement(target)
        return d


def loss_for(target: Target) -> tuple[str, float]:
    """The {0, 1} loss whose mean bounds the target's violation, and the bound it must stay under."""
    if target.kind == "cloud":
        return LOSS_KEPT_FIX, target.tolerance
    if target.kind == "accuracy":
        return LOSS_HYBRID_WRONG, 1.0 - target.value
    raise ValueError("a guarantee needs an accuracy target (--target cloud or --target-accuracy), "
                     f"not {target.kind}")


def _loss_counts(score: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, loss: str,
                 grid: np.ndarray) -> np.ndarray:
    """Losses on the data at each grid threshold (kept: ``score >= t``)."""
    s = np.asarray(score, dtype=np.float64)
    e = np.asarray(edge_ok, dtype=bool)
    c = np.asarray(cloud_ok, dtype=bool)
    order = np.argsort(s, kind="stable")
    ss = s[order]
    first_kept = np.searchsorted(ss, grid, side="left")        # inputs [first_kept:] have score >= t
    if loss == LOSS_KEPT_FIX:
        a = (~e & c)[order].astype(np.int64)
        tail = np.concatenate([np.cumsum(a[::-1])[::-1], [0]])  # tail[j] = sum(a[j:])
        return tail[first_kept]
    # hybrid wrong: the cloud's error where offloaded (score < t), the edge's where kept
    cw = np.concatenate([[0], np.cumsum((~c)[order])])
    ew_tail = np.concatenate([np.cumsum((~e)[order][::-1])[::-1], [0]])
    return cw[first_kept] + ew_tail[first_kept]


def certify_threshold(name: str, score: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, target: Target,
                      risk: float, level: float | None = None, exact: bool | None = None,
                      grid: np.ndarray | None = None) -> Guarantee:
    """The least conservative grid threshold certified for ``target`` by fixed-sequence testing
    at ``level`` (default: ``risk``). See the module docstring."""
    if not 0.0 < risk < 1.0:
        raise ValueError(f"risk must be between 0 and 1 (e.g. 0.05 for 95% confidence), got {risk}")
    level = risk if level is None else level
    if not 0.0 < level <= risk:
        raise ValueError(f"level must be in (0, risk], got {level}")
    loss, bound = loss_for(target)
    grid = threshold_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    counts = _loss_counts(score, edge_ok, cloud_ok, loss, grid)
    n = len(np.asarray(score))
    chosen: int | None = None
    stopped: int | None = None
    for j, k in enumerate(counts):
        if rejects(int(k), n, bound, level):
            chosen = j
        else:
            stopped = j
            break
    at = chosen if chosen is not None else 0
    k_at = int(counts[at])
    return Guarantee(
        score=name, risk=risk, level=level, loss=loss, bound=bound, n=n,
        threshold=None if chosen is None else float(grid[chosen]), losses=k_at,
        upper_bound=binomial_upper_bound(k_at, n, level),
        tested=(stopped + 1) if stopped is not None else len(grid),
        stopped_at=None if stopped is None else float(grid[stopped]),
        exact=(name in EXACT_SCORES) if exact is None else exact)


def smallest_certifiable_bound(n: int, level: float) -> float:
    """The least ``bound`` any threshold can be certified at with ``n`` inputs (zero losses)."""
    return binomial_upper_bound(0, n, level) if n > 0 else 1.0
