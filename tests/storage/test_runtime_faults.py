"""The store failing under a running service: degraded, no input classified twice, recovery by itself."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from edge_infer.config import StoreConfig
from edge_infer.errors import StoreUnavailable
from edge_infer.tools.localbroker import free_port
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
        pending = svc.writer.pending
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
    svc = _service(tmp_path, fs.path / "state", max_pending=64, max_wait_s=0.3)
    try:
        fs.fill()
        images = fmnist["test"].images
        answered = [svc.classify(images[i]) for i in range(64)]       # from memory: the store cannot commit
        assert len(answered) == 64
        with pytest.raises(StoreUnavailable, match="waiting for the store.*full"):
            svc.classify(images[64])
        assert svc.counters.get("store_unavailable") == 1 and svc.counters.get("backpressure_waits") >= 1
        assert svc.status()["store"]["pending_writes"] == 64
        fs.free()
        assert svc.flush(timeout=30)
        assert svc.classify(images[65]).label >= 0                   # accepted again
        assert svc.flush(timeout=10)
        assert svc.store.audit()["results"] == 65
        assert {r.sample_id for r in answered} <= {r.sample_id for r in svc.store.all_results()}
    finally:
        svc.stop()


def test_backpressure_holds_a_full_speed_burst_to_the_bound(tmp_path, fmnist):
    svc = _service(tmp_path, tmp_path / "state", max_pending=64)
    peak = 0
    try:
        images = fmnist["test"].images[:3000]
        for im in images:
            svc.classify(im)
            peak = max(peak, svc.writer.pending)
        assert svc.flush()
        assert peak <= 64
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


def test_a_store_that_cannot_record_sends_sends_each_sample_once_and_says_degraded(tmp_path, small_fs, fmnist):
    """Samples queued before the disk filled, then the broker comes: the link worker cannot write 'inflight';
    it must not send the same rows again every turn, and the retained status must say degraded."""
    from collections import Counter

    from edge_infer.tools.localbroker import LocalBroker

    from ..conftest import Recorder
    fs = small_fs("4m")
    port = free_port()
    cfg = replace(device_config(tmp_path, port, threshold=1.0), state_dir=fs.path / "state")   # all offloaded
    svc = EdgeService(cfg)
    svc.start()
    try:
        for im in fmnist["test"].images[:40]:
            svc.classify(im)
        assert svc.flush()
        fs.fill()
        with LocalBroker(tmp_path / "late", port=port) as b:
            rec = Recorder(b.port, svc.topics.samples, svc.topics.status)
            try:
                wait_for(lambda: any(m.get("state") == "degraded" for m in rec.json(svc.topics.status)), timeout=10,
                         what="degraded status published")
                time.sleep(3)   # many link-worker turns
                sent = Counter(m.properties.CorrelationData for m in rec.on(svc.topics.samples))
                assert sent and max(sent.values()) == 1, sent.most_common(3)
                status = [m for m in rec.json(svc.topics.status) if m.get("state") == "degraded"][-1]
                assert status["store"]["problem"] == "disk_full"
                fs.free()
                wait_for(lambda: svc.status()["state"] == "online", timeout=20, what="recovered")
                wait_for(lambda: any(m.get("state") == "online" for m in rec.json(svc.topics.status)[-1:]),
                         timeout=10, what="online status published again")
                wait_for(lambda: svc.store.outbox_counts()["delivered"] == 40, timeout=20, what="all 40 delivered")
                wait_for(lambda: len({m.properties.CorrelationData for m in rec.on(svc.topics.samples)}) == 40,
                         what="the subscriber has all 40")
                time.sleep(0.3)
                sent = Counter(m.properties.CorrelationData for m in rec.on(svc.topics.samples))
                assert max(sent.values()) == 1, sent.most_common(3)
            finally:
                rec.close()
    finally:
        svc.stop()


def test_spool_files_are_classified_once_when_the_bound_is_reached_mid_chunk(tmp_path, small_fs, fmnist):
    fs = small_fs("4m")
    spool = tmp_path / "spool"
    svc = _service(tmp_path, fs.path / "state", spool=spool, max_pending=64, max_wait_s=0.3)
    try:
        fs.fill()
        images = fmnist["test"].images
        for i in range(60):
            svc.classify(images[i])                      # API callers take most of the bound
        for i in range(40):
            (spool / f".{i:03d}.png").write_bytes(encode_png(images[100 + i]))
            (spool / f".{i:03d}.png").rename(spool / f"{i:03d}.png")
        wait_for(lambda: svc.counters.get("store_unavailable") >= 1, what="the spool ran into the bound")
        time.sleep(1.0)
        fs.free()
        wait_for(lambda: len(list((spool / "done").iterdir())) == 40, timeout=60, what="spool drained")
        assert svc.flush()
        sources = [r.source for r in svc.store.all_results() if r.source]
        assert sorted(sources) == [f"{i:03d}.png" for i in range(40)]      # each spool file exactly once
    finally:
        svc.stop()
