"""The store writer: answered inputs go to the store in group commits, on one thread.

``put()`` is called on the caller's path and only appends to a bounded queue
(backpressure at ``store.max_pending`` / ``max_pending_bytes``); one thread
commits what has gathered in one transaction. A store that cannot commit
(disk full, read-only, damaged) makes the writer retry with a growing pause,
never drop: the answered inputs wait in the bounded queue, and the health
tracker says why. At stop a failing store gets one last try and what is lost
is counted and logged.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Callable

from .config import StoreConfig
from .errors import StoreError, StoreUnavailable
from .result import Result
from .stats import Counters
from .store import OutboxItem, Store
from .storehealth import StoreHealth

log = logging.getLogger(__name__)

WRITE_BATCH = 256             # commit at once when this many results wait
WRITE_COALESCE_S = 0.002      # otherwise wait this long for a batch to gather
WRITE_RETRY_S = (0.5, 5.0)    # a failing store is retried after this, doubling up to the second figure
REPAIR_INTERVAL_S = 60.0      # a damaged database is rebuilt at most this often
STOP_JOIN_S = 20.0            # within the unit's TimeoutStopSec=30, with the link worker's share

Entry = tuple[Result, OutboxItem | None]


class StoreWriter:
    """Group commit: callers put(); one thread commits batches."""

    def __init__(self, store: Store, health: StoreHealth, counters: Counters, limits: StoreConfig, *,
                 max_outbox_bytes: int | None = None,
                 on_committed: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._health = health
        self._counters = counters
        self._limits = limits
        self._max_outbox_bytes = max_outbox_bytes
        self._on_committed = on_committed
        self._cv = threading.Condition()
        self._queue: list[Entry] = []
        self._enqueued = 0
        self._committed = 0          # committed, or given up at stop: answered-but-not-stored is the difference
        self._pending_bytes = 0      # payload bytes of those
        self._lost = 0               # given up at stop because the store could not take them
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_repair = 0.0
        self._evicted_unlogged = 0
        self._evictions_logged_at = -1e9

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("StoreWriter.start() called twice")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_JOIN_S) -> None:
        """Commit everything already put (one last try if the store fails), then end the thread."""
        if self._thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            self._thread = None
            self._cv.notify_all()

    def __enter__(self) -> "StoreWriter":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the callers' side
    @property
    def pending(self) -> int:
        """Answered inputs whose results are not stored yet."""
        with self._cv:
            return self._enqueued - self._committed

    def put(self, result: Result, item: OutboxItem | None) -> None:
        """Queue one answered input. Waits at the bound; raises StoreUnavailable after store.max_wait_s."""
        size = len(item.payload) if item is not None else 0
        with self._cv:
            if self._thread is None:
                raise RuntimeError("the store writer is not running: call EdgeService.start() first")
            if not self._room(size):
                # Backpressure: the writer is behind (a burst) or the store is degraded. Waiting keeps
                # memory bounded and every answered input committed or in this bounded queue.
                self._counters.inc("backpressure_waits")
                if not self._cv.wait_for(lambda: self._room(size) or self._thread is None, self._limits.max_wait_s):
                    self._counters.inc("store_unavailable")
                    d = self._health.degraded()
                    raise StoreUnavailable(
                        f"{self._enqueued - self._committed} results are waiting for the store "
                        f"({d.reason if d else 'the writer is behind'}); this input was not classified")
                if self._thread is None:
                    raise RuntimeError("the store writer is stopping")
            self._queue.append((result, item))
            self._enqueued += 1
            self._pending_bytes += size
            if len(self._queue) == 1 or len(self._queue) >= WRITE_BATCH:
                self._cv.notify()   # wake the writer: a new batch begins, or one is full

    def _room(self, size: int) -> bool:
        """Under _cv: may one more answered input wait for the writer?"""
        pending = self._enqueued - self._committed
        return pending < self._limits.max_pending and (
            pending == 0 or self._pending_bytes + size <= self._limits.max_pending_bytes)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every input put so far is committed; False on timeout or when some were lost."""
        with self._cv:
            target, lost = self._enqueued, self._lost
            self._cv.notify_all()   # cut the writer's wait for a fuller batch short
            self._cv.wait_for(lambda: self._committed >= target or self._thread is None, timeout)
            return self._committed >= target and self._lost == lost

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        retry = WRITE_RETRY_S[0]
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopping)
                if not self._stopping and len(self._queue) < WRITE_BATCH:
                    # Group commit: let a burst gather (one commit costs ~100 us, a row in a batch ~17 us).
                    self._cv.wait(WRITE_COALESCE_S)
                batch, self._queue = self._queue, []
                stopping = self._stopping
                if not batch and stopping:
                    return
            # A source acknowledged after this commit (a spool file moved to done/) needs the
            # commit to survive a power cut: sync it. One sync per spool chunk, not per file.
            durable = any(r.source_key for r, _ in batch)
            try:
                outcome = self._store.record_many(batch, durable=durable)
            except (sqlite3.Error, OSError) as exc:
                err = self._health.failed("store writer", exc)
                if stopping:
                    self._give_up(batch, err)
                    return
                if err.kind == "corrupt":
                    self._try_repair()
                # Answers keep coming from memory (up to store.max_pending); the batch is retried, not dropped.
                with self._cv:
                    self._queue[:0] = batch
                    self._cv.wait_for(lambda: self._stopping, retry)
                retry = min(retry * 2, WRITE_RETRY_S[1])
                continue
            retry = WRITE_RETRY_S[0]
            self._health.ok("store writer")
            # counted here, once per batch, to keep the lock off the caller's path
            offloaded = [r for r, item in batch if item is not None]
            self._counters.add({"classified": len(batch), "offloaded": len(offloaded),
                                "offloaded_audit": sum(r.offload_reason == "audit" for r in offloaded)})
            if outcome.evicted:
                self._counters.inc("evicted", len(outcome.evicted))
                self._log_evictions(len(outcome.evicted))
            self._release(batch)
            self._on_committed()

    def _release(self, batch: list[Entry]) -> None:
        with self._cv:
            self._committed += len(batch)
            self._pending_bytes -= sum(len(item.payload) for _, item in batch if item is not None)
            self._cv.notify_all()

    def _give_up(self, batch: list[Entry], err: StoreError) -> None:
        """At stop, with a store that still cannot commit: say exactly what is lost."""
        self._counters.inc("results_lost_at_stop", len(batch))
        with self._cv:
            self._lost += len(batch)
        log.error("stopping with %d result(s) that could not be stored (%s): they are lost; inputs from the "
                  "spool stay in the spool directory and are classified again at the next start", len(batch), err)
        self._release(batch)

    def _try_repair(self) -> None:
        now = time.monotonic()
        if now < self._next_repair:
            return
        self._next_repair = now + REPAIR_INTERVAL_S
        try:
            notice = self._store.repair()
        except StoreError as exc:
            log.error("the damaged state database cannot be repaired while running: %s", exc)
            return
        self._counters.inc("store_repaired")
        log.warning("%s", notice)

    def _log_evictions(self, n: int) -> None:
        """One warning a minute at most: a full budget while offline would otherwise flood the journal."""
        self._evicted_unlogged += n
        now = time.monotonic()
        if now - self._evictions_logged_at >= 60.0:
            log.warning("outbox byte budget (outbox.max_bytes = %s) is full: evicted %d oldest sample(s) since the "
                        "last report; their local answers stand. Total evicted: %d", self._max_outbox_bytes,
                        self._evicted_unlogged, self._counters.get("evicted"))
            self._evicted_unlogged = 0
            self._evictions_logged_at = now
