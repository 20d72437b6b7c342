"""The edge-infer device service: classify locally, offload when unsure.

``EdgeService`` wires the rooms and owns their start/stop order:

- the classifier (model card + preprocessing + backend + score),
- the offload plan (``policy.plan_offload``, pure) and the sample's payload,
- the store writer (group commits, backpressure),
- the uplink (the link worker: results, samples, replies, maintenance, status),
- the spool watcher.

``classify()`` answers at once from the local model and hands the result to
the writer; everything that touches the network happens on the uplink's
thread, which publishes what is committed when connected.
"""
from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from . import __version__, protocol
from .archive import HardExampleArchive
from .classifier import Classifier, Inference
from .backends import backend_telemetry
from .config import DeviceConfig
from .errors import StoreUnavailable
from .failover import BackendState
from .identity import check_tls_identity
from .mqtt_link import MqttLink, pack_user_properties
from .policy import OffloadPolicy, plan_offload
from .preprocess import CONTENT_TYPES, ImageError, decode_image, encode_sample, to_uint8, upright
from .result import Result
from .spool import SpoolWatcher
from .stats import Counters
from .store import OutboxItem, Store
from .storehealth import StoreHealth
from .storeschema import OUTBOX_STATES
from .uplink import Uplink
from .writer import StoreWriter

if TYPE_CHECKING:
    from .metrics import DeviceMetrics

log = logging.getLogger(__name__)

#: Counters always present in the status (a dashboard should see 0, not a missing key).
KNOWN_COUNTERS = (
    "classified", "offloaded", "offloaded_audit", "sent", "delivered", "corrected", "corrections_agreed",
    "corrections_changed_label", "audit_corrected", "audit_agreed", "cloud_errors", "expired", "evicted", "resent",
    "results_published", "results_refused", "samples_refused", "replies_rejected", "replies_duplicate",
    "replies_late", "replies_unknown", "offload_skipped_too_large", "offload_skipped_budget_samples",
    "offload_skipped_budget_bytes", "requeued_at_start", "connects", "backpressure_waits", "store_unavailable",
    "store_errors", "store_recoveries", "store_repaired", "results_lost_at_stop", "spool_processed",
    "spool_rejected", "spool_already_classified", "spool_rejected_not_regular", "spool_deferred_incomplete",
    "spool_ignored_dirs", "fallback_answers", "inference_unavailable", "inference_retries", "backend_child_failures",
    "backend_restarts", "backend_start_failures", "archived", "archive_dropped", "archive_errors",
    "archive_skipped_too_large", *(f"store_errors_{kind}" for kind in ("disk_full", "read_only", "corrupt", "io", "locked")))


class EdgeService:
    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.topics = protocol.Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.counters = Counters()
        self.store = Store(cfg.store_path, max_bytes=cfg.outbox.max_bytes,
                           resend_after_s=cfg.outbox.resend_after_s,
                           keep_payloads=cfg.outbox.keep_payload_after_correction)
        self.health = StoreHealth(self.store.path, self.counters)
        self.classifier = Classifier(cfg.model, cfg.policy, cfg.backend_options,
                                     fallback_options=cfg.backend.get("tflite-cpu"), counters=self.counters)
        pc = cfg.policy
        self.policy = OffloadPolicy(pc.threshold, pc.offload, pc.audit_rate, pc.max_samples_per_minute,
                                    pc.max_bytes_per_hour,
                                    pc.class_thresholds.for_labels(self.card.labels, pc.threshold, str(self.card.path)))
        self._budget = self.policy.initial_budget(time.monotonic())
        self._budget_lock = threading.Lock()
        self._rng = random.Random()
        self._waiters: dict[str, threading.Event] = {}
        self.uplink: Uplink | None = None
        self.writer = StoreWriter(self.store, self.health, self.counters, cfg.store,
                                  max_outbox_bytes=cfg.outbox.max_bytes, on_committed=self._poke)
        self.spool: SpoolWatcher | None = None
        #: [archive] enabled: corrected samples kept for retraining (device/archive.py), written by the uplink
        self.archive: HardExampleArchive | None = None
        self._started_at = 0.0
        self._last_counts: dict[str, int] = {}
        #: [metrics]: the Prometheus registry and server (device/metrics.py), and its per-input call
        self.metrics: DeviceMetrics | None = None
        self._observe_inference: Callable[[float], None] | None = None

    # ------------------------------------------------------------ the rooms, for tools and tests
    @property
    def card(self):
        return self.classifier.card

    @property
    def pre(self):
        return self.classifier.pre

    @property
    def backend(self):
        return self.classifier.backend

    @property
    def link(self) -> MqttLink | None:
        return self.uplink.link if self.uplink is not None else None

    # ------------------------------------------------------------ lifecycle
    def start(self, *, connect: bool = True) -> None:
        """Load the model and open the store (fails loudly); then go online in the background.

        Raises StoreError (exit code 2) when the store cannot be used: empty,
        truncated or damaged beyond an index, read-only, or on a full disk.
        """
        if self._started_at:
            raise RuntimeError("EdgeService.start() called twice")
        if self.cfg.metrics.enabled:
            from .metrics import require_prometheus
            require_prometheus()   # ConfigError (exit 2) before anything is loaded: what to install
        check_tls_identity(self.cfg.mqtt.tls, self.cfg.device_id)   # IdentityError (exit 2): not this device's certificate
        self.classifier.start()
        try:
            requeued = self.store.open()
        except BaseException:
            self.classifier.close()
            raise
        for notice in self.store.report.notices:
            log.warning("%s", notice)
        if self.store.report.repaired:
            self.counters.inc("store_repaired")
        self.counters.inc("requeued_at_start", requeued)
        self._open_archive()
        self._started_at = time.time()
        self.writer.start()
        if connect:
            self.uplink = Uplink(self.cfg, self.store, self.health, self.counters,
                                 labels=self.card.labels, waiters=self._waiters, status_fields=self.status,
                                 status_key=self.classifier.state, archive=self.archive)
            self.uplink.start()
        if self.cfg.spool.dir is not None:
            self.spool = SpoolWatcher(self.cfg.spool.dir, self.classify_bytes, self.counters, flush=self.flush,
                                      seen=self._seen, poll_interval_s=self.cfg.spool.poll_interval_s,
                                      max_file_bytes=self.cfg.spool.max_file_bytes, settle_s=self.cfg.spool.settle_s)
            self.spool.start()
        if self.cfg.metrics.enabled:
            self._start_metrics()
        log.info("edge-infer %s ready: device %s, model %s (%s), threshold %.4f, broker %s:%d",
                 __version__, self.cfg.device_id, self.card.model_id, self.classifier.runtime,
                 self.policy.threshold, self.cfg.mqtt.host, self.cfg.mqtt.port)

    def _open_archive(self) -> None:
        """[archive]: open it (a failure costs the archive, never the service); disabled: say so if one is left."""
        path = self.cfg.archive_path
        if not self.cfg.archive.enabled:
            if path.exists():
                log.warning("archive is disabled but %s still holds archived images: export them with `edge-infer "
                            "archive export`, or wipe them with `edge-infer archive wipe --yes`", path)
            return
        a = self.cfg.archive
        archive = HardExampleArchive(path, max_items=a.max_items, max_bytes=a.max_bytes, counters=self.counters)
        try:
            archive.open()
        except (OSError, sqlite3.Error) as exc:
            log.error("hard-example archive %s cannot be opened (%s): running without it", path, exc)
            return
        self.archive = archive

    def _start_metrics(self) -> None:
        from .metrics import DeviceMetrics
        try:
            metrics = DeviceMetrics(self)
            metrics.start()   # ConfigError (exit 2): the address cannot be listened on
        except BaseException:
            self.stop()
            raise
        self.metrics, self._observe_inference = metrics, metrics.observe_inference

    def stop(self) -> None:
        """Finish the current input, store what was answered, publish the offline status, close. Idempotent."""
        if self.metrics is not None:
            self.metrics.stop()   # first: no scrape reads a closing service
        if self.spool is not None:
            self.spool.stop()
            self.spool = None
        self.writer.stop()
        if self.uplink is not None:
            self.uplink.stop()
        if self.archive is not None:
            self.archive.close()   # after the uplink: its last corrections are flushed
        self.classifier.close()
        self.store.close()
        if self._started_at:
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
        PNG/JPEG/BMP/PGM bytes. Raises ImageError for anything else, and
        StoreUnavailable when the store has not taken results for store.max_wait_s.
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
        t0 = time.perf_counter()
        inf = self.classifier.infer(pixels)
        if self._observe_inference is not None:
            self._observe_inference(time.perf_counter() - t0)
        now = time.time()
        # Time-ordered and unique: sortable by creation, appends at the end of the store's index.
        sample_id = f"{time.time_ns():x}{os.urandom(4).hex()}"
        result, item = self._decide(sample_id, inf, pixels, encoded, now, source, source_key)
        waiter = None
        if item is not None and wait_for_cloud > 0:
            waiter = self._waiters[sample_id] = threading.Event()   # before the sample can be sent
        try:
            self.writer.put(result, item)
        except BaseException:
            self._waiters.pop(sample_id, None)
            raise
        if waiter is not None:
            try:
                if waiter.wait(wait_for_cloud):
                    return self.store.get_result(sample_id) or result
            finally:
                self._waiters.pop(sample_id, None)
        return result

    def _decide(self, sample_id: str, inf: Inference, pixels: np.ndarray, encoded: tuple[bytes, str] | None,
                now: float, source: str, source_key: str) -> tuple[Result, OutboxItem | None]:
        """The offload plan for one inference, and the records it produces."""
        wants = self.policy.wants(inf.confidence, self._rng.random(), inf.label)
        reason, item, offload_error = (wants.reason if wants.offload else None), None, None
        if wants.offload:
            payload = _payload(encoded, pixels, inf.fitted, self.cfg.outbox.max_payload_bytes)
            if len(payload[0]) > self.cfg.outbox.max_payload_bytes:
                offload_error = f"payload of {len(payload[0])} bytes exceeds outbox.max_payload_bytes"
                self.counters.inc("offload_skipped_too_large")
            else:
                with self._budget_lock:
                    plan = plan_offload(self.policy, wants, self._budget, time.monotonic(), len(payload[0]))
                    self._budget = plan.budget
                reason = plan.reason
                if not plan.send:
                    self.counters.inc(f"offload_skipped_{plan.reason}")   # over budget: counted, not logged
                else:
                    meta = protocol.SampleMeta(sample_id, self.cfg.device_id, inf.model_id, inf.label,
                                               inf.confidence, now, wants.reason)
                    item = OutboxItem(sample_id, now, payload[1], payload[0],
                                      pack_user_properties(protocol.sample_properties(meta)))
        offloaded = item is not None
        result = Result(
            sample_id=sample_id, label=inf.label, label_name=self.card.labels[inf.label],
            confidence=inf.confidence, origin="edge", state="provisional" if offloaded else "final",
            offloaded=offloaded, edge_label=inf.label, edge_confidence=inf.confidence,
            model_id=inf.model_id, created_at=now, source=source, offload_error=offload_error,
            offload_reason=reason, source_key=source_key, backend=inf.backend, fallback=inf.fallback)
        return result, item

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
        return self.writer.flush(timeout)

    def _seen(self, key: str) -> bool:
        """The spool's question "classified before?", with a store error turned into a pause, not a traceback."""
        try:
            found = self.store.has_source_key(key)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(self.health.failed("spool", exc))) from None
        self.health.ok("spool")
        return found

    def _poke(self) -> None:
        if self.uplink is not None:
            self.uplink.poke()

    # ------------------------------------------------------------ health and status
    def healthy(self, max_invoke_s: float = 10.0) -> tuple[bool, str]:
        """Is the inference loop making progress? (what the systemd watchdog pings on)

        Unhealthy when one invoke has been running for longer than
        ``max_invoke_s`` (a hung accelerator: a known failure of USB Edge
        TPUs; an isolated one is killed and restarted before that), when an
        isolated backend has failed for longer than model.failure_grace_s with
        no fallback, when the spool thread has stopped scanning, or when the
        store has not been able to commit for longer than store.degraded_grace_s.
        """
        stuck = self.classifier.stuck_for()
        if stuck > max_invoke_s:
            return False, f"inference stuck for {stuck:.0f}s"
        ok, why = self.classifier.health()
        if not ok:
            return False, why
        # An input may wait for an isolated backend's fresh child: that is recovery, not a stalled scan.
        spool_within = max_invoke_s + self.classifier.recovery_budget_s() + self.cfg.spool.poll_interval_s * 4
        if self.spool is not None and not self.spool.alive(spool_within):
            return False, "spool thread stalled"
        degraded_s = self.health.degraded_for()
        if degraded_s > self.cfg.store.degraded_grace_s:
            d = self.health.degraded()
            return False, (f"store cannot commit for {degraded_s:.0f}s (store.degraded_grace_s = "
                           f"{self.cfg.store.degraded_grace_s:.0f}): {d.reason if d else ''}")
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """The retained status message's fields. Never raises: a store that cannot be read makes it degraded."""
        counts = dict.fromkeys(KNOWN_COUNTERS, 0) | self.counters.snapshot()
        classified = counts["classified"]
        try:
            self._last_counts = self.store.counts()
            self.health.ok("status")
        except sqlite3.Error as exc:
            self.health.failed("status", exc)
        except RuntimeError:
            pass   # the store is closed (stopping): the last counts stand
        store_counts = self._last_counts
        degraded = self.health.degraded()
        inference = self.classifier.status()
        return {
            "device": self.cfg.device_id,
            # inference other than healthy (recovering, degraded on the fallback, lost) is degraded too
            "state": "degraded" if degraded or inference["state"] != BackendState.HEALTHY.value else "online",
            "version": __version__,
            "model": self.card.model_id,
            "backend": f"{self.cfg.model.backend} ({self.classifier.runtime})" if self.backend
            else self.cfg.model.backend,
            "threshold": self.policy.threshold,
            "inference": inference,
            # Edge TPU temperature and throttling where the hardware reports them (sysfs)
            **({"accelerator": t} if (t := backend_telemetry(self.cfg.model.backend,
                                                             self.cfg.backend_options)) else {}),
            "broker_connected": bool(self.uplink and self.uplink.connected),
            "store": {"ok": degraded is None, "problem": degraded.kind if degraded else None,
                      "reason": degraded.reason if degraded else None,
                      "for_s": round(self.health.degraded_for(), 1), "pending_writes": self.writer.pending},
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
            **({"archive": vars(self.archive.totals())} if self.archive is not None else {}),
            "started_at": self._started_at,
        }


def _payload(encoded: tuple[bytes, str] | None, pixels: np.ndarray, fitted: np.ndarray,
             max_bytes: int) -> tuple[bytes, str]:
    """What to send for an offloaded input: the original bytes when they are a format the cloud accepts,
    else a lossless encoding; the model-sized image when the original is larger than ``max_bytes``."""
    payload = encoded if encoded is not None and encoded[1] in CONTENT_TYPES else encode_sample(pixels)
    if len(payload[0]) > max_bytes:
        payload = encode_sample(fitted)   # still carries what the model saw
    return payload


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
