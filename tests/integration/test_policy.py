"""The device policy with the real model: audit sampling, offload budget, alternative scores."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_infer.scores import ScoreParams, make_scorer
from edge_infer.tools.localbroker import free_port
from edge_infer.service import EdgeService
from edge_infer_cloud.worker import CloudWorker

from ..conftest import unique, wait_for
from .helpers import device_config, worker_config

pytestmark = pytest.mark.integration


def with_policy(cfg, **policy):
    return replace(cfg, policy=replace(cfg.policy, **policy))


def test_budget_caps_offloads_and_the_local_answer_stands(tmp_path, fmnist):
    cfg = with_policy(device_config(tmp_path, free_port()), threshold=1.0, max_samples_per_minute=10)
    svc = EdgeService(cfg)
    svc.start()
    try:
        results = [svc.classify(im) for im in fmnist["test"].images[:100]]
        offloaded = [r for r in results if r.offloaded]
        assert len(offloaded) == 10 and all(r.offload_reason == "below_threshold" for r in offloaded)
        kept = [r for r in results if not r.offloaded]
        confident = [r for r in kept if r.confidence >= 1.0]     # saturated int8 logits can reach 1.0
        skipped = [r for r in kept if r.confidence < 1.0]
        assert all(r.state == "final" and r.offload_reason == "budget_samples" for r in skipped)
        assert all(r.offload_reason is None for r in confident)
        assert svc.counters.get("offload_skipped_budget_samples") == len(skipped) >= 80
        svc.flush()
        assert svc.store.outbox_counts()["queued"] == 10
    finally:
        svc.stop()


def test_audit_offloads_confident_inputs_and_reports_agreement(tmp_path, broker, fmnist):
    group = unique("g")
    w = CloudWorker(worker_config(broker.port, group=group))
    w.start()
    cfg = with_policy(device_config(tmp_path, broker.port), threshold=0.0, audit_rate=0.2)   # only audits
    svc = EdgeService(cfg)
    svc.start()
    try:
        wait_for(lambda: w.link.connected.is_set() and svc.link.connected.is_set())
        results = [svc.classify(im) for im in fmnist["test"].images[:400]]
        audited = [r for r in results if r.offloaded]
        assert all(r.offload_reason == "audit" for r in audited)
        assert 40 <= len(audited) <= 120          # 20% of 400, with generous room for chance
        wait_for(lambda: svc.counters.get("audit_corrected") == len(audited), timeout=60, what="audits corrected")
        st = svc.status()
        assert st["audit_agreement"] is not None and 0.5 < st["audit_agreement"] <= 1.0
        assert st["agreement"] == st["audit_agreement"]     # every correction here was an audit
        assert st["offload_rate"] == pytest.approx(len(audited) / 400, abs=1e-4)
    finally:
        svc.stop()
        w.stop()


def test_temperature_score_is_what_the_threshold_sees(tmp_path, fmnist):
    cfg = with_policy(device_config(tmp_path, free_port()), score="temperature", temperature=3.0, threshold=0.5,
                      offload=False)
    svc = EdgeService(cfg)
    svc.start()
    try:
        images = fmnist["test"].images[:50]
        got = np.array([svc.classify(im).confidence for im in images])
        # the same score computed from the raw model output
        from edge_infer.scores import dequantize
        logits = np.concatenate([dequantize(svc.backend.invoke(svc.pre.to_tensor(im)), svc.card.output)
                                 for im in images])
        want = make_scorer("temperature", ScoreParams(temperature=3.0))(logits)
        assert np.allclose(got, want, atol=1e-5)
        plain = make_scorer("max_softmax")(logits)
        assert (want < plain).mean() > 0.9          # T > 1 flattens: a different score, not max-softmax again
    finally:
        svc.stop()
