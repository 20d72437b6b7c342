import numpy as np
import pytest

from edge_infer.modelcard import OutputSpec, Quantization
from edge_infer.policy import ThresholdPolicy
from edge_infer.scores import dequantize, max_softmax, max_softmax_batch, probabilities, softmax, top1


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    assert np.allclose(p, [[0.5, 0.5, 0.0]])
    assert np.allclose(softmax(np.random.default_rng(0).normal(size=(5, 10))).sum(axis=1), 1.0)


def test_int8_logits_are_dequantized_before_softmax():
    spec = OutputSpec("logits", "int8", Quantization(0.1, -3))
    raw = np.array([[-3, 7, 17]], dtype=np.int8)        # logits 0, 1, 2
    assert np.allclose(dequantize(raw, spec), [[0.0, 1.0, 2.0]])
    pred = max_softmax(probabilities(raw, spec))
    expected = np.exp(2) / (1 + np.exp(1) + np.exp(2))
    assert pred.label == 2 and pred.confidence == pytest.approx(expected, rel=1e-5)


def test_probabilities_output_is_used_as_is():
    spec = OutputSpec("probabilities", "float32", None)
    pred = max_softmax(probabilities(np.array([[0.2, 0.7, 0.1]], dtype=np.float32), spec))
    assert pred.label == 1 and pred.confidence == pytest.approx(0.7)


def test_batch_scores_match_single():
    probs = softmax(np.random.default_rng(1).normal(size=(8, 10)))
    labels, conf = max_softmax_batch(probs)
    for i in range(8):
        single = max_softmax(probs[i])
        assert single.label == labels[i] and single.confidence == pytest.approx(conf[i])


def test_threshold_policy():
    p = ThresholdPolicy(0.8)
    assert not p.decide(0.8).offload and p.decide(0.8).reason == "confident"
    assert p.decide(0.79).offload and p.decide(0.79).reason == "below_threshold"
    off = ThresholdPolicy(0.8, enabled=False).decide(0.1)
    assert not off.offload and off.reason == "offload_disabled"


@pytest.mark.parametrize("spec", [OutputSpec("logits", "int8", Quantization(0.12, -17)),
                                  OutputSpec("logits", "float32", None)])
def test_fast_top1_equals_the_reference_score(spec):
    rng = np.random.default_rng(7)
    for _ in range(200):
        raw = (rng.integers(-128, 128, (1, 10)).astype(np.int8) if spec.dtype == "int8"
               else rng.normal(0, 4, (1, 10)).astype(np.float32))
        ref = max_softmax(probabilities(raw, spec))
        fast = top1(raw, spec)
        assert fast.label == ref.label and fast.confidence == pytest.approx(ref.confidence, rel=1e-5)
