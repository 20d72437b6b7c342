"""The shipped cascade-trained edge model, models/fmnist-edge-v2 (train_cascade.py --arch sep80):
its card against its file, the budget and operators the issue set, and its predictions.npz
against the model run as the device runs it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_infer.backends.tflitemodel import inspect_model
from edge_infer.modelcard import load_card, verified_model_bytes

from ..conftest import EDGE_CARD, MODELS

V2 = MODELS / "fmnist-edge-v2"
EDGETPU_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "FULLY_CONNECTED", "ADD"}


@pytest.fixture(scope="module")
def card():
    return load_card(V2 / "card.json")


def test_the_card_matches_its_file_and_the_budget(card):
    v1 = load_card(EDGE_CARD)
    data = verified_model_bytes(card)                     # raises on a sha256 mismatch
    assert card.model_id == "fmnist-edge:2.0.0" and card.labels == v1.labels
    assert card.params < 10_000 and (card.input.shape, card.input.dtype) == ((1, 28, 28, 1), "int8")
    assert card.output.dtype == "int8" and card.output.kind == "logits"
    ops = inspect_model(data)
    assert set(dict(ops.cpu_op_counts)) <= EDGETPU_OPS and not ops.compiled_for_edgetpu
    training = json.loads((V2 / "card.json").read_text())["training"]
    assert training["teacher"] == "fmnist-cloud-v1" and "sep80" in training["architecture"]


def test_its_views_card_runs_the_same_file(card):
    views = load_card(V2 / "card_views5.json")
    assert (views.file, views.sha256, views.labels) == (card.file, card.sha256, card.labels)
    assert len(views.input.views) == 5 and views.model_id == "fmnist-edge:2.0.0+views5"


def test_predictions_and_metrics_are_the_model_run_as_the_device_runs_it(card, fmnist):
    from edge_infer.tools.runmodel import edge_logits
    with np.load(V2 / "predictions.npz") as z:
        val_logits, test_logits, val_labels = z["val_logits"], z["test_logits"], z["val_labels"]
    assert np.array_equal(val_labels, fmnist["val"].labels)
    got = edge_logits(card, fmnist["val"].images[:500], progress=False)
    np.testing.assert_allclose(got, val_logits[:500], atol=1e-5)
    assert round(float((val_logits.argmax(1) == val_labels).mean()), 4) == card.metrics["val_accuracy"]
    assert round(float((test_logits.argmax(1) == fmnist["test"].labels).mean()), 4) == card.metrics["test_accuracy"]
    # more accurate than v1 on its own: the reason it exists
    with np.load(EDGE_CARD.parent / "predictions.npz") as z:
        v1_test = z["test_logits"].argmax(1)
    assert (test_logits.argmax(1) == fmnist["test"].labels).mean() > (v1_test == fmnist["test"].labels).mean()
