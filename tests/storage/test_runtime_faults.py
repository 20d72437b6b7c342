"""The store failing under a running service: degraded, no input classified twice, recovery by itself."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from edge_infer.config import StoreConfig
from edge_infer.errors import StoreUnavailable
from edge_infer.localbroker import free_port
from edge_infer.preprocess import encode_png
from edge_infer.service import EdgeService

from ..conftest import wait_for
from ..integration.helpers import device_config

pytestmark = pytest.mark.storage


def _service(tmp_path, state_dir, spool=None, **store):
    cfg = device_config(tmp_path, free_port(), spool=spool)   # no broker: the store is what is tested
    cfg = replace(cfg, state_dir=state_dir, store=replace(StoreConfig(), **store))
    svc = EdgeService(cfg)
    svc.start()
    return svc


def test_disk_full_pauses_the_spool_reports_degraded_and_recovers_without_duplicates(tmp_path, small_fs, fmnist,
                                                                                      caplog):
    fs = small_fs("4m")
    spool = tmp_path / "spool"
    svc = _service(tmp_path, fs.path / "state", spool=spool, degraded_grace_s=2.0)
    caplog.set_level(logging.INFO)
    try:
        assert svc.status()["state"] == "online"
        fs.fill()
        images = fmnist["test"].images[:300]
        for i, im in enumerate(images):
            (spool / f".{i:04d}.png").write_bytes(encode_png(im))
            (spool / f".{i:04d}.png").rename(spool / f"{i:04d}.png")
        wait_for(lambda: svc.status()["state"] == "degraded", what="degraded")
        st = svc.status()
        assert st["store"]["problem"] == "disk_full" and "full" in st["store"]["reason"]
        assert st["counters"]["store_errors"] >= 1
        wait_for(lambda: not svc.healthy()[0], timeout=10, what="watchdog sees the grace period pass")
        assert "store cannot commit" in svc.healthy()[1]
        # The spool waits on its first chunk: nothing moved, nothing read twice, the rest untouched.
        assert not list((spool / "done").iterdir())
        pending = svc._enqueued - svc._committed
        assert 0 < pending <= 32
        assert svc.counters.get("spool_processed") == 0
        fs.free()
        wait_for(lambda: len(list((spool / "done").iterdir())) == 300, timeout=60, what="spool drained after space "
                 "returned")
        assert svc.status()["state"] == "online" and svc.healthy()[0]
        audit = svc.store.audit()
        assert audit["results"] == 300, audit             # each input classified exactly once
        sources = [r.source for r in svc.store.all_results()]
        assert sorted(sources) == sorted(f"{i:04d}.png" for i in range(300))
        assert svc.counters.get("store_recoveries") == 1
        assert svc.status()["outbox"]["queued"] == audit["offloaded"]   # each offloaded sample queued once
    finally:
        svc.stop()
    text = caplog.text
    assert "Traceback" not in text
    degraded_lines = [r for r in caplog.records if "store degraded" in r.getMessage()]
    assert 1 <= len(degraded_lines) <= 3, [r.getMessage() for r in degraded_lines]


def test_classify_answers_from_memory_within_the_bound_then_fails_clearly(tmp_path, small_fs, fmnist):
    fs = small_fs("4m")
    svc = _service(tmp_path, fs.path / "state", max_pending=20, max_wait_s=0.3)
    try:
        fs.fill()
        images = fmnist["test"].images
        answered = [svc.classify(images[i]) for i in range(20)]       # from memory: the store cannot commit
        assert len(answered) == 20
        with pytest.raises(StoreUnavailable, match="waiting for the store.*full"):
            svc.classify(images[20])
        assert svc.counters.get("store_unavailable") == 1 and svc.counters.get("backpressure_waits") >= 1
        assert svc.status()["store"]["pending_writes"] == 20
        fs.free()
        assert svc.flush(timeout=30)
        assert svc.classify(images[21]).label >= 0                   # accepted again
        assert svc.flush(timeout=10)
        assert svc.store.audit()["results"] == 21
        assert {r.sample_id for r in answered} <= {r.sample_id for r in svc.store.all_results()}
    finally:
        svc.stop()


def test_backpressure_holds_a_full_speed_burst_to_the_bound(tmp_path, fmnist):
    svc = _service(tmp_path, tmp_path / "state", max_pending=16)
    peak = 0
    try:
        images = fmnist["test"].images[:3000]
        for im in images:
            svc.classify(im)
            peak = max(peak, svc._enqueued - svc._committed)
        assert svc.flush()
        assert peak <= 16
        assert svc.store.audit()["results"] == 3000
    finally:
        svc.stop()


def test_stop_with_a_store_that_cannot_commit_ends_in_time_and_says_what_is_lost(tmp_path, small_fs, fmnist,
                                                                                 caplog):
    import time
    fs = small_fs("4m")
    svc = _service(tmp_path, fs.path / "state")
    fs.fill()
    for im in fmnist["test"].images[:10]:
        svc.classify(im)
    wait_for(lambda: svc.status()["state"] == "degraded", what="degraded")
    t0 = time.monotonic()
    svc.stop()
    assert time.monotonic() - t0 < 15
    assert svc.counters.get("results_lost_at_stop") == 10
    assert "10 result(s) that could not be stored" in caplog.text
