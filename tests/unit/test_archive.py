"""The hard-example archive (device/archive.py): bounded, oldest first, private, cheap per insert, wipeable."""
from __future__ import annotations

import re
import sqlite3
import stat

import pytest

from edge_infer.archive import (ArchivedSample, ArchiveTotals, HardExampleArchive, archive_totals, archived_sample,
                                plan_eviction, read_archive, wipe_archive)
from edge_infer.result import Result
from edge_infer.stats import Counters


def sample(i: int, size: int = 10, marker: bytes = b"") -> ArchivedSample:
    payload = (marker + bytes([i % 256]) * size)[:max(size, len(marker))]
    return ArchivedSample(f"s{i:05d}", 1000.0 + i, 900.0 + i, 1000.0 + i, "m:1", i % 10, 0.5, (i + 1) % 10, 0.9,
                          "c:1", "below_threshold", "image/x-portable-graymap", payload)


def archive(tmp_path, **bounds) -> HardExampleArchive:
    a = HardExampleArchive(tmp_path / "archive.db", max_items=bounds.get("max_items", 1000),
                           max_bytes=bounds.get("max_bytes", 1 << 20), counters=Counters())
    a.open()
    return a


# ----------------------------------------------------------------------------- the eviction plan (pure)

def test_eviction_plan_drops_the_oldest_until_both_bounds_hold():
    rows = [(seq, 10) for seq in range(1, 11)]
    assert plan_eviction(ArchiveTotals(10, 100), 10, 100, iter(rows)) == plan_eviction(
        ArchiveTotals(10, 100), 10, 100, iter([]))   # within bounds: nothing, whatever is there
    assert plan_eviction(ArchiveTotals(10, 100), 7, 1000, iter(rows)).upto_seq == 3          # items
    assert plan_eviction(ArchiveTotals(10, 100), 100, 55, iter(rows)).upto_seq == 5          # bytes: 100 -> 50
    e = plan_eviction(ArchiveTotals(10, 100), 8, 35, iter(rows))                             # both: bytes decide
    assert (e.upto_seq, e.rows) == (7, 7)
    assert plan_eviction(ArchiveTotals(10, 100), 0, 0, iter(rows)).rows == 10


def test_eviction_plan_reads_only_as_many_rows_as_it_drops():
    read = []

    def oldest():
        for seq in range(1, 1_000_000):
            read.append(seq)
            yield seq, 1
    plan_eviction(ArchiveTotals(1_000_000, 1_000_000), 999_998, 1 << 30, oldest())
    assert len(read) == 3   # two dropped, and the one that showed the bounds hold


# ----------------------------------------------------------------------------- the file

def test_keeps_the_newest_within_max_items(tmp_path):
    a = archive(tmp_path, max_items=50)
    for i in range(120):
        a.put(sample(i))
        if i % 7 == 0:
            a.flush()
    a.flush()
    assert a.totals() == ArchiveTotals(50, 500)
    assert [s.sample_id for s in read_archive(a.path)] == [f"s{i:05d}" for i in range(70, 120)]
    assert a.counters.get("archived") == 120 and a.counters.get("archive_dropped") == 70
    a.close()


def test_keeps_the_newest_within_max_bytes_and_skips_one_larger_than_the_budget(tmp_path):
    a = archive(tmp_path, max_bytes=1000)
    for i in range(30):
        a.put(sample(i, size=100))
    a.put(sample(99, size=1001))
    a.flush()
    assert a.totals() == ArchiveTotals(10, 1000)
    assert [s.sample_id for s in read_archive(a.path)] == [f"s{i:05d}" for i in range(20, 30)]
    assert a.counters.get("archive_skipped_too_large") == 1
    a.close()


def test_lower_bounds_at_the_next_start_trim_at_once(tmp_path):
    a = archive(tmp_path)
    for i in range(40):
        a.put(sample(i))
    a.close()
    b = archive(tmp_path, max_items=15)
    assert b.totals().items == 15 and next(read_archive(b.path)).sample_id == "s00025"
    b.close()


def test_round_trip_of_what_was_archived(tmp_path):
    r = Result(sample_id="abc", label=6, label_name="shirt", confidence=0.88, origin="cloud", state="final",
               offloaded=True, edge_label=0, edge_confidence=0.61, model_id="fmnist-edge:1.0.0", created_at=5.0,
               corrected_at=6.0, cloud_model_id="fmnist-cloud:1.0.0", offload_reason="audit")
    a = archive(tmp_path)
    a.put(archived_sample(r, "image/png", b"\x89PNG...", now=7.0))
    a.put(archived_sample(r, "image/png", b"again", now=8.0))   # the same sample twice: kept once
    a.close()
    (s,) = read_archive(a.path)
    assert s == ArchivedSample("abc", 7.0, 5.0, 6.0, "fmnist-edge:1.0.0", 0, 0.61, 6, 0.88, "fmnist-cloud:1.0.0",
                               "audit", "image/png", b"\x89PNG...")
    assert archive_totals(a.path) == ArchiveTotals(1, 7)


def test_the_file_is_private(tmp_path):
    a = archive(tmp_path)
    a.put(sample(1))
    a.flush()
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / f"archive.db{suffix}"
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    a.close()


def files(tmp_path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.glob("archive.db*"))


def test_evicted_and_wiped_images_leave_no_bytes_in_the_files(tmp_path):
    """secure_delete overwrites what is deleted (Debian's SQLite has it on by default; the archive sets it
    everywhere), and the wipe also rewrites the file and empties the write-ahead log."""
    marker = b"PRIVATE-CAMERA-IMAGE-"
    a = archive(tmp_path, max_items=5)
    assert a._db.execute("PRAGMA secure_delete").fetchone() == (1,)
    for i in range(12):   # 7 evicted, 5 still there
        a.put(sample(i, size=200, marker=marker + b"%05d-" % i))
        a.flush()
    a._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert marker + b"00011-" in files(tmp_path)
    assert not [i for i in range(7) if marker + b"%05d-" % i in files(tmp_path)]
    assert wipe_archive(a.path) == 5          # beside the open archive, as beside a running service
    a.put(sample(100, size=20))
    a.flush()                                  # ... which goes on archiving
    a.close()
    assert marker not in files(tmp_path)
    assert [s.sample_id for s in read_archive(a.path)] == ["s00100"]


def test_a_failing_archive_is_counted_never_raised(tmp_path):
    a = archive(tmp_path)
    other = sqlite3.connect(a.path)
    other.execute("DROP TABLE items")   # whatever breaks the file under it
    other.close()
    a.put(sample(1))
    assert a.flush() == 0
    assert a.counters.get("archive_errors") == 1
    a.close()


def test_a_damaged_file_is_moved_aside_and_a_fresh_one_started(tmp_path):
    (tmp_path / "archive.db").write_bytes(b"not a database at all" * 100)
    a = archive(tmp_path)
    a.put(sample(1))
    a.flush()
    assert a.totals().items == 1
    assert len(list(tmp_path.glob("archive.db.damaged-*"))) == 1
    a.close()


def test_every_statement_seeks_an_index(tmp_path):
    """Insert, evict and read by primary key: the work per insert does not grow with the archive."""
    a = archive(tmp_path, max_items=20, max_bytes=150)
    statements: list[str] = []
    a._db.set_trace_callback(statements.append)
    for i in range(60):
        a.put(sample(i))
        a.flush()
    a._db.set_trace_callback(None)
    checked = 0
    for sql in set(statements):
        if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", sql, re.I):
            continue
        plan = [row[3] for row in a._db.execute("EXPLAIN QUERY PLAN " + sql)]
        checked += 1
        assert not [p for p in plan if re.match(r"SCAN items\b", p) and "LIMIT" not in sql], (sql, plan)
        assert not [p for p in plan if "TEMP B-TREE" in p], (sql, plan)
    assert checked >= 4
    a.close()


@pytest.mark.parametrize("version", [2, 99])
def test_an_archive_of_a_newer_schema_is_not_read_as_this_one(tmp_path, version):
    db = sqlite3.connect(tmp_path / "archive.db")
    db.execute(f"PRAGMA user_version={version}")
    db.execute("CREATE TABLE something_else (x)")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="schema"):
        list(read_archive(tmp_path / "archive.db"))
    a = archive(tmp_path)   # the service moves it aside and starts afresh
    assert list(tmp_path.glob("archive.db.damaged-*"))
    a.close()


def test_a_correction_hands_over_the_sample_it_drops_from_the_outbox(tmp_path):
    """What the archive gets comes from the outbox row in the correction's own transaction."""
    from edge_infer.protocol import Correction
    from edge_infer.store import Store

    from .test_store import make
    store = Store(tmp_path / "state.db")
    store.open()
    try:
        store.record(*make("a", payload=b"the image"))
        store.record(*make("b", payload=b"another"))
        store.commit_progress(inflight=["a", "b"])
        c = Correction("a", 6, "shirt", 0.97, "cloud:1", "w1")
        applied = store.apply_correction(c, with_sample=True)
        assert applied.reason == "applied" and applied.sample == ("image/png", b"the image")
        assert store.counts()["outbox.bytes"] == len(b"another")       # dropped from the outbox all the same
        assert store.apply_correction(c, with_sample=True).sample is None   # a duplicate: nothing to archive
        plain = store.apply_correction(Correction("b", 1, "trouser", 0.9, "cloud:1", "w1"))
        assert plain.reason == "applied" and plain.sample is None      # not asked (archive off): not read
    finally:
        store.close()
