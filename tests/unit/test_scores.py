"""Confidence scores (edge_infer.scores) and the learned router and its files (edge_infer.router)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_infer.router import (
    DenseLayer, RouterFileError, RouterParams, load_router, router_from_dict, router_to_dict, save_router,
)
from edge_infer.scores import (
    SCORES, ScoreParams, as_score_logits, make_scorer, max_softmax_batch, router_features, softmax,
)


def scorer(name: str, **kw) -> callable:
    return make_scorer(name, ScoreParams(**kw))


def test_the_interface_lists_the_five_scores():
    assert SCORES == ("max_softmax", "temperature", "margin", "entropy", "router")


def test_the_device_config_accepts_exactly_the_score_names():
    import dataclasses

    from edge_infer.config import PolicyConfig
    check = next(f for f in dataclasses.fields(PolicyConfig) if f.name == "score").metadata["check"]
    assert all(check(name) is None for name in SCORES)
    assert check("maxprob") == "must be one of: " + ", ".join(repr(name) for name in SCORES)


def test_scores_on_a_hand_computed_example():
    # softmax([0, log 3]) = [0.25, 0.75]
    z = np.array([[0.0, math.log(3.0)]], dtype=np.float32)
    assert scorer("max_softmax")(z)[0] == pytest.approx(0.75, abs=1e-6)
    assert scorer("margin")(z)[0] == pytest.approx(0.5, abs=1e-6)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert scorer("entropy")(z)[0] == pytest.approx(1 - h / math.log(2), abs=1e-6)
    # T = 2: softmax([0, log 3 / 2]) = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]
    assert scorer("temperature", temperature=2.0)(z)[0] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-6)


def test_max_softmax_agrees_with_the_device_reference_score():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (200, 10)).astype(np.float32)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    _, ref = max_softmax_batch(probs)
    np.testing.assert_allclose(scorer("max_softmax")(z), ref, rtol=1e-5)
    np.testing.assert_allclose(scorer("temperature", temperature=1.0)(z), ref, rtol=1e-5)


@pytest.mark.parametrize("name", ["max_softmax", "temperature", "margin", "entropy"])
def test_scores_are_in_unit_range_higher_when_confident_and_shift_invariant(name):
    f = scorer(name, temperature=1.7)
    confident = np.array([[30.0, 0.0, 0.0, 0.0]])
    uniform = np.zeros((1, 4))
    split = np.array([[5.0, 5.0, 0.0, 0.0]])
    c, u, s = f(confident)[0], f(uniform)[0], f(split)[0]
    assert c > s > u or (name == "margin" and c > s and s == pytest.approx(0.0, abs=1e-9))
    assert c == pytest.approx(1.0, abs=1e-3)
    rng = np.random.default_rng(2)
    z = rng.normal(0, 5, (500, 7))
    v = f(z)
    assert v.shape == (500,) and np.all((v >= 0) & (v <= 1))
    np.testing.assert_allclose(f(z + 123.0), v, atol=1e-9)


def test_uniform_logits_score_the_minimum():
    u = np.zeros((1, 10))
    assert scorer("max_softmax")(u)[0] == pytest.approx(0.1)
    assert scorer("margin")(u)[0] == pytest.approx(0.0)
    assert scorer("entropy")(u)[0] == pytest.approx(0.0, abs=1e-12)


def test_temperature_above_one_lowers_confidence_and_keeps_the_label():
    z = np.array([[3.0, 1.0, 0.0]])
    assert scorer("temperature", temperature=3.0)(z)[0] < scorer("max_softmax")(z)[0]
    assert scorer("temperature", temperature=0.5)(z)[0] > scorer("max_softmax")(z)[0]


def test_bad_inputs_and_names_are_errors():
    with pytest.raises(ValueError, match="unknown score 'maxprob'.*max_softmax"):
        make_scorer("maxprob", ScoreParams())
    with pytest.raises(ValueError, match="router_file"):
        make_scorer("router", ScoreParams())
    with pytest.raises(ValueError, match="temperature"):
        make_scorer("temperature", ScoreParams(temperature=0.0))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        scorer("max_softmax")(np.zeros(10))


def test_probability_outputs_become_logits_that_reproduce_them():
    p = np.array([[0.7, 0.2, 0.1, 0.0]], dtype=np.float32)
    z = as_score_logits(p, "probabilities")
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(softmax(z), p, atol=1e-6)
    assert as_score_logits(p, "logits") is not None and np.array_equal(as_score_logits(p, "logits"), p)
    with pytest.raises(ValueError):
        as_score_logits(p, "scores")


# ----------------------------------------------------------------------------- router

def logistic_on_max_prob(w: float, b: float, num_classes: int = 3) -> RouterParams:
    return RouterParams(num_classes=num_classes, features=("max_prob",), mean=(0.0,), scale=(1.0,),
                        layers=(DenseLayer(((w,),), (b,)),))


def test_router_is_the_sigmoid_of_its_linear_model():
    r = logistic_on_max_prob(4.0, -2.0)
    z = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = softmax(z).max(1)
    want = 1 / (1 + np.exp(-(4.0 * p - 2.0)))
    np.testing.assert_allclose(scorer("router", router=r)(z), want, rtol=1e-12)


def test_router_standardises_features_and_runs_hidden_layers():
    # features: margin (1) + predicted_class one-hot (2) = 3; one tanh hidden layer of 2 units
    w1 = ((1.0, -1.0), (0.5, 0.0), (0.0, 2.0))
    r = RouterParams(num_classes=2, features=("margin", "predicted_class"), mean=(0.5, 0.0, 0.0),
                     scale=(2.0, 1.0, 1.0), layers=(DenseLayer(w1, (0.1, -0.1)), DenseLayer(((1.5,), (-0.5,)), (0.2,))),
                     activation="tanh")
    z = np.array([[1.0, -1.0], [0.0, 3.0]])
    x = router_features(z, r.features)
    x = (x - np.array(r.mean)) / np.array(r.scale)
    h = np.tanh(x @ np.array(w1) + np.array([0.1, -0.1]))
    want = 1 / (1 + np.exp(-(h @ np.array([[1.5], [-0.5]]) + 0.2)[:, 0]))
    np.testing.assert_allclose(scorer("router", router=r)(z), want, rtol=1e-12)


def test_router_refuses_logits_of_another_model():
    with pytest.raises(ValueError, match="trained for 3 classes.*recalibrate"):
        scorer("router", router=logistic_on_max_prob(1.0, 0.0, 3))(np.zeros((1, 10)))


def test_router_features_have_the_declared_widths_and_values():
    z = np.array([[1.0, 3.0, 2.0]])
    f = router_features(z, ("logits_sorted", "predicted_class", "logit_margin", "probs", "probs_sorted"))
    assert f.shape == (1, 3 + 3 + 1 + 3 + 3)
    np.testing.assert_allclose(f[0, :3], [3, 2, 1])
    np.testing.assert_allclose(f[0, 3:6], [0, 1, 0])
    assert f[0, 6] == pytest.approx(1.0)
    np.testing.assert_allclose(f[0, 7:10], softmax(z)[0])
    np.testing.assert_allclose(f[0, 10:], np.sort(softmax(z)[0])[::-1])


def test_router_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    w1 = tuple(tuple(float(v) for v in row) for row in rng.normal(size=(10 + 1, 4)))
    r = RouterParams(num_classes=10, features=("probs_sorted", "entropy"), mean=tuple(rng.normal(size=11).tolist()),
                     scale=tuple((rng.random(11) + 0.5).tolist()),
                     layers=(DenseLayer(w1, (0.0, 0.1, 0.2, 0.3)), DenseLayer(((1.0,), (2.0,), (3.0,), (4.0,)), (0.5,))),
                     activation="relu", temperature=1.3, target="cloud_not_fixing", meta={"trained_on": 5000})
    path = tmp_path / "router.json"
    save_router(r, path)
    back = load_router(path)
    assert back == r and back.meta == {"trained_on": 5000}
    z = rng.normal(0, 3, (50, 10)).astype(np.float32)
    np.testing.assert_array_equal(scorer("router", router=back)(z), scorer("router", router=r)(z))


def good_router_dict() -> dict:
    return router_to_dict(logistic_on_max_prob(2.0, -1.0))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown field.*'extra'"),
    (lambda d: d.pop("layers"), "missing field.*'layers'"),
    (lambda d: d.update(format="other"), "'format'"),
    (lambda d: d.update(version=2), "'version' 2 is not supported"),
    (lambda d: d.update(num_classes=1), "'num_classes'"),
    (lambda d: d.update(num_classes=True), "'num_classes'"),
    (lambda d: d.update(features=["max_prob", "colour"]), "unknown name.*'colour'"),
    (lambda d: d.update(mean=[0.0, 1.0]), r"'mean' must be a list of 1 numbers, got 2 values"),
    (lambda d: d.update(scale=[0.0]), "'scale' values must all be > 0"),
    (lambda d: d.update(scale=[float("nan")]), r"'scale'\[0\] must be a finite number"),
    (lambda d: d.update(temperature=-1), "'temperature' must be > 0"),
    (lambda d: d.update(activation="gelu"), "'activation'"),
    (lambda d: d.update(target="cloud"), "'target'"),
    (lambda d: d["layers"][0].update(weights=[[1.0], [2.0]]), r"'layers\[0\]'.weights must have 1 rows"),
    (lambda d: d["layers"][0].update(bias=[0.0, 0.0]), r"'layers\[0\]'.weights\[0\] must be a list of 2"),
    (lambda d: d["layers"][0].update(weights=[[True]]), r"weights\[0\]\[0\] must be a finite number"),
    (lambda d: d.update(layers=[]), "'layers' must be a non-empty list"),
    (lambda d: d["layers"].append({"weights": [[1.0, 2.0]], "bias": [0.0, 0.0]}), "last layer must have 1 output"),
])
def test_router_files_are_validated_strictly(tmp_path, mutate, message):
    d = good_router_dict()
    mutate(d)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(d))
    with pytest.raises(RouterFileError, match=message) as info:
        load_router(path)
    assert str(path) in str(info.value) and "edge-infer calibrate" in str(info.value)


def test_router_file_errors_name_the_file(tmp_path):
    with pytest.raises(RouterFileError, match=r"router file .*missing.json not found.*router_file"):
        load_router(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RouterFileError, match=r"bad.json is not valid JSON"):
        load_router(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(RouterFileError, match=r"bad.json: expected a JSON object"):
        load_router(bad)


def test_a_good_dict_loads():
    r = router_from_dict(good_router_dict(), "x")
    assert r.features == ("max_prob",) and r.layers[0].weights == ((2.0,),)
