"""models/recipes/fmnist/_cascade.py: the cascade-aware edge recipe's loss, augmentation and metrics.

The loss is checked against its definition (distillation KL, cross-entropy, the Gatekeeper push
to uniform on the errors the cloud fixes); the metrics are checked on the shipped v1 pair against
the figures `edge-infer calibrate` gives for it (models/README.md: 64.5% val / 63.1% test kept).
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from ..conftest import MODELS, REPO

RECIPE = REPO / "models" / "recipes" / "fmnist" / "_cascade.py"


@pytest.fixture(scope="module")
def cascade():
    spec = importlib.util.spec_from_file_location("_cascade", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_cascade", mod)
    spec.loader.exec_module(mod)
    return mod


def _batch(n: int = 64, seed: int = 0, temperature: float = 3.0, cascade=None):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 10))
    labels = rng.integers(0, 10, n)
    teacher = rng.normal(0, 3, (n, 10))
    cloud_ok = rng.random(n) < 0.7
    return logits, labels, teacher, cloud_ok, cascade.pack_targets(labels, teacher, cloud_ok, temperature)


def test_plain_cross_entropy_when_no_distillation_and_no_gate(cascade):
    logits, labels, _, _, y = _batch(cascade=cascade)
    got = cascade.cascade_loss(logits, y, cascade.LossConfig(3.0, 0.0, 0.0))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got, -np.log(p[np.arange(len(labels)), labels]), rtol=1e-9)


def test_distillation_term_is_zero_when_student_equals_teacher(cascade):
    _, labels, teacher, cloud_ok, y = _batch(cascade=cascade)
    got = cascade.cascade_loss(teacher, y, cascade.LossConfig(3.0, 1.0, 0.0))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)   # targets are float32
    other = cascade.cascade_loss(teacher + np.random.default_rng(1).normal(0, 1, teacher.shape), y,
                                 cascade.LossConfig(3.0, 1.0, 0.0))
    assert (other > 0).all()


def test_gate_replaces_the_loss_only_on_errors_the_cloud_fixes(cascade):
    logits, labels, _, cloud_ok, y = _batch(n=400, cascade=cascade)
    plain = cascade.cascade_loss(logits, y, cascade.LossConfig(3.0, 0.5, 0.0))
    gated = cascade.cascade_loss(logits, y, cascade.LossConfig(3.0, 0.5, 1.0))
    wrong = logits.argmax(1) != labels
    fixes = wrong & cloud_ok
    assert fixes.any() and (~fixes).any()
    np.testing.assert_allclose(gated[~fixes], plain[~fixes])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl_uniform = (p * np.log(p)).sum(1) + np.log(10)     # KL(p || uniform)
    np.testing.assert_allclose(gated[fixes], kl_uniform[fixes], rtol=1e-9)
    every_error = cascade.cascade_loss(logits, y, cascade.LossConfig(3.0, 0.5, 1.0, gate_only_cloud_right=False))
    np.testing.assert_allclose(every_error[wrong], kl_uniform[wrong], rtol=1e-9)


def test_gate_loss_is_lowest_at_uniform_on_an_error(cascade):
    # one error the cloud fixes: the uniform prediction costs 0, a confident wrong one more
    y = cascade.pack_targets(np.array([3]), np.zeros((1, 10)), np.array([True]), 3.0)
    cfg = cascade.LossConfig(3.0, 0.5, 1.0)
    confident_wrong = np.zeros((1, 10))
    confident_wrong[0, 5] = 6.0
    assert cascade.cascade_loss(np.zeros((1, 10)), y, cfg)[0] == pytest.approx(0.0, abs=1e-12)
    assert cascade.cascade_loss(confident_wrong, y, cfg)[0] > 1.0


def test_loss_config_rejects_out_of_range_weights(cascade):
    with pytest.raises(ValueError, match="gate_weight"):
        cascade.LossConfig(3.0, 0.5, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        cascade.LossConfig(0.0, 0.5, 0.0)


def test_augment_crops_within_the_padding_and_flips(cascade):
    rng = np.random.default_rng(3)
    images = rng.integers(1, 256, (200, 28, 28)).astype(np.uint8)   # no zero pixels: padding shows as 0
    out, flipped = cascade.augment(images, np.random.default_rng(4))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert 50 < flipped.sum() < 150
    for i in range(len(images)):
        src = images[i, :, ::-1] if flipped[i] else images[i]
        padded = np.pad(src, 2)
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(padded[dy:dy + 28, dx:dx + 28], out[i])]
        assert matches, f"image {i} is not a crop of the padded (flipped={flipped[i]}) image"
    same, _ = cascade.augment(images, np.random.default_rng(4))
    np.testing.assert_array_equal(same, out)   # seeded: reproducible


def _pair(split: str):
    with np.load(MODELS / "fmnist-edge-v1" / "predictions.npz") as e, \
            np.load(MODELS / "fmnist-cloud-v1" / "predictions.npz") as c:
        return ({s: e[f"{s}_logits"] for s in ("val", "test")}, {s: c[f"{s}_logits"] for s in ("val", "test")},
                {s: e[f"{s}_labels"] for s in ("val", "test")})


def test_cascade_metrics_of_the_shipped_pair_match_calibrate(cascade):
    edge, cloud, labels = _pair("val")
    m = cascade.cascade_metrics(edge, cloud, labels)
    assert m.cloud_val_accuracy == pytest.approx(0.9442) and m.cloud_test_accuracy == pytest.approx(0.9397)
    assert m.edge_val_accuracy == pytest.approx(0.9028) and m.edge_test_accuracy == pytest.approx(0.9035)
    assert m.threshold == pytest.approx(0.9678, abs=1e-4)
    assert m.val_kept == pytest.approx(0.6448) and m.test_kept == pytest.approx(0.6311)
    assert m.val_hybrid_accuracy >= m.cloud_val_accuracy
    tol = cascade.cascade_metrics(edge, cloud, labels, tolerance=0.0025)
    assert tol.val_kept == pytest.approx(0.778) and tol.test_kept == pytest.approx(0.7661)


def test_paired_bootstrap_sees_no_difference_between_a_model_and_itself_and_a_real_one(cascade):
    edge, cloud, labels = _pair("val")
    same = cascade.paired_kept_bootstrap(edge["val"], edge["val"], cloud["val"], labels["val"], resamples=50)
    assert same.mean == 0.0 and not same.significant
    # the cloud model as the "edge" model keeps everything at its own accuracy: far better than v1
    better = cascade.paired_kept_bootstrap(edge["val"], cloud["val"], cloud["val"], labels["val"], resamples=50)
    assert better.significant and better.mean > 0.3
