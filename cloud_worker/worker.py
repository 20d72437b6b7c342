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

Three threads beside paho's network thread, so that the model never waits for
MQTT or PNG work: the intake thread takes the link's events (paho's callbacks
only enqueue them), validates and decodes each sample into the model's input
and queues it, acknowledges samples whose replies the broker confirmed, and
refreshes the status; the model thread runs batches from that queue as soon as
the model is free (cloud_worker.batcher: a lone sample runs alone at once, a
backlog makes full batches) and hands each finished batch to the reply thread,
which publishes its replies while the next batch runs. Replies are
registered under a lock before their PUBACK can be handled, so a sample is
acknowledged exactly once, after its reply.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from edge_infer import protocol
from edge_infer.mqtt_link import Connected, MqttLink, Published, Received
from edge_infer.preprocess import ImageError, decode_image
from edge_infer.stats import Counters

from .batcher import BatchQueue, size_bucket
from .config import WorkerConfig
from .model import CloudModel

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Counters the status always carries, at 0 until they happen: a dashboard must
#: read "none yet", not a missing key. Anything else counted is listed as well.
KNOWN_COUNTERS: tuple[str, ...] = (
    "received", "corrected", "batches", "model_busy_us", "rejected", "error_replies", "replies_refused", "connects", "intake_errors", "reply_errors",
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
        self.queue: BatchQueue[_Ready] = BatchQueue(cfg.worker.batch_policy())
        self._stopping = threading.Event()
        #: finished batches for the reply thread; None wakes it to stop. Bounded in practice by the
        #: receive maximum: the broker hands out no more samples than that unacknowledged.
        self._done: queue.SimpleQueue[_Finished | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._decoders: ThreadPoolExecutor | None = None
        self._ack_lock = threading.Lock()
        self._ack_after: dict[int, int] = {}   # reply mid -> sample mid (under _ack_lock)
        # Monotonic time of the next status refresh (intake thread only); the first
        # status goes out on Connected, so that it already counts the connect.
        self._status_due = math.inf
        #: [metrics]: the Prometheus registry and server (cloud_worker/metrics.py), from start()
        self.metrics: WorkerMetrics | None = None

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("CloudWorker.start() called twice")
        if self.cfg.metrics.enabled:
            from .metrics import WorkerMetrics
            self.metrics = WorkerMetrics(self)   # ConfigError (exit 2) before the model loads: what to install
        m = self.cfg.model
        self.model = CloudModel(m.card, m.intra_op_threads, providers=m.providers,
                                graph_optimization=m.graph_optimization, device_id=m.device_id,
                                spin_wait=m.spin_wait, trt_engine_cache_dir=m.trt_engine_cache_dir)
        topic = protocol.shared_samples_filter(self.cfg.mqtt.topic_prefix, self.cfg.worker.group)
        self.status_topic = protocol.worker_status_topic(self.cfg.mqtt.topic_prefix, self.worker_id)
        # A clean, non-persistent session: a stopped worker must not keep a share of the
        # group's samples queued in the broker. Samples lost with a dead worker's session
        # are re-sent by their device (outbox resend_after_s); corrections apply once.
        mqtt_cfg = replace(self.cfg.mqtt, session_expiry_s=0)
        # Receive maximum: how many unacknowledged samples the broker hands this worker. Two
        # batches' worth keeps the model busy while one batch's replies are confirmed, and is
        # what a slow worker holds at most (the rest of the group's samples go to the others).
        self.link = MqttLink(mqtt_cfg, self.cfg.client_id, subscriptions=[(topic, 1)], manual_ack=True,
                             clean_start=True, receive_maximum=max(2 * self.cfg.worker.batch_size, 64),
                             will=(self.status_topic, self._status("offline")))
        if self.cfg.worker.decode_threads > 1:
            self._decoders = ThreadPoolExecutor(self.cfg.worker.decode_threads, thread_name_prefix="worker-decode")
        self._threads = [threading.Thread(target=self._intake_loop, name="worker-intake", daemon=True),
                         threading.Thread(target=self._model_loop, name="worker-model", daemon=True),
                         threading.Thread(target=self._reply_loop, name="worker-reply", daemon=True)]
        for t in self._threads:
            t.start()
        self.link.start()
        if self.metrics is not None:
            try:
                self.metrics.start()   # ConfigError (exit 2): the address cannot be listened on
            except BaseException:
                self.stop()
                raise
        log.info("cloud worker %s ready: model %s (%s), group %s, broker %s:%d, batches up to %d", self.worker_id,
                 self.model.card.model_id, self.model.runtime, self.cfg.worker.group, self.cfg.mqtt.host,
                 self.cfg.mqtt.port, self.cfg.worker.batch_size)

    def __enter__(self) -> "CloudWorker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _status(self, state: str) -> bytes:
        fields = {"worker": self.worker_id, "state": state, "group": self.cfg.worker.group}
        if self.model is not None:
            fields["model"] = self.model.card.model_id
        if state == "online":
            snap = self.counters.snapshot()
            fields["counters"] = status_counters({k: v for k, v in snap.items() if not k.startswith("batch_size_")})
            fields["batch_sizes"] = {k[len("batch_size_"):]: v for k, v in sorted(snap.items(), key=_bucket_order)
                                     if k.startswith("batch_size_")}
            fields["queued"] = len(self.queue)
        return protocol.encode_status(fields)

    def _publish_status(self) -> None:
        """Intake thread only: refresh the retained status (and its counters)."""
        assert self.link is not None
        self.link.publish(self.status_topic, self._status("online"), retain=True)
        self._status_due = time.monotonic() + self.cfg.worker.status_interval_s

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self._stopping.set()
        self.queue.close()
        *feeders, replier = self._threads or [None]
        for t in feeders:
            t.join(timeout=10)
        self._done.put(None)       # after the model thread: the replies of its last batch still go out
        if replier is not None:
            replier.join(timeout=10)
        if self._decoders is not None:
            self._decoders.shutdown(wait=False, cancel_futures=True)
        if self.link is not None:
            if self.link.connected.is_set():
                self.link.publish(self.status_topic, self._status("offline"), retain=True)
                time.sleep(0.1)
            self.link.stop()
        log.info("cloud worker %s stopped: %s", self.worker_id, self.counters.snapshot())

    # ------------------------------------------------------------ intake thread
    def _intake_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._take_event(timeout=0.1)
                if time.monotonic() >= self._status_due and self.link is not None and self.link.connected.is_set():
                    self._publish_status()
            except Exception:
                log.exception("worker intake error; continuing")
                time.sleep(0.5)

    def _take_event(self, timeout: float) -> bool:
        assert self.link is not None
        try:
            ev = self.link.events.get(timeout=timeout)
        except queue.Empty:
            return False
        if isinstance(ev, Received):
            self.counters.inc("received")
            if self._decoders is not None:
                self._decoders.submit(self._guarded_prepare, ev)
            else:
                self._guarded_prepare(ev)
        elif isinstance(ev, Published):
            with self._ack_lock:
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

    def _guarded_prepare(self, msg: Received) -> None:
        try:
            self._prepare(msg)
        except Exception:
            # Acknowledged all the same: unacknowledged, it would hold one of the receive-maximum
            # slots until this worker reconnects, and enough of them would stall it. Its device
            # sends it again after its resend wait; the count shows in the status and metrics.
            self.counters.inc("intake_errors")
            log.exception("unexpected error preparing a sample on %r; acknowledged unanswered (its device resends "
                          "it)", msg.topic[:200])
            assert self.link is not None
            self.link.ack(msg.mid, 1)

    def _prepare(self, msg: Received) -> None:
        """Validate and decode one sample into the model's input, queue it; or reject it."""
        assert self.model is not None
        w = self.cfg.worker
        try:
            req = protocol.parse_sample(
                msg.topic, msg.payload, prefix=self.cfg.mqtt.topic_prefix, content_type=msg.content_type,
                response_topic=msg.response_topic, correlation_data=msg.correlation_data,
                user_properties=msg.user_properties, max_bytes=w.max_payload_bytes)
        except protocol.ProtocolError as exc:
            self._reject(msg, exc.code, str(exc))
            return
        try:
            img = decode_image(req.payload, max_bytes=w.max_payload_bytes, max_pixels=w.max_pixels,
                               expected_type=req.content_type)
            fitted = self.model.pre.fit(img.pixels)
        except ImageError as exc:
            self._reject(msg, "bad_image", str(exc), req)
            return
        self.queue.put(_Ready(msg, req, fitted))

    # ------------------------------------------------------------ model thread
    def _model_loop(self) -> None:
        while not self._stopping.is_set():
            batch = self.queue.take(timeout=0.1)
            if batch and not self._guarded_run(batch):
                time.sleep(0.5)

    def _guarded_run(self, batch: list["_Ready"]) -> bool:
        try:
            self._run_batch(batch)
            return True
        except Exception as exc:
            # Answered with an error and acknowledged: unacknowledged, the batch would hold its
            # receive-maximum slots until this worker reconnects.
            log.exception("worker model error; answering the batch of %d with model_error", len(batch))
            for r in batch:
                self._reject(r.msg, "model_error", f"cloud worker failed: {type(exc).__name__}", r.req)
            return False

    def _run_batch(self, batch: list["_Ready"]) -> None:
        assert self.model is not None
        try:
            started = time.perf_counter()
            labels, confs = self.model.predict_fitted_batch([r.fitted for r in batch])
            model_s = time.perf_counter() - started
        except (ValueError, RuntimeError, ImageError) as exc:
            for r in batch:
                self._reject(r.msg, "model_error", f"cloud model failed: {exc}", r.req)
            return
        self.counters.inc("batches")
        # Time inside the model: over wall time, how model-bound the worker is (1.0 under a backlog
        # means MQTT and decoding never kept the model waiting).
        self.counters.inc("model_busy_us", int(model_s * 1e6))
        self.counters.inc(f"batch_size_{size_bucket(len(batch))}")
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), model_s)
        # The replies go to their own thread so that the model starts the next batch at once:
        # publishing 32 replies from here left the model idle ~10% of the time under a backlog.
        self._done.put(_Finished(batch, labels, confs))

    # ------------------------------------------------------------ reply thread
    def _reply_loop(self) -> None:
        while (done := self._done.get()) is not None:
            self._publish_corrections(done)

    def _publish_corrections(self, done: "_Finished") -> None:
        assert self.model is not None and self.link is not None
        card = self.model.card
        for r, label, conf in zip(done.batch, done.labels, done.confidences):
            try:
                corr = protocol.Correction(r.req.sample_id, int(label), card.labels[int(label)], float(conf),
                                           card.model_id, self.worker_id)
                self._reply(r.msg, r.req.response_topic, r.req.correlation_data, protocol.encode_correction(corr))
                self.counters.inc("corrected")
            except Exception:
                # Acknowledged unanswered, as an intake error is: unacknowledged it would hold a
                # receive-maximum slot until the worker reconnects. Its device sends it again.
                self.counters.inc("reply_errors")
                log.exception("unexpected error replying to sample %r; acknowledged unanswered (its device resends "
                              "it)", r.req.sample_id)
                self.link.ack(r.msg.mid, 1)

    # ------------------------------------------------------------ replies (either thread)
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
        # Held across publish and registration: the reply's PUBACK (handled on the intake
        # thread) must find its sample, however fast the broker answers.
        with self._ack_lock:
            rc, mid = self.link.publish(topic, payload, content_type="application/json",
                                        correlation_data=correlation)
            if rc in (0, 4):
                self._ack_after[mid] = msg.mid
                return
        log.error("could not queue a reply (paho rc %d); the sample stays unacknowledged until this worker "
                  "reconnects, and its device sends it again after outbox.resend_after_s", rc)


class _Ready(NamedTuple):
    """A validated sample, decoded and fitted to the model's input, waiting for a batch."""

    msg: Received
    req: protocol.SampleRequest
    fitted: np.ndarray


class _Finished(NamedTuple):
    """A batch the model has run: its samples with their labels and confidences."""

    batch: list[_Ready]
    labels: np.ndarray
    confidences: np.ndarray


def _bucket_order(item: tuple[str, int]) -> int:
    return int(item[0][len("batch_size_"):].split("-")[0]) if item[0].startswith("batch_size_") else 0
