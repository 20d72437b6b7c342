"""What the state database keeps on disk, for how long, and who may read it; which replies it accepts."""
from __future__ import annotations

import os
import sqlite3
import stat
import time

from edge_infer.protocol import Correction, ErrorReply
from edge_infer.store import Store

from .test_store import make


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _payload(store: Store, sid: str) -> bytes | None:
    return store._conn().execute("SELECT payload FROM outbox WHERE sample_id=?", (sid,)).fetchone()[0]


def _sent(store: Store, *sids: str) -> None:
    store.commit_progress(inflight=list(sids))
    store.commit_progress(delivered=list(sids))


# ------------------------------------------------------------ file modes
def test_the_database_and_its_wal_and_shm_are_created_private(tmp_path):
    os.umask(0o022)   # a usual umask: files would be 0644
    path = tmp_path / "state" / "edge-infer.db"
    s = Store(path)
    s.open()
    s.record(*make("a"))
    files = {p.name: _mode(p) for p in path.parent.iterdir()}
    assert files == {"edge-infer.db": 0o600, "edge-infer.db-wal": 0o600, "edge-infer.db-shm": 0o600}
    assert _mode(path.parent) == 0o750   # a state directory the store makes (systemd's StateDirectoryMode)
    s.close()


def test_a_database_left_readable_by_an_older_release_is_made_private_at_open(tmp_path):
    path = tmp_path / "edge-infer.db"
    s = Store(path)
    s.open()
    s.record(*make("a"))
    for suffix in ("", "-wal", "-shm"):
        os.chmod(f"{path}{suffix}", 0o644)
    s.close()
    s = Store(path)
    s.open()
    assert {_mode(f"{path}{x}") for x in ("", "-wal", "-shm") if os.path.exists(f"{path}{x}")} == {0o600}
    s.close()


def test_a_rebuilt_database_is_private_too(tmp_path):
    path = tmp_path / "edge-infer.db"
    s = Store(path)
    s.open()
    s.record(*make("a"))
    s.repair()   # the copy into a fresh file, as after an index damaged while running
    assert _mode(path) == 0o600 and s.get_result("a") is not None
    s.close()


# ------------------------------------------------------------ payloads at rest
def test_by_default_an_image_is_dropped_when_its_correction_is_applied(tmp_path):
    s = Store(tmp_path / "db")
    s.open()
    s.record(*make("a", payload=b"x" * 100))
    _sent(s, "a")
    assert s.counts()["outbox.bytes"] == 100
    assert s.apply_correction(Correction("a", 2, "pullover", 0.9, "m", "w")).reason == "applied"
    assert _payload(s, "a") is None and s.counts()["outbox.bytes"] == 0
    s.close()


def test_keep_payload_after_correction_keeps_the_image_until_the_budget_needs_it(tmp_path):
    s = Store(tmp_path / "db", max_bytes=1000, keep_payloads=True)
    s.open()
    for sid in ("k1", "k2"):
        s.record(*make(sid, payload=sid.encode() * 150))   # 300 bytes each
        _sent(s, sid)
        assert s.apply_correction(Correction(sid, 2, "pullover", 0.9, "m", "w")).reason == "applied"
    assert _payload(s, "k1") == b"k1" * 150 and s.counts()["outbox.bytes"] == 600
    # expired, evicted and failed samples never keep theirs
    s.record(*make("err", payload=b"e" * 10))
    _sent(s, "err")
    s.apply_error(ErrorReply("err", "bad_image", "no", "w"))
    assert _payload(s, "err") is None
    # a new sample over the budget: the oldest kept image goes first, no waiting sample is evicted
    s.record(*make("q1", payload=b"q" * 300))
    out = s.record(*make("q2", payload=b"r" * 300))
    assert out.evicted == [] and s.outbox_counts()["evicted"] == 0
    assert _payload(s, "k1") is None and _payload(s, "k2") == b"k2" * 150
    assert s.outbox_state("k1")[0] == "corrected" and s.counts()["outbox.bytes"] == 900
    # the kept ones are used up before an uncorrected sample is evicted
    out = s.record(*make("q3", payload=b"s" * 500))
    assert _payload(s, "k2") is None and [d.result.sample_id for d in out.evicted] == ["q1"]
    s.close()


def test_kept_images_go_with_their_results_when_pruned(tmp_path):
    s = Store(tmp_path / "db", keep_payloads=True)
    s.open()
    for i in range(3):
        s.record(*make(f"k{i}", created=1000 + i, payload=b"x" * 50))
        _sent(s, f"k{i}")
        s.apply_correction(Correction(f"k{i}", 2, "pullover", 0.9, "m", "w"))
    s.commit_progress(acked_results=[(d.result.sample_id, d.seq) for d in s.unpublished_results(0, 10)])
    assert s.prune_results(keep=1) == 2
    assert s.counts()["outbox.bytes"] == 50 and s.counts()["outbox.corrected"] == 1
    s.close()


def test_turning_keeping_off_drops_the_kept_images_at_the_next_start(tmp_path):
    path = tmp_path / "db"
    s = Store(path, keep_payloads=True)
    s.open()
    s.record(*make("k", payload=b"x" * 50))
    _sent(s, "k")
    s.apply_correction(Correction("k", 2, "pullover", 0.9, "m", "w"))
    s.record(*make("waiting", payload=b"y" * 20))
    s.close()
    s = Store(path, keep_payloads=True)   # still keeping: nothing dropped
    s.open()
    assert _payload(s, "k") is not None and not s.report.notices
    s.close()
    s = Store(path)
    s.open()
    assert _payload(s, "k") is None and _payload(s, "waiting") == b"y" * 20
    assert s.counts()["outbox.bytes"] == 20
    assert any("kept by an earlier run" in n for n in s.report.notices)
    s.close()
    s = Store(path)
    s.open()
    assert not s.report.notices   # once
    s.close()


# ------------------------------------------------------------ which replies apply
def test_a_reply_for_a_sample_never_sent_is_refused(tmp_path):
    """A reply guessing the id of a sample still queued for its first send changes nothing."""
    s = Store(tmp_path / "db")
    s.open()
    s.record(*make("q"))
    assert s.apply_correction(Correction("q", 2, "pullover", 0.9, "m", "w")).reason == "unknown"
    assert s.apply_error(ErrorReply("q", "bad_image", "no", "w")).reason == "unknown"
    assert s.outbox_state("q") == ("queued", None) and s.get_result("q").state == "provisional"
    assert _payload(s, "q") is not None
    s.close()


def test_a_reply_to_an_earlier_send_applies_while_the_sample_waits_to_be_sent_again(tmp_path):
    """After a restart (inflight -> queued) or a resend (delivered -> queued) the reply to the first copy counts."""
    path = tmp_path / "db"
    s = Store(path, resend_after_s=1.0)
    s.open()
    s.record(*make("restarted"))
    s.record(*make("resent"))
    s.commit_progress(inflight=["restarted", "resent"])
    s.commit_progress(delivered=["resent"])
    assert s.resend_stale(now=time.time() + 10) == 1
    s.close()
    s = Store(path, resend_after_s=1.0)
    assert s.open() == 1
    assert {sid: s.outbox_state(sid)[0] for sid in ("restarted", "resent")} == {"restarted": "queued",
                                                                                 "resent": "queued"}
    assert s.apply_correction(Correction("restarted", 2, "pullover", 0.9, "m", "w")).reason == "applied"
    assert s.apply_error(ErrorReply("resent", "bad_image", "no", "w")).reason == "applied"
    assert s.outbox_state("resent")[0] == "failed"
    s.close()


def test_the_store_keeps_the_label_name_it_is_given(tmp_path):
    """The store records what the caller passes; the caller (protocol.parse_reply) takes it from the card."""
    s = Store(tmp_path / "db")
    s.open()
    s.record(*make("a"))
    _sent(s, "a")
    s.apply_correction(Correction("a", 4, "coat", 0.9, "m", "w"))
    assert (s.get_result("a").label, s.get_result("a").label_name) == (4, "coat")
    s.close()
    assert sqlite3.connect(tmp_path / "db").execute("SELECT label_name FROM results").fetchone() == ("coat",)
