"""The shipped ImageNet pair (models/imagenet-edge-lite0-v1, models/imagenet-cloud-lite2-v1): cards,
files and what the files hold, checked with the runtime's own readers and interpreters.

The figures the cards record were measured by models/recipes/imagenet/build.py; here the files are
checked against the cards (sha256, tensor types and quantization, operators, shapes), and the edge
model is run on the foolbox photos through the device's backend where those photos are installed.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from edge_infer.backends import create_backend
from edge_infer.backends.tflite_cpu import Options
from edge_infer.backends.tflitemodel import inspect_model
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor, decode_image
from edge_infer.scores import dequantize
from edge_infer.tools.photos import foolbox_photos_dir, list_photos

from ..conftest import MODELS

EDGE = MODELS / "imagenet-edge-lite0-v1" / "card.json"
CLOUD = MODELS / "imagenet-cloud-lite2-v1" / "card.json"
#: the operators edgetpu_compiler maps (coral.ai's supported-operations table), of those a CNN classifier uses
EDGETPU_CNN_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "AVERAGE_POOL_2D",
                   "MAX_POOL_2D", "RESHAPE", "PAD", "CONCATENATION", "QUANTIZE", "SOFTMAX", "MUL", "SUB"}


@pytest.fixture(scope="module")
def edge():
    return load_card(EDGE)


@pytest.fixture(scope="module")
def cloud():
    return load_card(CLOUD)


def test_both_cards_load_and_match_their_files(edge, cloud):
    for card in (edge, cloud):
        verified_model_bytes(card)                      # raises on a sha256 mismatch
    assert (edge.role, edge.format, cloud.role, cloud.format) == ("edge", "tflite", "cloud", "onnx")
    assert edge.labels == cloud.labels and len(edge.labels) == 1000
    assert edge.labels[0] == "tench" and edge.labels[243] == "bull mastiff" and edge.labels[999] == "toilet tissue"


def test_labels_are_unique_as_class_folder_names(edge):
    # edge-infer calibrate and the photo demo match folders case-insensitively, punctuation folded
    folded = [re.sub(r"[^a-z0-9]+", "_", x.lower()).strip("_") for x in edge.labels]
    assert len(set(folded)) == 1000


def test_input_specs_are_efficientnet_lites(edge, cloud):
    e, c = edge.input, cloud.input
    assert (e.shape, e.layout, e.dtype, e.color) == ((1, 224, 224, 3), "NHWC", "int8", "RGB")
    assert (c.shape, c.layout, c.dtype, c.color) == ((-1, 3, 260, 260), "NCHW", "float32", "RGB")
    for spec in (e, c):
        assert (spec.pixel_scale, spec.mean, spec.std) == (1.0, 127.0, 128.0)
        assert spec.resize.method == "bicubic" and spec.resize.crop == "center"
        assert spec.resize.shorter_side == spec.height + 32          # the reference eval crop: size / (size + 32)
    # (p - 127) / 128 quantized with scale 1/128, zero point -1 is p - 128: no rounding at the input
    assert (e.quantization.scale, e.quantization.zero_point) == (1 / 128, -1)
    lut = Preprocessor(e).batch(np.arange(256, dtype=np.uint8).reshape(16, 16)[None, ..., None].repeat(3, -1))
    assert np.array_equal(lut[0, ..., 0].reshape(-1), np.arange(256) - 128)


def test_edge_model_is_full_int8_on_edgetpu_operators_only(edge):
    data = verified_model_bytes(edge)
    ops = inspect_model(data)
    assert dict(ops.cpu_op_counts) == {"CONV_2D": 33, "DEPTHWISE_CONV_2D": 16, "ADD": 9, "MEAN": 1,
                                       "FULLY_CONNECTED": 1}
    assert set(dict(ops.cpu_op_counts)) <= EDGETPU_CNN_OPS and not ops.compiled_for_edgetpu
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    it = litert.Interpreter(model_content=data,
                            experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    kinds = {np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    assert kinds <= {"int8", "int32"}, kinds                  # int32: biases only, no float tensor left
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["quantization"] == (edge.input.quantization.scale, edge.input.quantization.zero_point)
    assert out["quantization"] == pytest.approx((edge.output.quantization.scale, edge.output.quantization.zero_point))
    assert list(inp["shape_signature"]) == [1, 224, 224, 3] and list(out["shape"]) == [1, 1000]


def test_cloud_model_takes_any_batch(cloud):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(cloud.file), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 260, 260)).astype(np.float32)
    (logits,) = sess.run(None, {"input": x})
    assert logits.shape == (3, 1000) and logits.dtype == np.float32
    (one,) = sess.run(None, {"input": x[1:2]})
    assert np.allclose(one, logits[1:2], atol=1e-4)


def test_cards_record_agreement_with_the_float_originals(edge, cloud):
    e, c = edge.metrics["agreement_with_float"], cloud.metrics["agreement_with_float"]
    assert e["calibration_views"]["top1_agreement"] >= 0.95 and e["calibration_views"]["n"] == 160
    assert e["synthetic"]["n"] == 200 and e["photos"]["n"] == 20
    assert c["calibration_views"]["top1_agreement"] == 1.0 and c["synthetic"]["top1_agreement"] >= 0.99
    assert edge.metrics["runtime_check"]["same_top1_as_build"] and cloud.metrics["runtime_check"]["same_top1_as_build"]


def test_edge_model_classifies_the_foolbox_photos_as_its_card_says(edge):
    folder = foolbox_photos_dir()
    assert folder is not None, "foolbox's photos are not installed: pip install --no-deps foolbox==3.3.4 (setup.sh does)"
    photos = list_photos(folder, edge.labels, foolbox_only=True)
    assert len(photos) == 20
    pytest.importorskip("ai_edge_litert")
    be = create_backend("tflite-cpu", edge, verified_model_bytes(edge), Options("auto", 1))
    pre = Preprocessor(edge.input)
    try:
        top1 = [int(dequantize(be.invoke(pre.to_tensor(decode_image(p.path.read_bytes()).pixels)), edge.output).argmax())
                for p in photos]
    finally:
        be.close()
    correct = sum(t == p.label for t, p in zip(top1, photos))
    assert correct == edge.metrics["runtime_check"]["photos_top1_correct"] == edge.metrics["photos_top1_correct"]["int8_tflite"]
