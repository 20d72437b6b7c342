"""Bad input at every boundary: a clear error, counted, nothing lost, the service keeps running."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from edge_infer import protocol
from edge_infer.preprocess import encode_png
from edge_infer.protocol import Topics
from edge_infer.service import EdgeService
from edge_infer_cloud.worker import CloudWorker

from ..conftest import paho_properties, unique, wait_for
from .helpers import device_config, worker_config

pytestmark = pytest.mark.integration


props = paho_properties


@pytest.fixture
def worker(broker):
    w = CloudWorker(worker_config(broker.port, group=unique("g"), max_payload_bytes=50_000))
    w.start()
    wait_for(w.link.connected.is_set)
    yield w
    w.stop()


def test_malformed_samples_get_error_replies_and_the_worker_keeps_going(broker, worker, recorder_factory, fmnist):
    t = Topics("edge-infer", unique("dev"))
    rec = recorder_factory(t.corrections, "edge-infer/+/hijack")
    good_png = encode_png(fmnist["test"].images[0])
    cases = {
        "corrupt": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, props("image/png", t.corrections, b"s-corrupt")),
        "wrongtype": (good_png, props("text/plain", t.corrections, b"s-type")),
        "toolarge": (b"x" * 60_000, props("image/png", t.corrections, b"s-large")),
        "mismatch": (good_png, props("image/png", t.corrections, b"s-jpeg")),
        "foreignreply": (good_png, props("image/png", "edge-infer/other/hijack", b"s-foreign")),
        "noreply": (good_png, props("image/png", None, b"s-none")),
        "nocorrelation": (good_png, props("image/png", t.corrections, None)),
    }
    # the "mismatch" case claims JPEG but sends PNG
    cases["mismatch"] = (good_png, props("image/jpeg", t.corrections, b"s-jpeg"))
    for payload, p in cases.values():
        rec.publish(t.samples, payload, p)
    rec.publish(t.samples, good_png, props("image/png", t.corrections, b"s-good"))

    wait_for(lambda: any(json.loads(m.payload).get("sample_id") == "s-good" for m in rec.on(t.corrections)),
             what="the good sample's correction after the bad ones")
    replies = {json.loads(m.payload)["sample_id"]: json.loads(m.payload) for m in rec.on(t.corrections)}
    assert replies["s-good"]["type"] == "correction"
    assert replies["s-corrupt"]["type"] == "error" and replies["s-corrupt"]["error"]["code"] == "bad_image"
    assert replies["s-type"]["error"]["code"] == "bad_content_type"
    assert replies["s-large"]["error"]["code"] == "too_large"
    assert replies["s-jpeg"]["error"]["code"] == "bad_image"
    # no reply to a topic the sender chose, nor without a usable address
    assert "s-foreign" not in replies and "s-none" not in replies and rec.on("edge-infer/other/hijack") == []
    c = worker.counters.snapshot()
    assert c["rejected"] == 7 and c["corrected"] == 1 and c["error_replies"] == 4
    # error replies echo the correlation data (MQTT v5 request/response)
    msg = next(m for m in rec.on(t.corrections) if json.loads(m.payload)["sample_id"] == "s-corrupt")
    assert msg.properties.CorrelationData == b"s-corrupt"


def test_malformed_duplicate_and_foreign_replies_change_nothing(tmp_path, broker, recorder_factory, fmnist):
    svc = EdgeService(device_config(tmp_path, broker.port, threshold=1.0))  # offload all, no worker in this group
    svc.start()
    try:
        wait_for(svc.link.connected.is_set)
        r = svc.classify(fmnist["test"].images[0])
        svc.flush()
        wait_for(lambda: svc.store.outbox_state(r.sample_id)[0] == "delivered", what="sample delivered")
        rec = recorder_factory()
        t = svc.topics
        good = protocol.Correction(r.sample_id, 9, "ankle boot", 0.97, "cloud:test", "test")
        bad_payloads = [
            (b"{not json", None),
            (json.dumps({"v": 1, "type": "correction", "sample_id": r.sample_id, "label": 99,
                         "confidence": 0.5}).encode(), r.sample_id.encode()),          # label out of range
            (protocol.encode_correction(good), b"other-id"),                             # correlation mismatch
            (protocol.encode_correction(protocol.Correction("f" * 32, 1, "x", 0.9, "c", "w")), None),  # unknown
        ]
        for payload, cd in bad_payloads:
            rec.publish(t.corrections, payload, props("application/json", correlation=cd))
        # a correction on another device's topic never reaches this device
        rec.publish(Topics(t.prefix, "someone-else").corrections, protocol.encode_correction(good),
                    props("application/json", correlation=r.sample_id.encode()))
        wait_for(lambda: svc.counters.get("replies_rejected") == 3 and svc.counters.get("replies_unknown") == 1,
                 what="bad replies counted")
        assert svc.result(r.sample_id).state == "provisional"

        for _ in range(3):   # the real one, then duplicates
            rec.publish(t.corrections, protocol.encode_correction(good),
                        props("application/json", correlation=r.sample_id.encode()))
        wait_for(lambda: svc.counters.get("replies_duplicate") == 2, what="duplicates counted")
        res = svc.result(r.sample_id)
        assert res.state == "final" and res.label == 9 and res.origin == "cloud"
        assert svc.counters.get("corrected") == 1
        # still serving
        assert svc.classify(fmnist["test"].images[1]).label_name
    finally:
        svc.stop()


def test_cloud_error_reply_makes_the_local_answer_final(tmp_path, broker, fmnist):
    # a worker that accepts only tiny images rejects every sample with an error reply
    w = CloudWorker(worker_config(broker.port, group="test-err", max_pixels=10))
    w.start()
    prefix_cfg = device_config(tmp_path, broker.port, threshold=1.0)
    svc = EdgeService(prefix_cfg)
    svc.start()
    try:
        wait_for(lambda: w.link.connected.is_set() and svc.link.connected.is_set())
        r = svc.classify(fmnist["test"].images[0])
        wait_for(lambda: svc.result(r.sample_id).state == "final", timeout=30, what="error reply applied")
        res = svc.result(r.sample_id)
        assert res.origin == "edge" and res.label == r.edge_label and "bad_image" in res.offload_error
        assert svc.store.outbox_state(r.sample_id)[0] == "failed"
    finally:
        svc.stop()
        w.stop()


def test_spool_classifies_good_files_and_quarantines_bad_ones(tmp_path, broker, fmnist):
    spool = tmp_path / "spool"
    svc = EdgeService(device_config(tmp_path, broker.port, spool=spool))
    svc.start()
    try:
        good = fmnist["test"].images[0]
        buf = io.BytesIO()
        Image.fromarray(np.kron(good, np.ones((4, 4), np.uint8))).convert("RGB").save(buf, format="JPEG")
        (spool / ".a.png.tmp").write_bytes(encode_png(good))
        (spool / ".a.png.tmp").rename(spool / "a.png")
        (spool / "b.jpg").write_bytes(buf.getvalue())
        (spool / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        (spool / "d.txt").write_text("hello")
        wait_for(lambda: len(list((spool / "done").iterdir())) == 2 and
                 len(list((spool / "failed").glob("*.error"))) == 2, what="spool processed")
        assert sorted(p.name for p in (spool / "done").iterdir()) == ["a.png", "b.jpg"]
        assert "not a decodable image" in (spool / "failed" / "c.png.error").read_text()
        assert svc.counters.get("spool_rejected") == 2 and svc.counters.get("spool_processed") == 2
        sources = {r.source: r for r in svc.store.all_results()}
        assert set(sources) == {"a.png", "b.jpg"}
        assert sources["a.png"].label == sources["b.jpg"].label   # same picture, resized and re-encoded
    finally:
        svc.stop()
