"""The ImageNet pair on real photos: the cards, preprocessing equal to the reference, the whole loop.

The photos are the 20 labelled ImageNet photos the foolbox package carries
(``scripts/setup.sh`` installs them with ``--no-deps``); the models are the
shipped EfficientNet-Lite0 int8 (device) and Lite2 ONNX (cloud).
"""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_infer.backends.tflitemodel import inspect_model
from edge_infer.config import ModelConfig
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor, decode_image
from edge_infer.service import EdgeService
from edge_infer.tools.photos import FOOLBOX_INSTALL, foolbox_photos_dir, list_photos
from edge_infer_cloud.config import CloudModelConfig
from edge_infer_cloud.model import CloudModel
from edge_infer_cloud.worker import CloudWorker

from ..conftest import REPO, drained, wait_for
from ..unit.test_photo_preprocess import reference
from .helpers import device_config, worker_config

pytestmark = pytest.mark.integration

EDGE = REPO / "models" / "imagenet-edge-lite0-v1" / "card.json"
CLOUD = REPO / "models" / "imagenet-cloud-lite2-v1" / "card.json"
#: the Edge TPU compiler maps these int8 builtins (coral.ai's supported-operations list)
EDGETPU_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D",
               "RESHAPE", "SOFTMAX", "QUANTIZE", "DEQUANTIZE", "CONCATENATION", "MUL", "PAD", "LOGISTIC", "RELU",
               "RELU6", "HARD_SWISH"}


@pytest.fixture(scope="module")
def photos():
    folder = foolbox_photos_dir()
    assert folder is not None, f"the ImageNet test photos are missing: {FOOLBOX_INSTALL} (scripts/setup.sh does)"
    found = list_photos(folder, load_card(EDGE).labels, foolbox_only=True)
    assert len(found) == 20 and all(p.label is not None for p in found)
    return found


def test_the_cards_describe_the_shipped_files():
    edge, cloud = load_card(EDGE), load_card(CLOUD)
    for card in (edge, cloud):
        verified_model_bytes(card)                         # sha256 of the file
        assert len(card.labels) == 1000 and len(set(card.labels)) == 1000
        assert card.labels[0] == "tench" and card.labels[999].startswith("toilet")   # human-readable, in order
        assert card.input.resize is not None and card.input.color == "RGB"
        assert (card.input.pixel_scale, card.input.mean, card.input.std) == (1.0, 127.0, 128.0)
    assert edge.format == "tflite" and edge.input.shape == (1, 224, 224, 3) and edge.input.dtype == "int8"
    assert edge.output.dtype == "int8" and edge.input.resize.shorter_side == 256
    assert cloud.format == "onnx" and cloud.input.shape[1:] == (3, 260, 260) and cloud.input.dtype == "float32"
    # the converted models answer as their float PyTorch originals do (measured by the recipe)
    edge_agree, cloud_agree = edge.metrics["agreement_with_float"], cloud.metrics["agreement_with_float"]
    assert edge_agree["calibration_views"]["top1_agreement"] >= 0.95 and edge_agree["photos"]["top1_agreement"] >= 0.9
    assert cloud_agree["calibration_views"]["top1_agreement"] == 1.0 and cloud_agree["photos"]["top1_agreement"] == 1.0
    assert cloud_agree["synthetic"]["top1_agreement"] >= 0.99      # its weights are stored as float16


def test_the_edge_model_is_all_int8_on_ops_the_edge_tpu_maps():
    ops = dict(inspect_model(verified_model_bytes(load_card(EDGE))).cpu_op_counts)
    assert set(ops) <= EDGETPU_OPS and ops.get("CONV_2D", 0) > 10, ops
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=verified_model_bytes(load_card(EDGE)))
    kinds = {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    assert kinds <= {"int8", "int32"}, kinds               # int32: the biases and shapes; no float tensor


@pytest.mark.parametrize("card_path", [EDGE, CLOUD], ids=["edge", "cloud"])
def test_preprocessing_of_the_shipped_photos_equals_the_reference_pipeline(photos, card_path):
    card = load_card(card_path)
    pre = Preprocessor(card.input)
    crop = card.input.height
    for photo in photos:
        data = photo.path.read_bytes()
        got = pre.to_tensor(decode_image(data).pixels)
        method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[card.input.resize.method]
        want = reference(Image.open(io.BytesIO(data)), card.input.resize.shorter_side, crop, method,
                         quantize=card.input.dtype == "int8", quantization=card.input.quantization)
        if card.input.layout == "NCHW":
            assert np.allclose(got, want.transpose(0, 3, 1, 2), atol=1e-6), photo.path.name
        else:
            assert np.array_equal(got, want), photo.path.name


def test_the_photos_through_the_real_service_and_worker(tmp_path, broker, photos, recorder_factory):
    wcfg = worker_config(broker.port, max_payload_bytes=4 * 1024 * 1024)
    worker = CloudWorker(replace(wcfg, model=CloudModelConfig(card=CLOUD, intra_op_threads=2)))
    cfg = device_config(tmp_path, broker.port, threshold=0.5)
    service = EdgeService(replace(cfg, model=ModelConfig(card=EDGE, num_threads=2)))
    worker.start()
    service.start()
    try:
        wait_for(lambda: worker.link.connected.is_set() and service.link.connected.is_set(), what="both connected")
        rec = recorder_factory(service.topics.results)
        results = [service.classify(p.path.read_bytes(), source=p.path.name) for p in photos]
        edge_right = sum(r.edge_label == p.label for r, p in zip(results, photos))
        assert edge_right >= 15, f"EfficientNet-Lite0 int8 got {edge_right} of the 20 photos right"
        offloaded = [i for i, r in enumerate(results) if r.offloaded]
        assert offloaded, "threshold 0.5 should send the least confident photos"
        service.flush()                        # every result and sample stored
        wait_for(lambda: drained(service.store), timeout=60, what="every offloaded photo corrected")
        final = [service.result(r.sample_id) for r in results]
        cloud = CloudModel(CLOUD)
        for i in offloaded:
            expected = int(cloud.predict([decode_image(photos[i].path.read_bytes()).pixels])[0][0])
            assert final[i].origin == "cloud" and final[i].label == expected
        assert sum(r.label == p.label for r, p in zip(final, photos)) >= edge_right
        # an integrator reads names, not indices, and the device's names are its card's
        labels = load_card(EDGE).labels
        def published() -> list[dict]:
            return [r for m in rec.on(service.topics.results) for r in json.loads(m.payload)["results"]]
        wait_for(lambda: len(published()) >= len(photos) + len(offloaded), what="every result published")
        published = published()
        assert all(r["label_name"] == labels[r["label"]] for r in published)
        assert {r["label_name"] for r in published} & {labels[p.label] for p in photos}
    finally:
        service.stop()
        worker.stop()


def test_the_imagenet_demo_prints_each_photo(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "edge_infer", "demo", "--models", "imagenet", "--no-progress",
                           "--out", str(out), "--models-dir", str(REPO / "models")],
                          capture_output=True, text=True, timeout=300, cwd=Path(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["images"] == 20 and report["scored"] == 20
    assert report["offloaded_without_correction"] == 0
    for row in report["per_image"]:
        assert Path(row["file"]).name in proc.stdout and row["edge_name"][:24] in proc.stdout
    assert report["hybrid_accuracy"] >= report["edge_only_accuracy"]
