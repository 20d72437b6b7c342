"""The certified threshold (edge_infer.calibration.guarantee): the binomial tails against exact
arithmetic, and the guarantee itself by simulation from a population whose risk is known."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_infer.calibration.compare import Split, calibrate_arrays
from edge_infer.calibration.curves import evaluate_threshold, offload_curve
from edge_infer.calibration.guarantee import (
    EXACT_SCORES, LOSS_HYBRID_WRONG, LOSS_KEPT_FIX, binomial_log_cdf, binomial_upper_bound, certify_threshold,
    rejects, smallest_certifiable_bound, threshold_grid,
)
from edge_infer.calibration.threshold import Target, select_threshold


def exact_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, j)) * p ** j * (1 - p) ** (n - j) for j in range(k + 1)), Fraction(0))


# ----------------------------------------------------------------------------- binomial tails

@pytest.mark.parametrize("n,k,p", [(1, 0, "1/2"), (10, 3, "1/5"), (40, 0, "1/40"), (60, 7, "3/100"),
                                   (200, 12, "1/25"), (200, 199, "9/10")])
def test_binomial_cdf_is_the_exact_sum(n, k, p):
    want = float(exact_cdf(k, n, Fraction(p)))
    assert math.exp(binomial_log_cdf(k, n, float(Fraction(p)))) == pytest.approx(want, rel=1e-10)


def test_binomial_cdf_edges():
    assert binomial_log_cdf(-1, 10, 0.3) == -math.inf
    assert binomial_log_cdf(10, 10, 0.3) == 0.0
    assert binomial_log_cdf(0, 10, 0.0) == 0.0
    assert binomial_log_cdf(3, 10, 1.0) == -math.inf
    assert math.exp(binomial_log_cdf(0, 5000, 0.0025)) == pytest.approx((1 - 0.0025) ** 5000, rel=1e-12)
    with pytest.raises(ValueError):
        binomial_log_cdf(1, 10, 1.5)


def test_clopper_pearson_upper_bound():
    n, alpha = 500, 0.05
    assert binomial_upper_bound(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-12)
    assert binomial_upper_bound(n, n, alpha) == 1.0
    bounds = [binomial_upper_bound(k, n, alpha) for k in range(0, 40)]
    assert all(b > k / n for k, b in enumerate(bounds))
    assert bounds == sorted(bounds)
    for k in (1, 7, 30):   # the bound is where the lower tail is exactly alpha
        assert math.exp(binomial_log_cdf(k, n, bounds[k])) == pytest.approx(alpha, rel=1e-6)
    # checked in exact rational arithmetic: 2 successes in 100, one-sided 95% upper bound 6.16%
    b = binomial_upper_bound(2, 100, 0.05)
    assert float(exact_cdf(2, 100, Fraction(b))) == pytest.approx(0.05, rel=1e-6) and 0.0615 < b < 0.0617


@pytest.mark.parametrize("p", [0.003, 0.02, 0.1])
def test_the_upper_bound_covers_the_true_mean_with_the_stated_probability(p):
    """Exact coverage, summed over every outcome: P(bound(X) < p) <= alpha."""
    n, alpha = 300, 0.05
    pmf = np.exp([binomial_log_cdf(k, n, p) for k in range(n + 1)])
    pmf = np.diff(np.concatenate([[0.0], pmf]))
    miss = sum(pmf[k] for k in range(n + 1) if binomial_upper_bound(k, n, alpha) < p)
    assert miss <= alpha + 1e-9
    if n * p >= 5:
        assert miss > alpha / 4      # and not vacuous: a tight bound, not a loose one


def test_the_test_never_certifies_a_zero_bound_and_always_a_bound_of_one():
    assert not rejects(0, 10 ** 6, 0.0, 0.05)
    assert rejects(10, 10, 1.0, 0.05)
    assert smallest_certifiable_bound(5000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 5000))
    assert rejects(0, 5000, smallest_certifiable_bound(5000, 0.05) * 1.001, 0.05)
    assert not rejects(0, 5000, smallest_certifiable_bound(5000, 0.05) * 0.999, 0.05)


def test_the_grid_is_fixed_descending_and_fine_near_one():
    g = threshold_grid()
    assert np.array_equal(g, threshold_grid())
    assert g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0)
    assert ((g > 0.99) & (g < 1.0)).sum() >= 400     # scores crowd near 1
    assert np.max(-np.diff(g)) <= 0.001 + 1e-12


# ----------------------------------------------------------------------------- a known population

#: s ~ U(0, 1); the edge is wrong with probability f(s) = 0.6 (1 - s)^2; the cloud is right
#: whenever the edge is, and right with probability 0.8 when the edge is wrong. Then:
#:   P(kept at t, edge wrong, cloud right) = 0.8 * int_t^1 f = 0.16 (1 - t)^3   (= the excess: the
#:   edge is never right where the cloud is wrong), and P(hybrid wrong at t) = 0.04 + 0.16 (1 - t)^3.

def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = rng.random(n)
    edge_ok = rng.random(n) >= 0.6 * (1 - s) ** 2
    cloud_ok = edge_ok | (rng.random(n) < 0.8)
    return s, edge_ok, cloud_ok


def population_excess(t: float) -> float:
    return 0.16 * (1 - t) ** 3


def test_the_population_formulas_hold():
    s, e, c = draw(np.random.default_rng(0), 400_000)
    for t in (0.3, 0.6, 0.8):
        kept = s >= t
        assert (kept & ~e & c).mean() == pytest.approx(population_excess(t), abs=2e-3)
        hybrid_wrong = np.where(kept, ~e, ~c).mean()
        assert hybrid_wrong == pytest.approx(0.04 + population_excess(t), abs=2e-3)
        assert c.mean() - np.where(kept, e, c).mean() == pytest.approx(population_excess(t), abs=2e-3)


@pytest.mark.parametrize("kind", ["cloud", "accuracy"])
def test_the_guarantee_holds_over_many_calibration_draws(kind):
    """Over many calibration sets from the known population, the share whose certified threshold
    violates the target on the population is at most the risk (plus the simulation's own noise);
    the point estimate, read off the same curves, violates it about half the time."""
    rng = np.random.default_rng(1)
    risk, n, reps = 0.1, 1500, 300
    # cloud: excess <= 0.01 (t >= 0.603); accuracy 0.94: hybrid wrong <= 0.06, excess <= 0.02 (t >= 0.5)
    tol = 0.01 if kind == "cloud" else 0.02
    target = Target("cloud", 0.0, tol) if kind == "cloud" else Target("accuracy", 0.94)
    violations = point_violations = uncertified = 0
    for _ in range(reps):
        s, e, c = draw(rng, n)
        g = certify_threshold("max_softmax", s, e, c, target, risk)
        assert g.loss == (LOSS_KEPT_FIX if kind == "cloud" else LOSS_HYBRID_WRONG)
        if g.threshold is None:
            uncertified += 1
        elif population_excess(g.threshold) > tol:
            violations += 1
        point_target = Target("cloud", float(c.mean()) - tol, tol) if kind == "cloud" else target
        p = select_threshold(offload_curve(s, e, c), point_target)
        if p is not None and population_excess(p.threshold) > tol:
            point_violations += 1
    slack = 3 * math.sqrt(risk * (1 - risk) / reps)
    assert violations / reps <= risk + slack
    assert uncertified / reps < 0.05             # 1,500 inputs are enough for this target
    assert point_violations / reps > 0.3         # the check has the power to see a violation


def test_the_certified_threshold_meets_the_bound_it_reports():
    s, e, c = draw(np.random.default_rng(2), 3000)
    g = certify_threshold("max_softmax", s, e, c, Target("cloud", 0.0, 0.01), 0.05)
    assert g.certified and g.exact and g.level == 0.05 and g.n == 3000
    kept = s >= g.threshold
    assert g.losses == int((kept & ~e & c).sum())
    assert g.upper_bound <= 0.01
    assert rejects(g.losses, g.n, 0.01, 0.05)
    # the next grid threshold (keeping more) was the one that failed
    grid = threshold_grid()
    j = int(np.flatnonzero(grid == g.threshold)[0])
    assert g.stopped_at == grid[j + 1] and g.tested == j + 2
    k_next = int(((s >= g.stopped_at) & ~e & c).sum())
    assert not rejects(k_next, g.n, 0.01, 0.05)


def test_without_a_tolerance_nothing_is_certified():
    s, e, c = draw(np.random.default_rng(3), 2000)
    g = certify_threshold("max_softmax", s, e, c, Target("cloud", 0.9, 0.0), 0.05)
    assert not g.certified and g.tested == 1 and g.stopped_at == 1.0


def test_a_budget_target_has_no_guarantee():
    s, e, c = draw(np.random.default_rng(3), 100)
    with pytest.raises(ValueError, match="accuracy target"):
        certify_threshold("max_softmax", s, e, c, Target("max_offload_share", 0.2), 0.05)
    with pytest.raises(ValueError, match="risk"):
        certify_threshold("max_softmax", s, e, c, Target("cloud", 0.9, 0.01), 0.0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(50, 600), seed=st.integers(0, 2 ** 32 - 1), tol=st.sampled_from([0.01, 0.03, 0.08]),
       kind=st.sampled_from(["cloud", "accuracy"]))
def test_the_certified_threshold_is_never_less_conservative_than_the_point_estimate(n, seed, tol, kind):
    """Its kept share on validation is at most the point estimate's, and it meets the point
    estimate's target on validation too."""
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(n), int(rng.integers(1, 4)))          # ties, as int8 scores have
    e = rng.random(n) >= rng.uniform(0.0, 0.4) * (1 - s) ** rng.uniform(0.5, 3)
    c = e | (rng.random(n) < 0.7) if rng.random() < 0.5 else rng.random(n) < 0.9
    target = (Target("cloud", max(float(c.mean()) - tol, 0.0), tol) if kind == "cloud"
              else Target("accuracy", float(rng.uniform(0.6, 0.99))))
    g = certify_threshold("max_softmax", s, e, c, target, 0.1)
    if g.threshold is None:
        return
    at = evaluate_threshold(s, e, c, g.threshold)
    assert at.accuracy >= target.value - 1e-12
    p = select_threshold(offload_curve(s, e, c), target)
    assert p is not None and at.kept_share <= p.kept_share + 1e-12


# ----------------------------------------------------------------------------- in the calibration

def synthetic_split(rng: np.random.Generator, n: int) -> Split:
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), labels] += rng.gamma(2.0, 1.5, n)
    cloud = np.where(rng.random(n) < 0.95, labels, (labels + 1) % 4)
    return Split(logits, labels, cloud)


def test_calibrate_arrays_with_risk_certifies_each_score_and_chooses_among_the_exact_ones():
    rng = np.random.default_rng(4)
    val, test = synthetic_split(rng, 4000), synthetic_split(rng, 4000)
    point = calibrate_arrays(val, test, tolerance=0.01, resamples=50)
    cal = calibrate_arrays(val, test, tolerance=0.01, resamples=50, risk=0.05)
    assert cal.risk == 0.05 and cal.risk_candidates == tuple(s for s in EXACT_SCORES)
    assert cal.chosen in EXACT_SCORES
    for name, r in cal.results.items():
        g = r.guarantee
        assert g is not None and g.level == pytest.approx(0.05 / 3) and g.exact == (name in EXACT_SCORES)
        assert r.point_val == point.results[name].val            # the point estimate is kept beside it
        if g.certified:
            assert r.val.threshold == g.threshold and r.val.kept_share <= r.point_val.kept_share
            assert r.test == evaluate_threshold(cal.values[name]["test"], test.edge_ok, test.cloud_ok, g.threshold)
        d = r.to_dict(cal.target)
        assert d["guarantee"]["certified"] == g.certified and "point_estimate" in d
    assert point.risk is None and all(r.guarantee is None for r in point.results.values())
    with pytest.raises(ValueError, match="max-offload-share"):
        calibrate_arrays(val, test, target_kind="max_offload_share", target_value=0.2, risk=0.05)
