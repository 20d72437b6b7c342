"""The hard-example archive: offloaded samples with the cloud's corrections, kept for retraining.

Opt-in (``[archive] enabled``, default false) and bounded (``max_items``, ``max_bytes``:
the oldest go first). When a correction is applied to an offloaded sample, the link worker
``put()``s the sample as it was sent (bytes and content type), the edge model's answer and
the cloud's; once per turn it ``flush()``es them in one transaction. ``edge-infer archive
export`` reads it (docs/closed-loop.md); docs/security.md says who can read it and how to
wipe it.

Why its own small SQLite file (``state_dir/archive.db``) and not a table of the state
database: the archive is best effort and must never put the outbox at risk. A separate file
needs no schema migration of the store (whose upgrades are one-way), cannot make the store's
start fail, is wiped or deleted without touching results and queued samples, and its writes
never hold the store's lock. A directory of image files would need an index of its own to
drop the oldest first and to know its size without listing the directory; SQLite gives
both, with an insert and its evictions in one atomic transaction. The price is that a crash
between a correction's commit and the next archive flush loses those few archive rows (at
most one turn of the link worker's): the correction itself is never lost.

Cost per insert does not grow with the archive: the totals are kept in a one-row table by
triggers (no COUNT), the oldest rows are found through the primary key, and each row is
deleted at most once, so eviction is amortised O(1) per insert. ``secure_delete`` overwrites
what is deleted, so an evicted or wiped image is not left in free pages of the file.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import dbfile, storeopen
from .result import Result
from .stats import Counters

log = logging.getLogger(__name__)

VERSION = 1
#: rows put() keeps in memory before it commits them itself (the link worker flushes every turn)
MAX_BUFFERED = 256
#: rows read per query while evicting or exporting (constant memory at any archive size)
PAGE = 256
ERROR_LOG_INTERVAL_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id        TEXT NOT NULL UNIQUE,
    archived_at      REAL NOT NULL,
    created_at       REAL NOT NULL,
    corrected_at     REAL,
    model            TEXT NOT NULL,
    edge_label       INTEGER NOT NULL,
    edge_conf        REAL NOT NULL,
    cloud_label      INTEGER NOT NULL,
    cloud_conf       REAL NOT NULL,
    cloud_model      TEXT,
    offload_reason   TEXT,
    content_type     TEXT NOT NULL,
    payload          BLOB NOT NULL,
    size             INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), items INTEGER NOT NULL,
                                   bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS items_ins AFTER INSERT ON items BEGIN
    UPDATE totals SET items = items + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS items_del AFTER DELETE ON items BEGIN
    UPDATE totals SET items = items - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
"""
COLUMNS = ("sample_id, archived_at, created_at, corrected_at, model, edge_label, edge_conf, cloud_label, cloud_conf, "
           "cloud_model, offload_reason, content_type, payload")


@dataclass(frozen=True)
class ArchivedSample:
    """One offloaded sample and its correction, as archived."""
    sample_id: str
    archived_at: float
    created_at: float
    corrected_at: float | None
    model_id: str
    edge_label: int
    edge_confidence: float
    cloud_label: int
    cloud_confidence: float
    cloud_model_id: str | None
    offload_reason: str | None
    content_type: str
    payload: bytes

    def row(self) -> tuple:
        return (self.sample_id, self.archived_at, self.created_at, self.corrected_at, self.model_id, self.edge_label,
                self.edge_confidence, self.cloud_label, self.cloud_confidence, self.cloud_model_id,
                self.offload_reason, self.content_type, self.payload)


def archived_sample(result: Result, content_type: str, payload: bytes, now: float) -> ArchivedSample:
    """The archive's record of a corrected result (``result``: as the store returns it after the correction)."""
    return ArchivedSample(result.sample_id, now, result.created_at, result.corrected_at, result.model_id,
                          result.edge_label, result.edge_confidence, result.label, result.confidence,
                          result.cloud_model_id, result.offload_reason, content_type, payload)


@dataclass(frozen=True)
class ArchiveTotals:
    items: int
    bytes: int


@dataclass(frozen=True)
class Eviction:
    """Which of the oldest rows go so that the archive fits its bounds (pure)."""
    upto_seq: int | None   # delete every row with seq <= this; None: nothing
    rows: int


def plan_eviction(totals: ArchiveTotals, max_items: int, max_bytes: int,
                  oldest: Iterator[tuple[int, int]]) -> Eviction:
    """Walk (seq, size) of the oldest rows until dropping them brings both totals within bounds."""
    items, held = totals.items, totals.bytes
    upto, n = None, 0
    for seq, size in oldest:
        if items <= max_items and held <= max_bytes:
            break
        upto, n = seq, n + 1
        items, held = items - 1, held - size
    return Eviction(upto, n)


class HardExampleArchive:
    """The archive file, written by the link worker. Thread-safe; a failure never raises into the caller."""

    def __init__(self, path: Path, *, max_items: int, max_bytes: int, counters: Counters | None = None) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.counters = counters or Counters()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._buffer: list[ArchivedSample] = []
        self._last_error_log = 0.0

    # ------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Open or create the file (mode 0600). A file that is damaged or of a newer schema is moved aside
        with a warning and a fresh one started: an archive is never a reason for the service not to run."""
        with self._lock:
            try:
                self._db = _connect(self.path)
            except sqlite3.DatabaseError as exc:
                aside = dbfile.move_aside(self.path, "damaged")
                log.warning("hard-example archive %s cannot be used (%s); moved aside as %s, starting an empty one",
                            self.path, exc, aside)
                self._db = _connect(self.path)
            self._fit(self._db)   # bounds lowered in the config since the last run

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------ writing
    def put(self, sample: ArchivedSample) -> None:
        """Buffer one sample; flushed at the end of the link worker's turn (or when the buffer is full)."""
        if len(sample.payload) > self.max_bytes:
            self.counters.inc("archive_skipped_too_large")
            return
        with self._lock:
            self._buffer.append(sample)
            full = len(self._buffer) >= MAX_BUFFERED
        if full:
            self.flush()

    def flush(self) -> int:
        """Commit what was put, dropping the oldest rows beyond the bounds, in one transaction.
        Returns the rows written. An error is logged (at most once a minute) and counted
        (``archive_errors``); those rows are dropped: the outbox and the corrections are not affected."""
        with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch or self._db is None:
                return 0
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    before = _totals(db).items
                    db.executemany(f"INSERT OR IGNORE INTO items ({COLUMNS}, size) VALUES "
                                   "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [s.row() + (len(s.payload),) for s in batch])
                    written = _totals(db).items - before
                    dropped = self._fit(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._failed(exc, len(batch))
                return 0
        self.counters.inc("archived", written)
        if dropped:
            self.counters.inc("archive_dropped", dropped)
        return written

    def _fit(self, db: sqlite3.Connection) -> int:
        """Drop the oldest rows until the bounds hold; the caller holds the lock (and a transaction, or none)."""
        totals = _totals(db)
        if totals.items <= self.max_items and totals.bytes <= self.max_bytes:
            return 0
        plan = plan_eviction(totals, self.max_items, self.max_bytes, _oldest(db))
        if plan.upto_seq is not None:
            db.execute("DELETE FROM items WHERE seq <= ?", (plan.upto_seq,))
        return plan.rows

    def _failed(self, exc: BaseException, rows: int) -> None:
        self.counters.inc("archive_errors")
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.warning("hard-example archive %s: %d sample(s) not archived: %s (the corrections are applied; "
                        "only the archive misses them)", self.path, rows, dbfile.classify(exc, self.path))

    # ------------------------------------------------------------ reading
    def totals(self) -> ArchiveTotals:
        with self._lock:
            if self._db is None:
                return ArchiveTotals(0, 0)
            try:
                return _totals(self._db)
            except sqlite3.Error:
                return ArchiveTotals(0, 0)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    db = storeopen.connect(path)   # mode 0600 before the first write, WAL, synchronous=NORMAL
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > VERSION:
            raise sqlite3.DatabaseError(f"archive schema {version} is newer than this release's {VERSION}")
        db.execute("PRAGMA secure_delete=ON")   # a dropped or wiped image is overwritten, not left in free pages
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _totals(db: sqlite3.Connection) -> ArchiveTotals:
    row = db.execute("SELECT items, bytes FROM totals WHERE id = 0").fetchone()
    return ArchiveTotals(*row) if row else ArchiveTotals(0, 0)


def _oldest(db: sqlite3.Connection) -> Iterator[tuple[int, int]]:
    after = -1
    while True:
        page = db.execute("SELECT seq, size FROM items WHERE seq > ? ORDER BY seq LIMIT ?", (after, PAGE)).fetchall()
        if not page:
            return
        yield from page
        after = page[-1][0]


def read_archive(path: Path) -> Iterator[ArchivedSample]:
    """Every archived sample, oldest first, read-only (safe beside a running service), a page at a time."""
    db = storeopen.connect(path, read_only=True)
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version != VERSION:
            raise sqlite3.DatabaseError(f"{path}: archive schema {version}, this release reads {VERSION}")
        after = -1
        while True:
            rows = db.execute(f"SELECT seq, {COLUMNS} FROM items WHERE seq > ? ORDER BY seq LIMIT ?",
                              (after, PAGE)).fetchall()
            if not rows:
                return
            for r in rows:
                yield ArchivedSample(*r[1:])
            after = rows[-1][0]
    finally:
        db.close()


def archive_totals(path: Path) -> ArchiveTotals:
    """Items and bytes of an archive file, read-only."""
    db = storeopen.connect(path, read_only=True)
    try:
        return _totals(db)
    finally:
        db.close()


def wipe_archive(path: Path) -> int:
    """Delete every archived sample and rewrite the file so that no image stays in it (also with the
    service running: SQLite locks the file meanwhile). Returns how many were deleted."""
    db = _connect(path)
    try:
        n = _totals(db).items
        db.execute("DELETE FROM items")
        db.execute("VACUUM")                          # a fresh file: no deleted page survives in it
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # ... nor in the write-ahead log
    finally:
        db.close()
    return n
