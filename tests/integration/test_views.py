"""A card with test-time views on the real service, broker and worker: the service answers with
the views' combined confidence, offloads by it, sends the input as it came (not a view), and
its published results name the views card's model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_infer.classifier import Classifier
from edge_infer.config import ModelConfig, PolicyConfig
from edge_infer.preprocess import decode_image
from edge_infer.service import EdgeService

from ..conftest import MODELS, drained, wait_for
from .helpers import device_config

pytestmark = pytest.mark.integration

VIEWS5_CARD = MODELS / "fmnist-edge-v1" / "card_views5.json"


def test_the_service_offloads_by_the_views_confidence_and_sends_the_input_as_it_came(tmp_path, broker, worker,
                                                                                     fmnist, recorder_factory):
    images = fmnist["test"].images[:200]
    with Classifier(ModelConfig(card=VIEWS5_CARD), PolicyConfig()) as clf:
        want = [clf.infer(im) for im in images]
    cfg = device_config(tmp_path, broker.port, threshold=0.9)
    svc = EdgeService(replace(cfg, model=replace(cfg.model, card=VIEWS5_CARD)))
    svc.start()
    try:
        wait_for(svc.link.connected.is_set, what="device connected")
        rec = recorder_factory(svc.topics.results, svc.topics.samples)
        results = [svc.classify(im) for im in images]
        assert [(r.edge_label, r.edge_confidence) for r in results] == [(w.label, w.confidence) for w in want]
        assert [r.offloaded for r in results] == [w.confidence < 0.9 for w in want]
        offloaded = {r.sample_id: i for i, r in enumerate(results) if r.offloaded}
        assert offloaded
        svc.flush()
        wait_for(lambda: drained(svc.store), timeout=60, what="all corrections applied")
        wait_for(lambda: len(rec.results(svc.topics.results)) >= len(images) + len(offloaded),
                 what="results published")
        published = rec.results(svc.topics.results)
        assert {m["edge"]["model"] for m in published} == {"fmnist-edge:1.0.0+views5"}
        samples = rec.on(svc.topics.samples)
        assert {s.properties.CorrelationData.decode() for s in samples} >= set(offloaded)
        for s in samples[:20]:
            i = offloaded[s.properties.CorrelationData.decode()]
            assert np.array_equal(decode_image(s.payload).pixels, images[i])
        assert all(svc.result(sid).origin == "cloud" for sid in offloaded)
    finally:
        svc.stop()
