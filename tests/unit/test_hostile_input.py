"""Hostile input at every decoder, on both sides (property-based).

Whatever the bytes, types and properties, each decoder either returns a value
that meets its contract or raises its one documented validation error (with a
documented code): ProtocolError for samples, replies, results and status,
ModelCardError for model cards, ConfigError for configuration, ImageError for
images. The device's reply handler and the worker's batch step, fed the same,
never raise, count what they refuse and write nothing for it.
"""
from __future__ import annotations

import io
import json
import math
import queue
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_infer import protocol
from edge_infer.config import DeviceConfig, parse_device_config
from edge_infer.modelcard import ModelCardError, load_card, parse_card
from edge_infer.mqtt_link import Published, Received
from edge_infer.preprocess import CONTENT_TYPES, ImageError, decode_image, encode_png
from edge_infer.protocol import ProtocolError, SampleMeta, Topics
from edge_infer.result import Result
from edge_infer.stats import Counters
from edge_infer.store import Store
from edge_infer.storehealth import StoreHealth
from edge_infer.tomlcfg import ConfigError, build, load_toml
from edge_infer.uplink import Uplink
from edge_infer_cloud.config import WorkerConfig

from ..conftest import CLOUD_CARD, EDGE_CARD

PREFIX = "edge-infer"
T = Topics(PREFIX, "dev-1")
LABELS = tuple(json.loads(EDGE_CARD.read_text())["labels"])
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------ strategies
#: text that looks like what is being checked (ids, topics, codes) as well as anything at all
tricky_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="abc-_./+#$ 019\x00\n\u00e9", max_size=70),
    st.sampled_from(["", "1", "2", "v", "dev-1", "dev 1", "_workers", "s-1", "a" * 64, "a" * 65, "NaN", "inf",
                     "-1e400", T.samples, T.corrections, T.results, "edge-infer/dev-2/corrections"]),
)
ids_as_bytes = st.one_of(st.none(), st.binary(max_size=80), tricky_text.map(lambda t: t.encode()),
                         st.sampled_from([b"s-1", b"abc123", b"a" * 64, b"a" * 65, b"\xff", b"has space"]))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                         st.floats(allow_nan=False, allow_infinity=False), tricky_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(tricky_text, inner, max_size=5)), max_leaves=20)


def json_bytes(values=json_values):
    return values.map(lambda v: json.dumps(v).encode())


def mutated(base: dict, keys: list[str]):
    """``base`` with some of ``keys`` replaced by anything, deleted, or left as they are."""
    return st.fixed_dictionaries({}, optional={k: st.one_of(json_values, st.just("__delete__")) for k in keys}).map(
        lambda changes: {k: v for k, v in ({**base, **changes}).items() if v != "__delete__"})


hostile_bytes = st.one_of(
    st.binary(max_size=5000),
    json_bytes(),
    st.sampled_from([b"", b"{", b"[" * 3000 + b"]" * 3000, b'{"v":1' + b"," * 1000 + b"}", b"\xef\xbb\xbf{}",
                     b"NaN", b'{"v":1e400}', b"1" * 5000, b'"' + b"\\u0000" * 600 + b'"']),
)

# ------------------------------------------------------------ samples (worker side)
_good_props = protocol.sample_properties(SampleMeta("s-1", "dev-1", "m:1", 3, 0.5, 1.0))


@st.composite
def sample_envelopes(draw):
    """A sample as the broker hands it to a worker: near-valid (so the later checks are reached) or wild."""
    device = draw(st.one_of(st.just("dev-1"), tricky_text))
    topic = draw(st.one_of(st.just(f"{PREFIX}/{device}/samples"), tricky_text))
    response = draw(st.one_of(st.just(f"{PREFIX}/{device}/corrections"), st.none(), tricky_text))
    props = draw(st.one_of(
        st.just(list(_good_props)),
        st.lists(st.tuples(st.one_of(st.sampled_from(["v", "sample_id", "device_id", "created_at", "model"]),
                                     tricky_text), tricky_text), max_size=8),
        st.none()))
    if props and draw(st.booleans()):
        props = [(k, draw(tricky_text) if draw(st.booleans()) else v) for k, v in props]
    return dict(
        topic=topic, payload=draw(st.binary(max_size=1200)), prefix=PREFIX,
        content_type=draw(st.one_of(st.none(), st.sampled_from(sorted(CONTENT_TYPES)), tricky_text)),
        response_topic=response, correlation_data=draw(st.one_of(st.just(b"s-1"), ids_as_bytes)),
        user_properties=props, max_bytes=1000)


@SETTINGS
@given(env=sample_envelopes())
def test_parse_sample_returns_a_valid_request_or_raises_a_documented_protocol_error(env):
    try:
        req = protocol.parse_sample(**env)
    except ProtocolError as exc:
        assert exc.code in protocol.SAMPLE_ERROR_CODES
        return
    assert protocol.valid_device_id(req.device_id) and protocol.valid_sample_id(req.sample_id)
    assert req.response_topic == Topics(PREFIX, req.device_id).corrections == env["response_topic"]
    assert req.correlation_data == req.sample_id.encode() and req.content_type in CONTENT_TYPES
    assert 0 < len(req.payload) <= env["max_bytes"]
    assert dict(env["user_properties"]).get("v") == "1"
    assert req.created_at is None or math.isfinite(req.created_at)


# ------------------------------------------------------------ replies (device side)
_good_correction = {"v": 1, "type": "correction", "sample_id": "s-1", "label": 4, "label_name": "trouser",
                    "confidence": 0.9, "model": "m:1", "worker": "w"}
_good_error = {"v": 1, "type": "error", "sample_id": "s-1", "error": {"code": "bad_image", "message": "no"},
               "worker": "w"}
reply_payloads = st.one_of(
    hostile_bytes,
    json_bytes(mutated(_good_correction, list(_good_correction))),
    json_bytes(mutated(_good_error, list(_good_error))),
)


@SETTINGS
@given(payload=reply_payloads, cd=st.one_of(st.just(b"s-1"), ids_as_bytes))
def test_parse_reply_returns_a_checked_reply_or_raises_a_documented_protocol_error(payload, cd):
    try:
        reply = protocol.parse_reply(payload, cd, LABELS)
    except ProtocolError as exc:
        assert exc.code in protocol.REPLY_ERROR_CODES
        return
    assert cd and cd == reply.sample_id.encode() and protocol.valid_sample_id(reply.sample_id)
    assert len(payload) <= protocol.MAX_REPLY_BYTES
    if isinstance(reply, protocol.Correction):
        assert 0 <= reply.label < len(LABELS) and reply.label_name == LABELS[reply.label]   # the card's name
        assert 0.0 <= reply.confidence <= 1.0
        assert all(isinstance(x, str) and len(x) <= 128 for x in (reply.model_id, reply.worker_id))
    else:
        assert isinstance(reply, protocol.ErrorReply) and len(reply.code) <= 64 and len(reply.message) <= 500


# ------------------------------------------------------------ results and status (integrators)
_result = Result(sample_id="s-1", label=1, label_name="trouser", confidence=0.5, origin="edge", state="final",
                 offloaded=False, edge_label=1, edge_confidence=0.5, model_id="m:1", created_at=1.0)
_good_results = json.loads(protocol.encode_results([_result], "dev-1"))


@SETTINGS
@given(payload=st.one_of(hostile_bytes, json_bytes(mutated(_good_results, ["v", "device", "results"]))))
def test_decode_results_returns_result_objects_or_raises_a_documented_protocol_error(payload):
    try:
        results = protocol.decode_results(payload)
    except ProtocolError as exc:
        assert exc.code in protocol.MESSAGE_ERROR_CODES
        return
    assert isinstance(results, list) and all(isinstance(r, dict) and "offload_error" in r for r in results)


_good_status = json.loads(protocol.encode_status({"device": "dev-1", "state": "online", "counters": {"a": 1}}))


@SETTINGS
@given(payload=st.one_of(hostile_bytes, json_bytes(mutated(_good_status, ["v", "device", "worker", "state",
                                                                          "counters"]))))
def test_decode_status_returns_a_status_or_raises_a_documented_protocol_error(payload):
    try:
        status = protocol.decode_status(payload)
    except ProtocolError as exc:
        assert exc.code in protocol.MESSAGE_ERROR_CODES
        return
    assert status["v"] == 1 and status["state"] in protocol.STATUS_STATES
    assert isinstance(status.get("device", status.get("worker")), str)


# ------------------------------------------------------------ model cards (both sides)
_good_card = json.loads(EDGE_CARD.read_text())


@st.composite
def cards(draw):
    """A real card with fields (at the top level or in input/output) replaced, deleted or added."""
    card = json.loads(json.dumps(_good_card))
    for _ in range(draw(st.integers(1, 4))):
        tables = [card, *(card[k] for k in ("input", "output") if isinstance(card.get(k), dict))]
        tables += [t["quantization"] for t in tables[1:] if isinstance(t.get("quantization"), dict)]
        where = draw(st.sampled_from(tables))
        key = draw(st.one_of(st.sampled_from(sorted(where) or ["x"]), tricky_text))
        if draw(st.booleans()):
            where[key] = draw(json_values)
        else:
            where.pop(key, None)
    return card


@SETTINGS
@given(data=st.one_of(cards(), json_values))
def test_parse_card_returns_a_card_or_raises_model_card_error(data):
    try:
        card = parse_card(data, EDGE_CARD)
    except ModelCardError:
        return
    assert card.labels and all(isinstance(x, str) for x in card.labels)
    assert len(card.input.shape) == 4 and card.input.std > 0 and math.isfinite(card.input.pixel_scale)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(hostile_bytes, cards().map(lambda c: json.dumps(c).encode())))
def test_load_card_from_arbitrary_bytes_raises_only_model_card_error(raw, tmp_path):
    path = tmp_path / "card.json"
    path.write_bytes(raw)
    try:
        load_card(path)
    except ModelCardError:
        pass


# ------------------------------------------------------------ configuration (both sides)
toml_scalars = st.one_of(st.booleans(), st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1), st.floats(),
                         tricky_text)
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(tricky_text, inner, max_size=4)), max_leaves=12)
_good_device = {"device_id": "dev-1", "model": {"card": "card.json"}}
_sections = {
    "": ["device_id", "state_dir", "log_level", "model", "policy", "mqtt", "outbox", "spool", "results", "store",
         "backend"],
    "model": ["card", "backend", "runtime", "num_threads"],
    "policy": ["threshold", "score", "temperature", "router_file", "offload", "audit_rate"],
    "mqtt": ["host", "port", "topic_prefix", "keepalive_s", "session_expiry_s", "tls", "reconnect_min_s"],
    "outbox": ["max_inflight", "max_age_s", "max_bytes", "keep_payload_after_correction"],
    "backend": ["tflite-cpu", "onnxruntime", "nope"],
    "store": ["max_pending", "max_wait_s"],
}


@st.composite
def device_tables(draw):
    table = json.loads(json.dumps(_good_device))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(_sections)))
        where = table if not section else table.setdefault(section, {})
        if not isinstance(where, dict):
            continue
        key = draw(st.one_of(st.sampled_from(_sections[section]), tricky_text))
        where[key] = draw(toml_values)
    return table


@SETTINGS
@given(table=st.one_of(device_tables(), st.dictionaries(tricky_text, toml_values, max_size=4)))
def test_device_config_from_arbitrary_tables_raises_only_config_error(table):
    try:
        cfg = parse_device_config(table)
    except ConfigError:
        return
    assert isinstance(cfg, DeviceConfig) and protocol.valid_device_id(cfg.device_id)


@SETTINGS
@given(table=st.one_of(
    st.dictionaries(st.sampled_from(["model", "worker", "mqtt", "log_level", "x"]), toml_values, max_size=4),
    st.fixed_dictionaries({"model": st.just({"card": "c.json"}),
                           "worker": st.dictionaries(st.sampled_from(["id", "group", "batch_max", "batch_wait_ms",
                                                                      "max_batch_size", "max_queue_delay_us",
                                                                      "preferred_batch_sizes", "decode_threads",
                                                                      "max_payload_bytes", "max_pixels"]),
                                                     toml_values, max_size=3)})))
def test_worker_config_from_arbitrary_tables_raises_only_config_error(table):
    try:
        build(WorkerConfig, table)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=2000), st.sampled_from([b"a = [" * 2000, b"[a]\n[a]\n", b"\xff = 1",
                                                                b"a = 1\na = 2", b"x = 1979-05-27T07:32:00Z"]),
                     st.text(alphabet="[]={}\"'=.,\n abc123#", max_size=200).map(str.encode)))
def test_config_files_of_arbitrary_bytes_raise_only_config_error(raw, tmp_path):
    path = tmp_path / "edge-infer.toml"
    path.write_bytes(raw)
    try:
        parse_device_config(load_toml(path))
    except ConfigError:
        pass


# ------------------------------------------------------------ images (both sides)
def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


_images = [encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8)), _encoded("JPEG"), _encoded("BMP"),
           _encoded("PPM"), b"P5\n8 8\n255\n" + bytes(64)]


@st.composite
def damaged_images(draw):
    data = bytearray(draw(st.sampled_from(_images)))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@SETTINGS
@given(data=st.one_of(st.binary(max_size=3000), damaged_images()),
       expected=st.one_of(st.none(), st.sampled_from(sorted(CONTENT_TYPES)), tricky_text))
def test_decode_image_returns_pixels_or_raises_only_image_error(data, expected):
    try:
        img = decode_image(data, max_bytes=4000, max_pixels=10_000, expected_type=expected)
    except ImageError:
        return
    assert img.pixels.dtype == np.uint8 and img.pixels.ndim in (2, 3) and 0 < img.pixels.size <= 30_000
    assert img.content_type in CONTENT_TYPES


# ------------------------------------------------------------ the device's reply handler
class _Harness:
    """An Uplink on a real store, not connected: its reply handler is called as the link worker would."""

    def __init__(self, tmp_path) -> None:
        from ..integration.helpers import device_config
        self.cfg = device_config(tmp_path, 1)
        self.store = Store(tmp_path / "db")
        self.store.open()
        self.counters = Counters()
        self.uplink = Uplink(self.cfg, self.store, StoreHealth(self.store.path, self.counters), self.counters,
                             labels=LABELS, waiters={}, status_fields=dict)
        self.topics = self.uplink.topics
        from .test_store import make
        for sid, sent in (("sent-1", True), ("never-sent", False)):
            self.store.record(*make(sid))
            if sent:
                self.store.commit_progress(inflight=[sid])
                self.store.commit_progress(delivered=[sid])

    def dump(self) -> list:
        db = self.store._conn()
        return [db.execute("SELECT * FROM outbox ORDER BY seq").fetchall(),
                db.execute("SELECT * FROM results ORDER BY pub_seq").fetchall()]

    def reply(self, topic: str, payload: bytes, cd: bytes | None, props=None) -> None:
        self.uplink._on_reply(Received(topic, payload, 1, 1, "application/json", None, cd, props or []))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(
    st.one_of(st.just("corrections"), tricky_text), reply_payloads,
    st.one_of(st.sampled_from([b"sent-1", b"never-sent", b"s-1"]), ids_as_bytes),
    st.lists(st.tuples(tricky_text, tricky_text), max_size=3)), min_size=1, max_size=8))
def test_hostile_replies_never_raise_and_change_nothing(messages, tmp_path_factory):
    """Replies that are not a valid reply for a sample sent and awaiting one leave the store as it was;
    each is counted (replies_rejected_<code>, replies_unknown, ...), and the handler never raises."""
    h = _Harness(tmp_path_factory.mktemp("uplink"))
    try:
        handled = 0
        for topic, payload, cd, props in messages:
            topic = h.topics.corrections if topic == "corrections" else topic
            if topic == h.topics.corrections and cd == b"sent-1":
                try:
                    protocol.parse_reply(payload, cd, LABELS)
                    continue   # a valid reply for the sample sent: the one thing that may change the store
                except ProtocolError:
                    pass
            before = h.dump()
            h.reply(topic, payload, cd, props)
            assert h.dump() == before
            handled += 1
        c = h.counters.snapshot()
        refused = c.get("replies_rejected", 0) + c.get("replies_unknown", 0)
        assert refused == handled and c.get("corrected", 0) == 0
        assert c.get("replies_rejected", 0) == sum(v for k, v in c.items() if k.startswith("replies_rejected_"))
    finally:
        h.store.close()


def test_a_forged_label_name_is_never_stored_or_published(tmp_path):
    """The reply says label 4 is "trouser"; the device stores and publishes its own card's name, "coat"."""
    h = _Harness(tmp_path)
    try:
        forged = dict(_good_correction, sample_id="sent-1", label=4, label_name="trouser")
        h.reply(h.topics.corrections, json.dumps(forged).encode(), b"sent-1")
        r = h.store.get_result("sent-1")
        assert (r.label, r.label_name, r.origin) == (4, "coat", "cloud")
        (due,) = [d for d in h.store.unpublished_results(0, 10) if d.result.sample_id == "sent-1"]
        assert json.loads(protocol.encode_results([due.result], "dev-1"))["results"][0]["label_name"] == "coat"
    finally:
        h.store.close()


def test_a_reply_for_a_sample_never_sent_is_counted_unknown(tmp_path):
    h = _Harness(tmp_path)
    try:
        h.reply(h.topics.corrections, json.dumps(dict(_good_correction, sample_id="never-sent")).encode(),
                b"never-sent")
        assert h.counters.get("replies_unknown") == 1 and h.store.outbox_state("never-sent")[0] == "queued"
    finally:
        h.store.close()


def test_a_reply_for_a_sample_handed_to_the_client_this_turn_is_applied(tmp_path):
    """The link worker records the samples it handed to paho at the end of its turn; a reply that comes
    first (or after a failed commit) makes it record them at once, then it applies the reply."""
    h = _Harness(tmp_path)
    try:
        h.uplink._pending_inflight.append("never-sent")   # handed to paho, not yet recorded as inflight
        h.reply(h.topics.corrections, json.dumps(dict(_good_correction, sample_id="never-sent")).encode(),
                b"never-sent")
        assert h.counters.get("corrected") == 1 and h.counters.get("sent") == 1
        assert h.store.outbox_state("never-sent")[0] == "corrected" and h.uplink._pending_inflight == []
        assert h.store.get_result("never-sent").label_name == "coat"
    finally:
        h.store.close()


# ------------------------------------------------------------ the worker's batch step
class _FakeLink:
    """What the worker uses of MqttLink: publish (replies) and ack; nothing goes anywhere."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.published: list[tuple[str, bytes, bytes | None]] = []
        self.acked: list[int] = []
        self._mid = 1000

    def publish(self, topic, payload, *, content_type=None, correlation_data=None, retain=False, **_):
        self._mid += 1
        self.published.append((topic, payload, correlation_data))
        return 0, self._mid

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


@pytest.fixture(scope="module")
def cloud_model():
    from edge_infer_cloud.model import CloudModel
    return CloudModel(CLOUD_CARD)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(envs=st.lists(sample_envelopes(), min_size=1, max_size=6),
       images=st.lists(st.one_of(st.sampled_from(_images), damaged_images()), min_size=6, max_size=6))
def test_hostile_samples_never_raise_and_every_one_is_answered_or_acknowledged(envs, images, cloud_model):
    from edge_infer_cloud.worker import CloudWorker
    from ..integration.helpers import worker_config
    w = CloudWorker(worker_config(1, max_payload_bytes=1000))
    w.model, w.link = cloud_model, _FakeLink()
    msgs = [Received(e["topic"], img if i % 2 else e["payload"], 1, i + 1, e["content_type"], e["response_topic"],
                     e["correlation_data"], e["user_properties"] or [])
            for i, (e, img) in enumerate(zip(envs, images))]
    for m in msgs:                       # the intake thread's steps: validate, decode, queue or reject
        w.link.events.put(m)
        w._take_event(timeout=0)
    while len(w.queue):                  # the model thread's: run what was queued; the reply thread's: reply
        w._run_batch(w.queue.take(timeout=0))
        w._publish_corrections(w._done.get_nowait())
    # every reply goes to the sender's own corrections topic, with its correlation data
    for topic, payload, cd in w.link.published:
        device = topic.split("/")[1]
        assert topic == Topics(PREFIX, device).corrections and protocol.valid_device_id(device)
        reply = protocol.parse_reply(payload, cd, LABELS)   # a device could parse it
        assert reply.sample_id.encode() == cd
    # acknowledged now (no reply) or once its reply is acknowledged by the broker
    for reply_mid in list(w._ack_after):
        w.link.events.put(Published(reply_mid, False, ""))
        w._take_event(timeout=0)
    assert sorted(w.link.acked) == [m.mid for m in msgs]
    c = w.counters.snapshot()
    assert c["received"] == len(msgs) == c.get("corrected", 0) + c.get("rejected", 0)
    assert set(k[len("rejected_"):] for k in c if k.startswith("rejected_")) <= set(protocol.SAMPLE_ERROR_CODES)


def test_an_unexpected_error_preparing_a_sample_acknowledges_it_and_counts_it(cloud_model, monkeypatch):
    """Unacknowledged, such a sample would hold a receive-maximum slot until the worker reconnects."""
    from edge_infer_cloud import worker as worker_module
    from edge_infer_cloud.worker import CloudWorker
    from ..integration.helpers import worker_config
    w = CloudWorker(worker_config(1))
    w.model, w.link = cloud_model, _FakeLink()

    def broken(*a, **k):
        raise RuntimeError("decoder bug")
    monkeypatch.setattr(worker_module, "decode_image", broken)
    dev = "dev-1"
    ups = [("v", "1"), ("sample_id", "s1"), ("device_id", dev)]
    w.link.events.put(Received(f"{PREFIX}/{dev}/samples", b"P5\n1 1\n255\n\x00", 1, 7, "image/x-portable-graymap",
                               Topics(PREFIX, dev).corrections, b"s1", ups))
    w._take_event(timeout=0)
    assert w.link.acked == [7] and w.counters.get("intake_errors") == 1 and not len(w.queue)


def test_an_unexpected_error_running_a_batch_answers_and_acknowledges_every_sample(cloud_model, monkeypatch):
    """The model thread's last line of defence: no sample of a failed batch is left holding a slot."""
    from edge_infer_cloud.worker import CloudWorker
    from ..integration.helpers import worker_config
    w = CloudWorker(worker_config(1))
    w.model, w.link = cloud_model, _FakeLink()
    dev = "dev-1"
    for mid in (7, 8):
        sid = f"s{mid}"
        ups = [("v", "1"), ("sample_id", sid), ("device_id", dev)]
        w.link.events.put(Received(f"{PREFIX}/{dev}/samples", b"P5\n1 1\n255\n\x00", 1, mid,
                                   "image/x-portable-graymap", Topics(PREFIX, dev).corrections, sid.encode(), ups))
        w._take_event(timeout=0)

    def broken(*a, **k):
        raise KeyError("post-processing bug")
    monkeypatch.setattr(cloud_model, "predict_fitted_batch", broken)
    assert w._guarded_run(w.queue.take(timeout=0)) is False
    replies = [protocol.parse_reply(payload, cd, LABELS) for _, payload, cd in w.link.published]
    assert [(r.sample_id, r.code) for r in replies] == [("s7", "model_error"), ("s8", "model_error")]
    for reply_mid in list(w._ack_after):
        w.link.events.put(Published(reply_mid, False, ""))
        w._take_event(timeout=0)
    assert sorted(w.link.acked) == [7, 8] and w.counters.get("rejected_model_error") == 2


def test_an_unexpected_error_replying_acknowledges_that_sample_counts_it_and_answers_the_rest(cloud_model, monkeypatch):
    from edge_infer_cloud import worker as worker_module
    from edge_infer_cloud.worker import CloudWorker
    from ..integration.helpers import worker_config
    w = CloudWorker(worker_config(1))
    w.model, w.link = cloud_model, _FakeLink()
    dev = "dev-1"
    for mid in (7, 8):
        sid = f"s{mid}"
        ups = [("v", "1"), ("sample_id", sid), ("device_id", dev)]
        w.link.events.put(Received(f"{PREFIX}/{dev}/samples", b"P5\n1 1\n255\n\x00", 1, mid,
                                   "image/x-portable-graymap", Topics(PREFIX, dev).corrections, sid.encode(), ups))
        w._take_event(timeout=0)
    w._run_batch(w.queue.take(timeout=0))
    real = worker_module.protocol.encode_correction

    def broken_for_s7(c):
        if c.sample_id == "s7":
            raise UnicodeError("encoder bug")
        return real(c)
    monkeypatch.setattr(worker_module.protocol, "encode_correction", broken_for_s7)
    w._publish_corrections(w._done.get_nowait())
    assert w.link.acked == [7] and w.counters.get("reply_errors") == 1 and w.counters.get("corrected") == 1
    assert [cd for _, _, cd in w.link.published] == [b"s8"]
