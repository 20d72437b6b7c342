"""Bad input at every boundary: a clear error, counted, nothing lost, the service keeps running."""
from __future__ import annotations

import io
import json
import random

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


def props(content_type=None, response_topic=None, correlation=None, user=(("v", "1"),)):
    """A sample's or reply's properties; samples carry the protocol version unless told otherwise."""
    return paho_properties(content_type, response_topic, correlation, list(user) if user is not None else None)


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
        "noversion": (good_png, props("image/png", t.corrections, b"s-nover", user=None)),
        "badversion": (good_png, props("image/png", t.corrections, b"s-v2", user=[("v", "2")])),
    }
    # the "mismatch" case claims JPEG but sends PNG
    cases["mismatch"] = (good_png, props("image/jpeg", t.corrections, b"s-jpeg"))
    for payload, p in cases.values():
        rec.publish(t.samples, payload, p)
    # a device id outside the documented pattern: refused, and no reply to its topic
    odd = Topics("edge-infer", "dev " + unique("x"))
    rec_odd = recorder_factory(odd.corrections)
    rec.publish(odd.samples, good_png, props("image/png", odd.corrections, b"s-odd"))
    rec.publish(t.samples, good_png, props("image/png", t.corrections, b"s-good"))

    wait_for(lambda: any(json.loads(m.payload).get("sample_id") == "s-good" for m in rec.on(t.corrections)),
             what="the good sample's correction after the bad ones")
    replies = {json.loads(m.payload)["sample_id"]: json.loads(m.payload) for m in rec.on(t.corrections)}
    assert replies["s-good"]["type"] == "correction"
    assert replies["s-corrupt"]["type"] == "error" and replies["s-corrupt"]["error"]["code"] == "bad_image"
    assert replies["s-type"]["error"]["code"] == "bad_content_type"
    assert replies["s-large"]["error"]["code"] == "too_large"
    assert replies["s-jpeg"]["error"]["code"] == "bad_image"
    assert replies["s-nover"]["error"]["code"] == replies["s-v2"]["error"]["code"] == "bad_version"
    # no reply to a topic the sender chose, nor without a usable address
    assert "s-foreign" not in replies and "s-none" not in replies and rec.on("edge-infer/other/hijack") == []
    wait_for(lambda: worker.counters.get("rejected") == 10, what="every bad sample counted")
    c = worker.counters.snapshot()
    assert c["rejected"] == 10 and c["corrected"] == 1 and c["error_replies"] == 6
    assert c["rejected_bad_version"] == 2 and c["rejected_bad_device_id"] == 1
    assert rec_odd.on(odd.corrections) == []
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
        # label 9 is "ankle boot" on the device's card; the reply claims another name
        good = protocol.Correction(r.sample_id, 9, "trouser", 0.97, "cloud:test", "test")
        bad_payloads = [
            (b"{not json", r.sample_id.encode()),
            (json.dumps({"v": 1, "type": "correction", "sample_id": r.sample_id, "label": 99,
                         "confidence": 0.5}).encode(), r.sample_id.encode()),          # label out of range
            (protocol.encode_correction(good), b"other-id"),                             # correlation mismatch
            (protocol.encode_correction(good), None),                                    # no correlation data
            (protocol.encode_correction(protocol.Correction("f" * 32, 1, "x", 0.9, "c", "w")), b"f" * 32),  # unknown
        ]
        for payload, cd in bad_payloads:
            rec.publish(t.corrections, payload, props("application/json", correlation=cd, user=None))
        # a correction on another device's topic never reaches this device
        rec.publish(Topics(t.prefix, "someone-else").corrections, protocol.encode_correction(good),
                    props("application/json", correlation=r.sample_id.encode()))
        wait_for(lambda: svc.counters.get("replies_rejected") == 4 and svc.counters.get("replies_unknown") == 1,
                 what="bad replies counted")
        assert svc.counters.get("replies_rejected_no_correlation") == 1
        assert svc.result(r.sample_id).state == "provisional"

        for _ in range(3):   # the real one, then duplicates
            rec.publish(t.corrections, protocol.encode_correction(good),
                        props("application/json", correlation=r.sample_id.encode()))
        wait_for(lambda: svc.counters.get("replies_duplicate") == 2, what="duplicates counted")
        res = svc.result(r.sample_id)
        assert res.state == "final" and res.label == 9 and res.origin == "cloud"
        assert res.label_name == svc.card.labels[9] == "ankle boot"   # the card's name, not the reply's
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


def _hostile_samples(rng: random.Random, device: str, n: int):
    """(topic, payload, properties) of samples each invalid in at least one way, for a worker."""
    alphabet = "abcXYZ019-_. é!~"
    for i in range(n):
        dev = rng.choice([device, "dev " + str(i), "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 70))),
                          "_workers", "x" * 65])
        topic = f"edge-infer/{dev}/samples"   # what the workers' subscription matches
        sid = rng.choice([f"h{i}".encode(), b"\xff\xfe", b"has space", b"a" * 65, None])
        user = rng.choice([None, [("v", "1")], [("v", "2")], [("v", "1"), ("device_id", "other")],
                           [("v", "1"), ("sample_id", "nope")], [(f"k{i}", "é" * rng.randint(0, 200))]])
        ctype = rng.choice(["image/png", "image/jpeg", "text/plain", None, "image/png; x=1"])
        reply_to = rng.choice([f"edge-infer/{dev}/corrections"] * 3 + [None, "edge-infer/other/corrections"])
        # never a decodable image: a leading NUL byte starts no accepted format
        payload = b"\x00" + rng.randbytes(rng.choice([0, 10, 1000, 60_000]))
        yield topic, payload, props(ctype, reply_to, sid, user=user)


def _hostile_replies(rng: random.Random, sample_id: str, n: int):
    """(payload, correlation data) of replies a device must refuse (or find for no sample it sent)."""
    sid = sample_id.encode()
    good = {"v": 1, "type": "correction", "sample_id": sample_id, "label": 3, "label_name": "x",
            "confidence": 0.5, "model": "m", "worker": "w"}
    for i in range(n):
        kind = i % 8
        if kind == 0:
            yield rng.randbytes(rng.randint(0, 3000)), rng.choice([sid, None, rng.randbytes(8)])
        elif kind == 1:
            yield b"[" * 3000 + b"]" * 1000, sid                                   # nested too deep to parse
        elif kind == 2:
            yield json.dumps(good | {"label": rng.choice([-1, 10, 99, 2 ** 70, True, "3", None])}).encode(), sid
        elif kind == 3:
            yield json.dumps(good | {"confidence": rng.choice([1.5, -0.1, "0.9", None, 10 ** 400])}).encode(), sid
        elif kind == 4:
            yield json.dumps(good | {"v": rng.choice([0, 2, "1", True, None])}).encode(), sid
        elif kind == 5:
            yield json.dumps(good).encode(), rng.choice([None, b"", b"other-id"])  # no or mismatched correlation
        elif kind == 6:
            yield json.dumps(good | {"label_name": "é" * 5000}).encode(), sid     # over the reply size limit
        else:
            other = f"{i:024x}"   # well formed, for a sample this device never sent
            yield json.dumps(good | {"sample_id": other}).encode(), other.encode()


def test_a_stream_of_hostile_messages_leaves_worker_and_device_running(tmp_path, broker, worker, recorder_factory,
                                                                        fmnist):
    """Hundreds of malformed samples and replies on a real broker: both sides refuse and count every one,
    their threads stay alive, nothing is half-written, and real samples are still corrected after it."""
    svc = EdgeService(device_config(tmp_path, broker.port, threshold=1.0))   # offloads every input
    svc.start()
    rng = random.Random(11)
    try:
        wait_for(svc.link.connected.is_set)
        rec = recorder_factory(svc.topics.corrections)
        first = svc.classify(fmnist["test"].images[0])
        wait_for(lambda: svc.result(first.sample_id).state == "final", timeout=30, what="a first correction")
        n_samples, n_replies = 160, 160
        samples = list(_hostile_samples(rng, svc.cfg.device_id, n_samples))
        replies = list(_hostile_replies(rng, first.sample_id, n_replies))
        for (topic, payload, p), (reply, cd) in zip(samples, replies):
            rec.publish(topic, payload, p)
            rec.publish(svc.topics.corrections, reply, props("application/json", correlation=cd, user=None))
        wait_for(lambda: worker.counters.get("rejected") == n_samples, timeout=30, what="every bad sample refused")
        # Every message on the device's corrections topic: the hostile ones, the worker's error replies to
        # hostile samples sent in this device's name (for samples it never sent), and the one correction.
        refused = ("replies_rejected", "replies_unknown", "replies_duplicate", "replies_late")

        def all_counted() -> bool:
            seen = len(rec.on(svc.topics.corrections))
            return seen > n_replies and sum(svc.counters.get(k) for k in refused) + 1 == seen
        wait_for(all_counted, timeout=30, what="every bad reply refused and counted")
        c = svc.counters.snapshot()
        assert c["replies_unknown"] >= n_replies // 8 and c["replies_rejected"] > n_replies // 2
        assert {k for k in c if k.startswith("replies_rejected_")} >= {
            "replies_rejected_bad_json", "replies_rejected_bad_label", "replies_rejected_bad_schema",
            "replies_rejected_bad_version", "replies_rejected_no_correlation", "replies_rejected_bad_correlation",
            "replies_rejected_too_large"}
        w = worker.counters.snapshot()
        assert w["corrected"] == 1 and w["rejected_bad_device_id"] > 0 and w["rejected_bad_version"] > 0
        # nothing half-written: the first result is as its one correction left it
        r = svc.result(first.sample_id)
        assert r.origin == "cloud" and r.label_name == svc.card.labels[r.label] and svc.counters.get("corrected") == 1
        # both sides are still running and still answer real samples
        assert all(t.is_alive() for t in worker._threads) and svc.uplink._thread.is_alive() and svc.writer._thread.is_alive()
        assert worker.link.connected.is_set() and svc.link.connected.is_set()
        later = [svc.classify(im) for im in fmnist["test"].images[1:6]]
        wait_for(lambda: all(svc.result(x.sample_id).state == "final" for x in later), timeout=30,
                 what="corrections after the hostile stream")
        assert all(svc.result(x.sample_id).origin == "cloud" for x in later)
        assert svc.store.audit()["applied_twice"] == 0
    finally:
        svc.stop()
