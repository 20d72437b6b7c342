"""The edge-infer device service: classify locally, offload when unsure.

``EdgeService`` composes the parts: model card + backend + preprocessor
(inference), the offload policy, the SQLite store (results + outbox), the
MQTT link, and the spool watcher. ``classify()`` answers at once from the
local model and hands the result to the store writer thread, which commits in
batches; everything that touches the network happens on one more thread (the
link worker), which publishes what is committed when connected.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, protocol
from .backends import BackendOptions, create_backend
from .config import DeviceConfig
from .modelcard import load_card, verified_model_bytes
from .mqtt_link import Connected, Disconnected, MqttLink, Published, Received, pack_user_properties
from .policy import OffloadPolicy
from .preprocess import CONTENT_TYPES, ImageError, Preprocessor, decode_image, encode_sample, to_uint8, upright
from .confidence import ScoreParams, as_score_logits, load_router, make_scorer
from .errors import StoreError, StoreUnavailable
from .result import Result
from .scores import Prediction, dequantize, top1
from .spool import SpoolWatcher
from .stats import Counters
from .store import Due, OutboxItem, Store
from .storeschema import OUTBOX_STATES
from .storehealth import StoreHealth

log = logging.getLogger(__name__)

FAILPOINT_ENV = "EDGE_INFER_TEST_FAILPOINT"
WAKE = object()               # put on the link worker's event queue: new work in the store
# Results messages in flight at once, and results per message. paho scans its whole
# out-queue on every PUBACK, so a wider window costs CPU without adding throughput.
RESULTS_WINDOW = 8
RESULTS_BATCH = 64
COALESCE_S = 0.001
WRITE_BATCH = 256             # commit at once when this many results wait
WRITE_COALESCE_S = 0.002      # otherwise wait this long for a batch to gather
WRITE_RETRY_S = (0.5, 5.0)    # a failing store is retried after this, doubling up to the second figure
REPAIR_INTERVAL_S = 60.0      # a damaged database is rebuilt at most this often
STATUS_INTERVAL_S = 10.0
MAINTENANCE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 60.0       # the keep limit need not be exact; pruning in chunks every minute is enough

#: Counters always present in the status (a dashboard should see 0, not a missing key).
KNOWN_COUNTERS = (
    "classified", "offloaded", "offloaded_audit", "sent", "delivered", "corrected", "corrections_agreed",
    "corrections_changed_label", "audit_corrected", "audit_agreed", "cloud_errors", "expired", "evicted", "resent",
    "results_published", "results_refused", "samples_refused", "replies_rejected", "replies_duplicate",
    "replies_late", "replies_unknown", "offload_skipped_too_large", "offload_skipped_budget_samples",
    "offload_skipped_budget_bytes", "requeued_at_start", "connects", "backpressure_waits", "store_unavailable",
    "store_errors", "store_recoveries", "store_repaired", "results_lost_at_stop", "spool_processed",
    "spool_rejected", "spool_already_classified", "spool_rejected_not_regular", "spool_deferred_incomplete",
    "spool_ignored_dirs", *(f"store_errors_{kind}" for kind in ("disk_full", "read_only", "corrupt", "io", "locked")))


class EdgeService:
    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.topics = protocol.Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.counters = Counters()
        self.store = Store(Path(cfg.state_dir) / "edge-infer.db", max_bytes=cfg.outbox.max_bytes,
                           resend_after_s=cfg.outbox.resend_after_s)
        self.health = StoreHealth(self.store.path, self.counters)
        pc = cfg.policy
        self.policy = OffloadPolicy(pc.threshold, pc.offload, pc.audit_rate, pc.max_samples_per_minute,
                                    pc.max_bytes_per_hour)
        self._budget = self.policy.initial_budget(time.monotonic())
        self._budget_lock = threading.Lock()
        self._rng = random.Random()
        self.card = load_card(cfg.model.card)
        self.pre = Preprocessor(self.card.input)
        # max_softmax has a fast path (top1); the other scores go through the shared scorer.
        self._scorer = None
        if pc.score != "max_softmax":
            router = load_router(pc.router_file) if pc.score == "router" else None
            self._scorer = make_scorer(pc.score, ScoreParams(temperature=pc.temperature, router=router))
        self.backend: Any = None
        self.link: MqttLink | None = None
        self.spool: SpoolWatcher | None = None
        self._infer_lock = threading.Lock()
        self._waiters: dict[str, threading.Event] = {}
        # group commit: classify() queues, the writer thread commits in batches
        self._write_cv = threading.Condition()
        self._write_q: list[tuple[Result, OutboxItem | None]] = []
        self._enqueued = 0
        self._committed = 0          # committed, or given up at stop: answered-but-not-stored is the difference
        self._pending_bytes = 0      # payload bytes of those
        self._lost = 0               # given up at stop because the store could not take them
        self._writer: threading.Thread | None = None
        self._writer_stop = False
        self._next_repair = 0.0
        self._last_counts: dict[str, int] = {}
        self._evicted_unlogged = 0
        self._evictions_logged_at = -1e9
        self._invoke_started = 0.0
        self._invokes = 0
        self._hang_after = _test_failpoint_hang_after()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._started_at = 0.0
        # link-worker state (touched only by the link worker thread)
        self._mids: dict[int, tuple[str, str, int]] = {}
        self._result_batches: dict[int, list[tuple[str, int]]] = {}
        self._samples_inflight = 0
        # Results are published from the store in sequence order: everything up to this
        # sequence has been handed to paho (or needed no publishing). The store hands out
        # sequences in commit order, so a cursor is all it takes, at any backlog size.
        self._pub_cursor = 0
        # state changes made by one turn of the link worker, committed together
        self._pending_inflight: list[str] = []
        self._pending_delivered: list[str] = []
        self._pending_acked: list[tuple[str, int]] = []
        self._next_prune = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self, *, connect: bool = True) -> None:
        """Load the model and open the store (fails loudly); then go online in the background.

        Raises StoreError (exit code 2) when the store cannot be used: empty,
        truncated or damaged beyond an index, read-only, or on a full disk.
        """
        if self._started_at:
            raise RuntimeError("EdgeService.start() called twice")
        model_bytes = verified_model_bytes(self.card)
        self.backend = create_backend(self.cfg.model.backend, self.card, model_bytes,
                                      BackendOptions(self.cfg.model.runtime, self.cfg.model.num_threads))
        # One warm-up invoke: the first call allocates, and a model that cannot run should fail here.
        self.backend.invoke(self.pre.batch(np.zeros((1, self.card.input.height, self.card.input.width), np.uint8)))
        requeued = self.store.open()
        for notice in self.store.report.notices:
            log.warning("%s", notice)
        if self.store.report.repaired:
            self.counters.inc("store_repaired")
        self.counters.inc("requeued_at_start", requeued)
        self._started_at = time.time()
        self._writer_stop = False
        self._writer = threading.Thread(target=self._run_writer, name="store-writer", daemon=True)
        self._writer.start()
        if connect:
            self.link = MqttLink(
                self.cfg.mqtt, self.cfg.client_id, subscriptions=[(self.topics.corrections, 1)],
                will=(self.topics.status, protocol.offline_status(self.cfg.device_id)))
            self._worker = threading.Thread(target=self._run_link_worker, name="link-worker", daemon=True)
            self._worker.start()
            self.link.start()
        if self.cfg.spool.dir is not None:
            self.spool = SpoolWatcher(self.cfg.spool.dir, self.classify_bytes, self.counters, flush=self.flush,
                                      seen=self._seen,
                                      poll_interval_s=self.cfg.spool.poll_interval_s,
                                      max_file_bytes=self.cfg.spool.max_file_bytes,
                                      settle_s=self.cfg.spool.settle_s)
            self.spool.start()
        log.info("edge-infer %s ready: device %s, model %s (%s), threshold %.4f, broker %s:%d",
                 __version__, self.cfg.device_id, self.card.model_id, self.backend.runtime,
                 self.policy.threshold, self.cfg.mqtt.host, self.cfg.mqtt.port)

    def stop(self) -> None:
        """Finish the current input, publish offline status, close the store."""
        if self.spool is not None:
            self.spool.stop()
        self._stop_writer()
        self._stopping.set()
        self._poke()
        if self._worker is not None:
            self._worker.join(timeout=10)
        if self.link is not None:
            self.link.stop()
        with self._infer_lock:
            self.store.close()
            if self.backend is not None:
                self.backend.close()
        log.info("edge-infer stopped")

    def __enter__(self) -> "EdgeService":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the API
    def classify(self, image: np.ndarray | Image.Image | bytes, source: str = "", *,
                 wait_for_cloud: float = 0.0) -> Result:
        """Classify one image now. Offloads it when the model is not confident.

        ``image``: a uint8 array (H, W) or (H, W, 3), a PIL image, or encoded
        PNG/JPEG/BMP/PGM bytes. Raises ImageError for anything else.
        ``wait_for_cloud``: for callers that would rather wait: up to this many
        seconds for the correction of an offloaded input; the local (provisional)
        result is returned if it does not arrive in time.
        """
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.classify_bytes(bytes(image), source, wait_for_cloud=wait_for_cloud)
        if isinstance(image, Image.Image):
            image = to_uint8(upright(image))   # as decode_image does: EXIF orientation, 16-bit scaled
        if not isinstance(image, np.ndarray):
            raise ImageError(f"classify() takes a uint8 array, a PIL image or encoded bytes, not {type(image).__name__}")
        return self._classify(image, source, None, wait_for_cloud)

    def classify_bytes(self, data: bytes, source: str = "", *, wait_for_cloud: float = 0.0,
                       source_key: str = "") -> Result:
        decoded = decode_image(data, max_bytes=max(self.cfg.spool.max_file_bytes, self.cfg.outbox.max_payload_bytes))
        return self._classify(decoded.pixels, source, (data, decoded.content_type), wait_for_cloud, source_key)

    def _classify(self, pixels: np.ndarray, source: str, encoded: tuple[bytes, str] | None,
                  wait_for_cloud: float = 0.0, source_key: str = "") -> Result:
        fitted = self.pre.fit(pixels)
        tensor = self.pre.batch(fitted[None])
        with self._infer_lock:
            self._invoke_started = time.monotonic()
            if self._hang_after is not None:
                self._maybe_hang()
            raw = self.backend.invoke(tensor)
            self._invoke_started = 0.0
        if self._scorer is None:
            pred = top1(raw, self.card.output)
        else:
            values = as_score_logits(dequantize(raw, self.card.output), self.card.output.kind).reshape(1, -1)
            pred = Prediction(int(values.argmax()), float(self._scorer(values)[0]))
        decision = self.policy.wants(pred.confidence, self._rng.random())
        reason = decision.reason if decision.offload else None
        now = time.time()
        # Time-ordered and unique: sortable by creation, appends at the end of the store's index.
        sample_id = f"{time.time_ns():x}{os.urandom(4).hex()}"
        item = None
        offload_error = None
        if decision.offload:
            payload, ctype = encoded if encoded is not None and encoded[1] in CONTENT_TYPES else encode_sample(pixels)
            if len(payload) > self.cfg.outbox.max_payload_bytes:
                # The original is too big to send: the (small) model-sized image still carries what the model saw.
                payload, ctype = encode_sample(fitted)
            if len(payload) > self.cfg.outbox.max_payload_bytes:
                offload_error = f"payload of {len(payload)} bytes exceeds outbox.max_payload_bytes"
                self.counters.inc("offload_skipped_too_large")
            else:
                admitted, why = True, ""
                if self.policy.has_budget:
                    with self._budget_lock:
                        admitted, why, self._budget = self.policy.admit(self._budget, time.monotonic(),
                                                                        len(payload))
                if not admitted:
                    # Over budget: the local answer stands. Counted, not logged per input.
                    reason = why
                    self.counters.inc(f"offload_skipped_{why}")
                else:
                    meta = protocol.SampleMeta(sample_id, self.cfg.device_id, self.card.model_id, pred.label,
                                               pred.confidence, now, decision.reason)
                    item = OutboxItem(sample_id, now, ctype, payload,
                                      pack_user_properties(protocol.sample_properties(meta)))
        offloaded = item is not None
        result = Result(
            sample_id=sample_id, label=pred.label, label_name=self.card.labels[pred.label],
            confidence=pred.confidence, origin="edge", state="provisional" if offloaded else "final",
            offloaded=offloaded, edge_label=pred.label, edge_confidence=pred.confidence,
            model_id=self.card.model_id, created_at=now, source=source, offload_error=offload_error,
            offload_reason=reason, source_key=source_key)
        waiter = None
        if offloaded and wait_for_cloud > 0:
            waiter = self._waiters[sample_id] = threading.Event()   # before the sample can be sent
        size = len(item.payload) if item is not None else 0
        sc = self.cfg.store
        with self._write_cv:
            if self._writer is None:
                raise RuntimeError("EdgeService is not started: call start() first")
            if not self._room(size):
                # Backpressure: the writer is behind (a burst) or the store is degraded. Waiting keeps
                # memory bounded and every answered input committed or in this bounded queue.
                self.counters.inc("backpressure_waits")
                if not self._write_cv.wait_for(lambda: self._room(size) or self._writer is None, sc.max_wait_s):
                    self.counters.inc("store_unavailable")
                    d = self.health.degraded()
                    raise StoreUnavailable(
                        f"{self._enqueued - self._committed} results are waiting for the store "
                        f"({d.reason if d else 'the writer is behind'}); this input was not classified")
                if self._writer is None:
                    raise RuntimeError("EdgeService is stopping")
            self._write_q.append((result, item))
            self._enqueued += 1
            self._pending_bytes += size
            if len(self._write_q) == 1 or len(self._write_q) >= WRITE_BATCH:
                self._write_cv.notify()   # wake the writer: a new batch begins, or one is full

        if waiter is not None:
            try:
                if waiter.wait(wait_for_cloud):
                    return self.store.get_result(sample_id) or result
            finally:
                self._waiters.pop(sample_id, None)
        return result

    def _room(self, size: int) -> bool:
        """Under _write_cv: may one more answered input wait for the writer?"""
        sc = self.cfg.store
        pending = self._enqueued - self._committed
        return pending < sc.max_pending and (pending == 0 or self._pending_bytes + size <= sc.max_pending_bytes)

    def result(self, sample_id: str) -> Result | None:
        """The stored (possibly corrected) result of an input."""
        self.flush()
        return self.store.get_result(sample_id)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every input classified so far is committed to the store.

        classify() answers before its result is on disk; the writer commits
        within milliseconds. Inputs that must not be lost on a crash (the
        spool's files) are acknowledged to their source only after a flush.
        """
        with self._write_cv:
            target, lost = self._enqueued, self._lost
            self._write_cv.notify_all()   # cut the writer's wait for a fuller batch short
            self._write_cv.wait_for(lambda: self._committed >= target or self._writer is None, timeout)
            return self._committed >= target and self._lost == lost

    def _seen(self, key: str) -> bool:
        """The spool's question "classified before?", with a store error turned into a pause, not a traceback."""
        try:
            found = self.store.has_source_key(key)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(self.health.failed("spool", exc))) from None
        self.health.ok("spool")
        return found

    def _run_writer(self) -> None:
        retry = WRITE_RETRY_S[0]
        while True:
            with self._write_cv:
                self._write_cv.wait_for(lambda: self._write_q or self._writer_stop)
                if not self._writer_stop and len(self._write_q) < WRITE_BATCH:
                    # Group commit: let a burst gather (one commit costs ~100 us, a row in a batch ~17 us).
                    self._write_cv.wait(WRITE_COALESCE_S)
                batch, self._write_q = self._write_q, []
                stopping = self._writer_stop
                if not batch and stopping:
                    return
            # A source acknowledged after this commit (a spool file moved to done/) needs the
            # commit to survive a power cut: sync it. One sync per spool chunk, not per file.
            durable = any(r.source_key for r, _ in batch)
            try:
                outcome = self.store.record_many(batch, durable=durable)
            except (sqlite3.Error, OSError) as exc:
                err = self.health.failed("store writer", exc)
                if stopping:
                    self._give_up(batch, err)
                    return
                if err.kind == "corrupt":
                    self._try_repair()
                # Answers keep coming from memory (up to store.max_pending); the batch is retried, not dropped.
                with self._write_cv:
                    self._write_q[:0] = batch
                    self._write_cv.wait_for(lambda: self._writer_stop, retry)
                retry = min(retry * 2, WRITE_RETRY_S[1])
                continue
            retry = WRITE_RETRY_S[0]
            self.health.ok("store writer")
            # counted here, once per batch, to keep the lock off the caller's path
            offloaded = [r for r, item in batch if item is not None]
            self.counters.add({"classified": len(batch), "offloaded": len(offloaded),
                               "offloaded_audit": sum(r.offload_reason == "audit" for r in offloaded)})
            if outcome.evicted:
                self.counters.inc("evicted", len(outcome.evicted))
                self._log_evictions(len(outcome.evicted))
            self._mark_committed(batch)
            self._poke()

    def _mark_committed(self, batch: list[tuple[Result, OutboxItem | None]]) -> None:
        with self._write_cv:
            self._committed += len(batch)
            self._pending_bytes -= sum(len(item.payload) for _, item in batch if item is not None)
            self._write_cv.notify_all()

    def _give_up(self, batch: list[tuple[Result, OutboxItem | None]], err: StoreError) -> None:
        """At stop, with a store that still cannot commit: say exactly what is lost."""
        self.counters.inc("results_lost_at_stop", len(batch))
        with self._write_cv:
            self._lost += len(batch)
        log.error("stopping with %d result(s) that could not be stored (%s): they are lost; inputs from the "
                  "spool stay in the spool directory and are classified again at the next start", len(batch), err)
        self._mark_committed(batch)

    def _try_repair(self) -> None:
        now = time.monotonic()
        if now < self._next_repair:
            return
        self._next_repair = now + REPAIR_INTERVAL_S
        try:
            notice = self.store.repair()
        except StoreError as exc:
            log.error("the damaged state database cannot be repaired while running: %s", exc)
            return
        self.counters.inc("store_repaired")
        log.warning("%s", notice)

    def _log_evictions(self, n: int) -> None:
        """One warning a minute at most: a full budget while offline would otherwise flood the journal."""
        self._evicted_unlogged += n
        now = time.monotonic()
        if now - self._evictions_logged_at >= 60.0:
            log.warning("outbox byte budget (outbox.max_bytes = %d) is full: evicted %d oldest sample(s) since the "
                        "last report; their local answers stand. Total evicted: %d", self.cfg.outbox.max_bytes,
                        self._evicted_unlogged, self.counters.get("evicted"))
            self._evicted_unlogged = 0
            self._evictions_logged_at = now

    def _stop_writer(self) -> None:
        if self._writer is None:
            return
        with self._write_cv:
            self._writer_stop = True
            self._write_cv.notify_all()
        # Bounded: a failing store gets one last try (see _give_up), so this ends within the unit's stop timeout.
        self._writer.join(timeout=20)
        with self._write_cv:
            self._writer = None
            self._write_cv.notify_all()

    def healthy(self, max_invoke_s: float = 10.0) -> tuple[bool, str]:
        """Is the inference loop making progress? (what the systemd watchdog pings on)

        Unhealthy when one invoke has been running for longer than
        ``max_invoke_s`` (a hung accelerator: a known failure of USB Edge
        TPUs), when the spool thread has stopped scanning, or when the store
        has not been able to commit for longer than store.degraded_grace_s.
        """
        started = self._invoke_started
        if started and time.monotonic() - started > max_invoke_s:
            return False, f"inference stuck for {time.monotonic() - started:.0f}s"
        degraded_s = self.health.degraded_for()
        if degraded_s > self.cfg.store.degraded_grace_s:
            d = self.health.degraded()
            return False, (f"store cannot commit for {degraded_s:.0f}s (store.degraded_grace_s = "
                           f"{self.cfg.store.degraded_grace_s:.0f}): {d.reason if d else ''}")
        if self.spool is not None and not self.spool.alive(max_invoke_s + self.cfg.spool.poll_interval_s * 4):
            return False, "spool thread stalled"
        return True, "ok"

    def _maybe_hang(self) -> None:
        self._invokes += 1
        if self._invokes > (self._hang_after or 0):
            log.warning("test failpoint: inference hangs now (%s)", FAILPOINT_ENV)
            threading.Event().wait()

    def status(self) -> dict[str, Any]:
        """The retained status message's fields. Never raises: a store that cannot be read makes it degraded."""
        counts = dict.fromkeys(KNOWN_COUNTERS, 0) | self.counters.snapshot()
        classified = counts["classified"]
        try:
            self._last_counts = self.store.counts()
            self.health.ok("status")
        except (sqlite3.Error, RuntimeError) as exc:   # RuntimeError: the store is closed (stopping)
            if isinstance(exc, sqlite3.Error):
                self.health.failed("status", exc)
        store_counts = self._last_counts
        degraded = self.health.degraded()
        with self._write_cv:
            pending = self._enqueued - self._committed
        return {
            "device": self.cfg.device_id,
            "state": "degraded" if degraded else "online",
            "version": __version__,
            "model": self.card.model_id,
            "backend": f"{self.cfg.model.backend} ({self.backend.runtime})" if self.backend else self.cfg.model.backend,
            "threshold": self.policy.threshold,
            "broker_connected": bool(self.link and self.link.connected.is_set()),
            "store": {"ok": degraded is None, "problem": degraded.kind if degraded else None,
                      "reason": degraded.reason if degraded else None,
                      "for_s": round(self.health.degraded_for(), 1), "pending_writes": pending},
            "outbox": {s: store_counts.get(f"outbox.{s}", 0) for s in OUTBOX_STATES},
            "results_stored": store_counts.get("results", 0),
            "results_unpublished": store_counts.get("results.unpublished", 0),
            "offload_rate": round(counts["offloaded"] / classified, 4) if classified else 0.0,
            "score": self.cfg.policy.score,
            # from corrections: how often the cloud agreed with the edge answer
            "agreement": _share(counts["corrections_agreed"], counts["corrected"]),
            # on audited (confident) inputs only: the edge model's observed accuracy proxy
            "audit_agreement": _share(counts["audit_agreed"], counts["audit_corrected"]),
            "counters": counts,
            "started_at": self._started_at,
        }

    # ------------------------------------------------------------ the link worker (one thread)
    def _run_link_worker(self) -> None:
        assert self.link is not None
        next_status = next_maintenance = 0.0
        was_degraded = False
        while not self._stopping.is_set():
            store_ok = self._guarded("link worker", self._link_turn)
            now = time.monotonic()
            if now >= next_maintenance:
                self._guarded("maintenance", self._maintenance)
                next_maintenance = now + MAINTENANCE_INTERVAL_S
            degraded = self.health.degraded() is not None
            if degraded != was_degraded:
                next_status, was_degraded = now, degraded   # integrators hear of it at once, not within 10 s
            if now >= next_status and self.link.connected.is_set():
                self._publish_status()   # never raises: a degraded store is what it reports
                next_status = now + STATUS_INTERVAL_S
            if not store_ok:
                self._stopping.wait(1.0)
        self._shutdown_link()

    def _link_turn(self) -> None:
        assert self.link is not None
        # Sleeps until something happens: a PUBACK, a reply, a (dis)connect, or new
        # results committed by the writer (a Wake); at most 50 ms for the timers.
        self._drain_events(timeout=0.05)
        # Samples handed to paho whose 'inflight' state is not yet written (the store failed
        # last turn) still read as queued: select nothing more until that is written.
        if self.link.connected.is_set() and not self._pending_inflight:
            self._send_results()
            self._send_samples()
        self._commit_progress()

    def _guarded(self, where: str, step) -> bool:
        """Run one step of the link worker; a store error is reported (storehealth), never a traceback loop."""
        try:
            step()
        except sqlite3.Error as exc:
            # Retried next turn with the same pending state changes: what paho acknowledged is
            # kept in memory until it can be written.
            self.health.failed(where, exc)
            return False
        except Exception:
            log.exception("link worker error in %s; continuing", where)
            time.sleep(0.5)
            return True
        self.health.ok(where)
        return True

    def _poke(self) -> None:
        if self.link is not None:
            self.link.events.put(WAKE)

    def _shutdown_link(self) -> None:
        """Publish the offline status (the will covers crashes) and give acks a moment to arrive."""
        assert self.link is not None
        if self.link.connected.is_set():
            rc, mid = self.link.publish(self.topics.status, protocol.offline_status(self.cfg.device_id), retain=True)
            self._mids[mid] = ("status", "", 0)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and ("status", "", 0) in self._mids.values():
                self._drain_events(timeout=0.05)
        # Keep what the broker acknowledged meanwhile, so the next start does not send it again.
        self._drain_events()
        self._commit_progress()

    def _drain_events(self, timeout: float = 0.0) -> None:
        assert self.link is not None
        delivered, acked = self._pending_delivered, self._pending_acked
        first = True
        while True:
            try:
                if first:
                    ev = self.link.events.get(timeout=timeout)
                    if timeout:
                        # Let a burst accumulate: one turn (one SQLite commit, one select) then
                        # serves many events. Costs at most this much latency.
                        time.sleep(COALESCE_S)
                else:
                    ev = self.link.events.get_nowait()
            except queue.Empty:
                break
            first = False
            if isinstance(ev, Published):
                entry = self._mids.pop(ev.mid, None)
                if entry is None:
                    continue
                kind, sid, seq = entry
                if kind == "sample":
                    self._samples_inflight -= 1
                    if ev.failed:
                        self._sample_refused(sid, ev.reason)
                    else:
                        delivered.append(sid)
                elif kind == "results":
                    batch = self._result_batches.pop(ev.mid, [])
                    if ev.failed:
                        # Not retried: the broker would refuse it again. Counted and logged.
                        self.counters.inc("results_refused", len(batch))
                        log.error("broker refused %d result(s): %s (check the broker ACL for %s)", len(batch),
                                  ev.reason, self.topics.results)
                    acked.extend(batch)
            elif isinstance(ev, Received):
                self._on_reply(ev)
            elif isinstance(ev, Connected):
                self.counters.inc("connects")
                self._publish_status()
            elif isinstance(ev, Disconnected):
                # paho keeps its unacknowledged QoS 1 messages and re-sends them on reconnect,
                # so the in-flight windows stay as they are.
                pass

    def _commit_progress(self) -> None:
        """One transaction for what this turn of the loop sent and what the broker acknowledged."""
        d, a, i = self._pending_delivered, self._pending_acked, self._pending_inflight
        if not (d or a or i):
            return
        self.store.commit_progress(inflight=i, delivered=d, acked_results=a)
        self.counters.inc("sent", len(i))
        self.counters.inc("delivered", len(d))
        self.counters.inc("results_published", len(a))
        self._pending_delivered, self._pending_acked, self._pending_inflight = [], [], []

    def _sample_refused(self, sample_id: str, reason: str) -> None:
        self.counters.inc("samples_refused")
        log.error("broker refused sample %s: %s; it will not be retried, the local answer stands", sample_id, reason)
        self.store.mark_failed(sample_id, f"refused by broker: {reason}")

    def _send_results(self) -> None:
        """Publish due results in sequence order, up to RESULTS_BATCH per message, RESULTS_WINDOW in flight."""
        while len(self._result_batches) < RESULTS_WINDOW:   # messages in flight
            upto = self.store.last_seq
            if upto <= self._pub_cursor:
                return
            batch = self.store.unpublished_results(self._pub_cursor, RESULTS_BATCH)
            if len(batch) < RESULTS_BATCH:
                # Every sequence up to ``upto`` was handed out before this read took the store's
                # lock, so its transaction has ended: nothing new can appear at or below it.
                self._pub_cursor = max(upto, batch[-1].seq if batch else 0)
            else:
                self._pub_cursor = batch[-1].seq
            if batch:
                self._publish_results(batch)

    def _publish_results(self, batch: list[Due]) -> None:
        assert self.link is not None
        payload = protocol.encode_results([d.result for d in batch], self.cfg.device_id)
        rc, mid = self.link.publish(self.topics.results, payload)
        if rc not in (0, 4):  # 4 = NO_CONN: paho queued it and sends it on reconnect
            log.warning("publishing %d result(s) failed locally (rc %d); they are published at the next start",
                        len(batch), rc)
            return
        self._mids[mid] = ("results", "", 0)
        self._result_batches[mid] = [(d.result.sample_id, d.seq) for d in batch]

    def _send_samples(self) -> None:
        assert self.link is not None
        free = self.cfg.outbox.max_inflight - self._samples_inflight
        if free <= 0:
            return
        # Rows sent in this turn become 'inflight' in _commit_progress, before the next select.
        items = self.store.queued_samples(free)
        sent = self._pending_inflight
        for it in items:
            try:
                rc, mid = self.link.publish(
                    self.topics.samples, it.payload, content_type=it.content_type,
                    response_topic=self.topics.corrections, correlation_data=it.sample_id.encode(),
                    packed_user_properties=it.user_props)
            except ValueError as exc:  # e.g. larger than MQTT allows
                self._sample_refused(it.sample_id, str(exc))
                continue
            if rc not in (0, 4):
                self._sample_refused(it.sample_id, f"paho error {rc}")
                continue
            self._mids[mid] = ("sample", it.sample_id, 0)
            self._samples_inflight += 1
            sent.append(it.sample_id)

    def _on_reply(self, ev: Received) -> None:
        if ev.topic != self.topics.corrections:
            self.counters.inc("replies_rejected")
            log.warning("ignored a message on unexpected topic %s", ev.topic)
            return
        try:
            reply = protocol.parse_reply(ev.payload, ev.correlation_data, len(self.card.labels))
        except protocol.ProtocolError as exc:
            self.counters.inc("replies_rejected")
            self.counters.inc(f"replies_rejected_{exc.code}")
            log.warning("rejected a reply on %s: %s", ev.topic, exc)
            return
        if isinstance(reply, protocol.ErrorReply):
            outcome = self.store.apply_error(reply)
            if outcome.reason == "applied":
                self.counters.inc("cloud_errors")
                log.warning("cloud could not process sample %s: %s %s; the local answer stands",
                            reply.sample_id, reply.code, reply.message)
        else:
            outcome = self.store.apply_correction(reply)
            if outcome.reason == "applied":
                self.counters.inc("corrected")
                r = outcome.result
                if r is not None:
                    agreed = r.label == r.edge_label
                    self.counters.inc("corrections_agreed" if agreed else "corrections_changed_label")
                    if r.offload_reason == "audit":
                        self.counters.inc("audit_corrected")
                        if agreed:
                            self.counters.inc("audit_agreed")
        if outcome.reason == "applied":
            waiter = self._waiters.get(reply.sample_id)
            if waiter is not None:
                waiter.set()
        else:
            self.counters.inc(f"replies_{outcome.reason}")
            log.info("reply for sample %s ignored (%s)", reply.sample_id, outcome.reason)

    def _maintenance(self) -> None:
        resent = self.store.resend_stale()
        if resent:
            self.counters.inc("resent", resent)
            log.warning("%d delivered sample(s) got no reply within %.0fs; sending them again", resent,
                        self.cfg.outbox.resend_after_s)
        expired = self.store.expire(self.cfg.outbox.max_age_s)
        if expired:
            self.counters.inc("expired", len(expired))
            log.warning("%d sample(s) expired after %.0fs without a correction; their local answers stand",
                        len(expired), self.cfg.outbox.max_age_s)
        now = time.monotonic()
        if now >= self._next_prune:
            self.store.prune_results(self.cfg.results.keep)
            self._next_prune = now + PRUNE_INTERVAL_S

    def _publish_status(self) -> None:
        assert self.link is not None
        self.link.publish(self.topics.status, protocol.encode_status(self.status()), retain=True)


def _test_failpoint_hang_after() -> int | None:
    """Tests only: ``EDGE_INFER_TEST_FAILPOINT=hang_invoke_after=N`` hangs inference after N inputs.

    Read from the environment at construction, never at import; a value that
    does not match this exact form is ignored.
    """
    value = os.environ.get(FAILPOINT_ENV, "")
    if value.startswith("hang_invoke_after="):
        count = value.split("=", 1)[1]
        if count.isdigit():
            return int(count)
    return None


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
