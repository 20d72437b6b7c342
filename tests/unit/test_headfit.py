"""The edge model's head, read, fine-tuned and written back (device/tools/tflitehead.py, headfit.py):
the int8 arithmetic matches the interpreter's, the file rewritten in place runs, and refusals say why."""
from __future__ import annotations

import numpy as np
import pytest

from edge_infer.backends.tflite_cpu import load_interpreter_module
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.tools.headfit import FloatHead, fit_head, quantize_head
from edge_infer.tools.tflitehead import HeadError, feature_model, find_head, read_quant_head, write_head

from ..conftest import EDGE_CARD


@pytest.fixture(scope="module")
def shipped():
    card = load_card(EDGE_CARD)
    model = verified_model_bytes(card)
    return card, model, find_head(model)


def run(model: bytes, images: np.ndarray) -> np.ndarray:
    """The model on uint8 28x28 images, one invoke each (q = pixel - 128, the card's input quantization)."""
    module, _ = load_interpreter_module("auto")
    it = module.Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    rows = []
    for im in images:
        it.set_tensor(inp["index"], (im.astype(np.int16) - 128).astype(np.int8)[None, :, :, None])
        it.invoke()
        rows.append(it.get_tensor(out["index"]).reshape(-1))
    return np.array(rows)


def test_the_shipped_head_is_found_with_its_quantization(shipped):
    card, model, head = shipped
    assert (head.classes, head.width, head.per_channel) == (10, 64, True)
    q = read_quant_head(model, head)
    assert (q.output_scale, q.output_zero_point) == pytest.approx((card.output.quantization.scale,
                                                                   card.output.quantization.zero_point))
    assert q.q_weights.dtype == np.int8 and q.q_bias.dtype == np.int32 and len(q.weight_scales) == 10


def test_numpy_int8_head_is_the_interpreters_on_real_features(shipped, fmnist):
    """Features from the cut model through QuantHead.int8_logits == the whole model's output."""
    _, model, head = shipped
    images = fmnist["test"].images[:300]
    feats = run(feature_model(model, head), images)
    assert feats.shape == (300, 64) and feats.dtype == np.int8
    q = read_quant_head(model, head)
    assert np.array_equal(q.int8_logits(feats), run(model, images))


def test_quantization_round_trip_gives_back_the_same_bytes(shipped):
    _, model, head = shipped
    q = read_quant_head(model, head)
    again = quantize_head(q.dequantized(), q)
    assert np.array_equal(again.q_weights, q.q_weights) and np.array_equal(again.q_bias, q.q_bias)
    assert np.array_equal(again.weight_scales, q.weight_scales)
    assert write_head(model, head, again.q_weights, again.weight_scales, again.q_bias) == model


def test_a_new_head_written_in_place_runs_as_the_numpy_head_says(shipped, fmnist):
    _, model, head = shipped
    q = read_quant_head(model, head)
    old = q.dequantized()
    rng = np.random.default_rng(3)
    changed = FloatHead(old.weights * 1.4 + rng.normal(0, 0.05, old.weights.shape), old.bias + rng.normal(0, 0.5, 10))
    new_q = quantize_head(changed, q)
    assert not np.array_equal(new_q.weight_scales, q.weight_scales)   # the scales are rewritten too
    new_model = write_head(model, head, new_q.q_weights, new_q.weight_scales, new_q.q_bias)
    assert len(new_model) == len(model)
    images = fmnist["test"].images[:300]
    feats = run(feature_model(model, head), images)
    out = run(new_model, images)
    assert np.abs(out.astype(int) - new_q.int8_logits(feats)).max() <= 1
    # within quantization error of the float head
    float_logits = np.clip(changed.logits(q.features(feats)), new_q.output_logits(-128), new_q.output_logits(127))
    assert np.abs(new_q.output_logits(out) - float_logits).max() < 3 * new_q.output_scale
    assert find_head(new_model).weights.scales == tuple(float(s) for s in new_q.weight_scales)


def test_fit_moves_toward_the_labels_and_stays_near_the_old_head_with_a_strong_pull():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    true_w = rng.normal(size=(3, 8)) * 2
    y = (x @ true_w.T).argmax(1)
    start = FloatHead(np.zeros((3, 8)), np.zeros(3))
    fit = fit_head(x, y, start, l2=1e-3, iterations=400)
    assert fit.loss_end < 0.5 * fit.loss_start and fit.grad_norm < 1e-3
    assert (fit.head.logits(x).argmax(1) == y).mean() > 0.95
    again = fit_head(x, y, start, l2=1e-3, iterations=400)
    assert np.array_equal(again.head.weights, fit.head.weights)    # deterministic
    pulled = fit_head(x, y, start, l2=1e3, iterations=400, learning_rate=1e-4)
    assert np.abs(pulled.head.weights).max() < 1e-2


def test_fit_refuses_inputs_that_do_not_fit_the_head():
    start = FloatHead(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="labels outside"):
        fit_head(np.zeros((2, 4)), np.array([0, 3]), start)
    with pytest.raises(ValueError, match="do not fit"):
        fit_head(np.zeros((2, 5)), np.array([0, 1]), start)


def test_refusals_say_why(shipped):
    _, model, head = shipped
    with pytest.raises(HeadError, match="not a TFLite model"):
        find_head(b"\0" * 64)
    with pytest.raises(HeadError, match="made by MEAN, not FULLY_CONNECTED"):
        find_head(feature_model(model, head))   # a model whose output is the pooled features
    q = read_quant_head(model, head)
    with pytest.raises(HeadError, match="int8 10x64"):
        write_head(model, head, q.q_weights.astype(np.int16), q.weight_scales, q.q_bias)
    with pytest.raises(HeadError, match="positive weight scale"):
        write_head(model, head, q.q_weights, np.zeros(10, np.float32), q.q_bias)
    with pytest.raises(HeadError, match="not a valid TFLite model"):
        find_head(model[:2000])
