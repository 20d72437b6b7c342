"""The store's cost does not grow with what it holds: every query seeks an index, counts are exact."""
from __future__ import annotations

import re
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_infer.protocol import Correction, ErrorReply
from edge_infer.store import Store
from edge_infer.storeschema import initial_counts

from .test_store import make


def _exercise(store: Store) -> None:
    """Every operation the service runs per input or periodically, on a store with rows in every state."""
    now = time.time()
    for i in range(40):
        r, item = make(f"s{i:03d}", offloaded=i % 2 == 0, created=now - 1000 + i)
        store.record_many([(r.__class__(**{**r.__dict__, "source_key": f"f{i}|1|2"}), item)], durable=i == 0)
    store.has_source_key("f3|1|2")
    store.commit_progress(inflight=["s000", "s002", "s004"])
    store.commit_progress(delivered=["s000", "s002"])
    store.shorten_resends(1.0)                       # the adaptive resend wait, walked through its index
    store.queued_samples(8)
    store.unpublished_results(0, 64)
    store.commit_progress(acked_results=[(d.result.sample_id, d.seq) for d in store.unpublished_results(0, 64)])
    store.apply_correction(Correction("s000", 3, "x", 0.9, "c", "w"))
    store.apply_error(ErrorReply("s002", "bad_image", "no", "w"))
    store.mark_failed("s004", "refused")
    store.resend_stale(now=now + 10_000)
    store.expire(max_age_s=990, now=now)
    store.counts()
    store.outbox_counts()
    store.unpublished_count()
    store.waiting_since()
    store.prune_results(keep=10)
    store.get_result("s010")
    store.outbox_state("s010")
    store.record(*make("s999", payload=b"y" * 30))   # over a tight budget: kept images (if any) go, then evictions


@pytest.mark.parametrize("keep_payloads", [False, True], ids=["default", "keep_payload_after_correction"])
def test_every_per_input_and_periodic_query_uses_an_index(tmp_path, keep_payloads):
    """No statement the running service issues scans a table (EXPLAIN QUERY PLAN), so none grows with it."""
    store = Store(tmp_path / "db", max_bytes=10_000 if not keep_payloads else 60, keep_payloads=keep_payloads)
    store.open()
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    _exercise(store)
    store._conn().set_trace_callback(None)
    db = store._conn()
    scans = {}
    checked = 0
    for sql in statements:
        if not re.match(r"\s*(SELECT|UPDATE|DELETE|INSERT)", sql, re.I) or "sqlite_" in sql:
            continue
        # trigger bodies are reported as their own statements: they only touch the counts table
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
        checked += 1
        # An index walked in order under a LIMIT stops after LIMIT rows (pruning from the oldest): allowed.
        # Sorting every matching row for an ORDER BY costs what is stored, however small the LIMIT.
        bad = [p for p in plan if (re.match(r"SCAN (results|outbox)\b", p)
                                   and not ("USING" in p and "LIMIT" in sql)) or "TEMP B-TREE" in p]
        if bad:
            scans[sql] = bad
    store.close()
    assert checked > 15
    assert not scans, scans
    assert keep_payloads == any("outbox_kept" in sql for sql in statements)   # the kept-image path ran


def _scanned(db: sqlite3.Connection) -> dict[str, int]:
    return dict(initial_counts(db))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["record", "offload", "send", "ack", "correct", "error", "refuse",
                                               "resend", "expire", "publish", "prune"]),
                              st.integers(0, 30)), max_size=60))
def test_counts_kept_by_triggers_equal_a_full_count(tmp_path_factory, ops):
    store = Store(tmp_path_factory.mktemp("c") / "db", max_bytes=2_000, resend_after_s=1.0)
    store.open()
    now, n = time.time(), 0
    for op, k in ops:
        sid = f"s{k}"
        if op in ("record", "offload"):
            store.record(*make(f"n{n}", offloaded=op == "offload", created=now - k, payload=b"x" * (k * 20 + 1)))
            n += 1
        elif op == "send":
            store.commit_progress(inflight=[i.sample_id for i in store.queued_samples(k + 1)])
        elif op == "ack":
            store.commit_progress(delivered=[f"n{j}" for j in range(n)])
        elif op == "correct":
            store.apply_correction(Correction(f"n{k}", 1, "b", 0.9, "c", "w"))
        elif op == "error":
            store.apply_error(ErrorReply(f"n{k}", "bad_image", "x", "w"))
        elif op == "refuse":
            store.mark_failed(f"n{k}", "refused")
        elif op == "resend":
            store.resend_stale(now=now + k)
        elif op == "expire":
            store.expire(max_age_s=k, now=now)
        elif op == "publish":
            store.commit_progress(acked_results=[(d.result.sample_id, d.seq) for d in store.unpublished_results(0, k)])
        elif op == "prune":
            store.prune_results(keep=k)
        del sid
    kept = store.counts()
    assert kept == _scanned(store._conn())
    if store.max_bytes is not None:
        # the budget holds after every recording (in-flight samples may exceed it, they are in paho's hands)
        assert kept["outbox.bytes"] <= store.max_bytes + sum(
            r for (r,) in store._conn().execute("SELECT size FROM outbox WHERE state='inflight'"))
    store.close()
