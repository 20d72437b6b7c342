"""When a retrained model is better than the current one beyond noise: paired exact tests. Pure.

Both models answer the same inputs, so each comparison is paired: per input, an outcome
(right, kept on the device, ...) for the old model and for the new one. Only the inputs
where the two differ carry information: ``gained`` (new yes, old no) and ``lost``. Given
their number m, ``gained`` is Binomial(m, pi), and the two models are equal when pi = 1/2.

- *better*: the exact one-sided McNemar test, P(X >= gained | m, 1/2) < alpha;
- *not worse* (non-inferiority with a tolerance): the difference of the rates,
  ``(gained - lost) / n = m (2 pi - 1) / n``, has a lower confidence bound from the
  Clopper-Pearson bound on pi (exact, conditional on m); the new model is not worse when
  that bound, at one-sided level alpha, is above ``-tolerance``.

No randomness and no scipy: the binomial tails are summed in log space with numpy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Rule = Literal["better", "not_worse"]


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(1, n + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])   # log C(n, j), j = 0..n
    j = np.arange(k, n + 1, dtype=np.float64)
    logpmf = log_choose[k:] + j * math.log(p) + (n - j) * math.log1p(-p)
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


def _bisect(f, lo: float, hi: float, iterations: int = 60) -> float:
    """The root of a function increasing from lo to hi."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided-at-``alpha`` lower and upper bounds on a binomial proportion (exact)."""
    if n == 0:
        return 0.0, 1.0
    low = 0.0 if k == 0 else _bisect(lambda p: binomial_sf(k, n, p) - alpha, 0.0, 1.0)
    # upper: the p where P(X <= k) = alpha, i.e. P(X >= k + 1) = 1 - alpha
    high = 1.0 if k == n else _bisect(lambda p: binomial_sf(k + 1, n, p) - (1 - alpha), 0.0, 1.0)
    return low, high


@dataclass(frozen=True)
class PairedDiff:
    """A paired comparison of one yes/no outcome, new model minus old, on n inputs."""
    n: int
    old: float          # rate of the outcome with the old model
    new: float
    gained: int         # inputs where new has it and old has not
    lost: int
    low: float          # one-sided lower bound (level alpha) of new - old
    high: float         # one-sided upper bound
    p_better: float     # exact one-sided McNemar p of "new > old"
    alpha: float

    @property
    def diff(self) -> float:
        return self.new - self.old

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "old": round(self.old, 6), "new": round(self.new, 6), "diff": round(self.diff, 6),
                "gained": self.gained, "lost": self.lost,
                # each bound one-sided at 1 - alpha (together a 1 - 2 alpha interval)
                "lower_bound": round(self.low, 6), "upper_bound": round(self.high, 6),
                "bound_confidence": 1 - self.alpha, "p_better": float(f"{self.p_better:.4g}")}


def paired_diff(old: np.ndarray, new: np.ndarray, alpha: float = 0.05) -> PairedDiff:
    o = np.asarray(old, dtype=bool).reshape(-1)
    w = np.asarray(new, dtype=bool).reshape(-1)
    if len(o) != len(w):
        raise ValueError(f"paired outcomes differ in length ({len(o)}, {len(w)})")
    n = len(o)
    if n == 0:
        raise ValueError("no inputs to compare")
    gained, lost = int((w & ~o).sum()), int((o & ~w).sum())
    m = gained + lost
    pi_low, pi_high = clopper_pearson(gained, m, alpha)
    low, high = (m * (2 * pi_low - 1) / n, m * (2 * pi_high - 1) / n) if m else (0.0, 0.0)
    return PairedDiff(n, float(o.mean()), float(w.mean()), gained, lost, low, high, binomial_sf(gained, m, 0.5),
                      alpha)


@dataclass(frozen=True)
class Criterion:
    """One outcome on one data set, and what the new model must do on it."""
    name: str
    old: np.ndarray
    new: np.ndarray
    rule: Rule
    #: not_worse: how far below the old rate the new one may be (a share, 0.005 = 0.5 points)
    tolerance: float = 0.0


@dataclass(frozen=True)
class Check:
    name: str
    rule: Rule
    tolerance: float
    result: PairedDiff
    passed: bool

    def says(self) -> str:
        r = self.result
        head = f"{self.name}: {r.old:.2%} -> {r.new:.2%} ({r.diff:+.2%}, {r.gained} gained / {r.lost} lost of {r.n})"
        if self.rule == "better":
            verdict = "better beyond noise" if self.passed else "not better beyond noise"
            return f"{head}: {verdict} (exact McNemar p = {r.p_better:.3g}, needs < {r.alpha:g})"
        verdict = "not worse" if self.passed else "WORSE beyond the tolerance"
        return (f"{head}: {verdict} (lower {1 - r.alpha:.0%} bound {r.low:+.2%}, may not be below "
                f"-{self.tolerance:.2%})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "tolerance": self.tolerance, "passed": self.passed,
                **self.result.to_dict()}


@dataclass(frozen=True)
class Decision:
    accepted: bool
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "checks": [c.to_dict() for c in self.checks]}


def judge(c: Criterion, alpha: float = 0.05) -> Check:
    r = paired_diff(c.old, c.new, alpha)
    if c.rule == "better":
        passed = r.gained > r.lost and r.p_better < alpha
    elif c.rule == "not_worse":
        passed = r.low >= -c.tolerance
    else:
        raise ValueError(f"unknown rule {c.rule!r}")
    return Check(c.name, c.rule, c.tolerance, r, bool(passed))


def decide(criteria: Sequence[Criterion], alpha: float = 0.05) -> Decision:
    """Accept only when every criterion holds (at least one of them must be a "better")."""
    if not any(c.rule == "better" for c in criteria):
        raise ValueError("a decision needs at least one 'better' criterion: not worse everywhere is no gain")
    checks = tuple(judge(c, alpha) for c in criteria)
    return Decision(all(c.passed for c in checks), checks)
