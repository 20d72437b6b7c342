"""The cloud worker: validate samples, run the large model in batches, reply.

Samples arrive through a shared subscription, so starting more workers in
the same group splits the load. Acknowledgement is manual: a sample's PUBACK
goes to the broker only after its reply has been published (and acknowledged
by the broker). Workers use clean, non-persistent sessions, so the samples a
dead worker held unacknowledged die with its session: the broker does not
hand them to another worker. They are answered only when their device sends
them again (``outbox.resend_after_s``, 120 s by default, the wait doubling up
to 64x); the device applies a correction once, however many copies are
answered. Every reply carries the sample's correlation data.

One thread (the worker thread) owns the link: paho's callbacks only enqueue
events, and every publish (replies, acknowledgements, status refreshes) is
made on it; only stop() publishes the final offline status, after it ended.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import replace

import numpy as np

from edge_infer import protocol
from edge_infer.mqtt_link import Connected, MqttLink, Published, Received
from edge_infer.preprocess import ImageError, decode_image
from edge_infer.stats import Counters

from .config import WorkerConfig
from .model import CloudModel

log = logging.getLogger(__name__)

#: Counters the status always carries, at 0 until they happen: a dashboard must
#: read "none yet", not a missing key. Anything else counted is listed as well.
KNOWN_COUNTERS: tuple[str, ...] = (
    "received", "corrected", "batches", "rejected", "error_replies", "replies_refused", "connects",
    *(f"rejected_{code}" for code in protocol.SAMPLE_ERROR_CODES),
)


def status_counters(snapshot: dict[str, int]) -> dict[str, int]:
    """The counters for a status message: every known one (0 if never counted) plus any other counted."""
    return dict(sorted(({name: 0 for name in KNOWN_COUNTERS} | snapshot).items()))


class CloudWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.worker_id = cfg.worker_id
        self.counters = Counters()
        self.model: CloudModel | None = None
        self.link: MqttLink | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ack_after: dict[int, int] = {}   # reply mid -> sample mid (worker thread only)
        self._pending: list[Received] = []
        # Monotonic time of the next status refresh (worker thread only); the first
        # status goes out on Connected, so that it already counts the connect.
        self._status_due = math.inf

    def start(self) -> None:
        self.model = CloudModel(self.cfg.model.card, self.cfg.model.intra_op_threads)
        topic = protocol.shared_samples_filter(self.cfg.mqtt.topic_prefix, self.cfg.worker.group)
        self.status_topic = protocol.worker_status_topic(self.cfg.mqtt.topic_prefix, self.worker_id)
        # A clean, non-persistent session: a stopped worker must not keep a share of the
        # group's samples queued in the broker. Samples lost with a dead worker's session
        # are re-sent by their device (outbox resend_after_s); corrections apply once.
        mqtt_cfg = replace(self.cfg.mqtt, session_expiry_s=0)
        self.link = MqttLink(mqtt_cfg, self.cfg.client_id, subscriptions=[(topic, 1)], manual_ack=True,
                             clean_start=True,
                             receive_maximum=max(2 * self.cfg.worker.batch_max, 64),
                             will=(self.status_topic, self._status("offline")))
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self._thread.start()
        self.link.start()
        log.info("cloud worker %s ready: model %s (%s), group %s, broker %s:%d", self.worker_id,
                 self.model.card.model_id, self.model.runtime, self.cfg.worker.group, self.cfg.mqtt.host,
                 self.cfg.mqtt.port)

    def _status(self, state: str) -> bytes:
        fields = {"worker": self.worker_id, "state": state, "group": self.cfg.worker.group}
        if self.model is not None:
            fields["model"] = self.model.card.model_id
        if state == "online":
            fields["counters"] = status_counters(self.counters.snapshot())
        return protocol.encode_status(fields)

    def _publish_status(self) -> None:
        """Worker thread only: refresh the retained status (and its counters)."""
        assert self.link is not None
        self.link.publish(self.status_topic, self._status("online"), retain=True)
        self._status_due = time.monotonic() + self.cfg.worker.status_interval_s

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.link is not None:
            if self.link.connected.is_set():
                self.link.publish(self.status_topic, self._status("offline"), retain=True)
                time.sleep(0.1)
            self.link.stop()
        log.info("cloud worker %s stopped: %s", self.worker_id, self.counters.snapshot())

    # ------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
                # Between batches: a busy worker refreshes its status as often as an idle one.
                if time.monotonic() >= self._status_due and self.link is not None and self.link.connected.is_set():
                    self._publish_status()
            except Exception:
                log.exception("worker loop error; continuing")
                time.sleep(0.5)

    def _step(self) -> None:
        assert self.link is not None
        self._take_event(timeout=0.1)
        if not self._pending:
            return
        deadline = time.monotonic() + self.cfg.worker.batch_wait_ms / 1000.0
        while len(self._pending) < self.cfg.worker.batch_max:
            left = deadline - time.monotonic()
            if left <= 0 or not self._take_event(timeout=left):
                break
        batch, self._pending = self._pending, []
        self._process(batch)

    def _take_event(self, timeout: float) -> bool:
        assert self.link is not None
        try:
            ev = self.link.events.get(timeout=timeout)
        except queue.Empty:
            return False
        if isinstance(ev, Received):
            self._pending.append(ev)
        elif isinstance(ev, Published):
            sample_mid = self._ack_after.pop(ev.mid, None)
            if sample_mid is not None:
                if ev.failed:
                    self.counters.inc("replies_refused")
                    log.error("broker refused a reply: %s (check the broker ACL); acknowledging the sample anyway: "
                              "unacknowledged, it would hold a receive-maximum slot, and a resent copy would be "
                              "refused the same way", ev.reason)
                self.link.ack(sample_mid, 1)
        elif isinstance(ev, Connected):
            self.counters.inc("connects")
            # Subscribed before this (in on_connect), so "online" means ready to take samples.
            self._publish_status()
        return True

    def _process(self, batch: list[Received]) -> None:
        assert self.model is not None and self.link is not None
        valid: list[tuple[Received, protocol.SampleRequest, np.ndarray]] = []
        for msg in batch:
            self.counters.inc("received")
            try:
                req = protocol.parse_sample(
                    msg.topic, msg.payload, prefix=self.cfg.mqtt.topic_prefix, content_type=msg.content_type,
                    response_topic=msg.response_topic, correlation_data=msg.correlation_data,
                    user_properties=msg.user_properties, max_bytes=self.cfg.worker.max_payload_bytes)
            except protocol.ProtocolError as exc:
                self._reject(msg, exc.code, str(exc))
                continue
            try:
                img = decode_image(req.payload, max_bytes=self.cfg.worker.max_payload_bytes,
                                   max_pixels=self.cfg.worker.max_pixels, expected_type=req.content_type)
            except ImageError as exc:
                self._reject(msg, "bad_image", str(exc), req)
                continue
            valid.append((msg, req, img.pixels))
        if not valid:
            return
        try:
            labels, confs = self.model.predict([v[2] for v in valid])
        except (ValueError, RuntimeError, ImageError) as exc:
            for msg, req, _ in valid:
                self._reject(msg, "model_error", f"cloud model failed: {exc}", req)
            return
        self.counters.inc("batches")
        for (msg, req, _), label, conf in zip(valid, labels, confs):
            corr = protocol.Correction(req.sample_id, int(label), self.model.card.labels[int(label)], float(conf),
                                       self.model.card.model_id, self.worker_id)
            self._reply(msg, req.response_topic, req.correlation_data, protocol.encode_correction(corr))
            self.counters.inc("corrected")

    def _reject(self, msg: Received, code: str, message: str, req: protocol.SampleRequest | None = None) -> None:
        """Answer a bad sample with an error reply when its reply address is trustworthy; always acknowledge it."""
        assert self.link is not None
        self.counters.inc("rejected")
        self.counters.inc(f"rejected_{code}")
        log.warning("rejected sample on %r: %s: %s", msg.topic[:200], code, message[:500])
        if req is None:
            # A reply is safe only to the sender's own corrections topic with a usable id.
            # A device id outside the documented pattern is no device of ours: no reply to it either.
            device = protocol.device_of_sample_topic(msg.topic, self.cfg.mqtt.topic_prefix)
            cd = msg.correlation_data
            ok_topic = (device is not None and protocol.valid_device_id(device)
                        and msg.response_topic == protocol.Topics(self.cfg.mqtt.topic_prefix, device).corrections)
            sid = cd.decode("ascii", "replace") if cd else ""
            if not (ok_topic and cd and protocol.valid_sample_id(sid)):
                self.link.ack(msg.mid, 1)
                return
            response_topic, correlation = msg.response_topic, cd
        else:
            response_topic, correlation, sid = req.response_topic, req.correlation_data, req.sample_id
        err = protocol.ErrorReply(sid, code, message, self.worker_id)
        self._reply(msg, response_topic, correlation, protocol.encode_error(err))
        self.counters.inc("error_replies")

    def _reply(self, msg: Received, topic: str, correlation: bytes, payload: bytes) -> None:
        assert self.link is not None
        rc, mid = self.link.publish(topic, payload, content_type="application/json", correlation_data=correlation)
        if rc not in (0, 4):
            log.error("could not queue a reply (paho rc %d); the sample stays unacknowledged until this worker "
                      "reconnects, and its device sends it again after outbox.resend_after_s", rc)
            return
        self._ack_after[mid] = msg.mid
