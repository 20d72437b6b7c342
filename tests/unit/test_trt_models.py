"""The shipped ONNX exports of the edge model for TensorRT (models/fmnist-edge-v1-trt/), checked on the CPU.

The INT8 model must be what TensorRT's explicit quantization takes: QuantizeLinear/
DequantizeLinear on the data and weight inputs of every Conv and Gemm, int8 zero points
that are all 0 (symmetric), per-channel weight scales; and it must be about as accurate
as the float model. Accuracy is measured here through the device's own onnxruntime
backend on the whole test split, as models/recipes/fmnist/export_trt_onnx.py measured
the cards' figures. What TensorRT makes of these files on a GPU is
tests/hardware/test_tensorrt_hw.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_infer.backends import create_backend
from edge_infer.backends.onnxrt import Options
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor

from ..conftest import EDGE_CARD, REPO

TRT_DIR = REPO / "models" / "fmnist-edge-v1-trt"
CARDS = {"fp32": TRT_DIR / "card.json", "fp16": TRT_DIR / "card_fp16.json", "int8": TRT_DIR / "card_int8.json"}
#: the INT8 model's test accuracy may be at most this far below the float model's (measured: see the card)
INT8_ACCURACY_BOUND = 0.005
#: ... and its labels agree with the float model's on at least this share of the test split
INT8_AGREEMENT_MIN = 0.98
WEIGHTED = ("Conv", "Gemm")


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx", reason="the onnx package is a dev dependency (pip install onnx)")


@pytest.fixture(scope="module")
def qdq(onnx):
    return onnx.load(load_card(CARDS["int8"]).file)


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def test_every_conv_and_gemm_takes_dequantized_data_and_weights(qdq, onnx):
    graph = qdq.graph
    made_by = _producers(graph)
    inits = {t.name: t for t in graph.initializer}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED]
    assert [n.op_type for n in weighted] == ["Conv"] * 6 + ["Gemm"]
    for node in weighted:
        data, weight = (made_by.get(x) for x in node.input[:2])
        assert data is not None and data.op_type == "DequantizeLinear", f"{node.name}: data not dequantized"
        q = made_by.get(data.input[0])
        assert q is not None and q.op_type == "QuantizeLinear", f"{node.name}: data not quantized first"
        assert weight is not None and weight.op_type == "DequantizeLinear", f"{node.name}: weight not dequantized"
        stored = inits[weight.input[0]]
        assert stored.data_type == onnx.TensorProto.INT8, f"{node.name}: weights are not stored as int8"
        axis = {a.name: onnx.helper.get_attribute_value(a) for a in weight.attribute}.get("axis", 1)
        scales = onnx.numpy_helper.to_array(inits[weight.input[1]])
        assert axis == 0 and scales.shape == (stored.dims[0],), f"{node.name}: weights not per output channel"
        if len(node.input) > 2:    # the bias stays float: TensorRT fuses it, it has no int32 bias input
            assert node.input[2] in inits and inits[node.input[2]].data_type == onnx.TensorProto.FLOAT


def test_every_zero_point_is_int8_zero_and_every_scale_positive(qdq, onnx):
    inits = {t.name: t for t in qdq.graph.initializer}
    qdq_nodes = [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq_nodes) >= 3 * 7
    for node in qdq_nodes:
        assert len(node.input) == 3, f"{node.name}: no zero point (TensorRT needs it to be int8)"
        zp = inits[node.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, f"{node.name}: zero point is not int8"
        assert not onnx.numpy_helper.to_array(zp).any(), f"{node.name}: asymmetric (zero point != 0)"
        scale = onnx.numpy_helper.to_array(inits[node.input[1]])
        assert scale.dtype == np.float32 and (scale > 0).all() and np.isfinite(scale).all()


def test_the_float_models_have_no_qdq_and_fp16_keeps_float32_io(onnx):
    fp32, fp16 = (onnx.load(load_card(CARDS[p]).file) for p in ("fp32", "fp16"))
    for model in (fp32, fp16):
        assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node}
        for io in (*model.graph.input, *model.graph.output):
            assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        onnx.checker.check_model(model, full_check=True)
    assert {t.data_type for t in fp32.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert {t.data_type for t in fp16.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert [n.op_type for n in fp16.graph.node][0] == [n.op_type for n in fp16.graph.node][-1] == "Cast"


def test_the_cards_are_the_files_and_fall_back_to_the_tflite_model():
    for precision, path in CARDS.items():
        card = load_card(path)
        verified_model_bytes(card)   # sha256
        assert card.format == "onnx" and card.input.shape == (-1, 1, 28, 28) and card.input.layout == "NCHW"
        assert card.fallback_card is not None and card.fallback_card.resolve() == EDGE_CARD.resolve()
        assert card.labels == load_card(EDGE_CARD).labels
        assert card.name == f"fmnist-edge-{precision}"
        assert card.file.stat().st_size < 64 * 1024


@pytest.fixture(scope="module")
def test_labels(fmnist):
    """Labels of the whole test split from each model, through the onnxruntime backend on the CPU."""
    out = {}
    images = list(fmnist["test"].images)
    for precision, path in CARDS.items():
        card = load_card(path)
        be = create_backend("onnxruntime", card, verified_model_bytes(card), Options(max_batch=500))
        try:
            pre = Preprocessor(card.input)
            out[precision] = be.invoke_batch(pre.batch(images)).argmax(1)
        finally:
            be.close()
    return out


def test_int8_is_as_accurate_as_the_float_model_within_the_bound(test_labels, fmnist):
    truth = fmnist["test"].labels
    acc = {p: float((labels == truth).mean()) for p, labels in test_labels.items()}
    assert acc["int8"] >= acc["fp32"] - INT8_ACCURACY_BOUND, acc
    assert abs(acc["fp16"] - acc["fp32"]) <= 0.001, acc
    assert (test_labels["int8"] == test_labels["fp32"]).mean() >= INT8_AGREEMENT_MIN
    assert (test_labels["fp16"] == test_labels["fp32"]).mean() >= 0.999
    # the float model is the one the shipped int8 TFLite model was quantized from: it is as accurate
    assert acc["fp32"] >= load_card(EDGE_CARD).metrics["test_accuracy"] - 0.01


def test_the_cards_figures_are_what_the_cpu_measures(test_labels, fmnist):
    truth = fmnist["test"].labels
    tflite = np.load(EDGE_CARD.parent / "predictions.npz")["test_logits"].argmax(1)
    for precision, labels in test_labels.items():
        m = load_card(CARDS[precision]).metrics
        # int8 kernels may round differently on another CPU: a few labels of 10,000
        assert m["test_accuracy"] == pytest.approx(float((labels == truth).mean()), abs=0.002), precision
        assert m["test_agreement_with_tflite"] == pytest.approx(float((labels == tflite).mean()), abs=0.002)
        assert m["test_agreement_with_tflite"] >= 0.95
