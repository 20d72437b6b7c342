"""The worker's retained status, seen from outside: real Mosquitto, real worker, real model."""
from __future__ import annotations

import json

import pytest

from edge_infer import protocol
from edge_infer.preprocess import encode_png
from edge_infer.protocol import Topics
from edge_infer.tomlcfg import ConfigError, build
from edge_infer_cloud.config import WorkerConfig
from edge_infer_cloud.worker import KNOWN_COUNTERS, CloudWorker, status_counters

from ..conftest import CLOUD_CARD, Recorder, paho_properties, unique, wait_for
from .helpers import worker_config


@pytest.fixture
def fast_worker(broker):
    # A short interval so the test sees refreshes; its own group so no other worker takes its samples.
    w = CloudWorker(worker_config(broker.port, group=unique("g"), status_interval_s=0.2))
    w.start()
    wait_for(w.link.connected.is_set, what="worker connected")
    yield w
    w.stop()


def online_counters(rec: Recorder, topic: str) -> list[dict[str, int]]:
    return [m["counters"] for m in rec.json(topic) if m.get("state") == "online"]


@pytest.mark.integration
def test_a_fresh_workers_status_carries_every_known_counter_at_zero(broker):
    w = CloudWorker(worker_config(broker.port, group=unique("g")))   # the default interval: only the connect's status
    w.start()
    try:
        rec = Recorder(broker.port, w.status_topic)
        try:
            wait_for(lambda: online_counters(rec, w.status_topic), what="online status")
            counters = online_counters(rec, w.status_topic)[-1]
        finally:
            rec.close()
    finally:
        w.stop()
    assert set(counters) >= set(KNOWN_COUNTERS)
    assert {"received", "corrected", "batches", "rejected", "error_replies", "replies_refused",
            "rejected_bad_image", "rejected_too_large", "rejected_model_error"} <= set(counters)
    assert {k: v for k, v in counters.items() if v} == {"connects": 1}


@pytest.mark.integration
def test_retained_status_counters_grow_as_samples_are_processed(broker, fast_worker, recorder_factory, fmnist):
    w = fast_worker
    t = Topics("edge-infer", unique("dev"))
    rec = recorder_factory(w.status_topic, t.corrections)
    wait_for(lambda: online_counters(rec, w.status_topic), what="online status")
    assert online_counters(rec, w.status_topic)[-1]["received"] == 0

    good = encode_png(fmnist["test"].images[0])
    v1 = [("v", "1")]
    rec.publish(t.samples, good, paho_properties("image/png", t.corrections, b"s-good", v1))
    rec.publish(t.samples, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, paho_properties("image/png", t.corrections, b"s-bad", v1))
    wait_for(lambda: {json.loads(m.payload)["sample_id"] for m in rec.on(t.corrections)} == {"s-good", "s-bad"},
             what="both replies")

    def caught_up() -> bool:
        c = online_counters(rec, w.status_topic)[-1]
        return c["received"] == 2 and c["corrected"] == 1 and c["rejected_bad_image"] == 1
    wait_for(caught_up, timeout=10, what="a refreshed status with the processed samples")
    c = online_counters(rec, w.status_topic)[-1]
    assert c["batches"] >= 1 and c["rejected"] == 1 and c["error_replies"] == 1 and c["connects"] == 1
    assert c["rejected_bad_topic"] == 0 and c["replies_refused"] == 0   # known counters stay present at 0

    # What a dashboard connecting now reads first is the retained, refreshed status.
    late = recorder_factory(w.status_topic)
    wait_for(lambda: online_counters(late, w.status_topic), what="retained status for a late subscriber")
    assert online_counters(late, w.status_topic)[0]["received"] == 2


def test_status_counters_list_known_names_at_zero_and_keep_the_others():
    out = status_counters({"received": 3, "something_new": 1})
    assert out["received"] == 3 and out["something_new"] == 1 and out["corrected"] == 0
    assert set(out) == set(KNOWN_COUNTERS) | {"something_new"}
    assert {f"rejected_{code}" for code in protocol.SAMPLE_ERROR_CODES} <= set(out)


def test_status_interval_has_a_default_and_is_validated():
    table = {"model": {"card": str(CLOUD_CARD)}}
    assert build(WorkerConfig, table).worker.status_interval_s == 10.0
    for bad in (0, -1, 7200):
        with pytest.raises(ConfigError, match="worker.status_interval_s"):
            build(WorkerConfig, {**table, "worker": {"status_interval_s": bad}})
