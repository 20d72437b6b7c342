"""Per-class thresholds (edge_infer.calibration.perclass) on synthetic data whose classes differ
in difficulty by a known amount, and their TOML snippet as the device config reads it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edge_infer.calibration.curves import evaluate_threshold, offload_curve
from edge_infer.calibration.perclass import (
    ClassData, ClassModel, apply_thresholds, evaluate_thresholds, fit_class_model, fit_class_thresholds,
)
from edge_infer.calibration.report import policy_snippet
from edge_infer.calibration.threshold import Target, select_threshold
from edge_infer.config import parse_device_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def draw(rng: np.random.Generator, n: int, intercepts: tuple[float, ...], slope: float = 1.5,
         cloud_accuracy: float = 0.97) -> ClassData:
    """P(edge right | score s, class c) = sigmoid(intercepts[c] + slope * logit(s)): the model's own form."""
    pred = rng.integers(0, len(intercepts), n)
    s = rng.uniform(0.3, 1.0, n)
    z = np.asarray(intercepts)[pred] + slope * (np.log(s) - np.log1p(-s))
    edge_ok = rng.random(n) < 1.0 / (1.0 + np.exp(-z))
    return ClassData(s, pred, edge_ok, rng.random(n) < cloud_accuracy)


def fit(val: ClassData, test: ClassData, tol: float = 0.005, **kw):
    target = Target("cloud", float(val.cloud_ok.mean()) - tol, tol)
    single = select_threshold(offload_curve(val.score, val.edge_ok, val.cloud_ok), target)
    single_test = evaluate_threshold(test.score, test.edge_ok, test.cloud_ok, single.threshold)
    num_classes = int(max(val.predicted.max(), test.predicted.max())) + 1
    return fit_class_thresholds("max_softmax", val, test, target, num_classes, single, single_test, **kw), target


def test_the_class_model_recovers_known_intercepts_and_slope():
    d = draw(np.random.default_rng(0), 60_000, (-0.5, 1.0, 3.0), slope=1.5)
    m = fit_class_model(d.score, d.predicted, d.edge_ok.astype(float), 3, l2=0.0)
    assert m.slope == pytest.approx(1.5, abs=0.08)
    np.testing.assert_allclose(m.intercepts, (-0.5, 1.0, 3.0), atol=0.12)
    assert m.seen == (True, True, True)


def test_the_table_keeps_exactly_the_inputs_the_model_keeps():
    rng = np.random.default_rng(1)
    m = ClassModel((-1.0, 0.5, 2.0), 1.3, (True, True, True))
    s, pred = rng.uniform(0, 1, 20_000), rng.integers(0, 3, 20_000)
    for level in (0.3, 0.8, 0.95, 0.999):
        t = m.thresholds(level, fallback=0.5)
        keep_by_model = m.keep_probability(s, pred) >= level
        np.testing.assert_array_equal(~apply_thresholds(s, pred, t), keep_by_model)
        assert t[0] > t[1] > t[2]          # the hardest class is held to the highest threshold


def test_a_class_never_predicted_in_the_fit_data_gets_the_single_threshold():
    d = draw(np.random.default_rng(2), 3000, (0.0, 2.0))
    m = fit_class_model(d.score, d.predicted, d.edge_ok.astype(float), 3)
    assert m.seen == (True, True, False)
    assert m.thresholds(0.9, fallback=0.77)[2] == 0.77


def test_classes_that_differ_in_difficulty_get_their_own_thresholds_beyond_noise():
    rng = np.random.default_rng(3)
    val, test = draw(rng, 4000, (-0.5, 3.0)), draw(rng, 4000, (-0.5, 3.0))
    r, target = fit(val, test)
    assert r.chosen and r.note.startswith("chosen") and r.gain.significant
    assert r.thresholds[0] > r.thresholds[1]
    # held-out test: far more kept than the single threshold, at the target all the same
    assert r.test.kept_share > r.single_test.kept_share + 0.15
    assert r.test.accuracy >= float(test.cloud_ok.mean()) - target.tolerance - 0.005
    # the points are what the table does
    assert r.test == evaluate_thresholds(test.score, test.predicted, test.edge_ok, test.cloud_ok, r.thresholds,
                                         r.level)
    d = r.to_dict(["hard", "easy"])
    assert d["chosen"] and set(d["thresholds"]) == {"hard", "easy"} and d["validation_gain_vs_single_threshold"]


def test_classes_of_the_same_difficulty_are_not_worth_a_table():
    rng = np.random.default_rng(4)
    val, test = draw(rng, 4000, (1.0, 1.0)), draw(rng, 4000, (1.0, 1.0))
    r, _ = fit(val, test)
    assert not r.chosen and "within noise" in r.note and not r.gain.significant
    assert r.thresholds is not None          # fitted and reported all the same
    forced, _ = fit(val, test, mode="on")
    assert forced.chosen and "as requested" in forced.note and forced.thresholds == r.thresholds
    off, _ = fit(val, test, mode="off")
    assert not off.chosen and off.thresholds is None


def test_per_class_thresholds_need_an_accuracy_target_and_enough_errors():
    rng = np.random.default_rng(5)
    val, test = draw(rng, 2000, (0.0, 2.0)), draw(rng, 2000, (0.0, 2.0))
    budget = Target("max_offload_share", 0.2)
    single = evaluate_threshold(val.score, val.edge_ok, val.cloud_ok, 0.5)
    r = fit_class_thresholds("max_softmax", val, test, budget, 2, single, single)
    assert not r.chosen and "accuracy target" in r.note
    few = ClassData(val.score[:40], val.predicted[:40], np.ones(40, bool), val.cloud_ok[:40])
    r = fit_class_thresholds("max_softmax", few, test, Target("cloud", 0.9), 2, single, single)
    assert not r.chosen and "rarer kind" in r.note
    with pytest.raises(ValueError, match="mode"):
        fit_class_thresholds("max_softmax", val, test, Target("cloud", 0.9), 2, single, single, mode="maybe")


def test_the_snippet_with_class_thresholds_is_a_device_policy(tmp_path):
    labels = ["t-shirt/top", "shirt", "ankle boot"]
    text = policy_snippet("max_softmax", 0.9, 1.0, None, "header", dict(zip(labels, (0.95, 0.99, 0.5))))
    p = tomllib.loads(text)["policy"]
    assert p["class_thresholds"] == {"t-shirt/top": 0.95, "shirt": 0.99, "ankle boot": 0.5}
    cfg = parse_device_config({"device_id": "d", "model": {"card": "card.json"}, "policy": p})
    assert cfg.policy.class_thresholds.for_labels(labels, cfg.policy.threshold) == (0.95, 0.99, 0.5)
    assert "class_thresholds" not in policy_snippet("max_softmax", 0.9, 1.0, None, "header")
