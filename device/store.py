"""The device's durable state: results and the offload outbox, in SQLite.

One database (WAL) holds both tables so that recording a result together
with its offloaded sample, and applying a correction to both, are single
transactions: a crash leaves either all of it or none of it.

Outbox states are ``storeschema.OutboxState``; every change of state is
a row of ``storeschema.TRANSITION_ROWS`` (drawn in docs/outbox.md). The
statements below are built from the table once, at import, and name each
change's states through ``_into``, which fails the import if the table lacks
the change. Results carry a publication sequence number: a result is
(re)published while ``pub_seq > acked_seq``. Sequence numbers are handed out
inside the transaction that writes them, under the store's lock, so they
become visible in order: a reader that has seen sequence S will never later
find a new row below S, which is what lets the link worker publish by cursor.

Cost does not grow with what is stored: every per-input and periodic query
seeks an index (tests check the query plans), scans stop at the first row
not due, deletions go in bounded chunks, and counts come from a table that
triggers keep exact.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

from . import dbfile, storeopen
from .protocol import Correction, ErrorReply
from .result import Result
from .storeschema import OPEN_STATES, OUTBOX_STATES, TABLES, TABLES_SQL, initial_counts, migrate
from .storerecords import ApplyOutcome, Due, OpenReport, OutboxItem, RecordOutcome, row_to_result
from .storesql import (
    CHUNK, DUPLICATE_CORRECTION, DUPLICATE_ERROR, EVICTABLE, EXPIRABLE, KEPT_INDEX, NEW, RESULT_COLS, RESULT_COLS_BEFORE_4,
    SQL_ACKED, SQL_CORRECT, SQL_CORRECT_KEEP, SQL_RESEND_PAGE, SQL_SHORTEN_RESEND, SQL_DROP_ALL_KEPT, SQL_DROP_KEPT, SQL_ERROR, SQL_EVICT, SQL_EXPIRE,
    SQL_KEPT_INDEX, SQL_KEPT_OLDEST, SQL_OLDEST, SQL_PRUNE_OUTBOX, SQL_QUEUED, SQL_REFUSED, SQL_REQUEUE, SQL_RESEND,
    SQL_SENT, UNSENT,
)

log = logging.getLogger(__name__)


class Store:
    """Thread-safe: one connection, one lock; every public method is one transaction."""

    def __init__(self, path: Path, max_bytes: int | None = None, resend_after_s: float = 120.0, *,
                 keep_payloads: bool = False) -> None:
        self.path = Path(path)
        #: budget for the payloads held (samples not yet corrected, and those kept after correction); None = unbounded
        self.max_bytes = max_bytes
        self.resend_after_s = resend_after_s
        #: outbox.keep_payload_after_correction: a corrected sample's image stays until its result is
        #: pruned or the byte budget needs the room; false: dropped with the correction (and, at open,
        #: any kept by an earlier run with it true)
        self.keep_payloads = keep_payloads
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._last_seq = 0
        self._legacy_counts = False   # a read-only look at a store of an older schema: counted by scanning
        self._cols = RESULT_COLS      # ... whose results lack the columns of schema 4: read as unrecorded
        self.report = OpenReport(0)

    # ------------------------------------------------------------ lifecycle
    def open(self, *, requeue: bool = True, check: bool = True) -> int:
        """Open (creating if new); returns how many in-flight samples were re-queued.

        A store that exists but is empty, truncated or not SQLite raises
        StoreError (exit 2): it is never replaced by a fresh one silently.
        With ``check`` the pages are verified (O(size), start-up only) and a
        damaged index is rebuilt from the tables (``self.report`` says so);
        a damaged table raises. ``requeue=False`` is for looking at the store
        of a running service: nothing is written.
        """
        if not requeue:
            self._db, version = storeopen.open_read_only(self.path)
            self._legacy_counts = version < 3
            self._cols = RESULT_COLS if version >= 4 else RESULT_COLS_BEFORE_4
            self._last_seq = self._max_seq()
            return 0
        opened = storeopen.open_writable(self.path, self.resend_after_s, check=check)
        self._db = opened.db
        try:
            self._last_seq = self._max_seq()
            with self._tx():
                n = self._db.execute(SQL_REQUEUE, (time.time(),)).rowcount
        except sqlite3.Error as exc:
            self.close()
            raise dbfile.classify(exc, self.path) from None
        notices = opened.notices
        try:
            dropped = self._kept_payloads_at_open()
        except sqlite3.Error as exc:
            self.close()
            raise dbfile.classify(exc, self.path) from None
        if dropped:
            notices += (f"dropped the images of {dropped} corrected sample(s) kept by an earlier run "
                        "(outbox.keep_payload_after_correction is false)",)
        self.report = OpenReport(n, notices, opened.repaired)
        if n:
            log.info("re-queued %d in-flight sample(s) from the previous run", n)
        return n

    def _kept_payloads_at_open(self) -> int:
        """Keeping: the partial index that finds kept payloads (for the byte budget). Not keeping:
        the payloads an earlier run kept are dropped, with that index. Returns how many were dropped."""
        db = self._conn()
        if self.keep_payloads:
            db.execute(SQL_KEPT_INDEX)
            return 0
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name=?", (KEPT_INDEX,)).fetchone() is None:
            return 0   # never kept (or rebuilt since: then pruning with the results drops them)
        with self._tx() as tx:
            n = tx.execute(SQL_DROP_ALL_KEPT).rowcount
            tx.execute(f"DROP INDEX {KEPT_INDEX}")
        return n

    def repair(self) -> str:
        """Rebuild a database found damaged while running (see dbfile.rebuild); raises StoreError
        when a table itself is damaged. Other threads wait on the lock meanwhile."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            try:
                aside = dbfile.rebuild(self.path, TABLES_SQL, TABLES)
            finally:
                self._db = storeopen.connect(self.path)
            migrate(self._db, self.resend_after_s)
            if self.keep_payloads:
                self._db.execute(SQL_KEPT_INDEX)
            self._last_seq = max(self._last_seq, self._max_seq())
        return (f"state database {self.path} was damaged while running; its tables were intact and were copied "
                f"into a rebuilt database (every index rebuilt). The damaged file is kept as {aside}")

    def _max_seq(self) -> int:
        (max_seq,) = self._conn().execute("SELECT COALESCE(MAX(pub_seq), 0) FROM results").fetchone()
        return max_seq

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _tx(self, durable: bool = False):
        return _Transaction(self._lock, self._conn(), durable)

    def _read(self):
        """Reads take the lock but no write transaction (WAL readers see the last commit)."""
        return _Read(self._lock, self._conn())

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # ------------------------------------------------------------ recording
    def record(self, result: Result, item: OutboxItem | None = None) -> RecordOutcome:
        """Store one new result (and its offloaded sample). See record_many."""
        return self.record_many([(result, item)])

    def record_many(self, entries: list[tuple[Result, OutboxItem | None]], *, durable: bool = False) -> RecordOutcome:
        """Store new results (and their offloaded samples) in one transaction, evicting to stay in budget.

        One transaction for a batch is what makes the store cheap per input
        (measured ~100 us per single-row commit vs ~17 us per row in batches of 64).
        ``durable``: the commit is synced to disk before this returns (it survives a
        power cut), for results whose source is acknowledged next.
        """
        evicted: list[Due] = []
        with self._tx(durable) as db:
            first = self._last_seq + 1
            self._last_seq += len(entries)
            seqs = list(range(first, first + len(entries)))
            samples = [(item.sample_id, item.created_at, item.created_at, NEW, item.content_type,
                        item.payload, len(item.payload), item.user_props, seq)
                       for (_, item), seq in zip(entries, seqs) if item is not None]
            db.executemany(f"INSERT INTO results ({RESULT_COLS}, pub_seq, source_key) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           [(r.sample_id, r.created_at, r.source, r.model_id, r.edge_label, r.edge_confidence,
                             r.label, r.label_name, r.confidence, r.origin, r.state, int(r.offloaded),
                             r.corrected_at, r.cloud_model_id, r.offload_error, r.offload_reason, r.backend,
                             int(r.fallback), seq, r.source_key)
                            for (r, _), seq in zip(entries, seqs)])
            if samples:
                db.executemany(
                    "INSERT INTO outbox (sample_id, created_at, updated_at, state, content_type, payload, size, "
                    "user_props, result_seq) VALUES (?,?,?,?,?,?,?,?,?)", samples)
                if self.max_bytes is not None and self._count(db, "outbox.bytes") > self.max_bytes:
                    evicted = self._evict(db)
        return RecordOutcome(seqs, evicted)

    def _evict(self, db: sqlite3.Connection) -> list[Due]:
        """Oldest uncorrected samples go first until the payloads fit the budget.

        Oldest first because they are the closest to expiring and the least
        useful to an operator waiting for fresh corrections. In-flight samples
        are in paho's hands and are skipped. Their local results stay.
        Each round reads the oldest few of each evictable state (an index seek).
        """
        assert self.max_bytes is not None
        evicted: list[Due] = []
        now = time.time()
        held = self._count(db, "outbox.bytes")
        while held > self.max_bytes and self.keep_payloads:
            # Images kept after correction go first (oldest first): they are no sample's only chance.
            kept = db.execute(SQL_KEPT_OLDEST).fetchall()
            if not kept:
                break
            for seq, size in kept:
                if held <= self.max_bytes:
                    break
                db.execute(SQL_DROP_KEPT, (seq,))
                held -= size
        while held > self.max_bytes:
            rows = sorted(r for state in EVICTABLE for r in db.execute(
                "SELECT seq, sample_id, size FROM outbox WHERE state=? ORDER BY seq LIMIT 64", (state.value,)))
            if not rows:
                break
            for _, sid, size in rows:
                if held <= self.max_bytes:
                    break
                db.execute(SQL_EVICT, (now, "evicted: outbox.max_bytes reached", sid))
                held -= size
                due = self._finalize_local(db, sid, "evicted: outbox byte budget full")
                if due is not None:
                    evicted.append(due)
        return evicted

    @staticmethod
    def _count(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT n FROM counts WHERE name=?", (name,)).fetchone()
        return row[0] if row else 0

    # ------------------------------------------------------------ publishing results
    def _next_seq(self) -> int:
        """Only inside a transaction (under the lock): sequences become visible in order."""
        self._last_seq += 1
        return self._last_seq

    @property
    def last_seq(self) -> int:
        """The highest publication sequence handed out so far (in this process or before it)."""
        return self._last_seq

    def unpublished_results(self, after_seq: int, limit: int) -> list[Due]:
        """Results not yet acknowledged by the broker with a sequence above ``after_seq``, in order."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT pub_seq, {self._cols} FROM results WHERE pub_seq > acked_seq AND pub_seq > ? "
                "ORDER BY pub_seq LIMIT ?", (after_seq, limit)).fetchall()
        return [Due(r[0], row_to_result(r[1:])) for r in rows]

    # ------------------------------------------------------------ outbox
    def queued_samples(self, limit: int) -> list[OutboxItem]:
        with self._read() as db:
            rows = db.execute(SQL_QUEUED, (limit,)).fetchall()
        return [OutboxItem(*r) for r in rows]

    def commit_progress(self, *, inflight: Iterable[str] = (), delivered: Iterable[str] = (),
                        acked_results: Iterable[tuple[str, int]] = ()) -> None:
        """State changes of the link worker, in one transaction (in this order): samples handed
        to the broker (queued -> inflight), samples it acknowledged (inflight -> delivered, due
        for a resend at ``resend_at``), and result publications it acknowledged."""
        now = time.time()
        with self._tx() as db:
            db.executemany(SQL_SENT, [(now, s) for s in inflight])
            db.executemany(SQL_ACKED, [(now, now, self.resend_after_s, s) for s in delivered])
            db.executemany("UPDATE results SET acked_seq=? WHERE sample_id=? AND acked_seq < ?",
                           [(seq, sid, seq) for sid, seq in acked_results])

    def mark_failed(self, sample_id: str, reason: str) -> Due | None:
        """The broker refused the sample: it is not retried; the local answer becomes final."""
        now = time.time()
        with self._tx() as db:
            n = db.execute(SQL_REFUSED, (reason, now, sample_id)).rowcount
            return self._finalize_local(db, sample_id, reason) if n else None

    def _finalize_local(self, db: sqlite3.Connection, sample_id: str, reason: str) -> Due | None:
        seq = self._next_seq()
        n = db.execute("UPDATE results SET state='final', offload_error=?, pub_seq=? WHERE sample_id=? "
                       "AND state='provisional'", (reason, seq, sample_id)).rowcount
        row = db.execute(f"SELECT {self._cols} FROM results WHERE sample_id=?", (sample_id,)).fetchone()
        return Due(seq, row_to_result(row)) if n and row else None

    def expire(self, max_age_s: float, now: float | None = None) -> list[Due]:
        """Samples older than max_age that are not in the broker's hands expire; their local answer stands.

        Reads each state's oldest rows and stops at the first one that is young
        enough, so a pass costs what it expires, not what is queued. At most
        CHUNK rows a state per call; the rest go on the next pass.
        """
        now = time.time() if now is None else now
        cutoff = now - max_age_s
        due: list[Due] = []
        with self._tx() as db:
            for state in EXPIRABLE:
                rows = db.execute("SELECT sample_id, created_at FROM outbox WHERE state=? ORDER BY seq LIMIT ?",
                                  (state.value, CHUNK)).fetchall()
                for sid, created in rows:
                    if created >= cutoff:
                        # seq follows creation (to within the writer's batching), so the rest are younger
                        break
                    db.execute(SQL_EXPIRE, (now, sid))
                    d = self._finalize_local(db, sid, "expired")
                    if d is not None:
                        due.append(d)
        return due

    def shorten_resends(self, resend_after_s: float) -> int:
        """Use a shorter ``resend_after_s`` from now on, and for the samples already waiting for a reply
        (their resend time recomputed with it where that is sooner). Returns how many moved."""
        self.resend_after_s = resend_after_s
        moved, cursor = 0, (-1.0, -1)   # before every (resend_at, rowid): both are positive
        while True:
            with self._tx() as db:
                page = db.execute(SQL_RESEND_PAGE, (*cursor, CHUNK)).fetchall()
                if not page:
                    return moved
                for rowid, _ in page:
                    moved += db.execute(SQL_SHORTEN_RESEND, (resend_after_s, rowid)).rowcount
            cursor = (page[-1][1], page[-1][0])

    def resend_stale(self, now: float | None = None) -> int:
        """Delivered samples whose ``resend_at`` has passed go back to queued (at most CHUNK a call).

        The broker's PUBACK only means the broker has the sample: with no worker
        subscribed yet, a killed worker, or a broker restarted without
        persistence, it is gone. Sending again is safe because corrections are
        applied once. The wait is ``resend_after_s`` and doubles with every
        attempt (up to 64x), so a cloud that is merely slow is not flooded with
        copies of its own backlog.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute(SQL_RESEND, (now, now, CHUNK)).rowcount

    # ------------------------------------------------------------ replies
    def apply_correction(self, c: Correction, now: float | None = None, *, with_sample: bool = False) -> ApplyOutcome:
        """Apply a cloud correction exactly once (keyed by sample id), to a sample that was sent and
        awaits a reply (inflight, delivered, or queued to be sent again). ``c.label_name`` is stored as
        given: the caller takes it from its own model card (protocol.parse_reply does). ``with_sample``:
        the outcome carries the sample's content type and payload, read before the correction drops it
        (for the hard-example archive; the same row, so no extra seek)."""
        now = time.time() if now is None else now
        cols = "state, attempts, content_type, payload" if with_sample else "state, attempts"
        with self._tx() as db:
            row = db.execute(f"SELECT {cols} FROM outbox WHERE sample_id=?", (c.sample_id,)).fetchone()
            if row is None or (row[0] == UNSENT and row[1] == 0):
                return ApplyOutcome(None, "unknown")   # never sent: no worker can be answering it
            if row[0] not in OPEN_STATES:
                return ApplyOutcome(None, "duplicate" if row[0] in DUPLICATE_CORRECTION else "late")
            # ``applied`` counts applications; the state check above keeps it at most 1 (fault tests audit it).
            db.execute(SQL_CORRECT_KEEP if self.keep_payloads else SQL_CORRECT, (now, c.sample_id))
            seq = self._next_seq()
            db.execute("UPDATE results SET label=?, label_name=?, confidence=?, origin='cloud', state='final', "
                       "corrected_at=?, cloud_model=?, pub_seq=? WHERE sample_id=?",
                       (c.label, c.label_name, c.confidence, now, c.model_id, seq, c.sample_id))
            r = db.execute(f"SELECT {self._cols} FROM results WHERE sample_id=?", (c.sample_id,)).fetchone()
        sample = (row[2], bytes(row[3])) if with_sample and row[3] is not None else None
        return ApplyOutcome(Due(seq, row_to_result(r)) if r else None, "applied", sample)

    def apply_error(self, e: ErrorReply) -> ApplyOutcome:
        """The cloud could not process the sample: the local answer becomes final."""
        with self._tx() as db:
            row = db.execute("SELECT state, attempts FROM outbox WHERE sample_id=?", (e.sample_id,)).fetchone()
            if row is None or (row[0] == UNSENT and row[1] == 0):
                return ApplyOutcome(None, "unknown")   # never sent: no worker can be answering it
            if row[0] not in OPEN_STATES:
                return ApplyOutcome(None, "duplicate" if row[0] in DUPLICATE_ERROR else "late")
            reason = f"cloud error {e.code}: {e.message}"
            db.execute(SQL_ERROR, (reason, time.time(), e.sample_id))
            return ApplyOutcome(self._finalize_local(db, e.sample_id, reason), "applied")

    # ------------------------------------------------------------ queries
    def has_source_key(self, key: str) -> bool:
        with self._read() as db:
            # The index is partial (source_key != ''): the query must say so for SQLite to use it.
            return db.execute("SELECT 1 FROM results WHERE source_key=? AND source_key != '' LIMIT 1",
                              (key,)).fetchone() is not None

    def get_result(self, sample_id: str) -> Result | None:
        with self._read() as db:
            row = db.execute(f"SELECT {self._cols} FROM results WHERE sample_id=?", (sample_id,)).fetchone()
        return row_to_result(row) if row else None

    def all_results(self) -> list[Result]:
        with self._read() as db:
            rows = db.execute(f"SELECT {self._cols} FROM results ORDER BY created_at").fetchall()
        return [row_to_result(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Outbox rows per state, payload bytes held, results kept and unpublished: O(1)."""
        with self._read() as db:
            if self._legacy_counts:
                return dict(initial_counts(db))
            return dict(db.execute("SELECT name, n FROM counts").fetchall())

    def outbox_counts(self) -> dict[str, int]:
        c = self.counts()
        return {s: c.get(f"outbox.{s}", 0) for s in OUTBOX_STATES}

    def waiting_since(self) -> dict[str, float | None]:
        """The creation time of the oldest sample queued, in flight and delivered (None: none): O(log n)."""
        with self._read() as db:
            return {state: (row[0] if (row := db.execute(sql).fetchone()) else None)
                    for state, sql in SQL_OLDEST.items()}

    def outbox_state(self, sample_id: str) -> tuple[str, str | None] | None:
        with self._read() as db:
            row = db.execute("SELECT state, last_error FROM outbox WHERE sample_id=?", (sample_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def audit(self) -> dict[str, int]:
        """Figures for fault tests and operators: samples, corrections applied more than once (O(n) scans)."""
        with self._read() as db:
            (results,) = db.execute("SELECT COUNT(*) FROM results").fetchone()
            (offloaded,) = db.execute("SELECT COUNT(*) FROM results WHERE offloaded=1").fetchone()
            (twice,) = db.execute("SELECT COUNT(*) FROM outbox WHERE applied > 1").fetchone()
            (cloud,) = db.execute("SELECT COUNT(*) FROM results WHERE origin='cloud'").fetchone()
        return {"results": results, "offloaded": offloaded, "corrected_results": cloud, "applied_twice": twice}

    def unpublished_count(self) -> int:
        return self.counts().get("results.unpublished", 0)

    def prune_results(self, keep: int) -> int:
        """Drop the oldest final, published results beyond ``keep`` (never unpublished or provisional ones),
        and the finished outbox rows of the dropped results; CHUNK rows per transaction."""
        done = 0
        while True:
            with self._read() as db:
                excess = self._count(db, "results") - keep
            if excess <= 0:
                return done   # the common case takes no write lock
            with self._tx() as db:
                ids = [r[0] for r in db.execute(
                    "DELETE FROM results WHERE rowid IN (SELECT rowid FROM results WHERE state='final' "
                    "AND acked_seq >= pub_seq ORDER BY created_at LIMIT ?) RETURNING sample_id",
                    (min(excess, CHUNK),)).fetchall()]
                db.executemany(SQL_PRUNE_OUTBOX, [(i,) for i in ids])
            done += len(ids)
            if len(ids) < min(excess, CHUNK):
                return done   # the rest are unpublished or provisional: they stay


class _Transaction:
    def __init__(self, lock: threading.Lock, db: sqlite3.Connection, durable: bool = False) -> None:
        self._lock, self._db, self._durable = lock, db, durable

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            if self._durable:
                # FULL in WAL mode: this commit syncs the log. Set outside the transaction, as SQLite requires.
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._restore()
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._db.execute("COMMIT")
            elif self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._restore()
            self._lock.release()

    def _restore(self) -> None:
        if self._durable:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error:
                pass  # the connection is broken; the error that matters was raised already


class _Read:
    def __init__(self, lock: threading.Lock, db: sqlite3.Connection) -> None:
        self._lock, self._db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._lock.release()
