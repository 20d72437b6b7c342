"""The uplink: everything that touches the network, on one thread (the link worker).

paho's callbacks only enqueue events (mqtt_link); this thread owns the link
state: it publishes committed results in sequence order from the store (a
cursor, no in-memory copy), sends queued samples within the in-flight window,
applies replies, commits what the broker acknowledged, runs the periodic
maintenance (resend, expiry, pruning) and publishes the retained status.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence

from . import protocol
from .archive import HardExampleArchive, archived_sample
from .config import DeviceConfig
from .mqtt_link import Connected, Disconnected, MqttLink, Published, Received
from .resend import ResendPolicy, RoundTrips, resend_after
from .stats import Counters
from .store import Due, Store
from .storehealth import StoreHealth

log = logging.getLogger(__name__)

WAKE = object()               # put on the link worker's event queue: new work in the store
# Results messages in flight at once, and results per message. paho scans its whole
# out-queue on every PUBACK, so a wider window costs CPU without adding throughput.
RESULTS_WINDOW = 8
RESULTS_BATCH = 64
COALESCE_S = 0.001
STATUS_INTERVAL_S = 10.0
MAINTENANCE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 60.0       # the keep limit need not be exact; pruning in chunks every minute is enough
STOP_JOIN_S = 10.0


class Uplink:
    """The link worker and the MQTT client it owns; explicit start/stop."""

    def __init__(self, cfg: DeviceConfig, store: Store, health: StoreHealth, counters: Counters, *,
                 labels: Sequence[str], waiters: dict[str, threading.Event],
                 status_fields: Callable[[], dict[str, Any]], status_key: Callable[[], Any] | None = None,
                 archive: HardExampleArchive | None = None) -> None:
        """``status_key``: read every turn; when its value changes the status is published at once
        (the inference backend's state), as it is when the store becomes degraded or recovers.
        ``archive``: corrected samples are put there ([archive] enabled) and flushed once per turn."""
        self.cfg = cfg
        self.topics = protocol.Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.store = store
        self.health = health
        self.counters = counters
        #: the device's own card's labels: a correction's label is checked against them, and the name
        #: published is the card's, never the one in the reply
        self._labels = tuple(labels)
        self._waiters = waiters
        self._status_fields = status_fields
        self._status_key = status_key or (lambda: None)
        self._archive = archive
        self.link: MqttLink | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # link-worker state (touched only by the link worker thread)
        self._mids: dict[int, tuple[str, str, int]] = {}
        self._result_batches: dict[int, list[tuple[str, int]]] = {}
        self._samples_inflight = 0
        # Results are published from the store in sequence order: everything up to this
        # sequence has been handed to paho (or needed no publishing). The store hands out
        # sequences in commit order, so a cursor is all it takes, at any backlog size.
        self._pub_cursor = 0
        # State changes made by one turn of the link worker, committed together (cleared in place: the
        # turn's code holds these lists while a reply may commit them early, see _on_reply).
        self._pending_inflight: list[str] = []
        self._pending_delivered: list[str] = []
        self._pending_acked: list[tuple[str, int]] = []
        self._next_prune = 0.0
        # When each sample in flight was handed to paho (monotonic), for the resend wait's round
        # trips; bounded: a sample never answered is dropped once newer ones push it out.
        self._sent_at: dict[str, float] = {}
        self._round_trips = RoundTrips()
        o = cfg.outbox
        self._resend_policy = ResendPolicy(ceiling_s=o.resend_after_s, floor_s=min(o.resend_after_min_s,
                                                                                   o.resend_after_s))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Uplink.start() called twice")
        self.link = MqttLink(
            self.cfg.mqtt, self.cfg.client_id, subscriptions=[(self.topics.corrections, 1)],
            will=(self.topics.status, protocol.offline_status(self.cfg.device_id)))
        self._thread = threading.Thread(target=self._run, name="link-worker", daemon=True)
        self._thread.start()
        self.link.start()

    def stop(self) -> None:
        """Publish the offline status, keep what the broker acknowledged, close the connection. Idempotent."""
        if self._thread is None:
            return
        self._stopping.set()
        self.poke()
        self._thread.join(timeout=STOP_JOIN_S)
        self._thread = None
        if self.link is not None:
            self.link.stop()

    def __enter__(self) -> "Uplink":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return bool(self.link and self.link.connected.is_set())

    def poke(self) -> None:
        """New work in the store (called by the writer after each commit)."""
        if self.link is not None:
            self.link.events.put(WAKE)

    def _run(self) -> None:
        assert self.link is not None
        next_status = next_maintenance = 0.0
        was: tuple[bool, Any] = (False, None)   # (store degraded, status_key())
        while not self._stopping.is_set():
            store_ok = self._guarded("link worker", self._link_turn)
            now = time.monotonic()
            if now >= next_maintenance:
                self._guarded("maintenance", self._maintenance)
                next_maintenance = now + MAINTENANCE_INTERVAL_S
            seen = (self.health.degraded() is not None, self._status_key())
            if seen != was:
                next_status, was = now, seen   # integrators hear of it at once, not within 10 s
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
        if self._archive is not None:
            self._archive.flush()   # never raises: a failing archive is counted, the outbox goes on

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
        i.clear()
        d.clear()
        a.clear()

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
        # A sample waits until its provisional result is with paho (results go first, in order),
        # so a fast correction cannot overtake it: subscribers see provisional, then final.
        items = [it for it in self.store.queued_samples(free) if it.result_seq <= self._pub_cursor]
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
            self._sent_at[it.sample_id] = time.monotonic()
        while len(self._sent_at) > 8 * max(self.cfg.outbox.max_inflight, 1):
            del self._sent_at[next(iter(self._sent_at))]

    def _on_reply(self, ev: Received) -> None:
        """A message on the corrections topic: untrusted until parsed and matched to a sample that was
        sent and still awaits a reply. Only workers may publish here (the broker's ACL: the trust
        boundary, docs/security.md); nothing in the message itself, user properties included, proves
        who sent it. The store applies a reply once, and only to a sample that was sent."""
        if ev.topic != self.topics.corrections:
            self.counters.inc("replies_rejected")
            self.counters.inc("replies_rejected_bad_topic")
            log.warning("ignored a message on unexpected topic %r", ev.topic[:200])
            return
        try:
            reply = protocol.parse_reply(ev.payload, ev.correlation_data, self._labels)
        except protocol.ProtocolError as exc:
            self.counters.inc("replies_rejected")
            self.counters.inc(f"replies_rejected_{exc.code}")
            log.warning("rejected a reply on %s: %s", ev.topic, exc)
            return
        if reply.sample_id in self._pending_inflight:
            # Handed to paho this turn (or in a turn whose commit failed), not yet recorded as
            # inflight: record it first, so the store sees a sample that was sent.
            self._commit_progress()
        if isinstance(reply, protocol.ErrorReply):
            outcome = self.store.apply_error(reply)
            if outcome.reason == "applied":
                self.counters.inc("cloud_errors")
                log.warning("cloud could not process sample %s: %s %s; the local answer stands",
                            reply.sample_id, reply.code, reply.message)
        else:
            outcome = self.store.apply_correction(reply, with_sample=self._archive is not None)
            if outcome.reason == "applied":
                self.counters.inc("corrected")
                r = outcome.result
                if r is not None:
                    if self._archive is not None and outcome.sample is not None:
                        self._archive.put(archived_sample(r, *outcome.sample, time.time()))
                    agreed = r.label == r.edge_label
                    self.counters.inc("corrections_agreed" if agreed else "corrections_changed_label")
                    if r.offload_reason == "audit":
                        self.counters.inc("audit_corrected")
                        if agreed:
                            self.counters.inc("audit_agreed")
        if outcome.reason == "applied":
            sent = self._sent_at.pop(reply.sample_id, None)
            if sent is not None:
                self._round_trips.add(time.monotonic() - sent)
            waiter = self._waiters.get(reply.sample_id)
            if waiter is not None:
                waiter.set()
        else:
            self.counters.inc(f"replies_{outcome.reason}")
            log.info("reply for sample %s ignored (%s)", reply.sample_id, outcome.reason)

    def _maintenance(self) -> None:
        if self.cfg.outbox.resend_adaptive:
            wait = resend_after(self._round_trips.array(), self._resend_policy)
            if wait < self.store.resend_after_s / 2:
                # Much shorter (the first estimate, or a backlog cleared): samples acknowledged under
                # the old wait get the new one too, or a worker killed now would cost them the old one.
                moved = self.store.shorten_resends(wait)
                log.info("resend wait now %.1fs (p99 round trip x%g); %d waiting sample(s) moved up", wait,
                         self._resend_policy.factor, moved)
            else:
                self.store.resend_after_s = wait     # read when a sample is acknowledged
        resent = self.store.resend_stale()
        if resent:
            self.counters.inc("resent", resent)
            log.warning("%d delivered sample(s) got no reply within %.1fs; sending them again", resent,
                        self.store.resend_after_s)
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
        self.link.publish(self.topics.status, protocol.encode_status(self._status_fields()), retain=True)
