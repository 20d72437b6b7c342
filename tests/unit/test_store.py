"""The SQLite store on a real database file (no fakes: SQLite is the component)."""
import random
import re
import time
from pathlib import Path

import pytest

from edge_infer import store as store_module
from edge_infer.protocol import Correction, ErrorReply
from edge_infer.result import Result
from edge_infer.errors import StoreError
from edge_infer.store import OutboxItem, Store
from edge_infer.storeschema import INITIAL_STATE, OUTBOX_STATES, TRANSITIONS


def make(sid: str, offloaded: bool = True, created: float | None = None,
         payload: bytes = b"png") -> tuple[Result, OutboxItem | None]:
    now = time.time() if created is None else created
    r = Result(sample_id=sid, label=1, label_name="b", confidence=0.4, origin="edge",
               state="provisional" if offloaded else "final", offloaded=offloaded, edge_label=1,
               edge_confidence=0.4, model_id="m:1", created_at=now)
    item = OutboxItem(sid, now, "image/png", payload, b"\x26\x00\x01k\x00\x01v") if offloaded else None
    return r, item


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    s.open()
    yield s
    s.close()


def test_outbox_state_machine_and_exactly_once_correction(store):
    store.record(*make("s1"))
    store.record(*make("s2", offloaded=False))
    assert [i.sample_id for i in store.queued_samples(10)] == ["s1"]
    assert store.queued_samples(10)[0].user_props == b"\x26\x00\x01k\x00\x01v"
    store.commit_progress(inflight=["s1"])
    assert store.queued_samples(10) == []
    store.commit_progress(delivered=["s1"])
    assert store.outbox_state("s1") == ("delivered", None)
    c = Correction("s1", 7, "sneaker", 0.99, "cloud:1", "w")
    first = store.apply_correction(c)
    assert first.reason == "applied" and first.result.label == 7 and first.result.state == "final"
    assert first.result.origin == "cloud" and first.result.edge_label == 1
    again = store.apply_correction(Correction("s1", 3, "dress", 0.5, "cloud:1", "w"))
    assert again.reason == "duplicate" and again.result is None
    assert store.get_result("s1").label == 7
    assert store.apply_correction(Correction("nope", 1, "", 0.5, "", "")).reason == "unknown"
    assert store.apply_correction(Correction("s2", 1, "", 0.5, "", "")).reason == "unknown"


def test_inflight_samples_are_requeued_at_open(tmp_path):
    s = Store(tmp_path / "db")
    s.open()
    s.record(*make("a"))
    s.record(*make("b"))
    s.commit_progress(inflight=["a", "b"])
    s.commit_progress(delivered=["b"])
    s.close()
    s2 = Store(tmp_path / "db")
    assert s2.open() == 1
    assert [i.sample_id for i in s2.queued_samples(10)] == ["a"]
    s2.close()


def test_results_publication_sequence(store):
    store.record(*make("a", offloaded=False))
    store.record(*make("b"))
    pending = [(d.seq, d.result) for d in store.unpublished_results(0, 10)]
    assert [r.sample_id for _, r in pending] == ["a", "b"]
    store.commit_progress(acked_results=[(r.sample_id, seq) for seq, r in pending])
    assert store.unpublished_count() == 0
    store.commit_progress(inflight=["b"])
    # a correction makes the result due for publication again, with a newer sequence
    out = store.apply_correction(Correction("b", 2, "c", 0.9, "cloud:1", "w"))
    (due,) = store.unpublished_results(0, 10)
    seq, r = due.seq, due.result
    assert out.due == due and store.last_seq == seq
    assert r.sample_id == "b" and r.state == "final" and seq > max(s for s, _ in pending)
    assert store.unpublished_results(seq, 10) == []      # nothing beyond the cursor
    # an ack of the older publication does not count for the newer one
    store.commit_progress(acked_results=[("b", pending[1][0])])
    assert store.unpublished_count() == 1


def test_expiry_finalises_local_answer_and_late_correction_is_ignored(store):
    old = time.time() - 100
    store.record(*make("old", created=old))
    store.record(*make("new"))
    assert [d.result.sample_id for d in store.expire(max_age_s=50)] == ["old"]
    r = store.get_result("old")
    assert r.state == "final" and r.origin == "edge" and r.offload_error == "expired"
    assert store.outbox_state("old")[0] == "expired"
    assert store.apply_correction(Correction("old", 3, "x", 0.9, "c", "w")).reason == "late"
    assert store.get_result("old").label == 1


def test_refused_and_error_replies_make_the_local_answer_final(store):
    store.record(*make("a"))
    store.record(*make("b"))
    store.commit_progress(inflight=["a", "b"])
    r = store.mark_failed("a", "refused by broker: Not authorized").result
    assert r.state == "final" and "Not authorized" in r.offload_error
    store.commit_progress(delivered=["b"])
    out = store.apply_error(ErrorReply("b", "bad_image", "cannot decode", "w"))
    assert out.reason == "applied" and out.result.state == "final" and "bad_image" in out.result.offload_error
    assert store.outbox_counts()["failed"] == 2


def test_prune_never_drops_unpublished_or_provisional(store):
    for i in range(5):
        store.record(*make(f"f{i}", offloaded=False, created=1000 + i))
    store.record(*make("p", created=999))
    assert store.prune_results(keep=2) == 0  # nothing published yet
    pending = store.unpublished_results(0, 10)
    store.commit_progress(acked_results=[(d.result.sample_id, d.seq) for d in pending])
    assert store.prune_results(keep=2) == 4   # 6 rows, the provisional one stays
    assert store.get_result("p") is not None and store.get_result("f4") is not None


def test_corrupt_database_gives_an_operator_message(tmp_path):
    p = tmp_path / "db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a SQLite database.*reset-store") as err:
        Store(p).open()
    assert err.value.kind == "corrupt" and err.value.exit_code == 2
    assert p.read_bytes() == b"this is not sqlite" * 100     # left as it was for the operator


def test_delivered_without_reply_is_resent(tmp_path):
    store = Store(tmp_path / "db", resend_after_s=60)
    store.open()
    store.record(*make("a"))
    store.commit_progress(inflight=["a"])
    store.commit_progress(delivered=["a"])
    assert store.resend_stale() == 0
    t = time.time()
    assert store.resend_stale(now=t + 61) == 1           # first attempt: after 60 s
    assert [i.sample_id for i in store.queued_samples(5)] == ["a"]
    store.commit_progress(inflight=["a"])                                        # attempt 2
    store.commit_progress(delivered=["a"])
    assert store.resend_stale(now=time.time() + 61) == 0  # now it waits 120 s
    assert store.resend_stale(now=time.time() + 121) == 1


def test_a_shorter_resend_wait_reaches_the_samples_already_waiting(tmp_path):
    store = Store(tmp_path / "db", resend_after_s=120)
    store.open()
    ids = [f"s{i}" for i in range(1300)]          # more than one chunk of the walk
    for sid in ids:
        store.record(*make(sid))
    store.commit_progress(inflight=ids)
    store.commit_progress(delivered=ids)
    t = time.time()
    assert store.resend_stale(now=t + 15) == 0     # acknowledged under the 120 s wait
    assert store.shorten_resends(10.0) == len(ids)
    assert store.shorten_resends(10.0) == 0        # already as soon as that: nothing moves
    assert store.shorten_resends(60.0) == 0        # a longer wait never postpones them
    assert store.resend_after_s == 60.0            # but applies to what is acknowledged next
    due = 0
    while (n := store.resend_stale(now=t + 15)):
        due += n
    assert due == len(ids)


def test_byte_budget_evicts_oldest_uncorrected_first(tmp_path):
    s = Store(tmp_path / "db", max_bytes=350)
    s.open()
    for i in range(3):
        assert s.record(*make(f"s{i}", payload=b"x" * 100)).evicted == []
    s.commit_progress(inflight=["s0"])                      # in paho's hands: never evicted
    evicted = s.record(*make("s3", payload=b"x" * 100)).evicted
    assert [d.result.sample_id for d in evicted] == ["s1"]   # the oldest that is not in flight
    assert evicted[0].result.state == "final"
    evicted = s.record(*make("s4", payload=b"x" * 200)).evicted
    assert [d.result.sample_id for d in evicted] == ["s2", "s3"]
    counts = s.outbox_counts()
    assert counts["evicted"] == 3 and counts["queued"] == 1 and counts["inflight"] == 1
    r = s.get_result("s1")
    assert r.state == "final" and r.origin == "edge" and "evicted" in r.offload_error
    assert s.apply_correction(Correction("s1", 2, "c", 0.9, "m", "w")).reason == "late"
    s.close()
    s2 = Store(tmp_path / "db", max_bytes=350)   # the budget survives a restart
    s2.open()
    assert [d.result.sample_id for d in s2.record(*make("s5", payload=b"x" * 100)).evicted] == ["s0"]  # re-queued
    s2.close()


def test_prune_also_drops_finished_outbox_rows_of_pruned_results(tmp_path):
    s = Store(tmp_path / "db", max_bytes=150)
    s.open()
    for i in range(3):
        s.record(*make(f"e{i}", created=1000 + i, payload=b"x" * 100))   # each new one evicts the previous
    s.record(*make("n", offloaded=False, created=2000))
    s.commit_progress(acked_results=[(d.result.sample_id, d.seq) for d in s.unpublished_results(0, 10)])
    assert s.outbox_counts()["evicted"] == 2
    assert s.prune_results(keep=2) == 2          # e0, e1 (final, published) go
    assert s.outbox_counts()["evicted"] == 0     # and their evicted outbox rows with them
    s.close()


def test_an_index_damaged_while_running_is_rebuilt_by_repair(tmp_path):
    import sqlite3
    db = tmp_path / "db"
    s = Store(db)
    s.open()
    for i in range(300):
        r, item = make(f"s{i}")
        s.record(r.__class__(**{**r.__dict__, "source_key": f"k{i}"}), item)
    s.close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name='results_source_key'").fetchone()
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\0" * 4096)
    s = Store(db)
    s.open(check=False)                       # as if it broke after start-up
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        s.has_source_key("k1")
    assert "damaged while running" in s.repair()
    assert s.has_source_key("k1") and s.counts()["outbox.queued"] == 300
    s.record(*make("after"))
    assert s.audit()["results"] == 301
    s.close()


# ------------------------------------------------------------ the state machine is the table
#: every change storeschema allows, plus the insert of a new sample (from None)
ALLOWED = {(None, INITIAL_STATE.value)} | {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}


@pytest.fixture
def traced(monkeypatch):
    """Every change of an outbox row's state, on every connection the store opens, as SQLite sees it:
    temporary triggers call back into Python, whatever statement made the change."""
    seen: list[tuple[str | None, str]] = []
    real = store_module.migrate

    def migrate_and_trace(db, resend_after_s):
        found = real(db, resend_after_s)
        db.create_function("trace_state", 2, lambda old, new: seen.append((old, new)))
        db.execute("CREATE TEMP TRIGGER IF NOT EXISTS trace_ins AFTER INSERT ON main.outbox "
                   "BEGIN SELECT trace_state(NULL, NEW.state); END")
        db.execute("CREATE TEMP TRIGGER IF NOT EXISTS trace_upd AFTER UPDATE ON main.outbox "
                   "WHEN OLD.state IS NOT NEW.state BEGIN SELECT trace_state(OLD.state, NEW.state); END")
        return found

    import edge_infer.storeopen as storeopen_module
    monkeypatch.setattr(store_module, "migrate", migrate_and_trace)       # repair() reopens through this
    monkeypatch.setattr(storeopen_module, "migrate", migrate_and_trace)   # open() through this
    return seen


def test_every_transition_the_store_makes_is_in_the_table_and_every_one_is_made(tmp_path, traced):
    """Drives each state-changing method from each state it accepts (and some it must refuse).
    Fails when the store makes a change that storeschema.TRANSITION_ROWS (and so the docs) lacks,
    or when the table lists one the store never makes."""
    path = tmp_path / "db"
    s = Store(path, resend_after_s=1.0)
    s.open()
    old = time.time() - 1000

    def at(sid, state, created=None, size=3):
        """A new sample in ``state``; "resent": queued again after a send (no reply by resend_at)."""
        s.record(*make(sid, created=created, payload=b"x" * size))
        if state in ("inflight", "delivered", "resent"):
            s.commit_progress(inflight=[sid])
        if state in ("delivered", "resent"):
            s.commit_progress(delivered=[sid])
        if state == "resent":
            assert s.resend_stale(now=time.time() + 10) == 1
        assert s.outbox_state(sid)[0] == ("queued" if state == "resent" else state)

    # expiry reads each state's oldest rows: these go first
    for state in ("queued", "inflight", "delivered"):
        at(f"old-{state}", state, created=old)
    s.expire(max_age_s=500)
    assert [s.outbox_state(f"old-{x}")[0] for x in ("queued", "inflight", "delivered")] == [
        "expired", "inflight", "expired"]
    for state in ("resent", "inflight", "delivered"):
        at(f"corr-{state}", state)
        assert s.apply_correction(Correction(f"corr-{state}", 2, "c", 0.9, "m", "w")).reason == "applied"
        at(f"err-{state}", state)
        assert s.apply_error(ErrorReply(f"err-{state}", "bad_image", "no", "w")).reason == "applied"
    # a reply for a sample never sent is refused: no worker has seen it
    at("unsent", "queued")
    assert s.apply_correction(Correction("unsent", 2, "c", 0.9, "m", "w")).reason == "unknown"
    assert s.apply_error(ErrorReply("unsent", "bad_image", "no", "w")).reason == "unknown"
    assert s.outbox_state("unsent")[0] == "queued"
    for state in ("queued", "inflight"):
        at(f"refused-{state}", state)
        assert s.mark_failed(f"refused-{state}", "refused by broker: x") is not None
    at("refused-delivered", "delivered")
    assert s.mark_failed("refused-delivered", "refused by broker: x") is None     # refused: not in the table
    at("resend", "delivered")
    assert s.resend_stale(now=time.time() + 10) >= 1
    # the byte budget: the oldest delivered sample, then the oldest queued one, go; in-flight ones stay
    at("big-inflight", "inflight", size=1000)
    at("big-delivered", "delivered", size=1000)
    at("big-queued", "queued", size=1000)
    s.max_bytes = s.counts()["outbox.bytes"] - 500
    s.record(*make("big-new", payload=b"x" * 500))
    s.record(*make("big-new2", payload=b"x" * 500))
    assert [s.outbox_state(f"big-{x}")[0] for x in ("inflight", "delivered", "queued")] == [
        "inflight", "evicted", "evicted"]
    s.max_bytes = None
    # replies to done samples change nothing
    for sid in ("corr-resent", "err-resent", "old-queued", "big-queued"):
        s.apply_correction(Correction(sid, 2, "c", 0.9, "m", "w"))
        s.apply_error(ErrorReply(sid, "bad_image", "no", "w"))
        s.mark_failed(sid, "x")
    s.close()
    s = Store(path)
    assert s.open() >= 1       # in-flight ones go back to queued
    s.close()

    made = set(traced)
    assert made <= ALLOWED, f"changes missing from storeschema.TRANSITION_ROWS: {sorted(made - ALLOWED, key=str)}"
    assert made == ALLOWED, f"listed but never made by the store: {sorted(ALLOWED - made, key=str)}"


def test_random_operations_only_make_transitions_in_the_table(tmp_path, traced):
    """Any method on any sample in any order (replies to done samples, sends of delivered ones, ...)."""
    rng = random.Random(10)
    s = Store(tmp_path / "db", max_bytes=4_000, resend_after_s=0.0)
    s.open()
    ids: list[str] = []
    for step in range(600):
        op = rng.choice(["record", "send", "ack", "correct", "error", "refuse", "resend", "expire", "reopen"])
        sid = rng.choice(ids) if ids else "none"
        if op == "record" or not ids:
            ids.append(f"s{step}")
            s.record(*make(ids[-1], created=time.time() - rng.choice([0, 1000]), payload=b"x" * rng.randint(1, 900)))
        elif op == "send":
            s.commit_progress(inflight=[sid])
        elif op == "ack":   # what was sent, or (half the time) sent and acknowledged in one turn
            s.commit_progress(inflight=[sid] if rng.random() < 0.5 else [], delivered=[sid])
        elif op == "correct":
            s.apply_correction(Correction(sid, 2, "c", 0.9, "m", "w"))
        elif op == "error":
            s.apply_error(ErrorReply(sid, "bad_image", "no", "w"))
        elif op == "refuse":
            s.mark_failed(sid, "refused by broker: x")
        elif op == "resend":
            s.resend_stale(now=time.time() + 1)
        elif op == "expire":
            s.expire(max_age_s=500)
        else:
            s.close()
            s = Store(tmp_path / "db", max_bytes=4_000, resend_after_s=0.0)
            s.open()
    s.close()
    assert set(traced) <= ALLOWED, sorted(set(traced) - ALLOWED, key=str)
    assert len({new for _, new in traced}) == len(OUTBOX_STATES)   # the run reached every state


def test_store_sql_names_outbox_states_through_the_enum():
    """No outbox state spelled as an SQL literal in the store's code: its statements take them from storeschema."""
    import edge_infer.storesql as storesql_module
    source = Path(store_module.__file__).read_text() + Path(storesql_module.__file__).read_text()
    literals = re.findall(r"'(%s)'" % "|".join(OUTBOX_STATES), source)
    assert not literals, literals
