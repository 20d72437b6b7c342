"""Calibration maths (the pure modules of edge_infer.calibration) on synthetic logits."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edge_infer.calibration.compare import Split, calibrate_arrays, choose_score
from edge_infer.calibration.curves import (
    OperatingPoint, auc, bootstrap_kept_difference, evaluate_threshold, kept_share_at, offload_curve, oracle_score,
)
from edge_infer.calibration.fitting import (
    RouterTraining, cross_fit_router, fit_temperature, fold_indices, nll, router_labels, train_router,
)
from edge_infer.calibration.report import policy_snippet
from edge_infer.calibration.threshold import Target, select_threshold
from edge_infer.scores import ScoreParams, make_scorer, softmax

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def sample_labels(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    p = softmax(logits, temperature)
    u = rng.random(len(p))[:, None]
    return (p.cumsum(1) < u).sum(1).clip(0, p.shape[1] - 1)


# ----------------------------------------------------------------------------- temperature

def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (20000, 10))
    y = sample_labels(z, rng, temperature=2.5)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.06)
    assert nll(z, y, t) < nll(z, y, 1.0)
    assert nll(z, y, t) <= min(nll(z, y, t * 1.1), nll(z, y, t / 1.1))


def test_fit_temperature_finds_sharpening_too():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, (20000, 5))
    y = sample_labels(z, rng, temperature=0.4)
    assert fit_temperature(z, y) == pytest.approx(0.4, rel=0.06)


# ----------------------------------------------------------------------------- curves

def test_offload_curve_on_a_hand_example_with_ties():
    score = np.array([0.9, 0.2, 0.1, 0.2])
    edge_ok = np.array([True, True, False, False])
    cloud_ok = np.array([False, True, True, True])
    c = offload_curve(score, edge_ok, cloud_ok)
    # cuts only between distinct values: offload 0, 1 (0.1), 3 (0.1, 0.2, 0.2), 4
    assert c.offloaded.tolist() == [0, 1, 3, 4]
    np.testing.assert_allclose(c.accuracy, [2 / 4, 3 / 4, 4 / 4, 3 / 4])
    np.testing.assert_allclose(c.thresholds, [0.0, 0.15, 0.55, 1.0])
    assert c.best() == OperatingPoint(0.55, 3, 4, 1.0)


def test_every_curve_point_is_what_its_threshold_does_and_nothing_is_missing():
    rng = np.random.default_rng(5)
    n = 400
    score = np.round(rng.random(n), 2)            # many ties
    edge_ok = rng.random(n) < 0.3 + 0.6 * score
    cloud_ok = rng.random(n) < 0.9
    c = offload_curve(score, edge_ok, cloud_ok)
    for j in range(len(c)):
        p = evaluate_threshold(score, edge_ok, cloud_ok, c.thresholds[j])
        assert (p.offloaded, p.accuracy) == (c.offloaded[j], pytest.approx(c.accuracy[j]))
    seen = {(int(k), round(float(a), 12)) for k, a in zip(c.offloaded, c.accuracy)}
    for t in np.linspace(-0.01, 1.01, 3001):
        p = evaluate_threshold(score, edge_ok, cloud_ok, t)
        assert (p.offloaded, round(p.accuracy, 12)) in seen
    assert c.offloaded[0] == 0 and c.offloaded[-1] == n
    assert c.accuracy[0] == pytest.approx(edge_ok.mean()) and c.accuracy[-1] == pytest.approx(cloud_ok.mean())


def test_thresholds_separate_neighbours_that_differ_in_the_last_bit():
    a = 0.5
    b = float(np.nextafter(a, 1.0))
    score = np.array([a, b, b])
    c = offload_curve(score, np.array([False, True, True]), np.array([True, True, True]))
    p = evaluate_threshold(score, np.array([False, True, True]), np.array([True, True, True]), c.thresholds[1])
    assert c.offloaded[1] == 1 and p.offloaded == 1


def test_curve_inputs_are_checked():
    with pytest.raises(ValueError, match="length"):
        offload_curve(np.zeros(3), np.zeros(2, bool), np.zeros(3, bool))
    with pytest.raises(ValueError, match="finite"):
        offload_curve(np.array([np.nan]), np.zeros(1, bool), np.zeros(1, bool))


# ----------------------------------------------------------------------------- selection

def curve_example():
    #            offload:  0     1     2     3     4     5
    # accuracy:           0.5   0.6   0.7   0.7   0.8   0.6
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    edge_ok = np.array([False, False, True, False, True])
    cloud_ok = np.array([True, True, True, True, False])
    return offload_curve(score, edge_ok, cloud_ok)


def test_accuracy_target_takes_the_least_offloading_that_reaches_it():
    c = curve_example()
    np.testing.assert_allclose(c.accuracy, [0.4, 0.6, 0.8, 0.8, 1.0, 0.8])
    p = select_threshold(c, Target("accuracy", 0.8))
    assert p.offloaded == 2 and p.accuracy == pytest.approx(0.8)
    assert select_threshold(c, Target("accuracy", 1.0)).offloaded == 4
    assert kept_share_at(c, 0.8) == pytest.approx(0.6)


def test_unreachable_accuracy_gives_none():
    c = curve_example()
    assert select_threshold(c, Target("accuracy", 1.0 + 0.0)).accuracy == 1.0
    c2 = offload_curve(np.array([0.1, 0.2]), np.array([False, False]), np.array([False, True]))
    assert select_threshold(c2, Target("accuracy", 0.9)) is None
    assert kept_share_at(c2, 0.9) is None


def test_offload_budget_takes_the_best_accuracy_within_it():
    c = curve_example()
    assert select_threshold(c, Target("max_offload_share", 0.5)).offloaded == 2   # 0.8 at 2 (not 3)
    assert select_threshold(c, Target("max_offload_share", 0.2)).offloaded == 1
    assert select_threshold(c, Target("max_offload_share", 0.0)).offloaded == 0
    assert select_threshold(c, Target("max_offload_share", 1.0)).offloaded == 4


def test_target_validation():
    with pytest.raises(ValueError):
        Target("speed", 0.5)
    with pytest.raises(ValueError):
        Target("accuracy", 1.5)


def test_choose_score_prefers_most_kept_then_the_simpler_score():
    pt = lambda off, acc: OperatingPoint(0.5, off, 100, acc)
    acc_target = Target("cloud", 0.9)
    pts = {"max_softmax": pt(40, 0.9), "margin": pt(30, 0.9), "entropy": pt(30, 0.91), "router": None}
    assert choose_score(pts, acc_target) == "margin"     # equal kept: the earlier in SCORES
    pts["router"] = pt(29, 0.9)
    assert choose_score(pts, acc_target) == "router"
    budget = Target("max_offload_share", 0.4)
    assert choose_score(pts, budget) == "entropy"        # best accuracy within the budget
    assert choose_score({"router": None}, acc_target) is None


# ----------------------------------------------------------------------------- oracle and auc

def test_oracle_reaches_cloud_accuracy_offloading_only_what_the_cloud_fixes():
    rng = np.random.default_rng(7)
    edge_ok = rng.random(1000) < 0.85
    cloud_ok = rng.random(1000) < 0.93
    c = offload_curve(oracle_score(edge_ok, cloud_ok), edge_ok, cloud_ok)
    need = int(cloud_ok.sum() - edge_ok.sum())
    assert kept_share_at(c, cloud_ok.mean()) == pytest.approx(1 - need / 1000)
    assert c.best().accuracy == pytest.approx((edge_ok | cloud_ok).mean())


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(8)
    s = np.round(rng.random(300), 1)
    y = rng.random(300) < s
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(s, y) == pytest.approx(pairs)
    assert auc(s, np.ones(300, bool)) is None


# ----------------------------------------------------------------------------- router

def class_dependent_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-prob carries no information; the predicted class does (class 0 is always wrong)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 5))
    wrong = z.argmax(1) == 0
    return z, ~wrong


def test_router_learns_what_max_softmax_cannot_see():
    z, ok = class_dependent_task(3000, 0)
    cfg = RouterTraining(model="logistic", features=("max_prob", "predicted_class"))
    oof = cross_fit_router(z, ok.astype(float), cfg, folds=5, seed=1)
    assert auc(oof, ok) > 0.99
    assert auc(make_scorer("max_softmax", ScoreParams())(z), ok) < 0.6
    router = train_router(z, ok.astype(float), cfg)
    zt, okt = class_dependent_task(2000, 9)
    assert auc(make_scorer("router", ScoreParams(router=router))(zt), okt) > 0.99


def test_logistic_router_recovers_a_known_logistic_model():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (40000, 2))
    margin = np.abs(z[:, 0] - z[:, 1])
    y = rng.random(len(z)) < 1 / (1 + np.exp(-(1.5 * margin - 1.0)))
    r = train_router(z, y.astype(float), RouterTraining(features=("logit_margin",), l2=0.0))
    # unstandardise: logit = w * (m - mean) / scale + b
    w = r.layers[0].weights[0][0] / r.scale[0]
    b = r.layers[0].bias[0] - w * r.mean[0]
    assert w == pytest.approx(1.5, rel=0.05) and b == pytest.approx(-1.0, abs=0.08)


def test_mlp_router_learns_a_non_monotone_rule_that_logistic_cannot():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.5, (3000, 3))
    m = np.abs(np.sort(z, 1)[:, -1] - np.sort(z, 1)[:, -2])
    ok = (m > 0.4) & (m < 1.2)                        # a band, not a threshold
    for model, lo, hi in (("mlp", 0.95, 1.0), ("logistic", 0.0, 0.75)):
        cfg = RouterTraining(model=model, features=("logit_margin",), hidden=8, steps=1500, learning_rate=0.05)
        r = train_router(z[:2000], ok[:2000].astype(float), cfg)
        a = auc(make_scorer("router", ScoreParams(router=r))(z[2000:]), ok[2000:])
        assert lo <= a <= hi, (model, a)


def test_cross_fitting_does_not_score_inputs_with_a_router_that_saw_them():
    # pure-noise labels: in-sample scores look informative, out-of-fold ones must not
    rng = np.random.default_rng(6)
    z = rng.normal(0, 2, (600, 10))
    y = (rng.random(600) < 0.5).astype(float)
    cfg = RouterTraining(model="mlp", hidden=16, steps=800, l2=0.0, learning_rate=0.03)
    in_sample = make_scorer("router", ScoreParams(router=train_router(z, y, cfg)))(z)
    oof = cross_fit_router(z, y, cfg, folds=5, seed=0)
    assert auc(in_sample, y) > 0.75
    assert 0.4 < auc(oof, y) < 0.6


def test_folds_partition_the_inputs():
    parts = fold_indices(103, 5, seed=2)
    assert len(parts) == 5 and sorted(np.concatenate(parts).tolist()) == list(range(103))
    with pytest.raises(ValueError):
        fold_indices(3, 5, 0)


def test_router_labels():
    e = np.array([True, True, False, False])
    c = np.array([True, False, True, False])
    assert router_labels(e, c, "edge_correct").tolist() == [1, 1, 0, 0]
    assert router_labels(e, c, "cloud_not_fixing").tolist() == [1, 1, 0, 1]


# ----------------------------------------------------------------------------- the whole calibration

def synthetic_split(n: int, seed: int) -> Split:
    """Edge logits whose labels follow softmax(z / 1.5); a cloud that fixes most edge errors."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, 10)).astype(np.float32)
    y = sample_labels(z, rng, temperature=1.5)
    edge_ok = z.argmax(1) == y
    cloud_pred = np.where(rng.random(n) < 0.8, y, z.argmax(1))
    cloud_pred = np.where(edge_ok & (rng.random(n) < 0.97), y, cloud_pred)
    return Split(z, y, cloud_pred)


@pytest.fixture(scope="module")
def calibrated():
    return calibrate_arrays(synthetic_split(4000, 1), synthetic_split(4000, 2), folds=4, seed=0)


def test_calibration_meets_the_cloud_target_on_validation_and_reports_test_honestly(calibrated):
    cal = calibrated
    val, test = synthetic_split(4000, 1), synthetic_split(4000, 2)
    assert cal.target.kind == "cloud" and cal.target.value == pytest.approx(val.cloud_ok.mean())
    assert cal.temperature == pytest.approx(1.5, rel=0.1)
    assert set(cal.results) == {"max_softmax", "temperature", "margin", "entropy", "router"}
    for name, r in cal.results.items():
        assert r.val.accuracy >= cal.target.value - 1e-12
        assert 0 < r.val.offloaded_share < 1
        # the test point is exactly what the validation threshold does on test
        f = make_scorer(name, ScoreParams(temperature=cal.temperature, router=cal.router))
        if name != "router":
            assert evaluate_threshold(f(val.logits), val.edge_ok, val.cloud_ok, r.val.threshold) == r.val
        assert evaluate_threshold(f(test.logits), test.edge_ok, test.cloud_ok, r.val.threshold) == r.test
    # the reference unless another score keeps more beyond noise (paired bootstrap interval above 0)
    eligible = [k for k in cal.results if k == "max_softmax" or (k in cal.val_gain and cal.val_gain[k].significant)]
    assert cal.chosen == max(eligible, key=lambda k: (cal.results[k].val.kept_share, -list(cal.results).index(k)))
    assert cal.oracle.test_kept_at_target > max(r.test.kept_share for r in cal.results.values())
    assert cal.router is not None and "cross-fitted" in cal.router_note


def test_calibration_with_an_offload_budget(calibrated):
    cal = calibrate_arrays(synthetic_split(2000, 1), synthetic_split(2000, 2), target_kind="max_offload_share",
                           target_value=0.1, scores=("max_softmax", "margin"))
    for r in cal.results.values():
        assert r.val.offloaded_share <= 0.1
    assert set(cal.results) == {"max_softmax", "margin"} and cal.router is None


def test_a_tolerance_below_the_cloud_keeps_more_on_the_device(calibrated):
    cal = calibrate_arrays(synthetic_split(4000, 1), synthetic_split(4000, 2), folds=4, seed=0, tolerance=0.005,
                           scores=("max_softmax", "margin"))
    assert cal.target.value == pytest.approx(calibrated.target.value - 0.005)
    assert cal.test_target_accuracy == pytest.approx(calibrated.test_target_accuracy - 0.005)
    assert "minus 0.50 pp" in cal.target.describe()
    for name in ("max_softmax", "margin"):
        assert cal.results[name].val.kept_share > calibrated.results[name].val.kept_share
        assert cal.results[name].val.accuracy >= cal.target.value - 1e-12


def test_router_is_skipped_with_a_reason_when_validation_has_too_few_errors():
    s = synthetic_split(300, 3)
    perfect = Split(s.logits, s.logits.argmax(1), s.cloud_pred)   # the edge is never wrong
    cal = calibrate_arrays(perfect, perfect, scores=("max_softmax", "router"), folds=5)
    assert "router" not in cal.results and "skipped" in cal.router_note and cal.chosen == "max_softmax"


def test_bootstrap_of_a_score_against_itself_is_exactly_zero():
    s = synthetic_split(1000, 4)
    f = make_scorer("max_softmax", ScoreParams())(s.logits)
    d = bootstrap_kept_difference({"max_softmax": f, "same": f.copy()}, s.edge_ok, s.cloud_ok, resamples=50)
    assert d["same"].mean == 0.0 and d["same"].low == 0.0 and d["same"].high == 0.0


def test_bootstrap_pairs_two_edge_models_on_the_same_resampled_inputs():
    rng = np.random.default_rng(7)
    n = 2000
    cloud_ok = rng.random(n) < 0.9
    worse = rng.random(n) < 0.8
    better = worse | (rng.random(n) < 0.5)          # right wherever the worse model is, and more
    score = rng.random(n)
    both = {"worse": score, "better": score.copy()}
    d = bootstrap_kept_difference(both, {"worse": worse, "better": better}, cloud_ok, reference="worse",
                                  resamples=100, seed=1, accuracy_offset=0.02)["better"]
    # the same ranking over answers that are right more often keeps more at every resample
    assert d.low > 0 and d.significant
    same = bootstrap_kept_difference(both, {"worse": worse, "better": worse}, cloud_ok, reference="worse",
                                     resamples=50, accuracy_offset=0.02)["better"]
    assert same.mean == same.low == same.high == 0.0
    with pytest.raises(ValueError, match="no edge answers"):
        bootstrap_kept_difference(both, {"worse": worse}, cloud_ok, reference="worse", resamples=5)


# ----------------------------------------------------------------------------- the policy snippet

def test_policy_snippet_is_toml_with_exactly_the_policy_keys():
    text = policy_snippet("router", 0.123456789012345, 1.25, 'C:\\models\\"r".json', "made by\na test")
    data = tomllib.loads(text)
    assert data == {"policy": {"score": "router", "threshold": 0.123456789012345, "temperature": 1.25,
                               "router_file": 'C:\\models\\"r".json'}}
    assert text.startswith("# made by\n# a test\n")
    data = tomllib.loads(policy_snippet("margin", 0.5, 1.0, None, "x"))
    assert data == {"policy": {"score": "margin", "threshold": 0.5, "temperature": 1.0}}
