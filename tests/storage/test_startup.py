"""Start-up on damaged, empty, read-only and full stores: a named cause and exit 2, never a silent fresh start."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_infer.errors import StoreError
from edge_infer.tools.localbroker import free_port
from edge_infer.service import EdgeService
from edge_infer.store import Store

from ..conftest import device_toml
from ..integration.helpers import device_config

pytestmark = pytest.mark.storage


def _filled_store(tmp_path: Path, fmnist, n: int = 600) -> tuple[Path, list[str]]:
    """A real store written by the service: n results, some samples queued."""
    cfg = device_config(tmp_path, free_port())
    svc = EdgeService(cfg)
    svc.start()
    ids = [svc.classify(im, source=f"f{i}").sample_id for i, im in enumerate(fmnist["test"].images[:n])]
    assert svc.flush()
    svc.stop()
    db = Path(cfg.state_dir) / "edge-infer.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # everything in the main file, as after a clean stop
    con.close()
    return db, ids


def _zero_page(db: Path, name: str) -> None:
    con = sqlite3.connect(db)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (name,)).fetchone()
    (page_size,) = con.execute("PRAGMA page_size").fetchone()
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\0" * page_size)


def _start(tmp_path: Path, db: Path) -> EdgeService:
    svc = EdgeService(replace(device_config(tmp_path, free_port()), state_dir=db.parent))
    svc.start(connect=False)
    return svc


def _run(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_infer", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)


def test_an_empty_store_file_is_an_error_not_a_fresh_start(tmp_path, fmnist):
    db, _ = _filled_store(tmp_path, fmnist)
    for p in db.parent.glob("edge-infer.db-*"):
        p.unlink()
    db.write_bytes(b"")
    cfg = device_toml(tmp_path, free_port())
    run = subprocess.run([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "is empty (0 bytes)" in run.stderr and "reset-store" in run.stderr
    assert "Traceback" not in run.stderr
    assert db.stat().st_size == 0                 # nothing written into it
    status = _run(cfg, "status")
    assert status.returncode == 2 and "is empty" in status.stderr and "Traceback" not in status.stderr
    # the operator asks for a reset: the file is kept aside, the next start is fresh
    assert _run(cfg, "reset-store").returncode == 2          # refuses without --yes
    reset = _run(cfg, "reset-store", "--yes")
    assert reset.returncode == 0 and not db.exists()
    assert len(list(db.parent.glob("edge-infer.db.reset-*Z"))) == 1
    svc = _start(tmp_path, db)
    svc.stop()


def test_a_truncated_store_is_an_error(tmp_path, fmnist):
    db, _ = _filled_store(tmp_path, fmnist)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreError, match="truncated") as err:
        _start(tmp_path, db)
    assert err.value.exit_code == 2 and db.stat().st_size == size // 2


def test_a_damaged_index_is_rebuilt_and_reported_with_nothing_lost(tmp_path, fmnist, caplog):
    db, ids = _filled_store(tmp_path, fmnist)
    _zero_page(db, "results_source_key")
    svc = _start(tmp_path, db)
    try:
        assert svc.counters.get("store_repaired") == 1
        assert "was damaged" in caplog.text and "rebuilt" in caplog.text
        assert svc.store.audit()["results"] == len(ids)
        assert {r.sample_id for r in svc.store.all_results()} == set(ids)
        assert svc.store.has_source_key("x") is False                   # the index works again
        assert svc.classify(fmnist["test"].images[0]).label >= 0
        assert svc.flush()
        kept = list(db.parent.glob("edge-infer.db.damaged-*Z"))
        assert len(kept) == 1                                            # the damaged file, for forensics
        st = svc.status()
        assert st["state"] == "online" and st["results_stored"] == len(ids) + 1
    finally:
        svc.stop()


def test_a_damaged_table_is_an_error_that_names_it_and_the_way_out(tmp_path, fmnist):
    db, _ = _filled_store(tmp_path, fmnist)
    _zero_page(db, "results")
    with pytest.raises(StoreError, match="table results is damaged.*reset-store") as err:
        _start(tmp_path, db)
    assert err.value.kind == "corrupt" and err.value.exit_code == 2
    assert db.exists()                                                  # left for the operator


def test_read_only_and_full_state_dirs_exit_2_with_the_cause(tmp_path, small_fs, fmnist):
    fs = small_fs("4m")
    state = fs.path / "state"
    svc = EdgeService(replace(device_config(tmp_path, free_port()), state_dir=state))
    svc.start(connect=False)
    svc.classify(fmnist["test"].images[0])
    assert svc.flush()
    svc.stop()
    cfg = tmp_path / "ro.toml"
    cfg.write_text(device_toml(tmp_path, free_port()).read_text().replace(str(tmp_path / "state"), str(state)))

    fs.remount("ro")
    run = _run(cfg, "run")
    assert run.returncode == 2 and "read-only" in run.stderr and "Traceback" not in run.stderr, run.stderr
    status = _run(cfg, "status")                       # reading a read-only store still works
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["results"] == 1

    fs.remount("rw")
    fs.fill()
    run = _run(cfg, "run")
    assert run.returncode == 2 and "full" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_schema_2_store_is_upgraded_in_place(tmp_path):
    """Stores written before the counts table: upgraded at start, the counts taken from the rows."""
    db = tmp_path / "state" / "edge-infer.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    con.executescript(V2_SCHEMA)
    con.executemany("INSERT INTO results (sample_id, created_at, source, model, edge_label, edge_conf, label, "
                    "label_name, confidence, origin, state, offloaded, pub_seq, acked_seq) "
                    "VALUES (?, 1, '', 'm', 1, .5, 1, 'b', .5, 'edge', ?, ?, ?, ?)",
                    [("a", "final", 0, 1, 1), ("b", "provisional", 1, 2, 0), ("c", "provisional", 1, 3, 0)])
    con.executemany("INSERT INTO outbox (sample_id, created_at, updated_at, state, content_type, payload, size, "
                    "user_props, attempts) VALUES (?, 1, ?, ?, 'image/png', x'00', 1, x'', 1)",
                    [("b", 1000.0, "delivered"), ("c", 1.0, "queued")])
    con.commit()
    con.close()
    s = Store(db, resend_after_s=60)
    s.open()
    assert s.outbox_counts()["delivered"] == 1 and s.outbox_counts()["queued"] == 1
    assert s.counts()["results"] == 3 and s.unpublished_count() == 2
    assert s.resend_stale(now=1059) == 0 and s.resend_stale(now=1061) == 1   # resend_at from the old rows
    s.close()


def _v3_store(db: Path) -> None:
    """A schema 3 store as the release before schema 4 left it: results without backend/fallback."""
    from edge_infer.storeschema import migrate
    db.parent.mkdir(exist_ok=True)
    con = sqlite3.connect(db, isolation_level=None)
    migrate(con, 60.0)
    con.execute("ALTER TABLE results DROP COLUMN fallback")
    con.execute("ALTER TABLE results DROP COLUMN backend")
    con.execute("INSERT INTO results (sample_id, created_at, source, model, edge_label, edge_conf, label, label_name, "
                "confidence, origin, state, offloaded, pub_seq, acked_seq) "
                "VALUES ('old', 1, '', 'm', 1, .5, 1, 'b', .5, 'edge', 'final', 0, 1, 1)")
    con.execute("PRAGMA user_version = 3")
    con.close()


def test_a_schema_3_store_is_read_as_it_is_then_upgraded_to_4(tmp_path):
    """Results before schema 4 did not record their backend: read as '' and not fallback, before and after."""
    from edge_infer.result import Result
    db = tmp_path / "state" / "edge-infer.db"
    _v3_store(db)
    ro = Store(db)
    ro.open(requeue=False)                    # `edge-infer status` on a store an older release wrote
    old = ro.get_result("old")
    assert old.backend == "" and old.fallback is False
    ro.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 3   # a look writes nothing
    s = Store(db)
    s.open()
    assert any("upgraded from schema 3 to 4" in n for n in s.report.notices)
    new = Result(sample_id="new", label=2, label_name="c", confidence=.4, origin="edge", state="final",
                 offloaded=False, edge_label=2, edge_confidence=.4, model_id="m", created_at=2.0,
                 backend="tflite-cpu", fallback=True)
    s.record_many([(new, None)])
    assert s.get_result("old").backend == "" and s.get_result("new") == new
    assert s.counts()["results"] == 2
    s.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 4


V2_SCHEMA = """
CREATE TABLE results (sample_id TEXT PRIMARY KEY, created_at REAL NOT NULL, source TEXT NOT NULL,
    model TEXT NOT NULL, edge_label INTEGER NOT NULL, edge_conf REAL NOT NULL, label INTEGER NOT NULL,
    label_name TEXT NOT NULL, confidence REAL NOT NULL, origin TEXT NOT NULL, state TEXT NOT NULL,
    offloaded INTEGER NOT NULL, corrected_at REAL, cloud_model TEXT, offload_error TEXT, offload_reason TEXT,
    source_key TEXT NOT NULL DEFAULT '', pub_seq INTEGER NOT NULL, acked_seq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX results_unpublished ON results(pub_seq) WHERE pub_seq > acked_seq;
CREATE INDEX results_created ON results(created_at);
CREATE INDEX results_source_key ON results(source_key) WHERE source_key != '';
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, state TEXT NOT NULL, content_type TEXT NOT NULL,
    payload BLOB, size INTEGER NOT NULL DEFAULT 0, user_props BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    applied INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX outbox_state ON outbox(state, seq);
PRAGMA user_version = 2;
"""
