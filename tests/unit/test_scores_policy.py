import numpy as np
import pytest

from edge_infer.modelcard import OutputSpec, Quantization
from edge_infer.policy import Decision, OffloadPolicy
from edge_infer.scores import Prediction, dequantize, max_softmax_batch, probabilities, softmax, top1


def max_softmax(probs: np.ndarray) -> Prediction:
    """The reference: top class and its probability, straight from the definition."""
    flat = probs.reshape(-1)
    return Prediction(int(flat.argmax()), float(flat.max()))


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
    assert top1(np.array([[0.2, 0.7, 0.1]], dtype=np.float32), spec) == pred
    q = OutputSpec("probabilities", "uint8", Quantization(1 / 256, 0))
    assert top1(np.array([[10, 200, 46]], dtype=np.uint8), q).confidence == pytest.approx(200 / 256)


def test_batch_scores_match_single():
    probs = softmax(np.random.default_rng(1).normal(size=(8, 10)))
    labels, conf = max_softmax_batch(probs)
    for i in range(8):
        single = max_softmax(probs[i])
        assert single.label == labels[i] and single.confidence == pytest.approx(conf[i])


def test_threshold_and_audit():
    p = OffloadPolicy(0.8)
    assert p.wants(0.8, u=0.0) .reason == "confident" and not p.wants(0.8, 0.0).offload
    assert p.wants(0.79, 0.9).offload and p.wants(0.79, 0.9).reason == "below_threshold"
    assert OffloadPolicy(0.8, enabled=False).wants(0.1, 0.0) == Decision(False, "offload_disabled")
    audited = OffloadPolicy(0.8, audit_rate=0.05)
    assert audited.wants(0.99, u=0.01) == Decision(True, "audit")
    assert audited.wants(0.99, u=0.05) == Decision(False, "confident")


def test_audit_share_follows_the_rate():
    import random
    rng = random.Random(1)
    p = OffloadPolicy(0.5, audit_rate=0.02)
    share = sum(p.wants(0.9, rng.random()).offload for _ in range(50_000)) / 50_000
    assert share == pytest.approx(0.02, abs=0.003)


def test_sample_budget_is_a_token_bucket():
    p = OffloadPolicy(0.5, max_samples_per_minute=3)
    st = p.initial_budget(now=0.0)
    outcomes = []
    for _ in range(5):
        ok, why, st = p.admit(st, now=0.0, nbytes=100)
        outcomes.append((ok, why))
    assert outcomes == [(True, "")] * 3 + [(False, "budget_samples")] * 2
    ok, _, st = p.admit(st, now=19.0, nbytes=100)      # 19 s refill 0.95 of a sample: not yet
    assert not ok
    ok, _, st = p.admit(st, now=21.0, nbytes=100)      # 21 s: one sample back
    assert ok
    ok, _, st = p.admit(st, now=1000.0, nbytes=100)    # capped at capacity, not 1000/20
    assert ok and st.samples == pytest.approx(2.0)


def test_byte_budget():
    p = OffloadPolicy(0.5, max_bytes_per_hour=3600)    # 1 byte per second
    st = p.initial_budget(0.0)
    ok, _, st = p.admit(st, 0.0, 3000)
    assert ok and st.bytes == pytest.approx(600)
    ok, why, st = p.admit(st, 0.0, 1000)
    assert not ok and why == "budget_bytes"
    ok, _, st = p.admit(st, 400.0, 1000)
    assert ok


def test_no_budget_means_no_limit():
    p = OffloadPolicy(0.5)
    assert not p.has_budget and OffloadPolicy(0.5, max_bytes_per_hour=1).has_budget
    st = p.initial_budget(0.0)
    for _ in range(1000):
        ok, _, st = p.admit(st, 0.0, 10**6)
        assert ok


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
