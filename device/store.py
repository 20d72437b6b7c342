"""The device's durable state: results and the offload outbox, in SQLite.

One database (WAL) holds both tables so that recording a result together
with its offloaded sample, and applying a correction to both, are single
transactions: a crash leaves either all of it or none of it.

Outbox states::

    queued -> inflight -> delivered -> corrected
       |          |           |-----> queued again (no reply within resend_after_s)
       |          |           `-----> expired (no correction within max age)
       |          `-> failed (the broker refused the publish; reason kept)
       |-> expired (not sent within max age)
       `-> evicted (the byte budget was full: oldest uncorrected first)

``inflight`` rows go back to ``queued`` at start-up (the process that sent
them is gone). Results carry a publication sequence number: a result is
(re)published while ``pub_seq > acked_seq``, so results recorded offline are
published after reconnecting and nothing is lost between the two tables.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .protocol import Correction, ErrorReply
from .result import Result

log = logging.getLogger(__name__)

OUTBOX_STATES = ("queued", "inflight", "delivered", "corrected", "expired", "evicted", "failed")
_OPEN_STATES = ("queued", "inflight", "delivered")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    sample_id     TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    source        TEXT NOT NULL,
    model         TEXT NOT NULL,
    edge_label    INTEGER NOT NULL,
    edge_conf     REAL NOT NULL,
    label         INTEGER NOT NULL,
    label_name    TEXT NOT NULL,
    confidence    REAL NOT NULL,
    origin        TEXT NOT NULL,
    state         TEXT NOT NULL,
    offloaded     INTEGER NOT NULL,
    corrected_at  REAL,
    cloud_model   TEXT,
    offload_error TEXT,
    offload_reason TEXT,
    source_key    TEXT NOT NULL DEFAULT '',
    pub_seq       INTEGER NOT NULL,
    acked_seq     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_unpublished ON results(pub_seq) WHERE pub_seq > acked_seq;
CREATE INDEX IF NOT EXISTS results_created ON results(created_at);
CREATE INDEX IF NOT EXISTS results_source_key ON results(source_key) WHERE source_key != '';
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id    TEXT NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    state        TEXT NOT NULL,
    content_type TEXT NOT NULL,
    payload      BLOB,
    size         INTEGER NOT NULL DEFAULT 0,
    user_props   BLOB NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    applied      INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, seq);
PRAGMA user_version = 2;
"""

_RESULT_COLS = ("sample_id, created_at, source, model, edge_label, edge_conf, label, label_name, confidence, "
                "origin, state, offloaded, corrected_at, cloud_model, offload_error, offload_reason")


@dataclass(frozen=True)
class OutboxItem:
    sample_id: str
    created_at: float
    content_type: str
    payload: bytes
    #: MQTT v5 user properties, packed as sent (opaque to the store)
    user_props: bytes


@dataclass(frozen=True)
class Due:
    """A result version due for publication: ``seq`` is its publication sequence."""
    seq: int
    result: Result


@dataclass(frozen=True)
class ApplyOutcome:
    """What applying a reply did. ``due`` is None when nothing changed."""
    due: Due | None
    reason: str   # "applied", "duplicate", "unknown", "late"

    @property
    def result(self) -> Result | None:
        return self.due.result if self.due else None


@dataclass(frozen=True)
class RecordOutcome:
    seqs: list[int]
    #: results of samples evicted to make room (now final, due for publication)
    evicted: list[Due]


def _row_to_result(row: tuple) -> Result:
    (sample_id, created_at, source, model, edge_label, edge_conf, label, label_name, confidence,
     origin, state, offloaded, corrected_at, cloud_model, offload_error, offload_reason) = row
    return Result(sample_id=sample_id, label=label, label_name=label_name, confidence=confidence, origin=origin,
                  state=state, offloaded=bool(offloaded), edge_label=edge_label, edge_confidence=edge_conf,
                  model_id=model, created_at=created_at, source=source, corrected_at=corrected_at,
                  cloud_model_id=cloud_model, offload_error=offload_error, offload_reason=offload_reason)


class Store:
    """Thread-safe: one connection, one lock; every public method is one transaction."""

    def __init__(self, path: Path, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        #: budget for the payloads of samples not yet corrected; None = unbounded
        self.max_bytes = max_bytes
        self._held_bytes = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._seq_lock = threading.Lock()
        self._last_seq = 0

    # ------------------------------------------------------------ lifecycle
    def open(self, *, requeue: bool = True) -> int:
        """Open (creating if needed); returns how many in-flight samples were re-queued.

        ``requeue=False`` is for inspecting the database of a running service.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (kill -9);
            # a power cut can lose the last commits but never corrupts the file.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(f"state database {self.path} cannot be opened ({exc}). If it is corrupt, move it "
                               "aside and restart: the service creates a new one (queued samples in it are lost).") from exc
        self._db = db
        (max_seq,) = db.execute("SELECT COALESCE(MAX(pub_seq), 0) FROM results").fetchone()
        self._last_seq = max_seq
        self._held_bytes = self._payload_bytes(db)
        if not requeue:
            return 0
        with self._tx():
            n = db.execute("UPDATE outbox SET state='queued', updated_at=? WHERE state='inflight'",
                           (time.time(),)).rowcount
        if n:
            log.info("re-queued %d in-flight sample(s) from the previous run", n)
        return n

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _tx(self):
        return _Transaction(self._lock, self._conn())

    def _read(self):
        """Reads take the lock but no write transaction (WAL readers see the last commit)."""
        return _Read(self._lock, self._conn())

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # ------------------------------------------------------------ recording
    @staticmethod
    def _payload_bytes(db: sqlite3.Connection) -> int:
        (n,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox WHERE payload IS NOT NULL").fetchone()
        return n

    def record(self, result: Result, item: OutboxItem | None = None) -> RecordOutcome:
        """Store one new result (and its offloaded sample). See record_many."""
        return self.record_many([(result, item)])

    def record_many(self, entries: list[tuple[Result, OutboxItem | None]]) -> RecordOutcome:
        """Store new results (and their offloaded samples) in one transaction, evicting to stay in budget.

        One transaction for a batch is what makes the store cheap per input
        (measured ~100 us per single-row commit vs ~17 us per row in batches of 64).
        """
        seqs = [self._next_seq() for _ in entries]
        evicted: list[Due] = []
        rows, samples = [], []
        for (result, item), seq in zip(entries, seqs):
            rows.append((result.sample_id, result.created_at, result.source, result.model_id, result.edge_label,
                         result.edge_confidence, result.label, result.label_name, result.confidence, result.origin,
                         result.state, int(result.offloaded), result.corrected_at, result.cloud_model_id,
                         result.offload_error, result.offload_reason, seq, result.source_key))
            if item is not None:
                samples.append((item.sample_id, item.created_at, item.created_at, "queued", item.content_type,
                                item.payload, len(item.payload), item.user_props))
        with self._tx() as db:
            db.executemany(f"INSERT INTO results ({_RESULT_COLS}, pub_seq, source_key) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           rows)
            if samples:
                db.executemany(
                    "INSERT INTO outbox (sample_id, created_at, updated_at, state, content_type, payload, size, "
                    "user_props) "
                    "VALUES (?,?,?,?,?,?,?,?)", samples)
                self._held_bytes += sum(s[6] for s in samples)
                if self.max_bytes is not None and self._held_bytes > self.max_bytes:
                    evicted = self._evict(db)
        return RecordOutcome(seqs, evicted)

    def _evict(self, db: sqlite3.Connection) -> list[Due]:
        """Oldest uncorrected samples go first until the payloads fit the budget.

        Oldest first because they are the closest to expiring and the least
        useful to an operator waiting for fresh corrections. In-flight samples
        are in paho's hands and are skipped. Their local results stay.
        """
        assert self.max_bytes is not None
        self._held_bytes = self._payload_bytes(db)  # the running count only overestimates
        evicted: list[Due] = []
        if self._held_bytes <= self.max_bytes:
            return evicted
        now = time.time()
        rows = db.execute("SELECT sample_id, size FROM outbox WHERE state IN ('queued','delivered') "
                          "AND payload IS NOT NULL ORDER BY seq").fetchall()
        for sid, size in rows:
            if self._held_bytes <= self.max_bytes:
                break
            db.execute("UPDATE outbox SET state='evicted', payload=NULL, updated_at=?, last_error=? "
                       "WHERE sample_id=?", (now, "evicted: outbox.max_bytes reached", sid))
            due = self._finalize_local(db, sid, "evicted: outbox byte budget full")
            self._held_bytes -= size
            if due is not None:
                evicted.append(due)
        return evicted

    # ------------------------------------------------------------ publishing results
    def _next_seq(self) -> int:
        with self._seq_lock:
            self._last_seq += 1
            return self._last_seq

    @property
    def last_seq(self) -> int:
        """The highest publication sequence handed out so far (in this process or before it)."""
        return self._last_seq

    def unpublished_results(self, after_seq: int, limit: int, upto_seq: int | None = None) -> list[Due]:
        """Results not yet acknowledged by the broker, oldest publication first."""
        upto = self._last_seq if upto_seq is None else upto_seq
        with self._read() as db:
            rows = db.execute(
                f"SELECT pub_seq, {_RESULT_COLS} FROM results WHERE pub_seq > acked_seq AND pub_seq > ? "
                "AND pub_seq <= ? ORDER BY pub_seq LIMIT ?", (after_seq, upto, limit)).fetchall()
        return [Due(r[0], _row_to_result(r[1:])) for r in rows]

    # ------------------------------------------------------------ outbox
    def queued_samples(self, limit: int) -> list[OutboxItem]:
        with self._read() as db:
            rows = db.execute(
                "SELECT sample_id, created_at, content_type, payload, user_props FROM outbox WHERE state='queued' "
                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [OutboxItem(*r) for r in rows]

    def commit_progress(self, *, inflight: Iterable[str] = (), delivered: Iterable[str] = (),
                        acked_results: Iterable[tuple[str, int]] = ()) -> None:
        """State changes of the link worker, in one transaction (in this order): samples handed
        to the broker (queued -> inflight), samples it acknowledged (inflight -> delivered), and
        result publications it acknowledged."""
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE outbox SET state='inflight', attempts=attempts+1, updated_at=? "
                           "WHERE sample_id=? AND state='queued'", [(now, s) for s in inflight])
            db.executemany("UPDATE outbox SET state='delivered', updated_at=? WHERE sample_id=? AND state='inflight'",
                           [(now, s) for s in delivered])
            db.executemany("UPDATE results SET acked_seq=? WHERE sample_id=? AND acked_seq < ?",
                           [(seq, sid, seq) for sid, seq in acked_results])

    def mark_failed(self, sample_id: str, reason: str) -> Due | None:
        """The broker refused the sample: it is not retried; the local answer becomes final."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("UPDATE outbox SET state='failed', last_error=?, payload=NULL, updated_at=? "
                           "WHERE sample_id=? AND state IN ('queued','inflight')", (reason, now, sample_id)).rowcount
            return self._finalize_local(db, sample_id, reason) if n else None

    def _finalize_local(self, db: sqlite3.Connection, sample_id: str, reason: str) -> Due | None:
        seq = self._next_seq()
        n = db.execute("UPDATE results SET state='final', offload_error=?, pub_seq=? WHERE sample_id=? "
                       "AND state='provisional'", (reason, seq, sample_id)).rowcount
        row = db.execute(f"SELECT {_RESULT_COLS} FROM results WHERE sample_id=?", (sample_id,)).fetchone()
        return Due(seq, _row_to_result(row)) if n and row else None

    def expire(self, max_age_s: float, now: float | None = None) -> list[Due]:
        """Samples older than max_age that are not in the broker's hands expire; their local answer stands."""
        now = time.time() if now is None else now
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT sample_id FROM outbox WHERE state IN ('queued','delivered') AND created_at < ?",
                (now - max_age_s,))]
            due = []
            for sid in ids:
                db.execute("UPDATE outbox SET state='expired', payload=NULL, updated_at=? WHERE sample_id=?",
                           (now, sid))
                d = self._finalize_local(db, sid, "expired")
                if d is not None:
                    due.append(d)
        return due

    def resend_stale(self, after_s: float, now: float | None = None) -> int:
        """Delivered samples with no reply after ``after_s`` go back to queued.

        The broker's PUBACK only means the broker has the sample: with no worker
        subscribed yet, or a broker restarted without persistence, it is gone.
        Sending again is safe because corrections are applied once. The wait
        doubles with every attempt (up to 64x), so a cloud that is merely slow
        is not flooded with copies of its own backlog.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute("UPDATE outbox SET state='queued', updated_at=? WHERE state='delivered' "
                              "AND updated_at < ? - ? * (1 << MIN(MAX(attempts - 1, 0), 6))",
                              (now, now, after_s)).rowcount

    # ------------------------------------------------------------ replies
    def apply_correction(self, c: Correction, now: float | None = None) -> ApplyOutcome:
        """Apply a cloud correction exactly once (keyed by sample id)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT state FROM outbox WHERE sample_id=?", (c.sample_id,)).fetchone()
            if row is None:
                return ApplyOutcome(None, "unknown")
            if row[0] not in _OPEN_STATES:
                return ApplyOutcome(None, "duplicate" if row[0] == "corrected" else "late")
            # ``applied`` counts applications; the state check above keeps it at most 1 (fault tests audit it).
            db.execute("UPDATE outbox SET state='corrected', payload=NULL, updated_at=?, applied=applied+1 "
                       "WHERE sample_id=?", (now, c.sample_id))
            seq = self._next_seq()
            db.execute("UPDATE results SET label=?, label_name=?, confidence=?, origin='cloud', state='final', "
                       "corrected_at=?, cloud_model=?, pub_seq=? WHERE sample_id=?",
                       (c.label, c.label_name, c.confidence, now, c.model_id, seq, c.sample_id))
            r = db.execute(f"SELECT {_RESULT_COLS} FROM results WHERE sample_id=?", (c.sample_id,)).fetchone()
        return ApplyOutcome(Due(seq, _row_to_result(r)) if r else None, "applied")

    def apply_error(self, e: ErrorReply) -> ApplyOutcome:
        """The cloud could not process the sample: the local answer becomes final."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM outbox WHERE sample_id=?", (e.sample_id,)).fetchone()
            if row is None:
                return ApplyOutcome(None, "unknown")
            if row[0] not in _OPEN_STATES:
                return ApplyOutcome(None, "duplicate" if row[0] in ("corrected", "failed") else "late")
            reason = f"cloud error {e.code}: {e.message}"
            db.execute("UPDATE outbox SET state='failed', last_error=?, payload=NULL, updated_at=? WHERE sample_id=?",
                       (reason, time.time(), e.sample_id))
            return ApplyOutcome(self._finalize_local(db, e.sample_id, reason), "applied")

    # ------------------------------------------------------------ queries
    def has_source_key(self, key: str) -> bool:
        with self._read() as db:
            return db.execute("SELECT 1 FROM results WHERE source_key=? LIMIT 1", (key,)).fetchone() is not None

    def get_result(self, sample_id: str) -> Result | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_RESULT_COLS} FROM results WHERE sample_id=?", (sample_id,)).fetchone()
        return _row_to_result(row) if row else None

    def all_results(self) -> list[Result]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_RESULT_COLS} FROM results ORDER BY created_at").fetchall()
        return [_row_to_result(r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        counts = dict.fromkeys(OUTBOX_STATES, 0)
        counts.update(dict(rows))
        return counts

    def outbox_state(self, sample_id: str) -> tuple[str, str | None] | None:
        with self._read() as db:
            row = db.execute("SELECT state, last_error FROM outbox WHERE sample_id=?", (sample_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def audit(self) -> dict[str, int]:
        """Figures for fault tests and operators: samples, corrections applied more than once."""
        with self._read() as db:
            (results,) = db.execute("SELECT COUNT(*) FROM results").fetchone()
            (offloaded,) = db.execute("SELECT COUNT(*) FROM results WHERE offloaded=1").fetchone()
            (twice,) = db.execute("SELECT COUNT(*) FROM outbox WHERE applied > 1").fetchone()
            (cloud,) = db.execute("SELECT COUNT(*) FROM results WHERE origin='cloud'").fetchone()
        return {"results": results, "offloaded": offloaded, "corrected_results": cloud, "applied_twice": twice}

    def unpublished_count(self) -> int:
        with self._read() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM results WHERE pub_seq > acked_seq").fetchone()
        return n

    def prune_results(self, keep: int) -> int:
        """Drop the oldest final, published results beyond ``keep`` (never unpublished or provisional ones)."""
        with self._read() as db:
            (total,) = db.execute("SELECT COUNT(*) FROM results").fetchone()
        if total <= keep:
            return 0   # the common case takes no write lock
        with self._tx() as db:
            n = db.execute(
                "DELETE FROM results WHERE sample_id IN (SELECT sample_id FROM results WHERE state='final' "
                "AND acked_seq >= pub_seq ORDER BY created_at LIMIT ?)", (total - keep,)).rowcount
            db.execute("DELETE FROM outbox WHERE state IN ('corrected','expired','evicted','failed') AND sample_id NOT IN "
                       "(SELECT sample_id FROM results)")
        return n


class _Transaction:
    def __init__(self, lock: threading.Lock, db: sqlite3.Connection) -> None:
        self._lock, self._db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


class _Read:
    def __init__(self, lock: threading.Lock, db: sqlite3.Connection) -> None:
        self._lock, self._db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._lock.release()
