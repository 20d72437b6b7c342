"""Store-and-forward under faults, with real Mosquitto and real processes.

Each test prints its figures (produced, offloaded, delivered, corrected, lost,
applied twice) and asserts that nothing is lost and nothing applied twice.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_infer.tools.localbroker import LocalBroker, free_port, stop_process
from edge_infer.preprocess import encode_png
from edge_infer.service import EdgeService
from edge_infer.store import Store

from ..conftest import CLOUD_CARD, device_toml, drained, unique, wait_for
from ..integration.helpers import device_config

pytestmark = pytest.mark.faults


class WorkerProcess:
    def __init__(self, tmp: Path, port: int, worker_id: str, group: str) -> None:
        cfg = tmp / f"{worker_id}.toml"
        cfg.write_text(f'[model]\ncard = "{CLOUD_CARD}"\n[worker]\nid = "{worker_id}"\ngroup = "{group}"\n'
                       f'[mqtt]\nport = {port}\nreconnect_min_s = 0.2\nreconnect_max_s = 1\n')
        self.log = open(tmp / f"{worker_id}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_infer_cloud", "run", "--config", str(cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def wait_worker_ready(port: int, worker_id: str) -> None:
    from ..conftest import Recorder
    topic = f"edge-infer/_workers/{worker_id}/status"
    rec = Recorder(port, topic)
    try:
        wait_for(lambda: any(m.get("state") == "online" for m in rec.json(topic)), timeout=60,
                 what=f"{worker_id} online")
    finally:
        rec.close()


def figures(store: Store, produced: int, name: str) -> dict:
    a = store.audit()
    c = store.outbox_counts()
    lost_results = produced - a["results"]
    open_samples = c["queued"] + c["inflight"] + c["delivered"]
    f = {"produced": produced, "results": a["results"], "offloaded": a["offloaded"],
         "delivered_or_corrected": c["delivered"] + c["corrected"], "corrected": c["corrected"],
         "evicted": c["evicted"], "expired": c["expired"], "failed": c["failed"],
         "held": open_samples,
         # an input is lost if it has no result, or if it was offloaded and is neither corrected,
         # accounted for (evicted / expired / failed, each counted) nor still held in the outbox
         "lost": lost_results + (a["offloaded"] - a["corrected_results"] - c["evicted"] - c["expired"]
                                 - c["failed"] - open_samples),
         "applied_twice": a["applied_twice"]}
    print(f"\n[{name}] " + " ".join(f"{k}={v}" for k, v in f.items()))
    return f


def stream_with_faults(svc: EdgeService, images, faults: dict, name: str) -> tuple[list, dict]:
    """Classify every image, injecting ``faults[i]()`` before input i; wait until drained; the figures."""
    results = []
    for i, im in enumerate(images):
        if i in faults:
            faults[i]()
        results.append(svc.classify(im))
    svc.flush()   # committed first: before that the outbox looks drained
    wait_for(lambda: drained(svc.store), timeout=120, what=f"{name}: everything corrected")
    return results, figures(svc.store, len(images), name)


@pytest.fixture
def own_broker(tmp_path):
    b = LocalBroker(tmp_path / "broker", persistence=True)
    b.start()
    yield b
    b.stop()


def test_broker_down_mid_stream_then_back(tmp_path, own_broker, fmnist):
    wid = unique("w")
    worker = WorkerProcess(tmp_path, own_broker.port, wid, unique("g"))
    svc = EdgeService(device_config(tmp_path, own_broker.port, resend_after_s=5.0))
    images = fmnist["test"].images[:3000]
    try:
        wait_worker_ready(own_broker.port, wid)
        svc.start()
        wait_for(svc.link.connected.is_set)
        results, f = stream_with_faults(svc, images, {
            1000: own_broker.stop,      # the broker goes away mid-stream
            2000: own_broker.start,     # ... and comes back with its persisted state
        }, "broker down 1000..2000")
        assert all(r.origin == "edge" for r in results)   # every input got a local answer at once
        assert f["results"] == 3000 and f["corrected"] == f["offloaded"] > 0
        assert f["lost"] == 0 and f["applied_twice"] == 0
    finally:
        svc.stop()
        worker.stop()


def test_device_killed_mid_stream_and_restarted(tmp_path, broker, fmnist):
    group, wid, dev = unique("g"), unique("w"), unique("dev")
    worker = WorkerProcess(tmp_path, broker.port, wid, group)
    wait_worker_ready(broker.port, wid)
    spool = tmp_path / "spool"
    spool.mkdir()
    n = 1500
    for i, im in enumerate(fmnist["test"].images[:n]):
        (spool / f".{i}").write_bytes(encode_png(im))
        os.rename(spool / f".{i}", spool / f"{i:05d}.png")
    cfg = device_toml(tmp_path, broker.port, device_id=dev, outbox="resend_after_s = 5",
                      spool=f'dir = "{spool}"\npoll_interval_s = 0.05')
    done = spool / "done"
    cmd = [sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)]
    try:
        p1 = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        wait_for(lambda: done.exists() and len(os.listdir(done)) >= 500, timeout=60, what="500 files done")
        p1.send_signal(signal.SIGKILL)
        p1.wait()
        killed_at = len(os.listdir(done))
        p2 = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(os.listdir(done)) == n, timeout=120, what="all files done after restart")
            store = Store(tmp_path / "state" / "edge-infer.db")
            store.open(requeue=False)
            wait_for(lambda: drained(store), timeout=120, what="outbox drained after restart")
            sources = {r.source for r in store.all_results()}
            f = figures(store, n, f"device SIGKILL after {killed_at} files")
            store.close()
        finally:
            p2.terminate()
            p2.wait(timeout=20)
        assert sources == {f"{i:05d}.png" for i in range(n)}      # every input has a result
        assert [x for x in os.listdir(spool) if not x.startswith(".") and x not in ("done", "failed")] == []
        # a file classified but not yet moved when killed is recognised and not classified again
        assert f["results"] == n
        f["lost"] = n - len(sources) + (f["offloaded"] - f["corrected"] - f["evicted"] - f["expired"] - f["failed"])
        assert f["lost"] == 0 and f["applied_twice"] == 0 and f["corrected"] > 0
    finally:
        worker.stop()


def test_one_of_two_workers_killed_mid_stream(tmp_path, broker, fmnist):
    group = unique("g")
    w1, w2 = unique("w"), unique("w")
    workers = [WorkerProcess(tmp_path, broker.port, w1, group), WorkerProcess(tmp_path, broker.port, w2, group)]
    for w in (w1, w2):
        wait_worker_ready(broker.port, w)
    svc = EdgeService(device_config(tmp_path, broker.port, resend_after_s=3.0))
    svc.start()
    try:
        wait_for(svc.link.connected.is_set)
        images = fmnist["test"].images[:3000]
        _, f = stream_with_faults(svc, images, {1000: workers[0].kill}, "worker SIGKILL at input 1000")
        assert f["corrected"] == f["offloaded"] > 0 and f["lost"] == 0 and f["applied_twice"] == 0
    finally:
        svc.stop()
        for w in workers:
            w.stop()


def test_a_killed_workers_samples_come_back_after_the_adaptive_wait_not_the_configured_maximum(tmp_path, broker,
                                                                                                fmnist):
    """resend_after_s = 600: without the adaptive wait, the samples the killed worker held would be
    answered after ten minutes; the observed round trips make it seconds (never below the floor)."""
    group = unique("g")
    w1, w2 = unique("w"), unique("w")
    workers = [WorkerProcess(tmp_path, broker.port, w1, group), WorkerProcess(tmp_path, broker.port, w2, group)]
    for w in (w1, w2):
        wait_worker_ready(broker.port, w)
    svc = EdgeService(device_config(tmp_path, broker.port, resend_after_s=600.0, resend_after_min_s=2.0))
    svc.start()
    try:
        wait_for(svc.link.connected.is_set)
        images = fmnist["test"].images[:3000]
        for im in images[:1000]:                   # round trips observed: the wait adapts
            svc.classify(im)
        svc.flush()   # committed first: before that the outbox looks drained
        wait_for(lambda: drained(svc.store), timeout=60, what="first 1000 corrected")
        workers[0].proc.send_signal(signal.SIGSTOP)   # it takes its share of samples and answers none ...
        for im in images[1000:2000]:
            svc.classify(im)
        wait_for(lambda: svc.store.outbox_counts().get("queued", 0) == 0, timeout=60, what="all sent")
        time.sleep(1.0)
        workers[0].kill()                             # ... and dies holding them
        t0 = time.monotonic()
        for im in images[2000:]:
            svc.classify(im)
        svc.flush()   # committed first: before that the outbox looks drained
        wait_for(lambda: drained(svc.store), timeout=90, what="every sample corrected after the kill")
        took = time.monotonic() - t0
        f = figures(svc.store, len(images), "worker SIGSTOP + SIGKILL, adaptive resend")
        assert f["corrected"] == f["offloaded"] > 0 and f["lost"] == 0 and f["applied_twice"] == 0
        assert svc.counters.get("resent") > 0
        assert 2.0 <= svc.store.resend_after_s < 60, svc.store.resend_after_s
        print(f"\nadaptive resend wait {svc.store.resend_after_s:.2f}s (ceiling 600 s), "
              f"{svc.counters.get('resent')} resent, all corrected {took:.1f}s after the kill")
    finally:
        svc.stop()
        for w in workers:
            w.stop()


def test_disk_budget_smaller_than_offline_backlog(tmp_path, fmnist):
    port = free_port()
    svc = EdgeService(device_config(tmp_path, port, max_bytes=40_000))   # offline: no broker on this port
    svc.start()
    try:
        images = fmnist["test"].images[:2000]
        results = [svc.classify(im) for im in images]
        svc.flush()
        f = figures(svc.store, len(images), "budget 40 kB, offline")
        assert f["results"] == 2000                     # every local result is kept
        assert f["evicted"] > 0 and svc.counters.get("evicted") == f["evicted"]
        held = svc.store.outbox_counts()["queued"]
        evicted_ids = [r.sample_id for r in results if r.offloaded and svc.store.outbox_state(r.sample_id)[0] == "evicted"]
        queued_ids = [r.sample_id for r in results if r.offloaded and svc.store.outbox_state(r.sample_id)[0] == "queued"]
        assert len(queued_ids) == held and len(evicted_ids) == f["evicted"]
        # the policy: oldest uncorrected first, so everything still queued is newer than everything evicted
        order = {r.sample_id: i for i, r in enumerate(results)}
        assert max(order[s] for s in evicted_ids) < min(order[s] for s in queued_ids)
        for sid in evicted_ids[:20]:
            r = svc.result(sid)
            assert r.state == "final" and r.origin == "edge" and "evicted" in r.offload_error
        assert svc.status()["counters"]["evicted"] == f["evicted"]
        assert f["lost"] == 0
    finally:
        svc.stop()


def test_broker_restarted_without_persistence_while_in_flight(tmp_path, fmnist):
    b = LocalBroker(tmp_path / "volatile", persistence=False).start()
    group, wid = unique("g"), unique("w")
    worker = WorkerProcess(tmp_path, b.port, wid, group)
    svc = EdgeService(device_config(tmp_path, b.port, resend_after_s=3.0))
    try:
        wait_worker_ready(b.port, wid)
        svc.start()
        wait_for(svc.link.connected.is_set)
        images = fmnist["test"].images[:2000]
        # everything the broker held is gone
        _, f = stream_with_faults(svc, images, {800: lambda: (b.kill(), b.start())},
                                  "broker restarted without persistence at 800")
        assert f["corrected"] == f["offloaded"] > 0 and f["lost"] == 0 and f["applied_twice"] == 0
    finally:
        svc.stop()
        worker.stop()
        b.stop()


def test_database_copied_mid_write_opens_and_resumes(tmp_path, fmnist):
    """Power-loss style: a copy of the database and its WAL taken while the service writes."""
    import shutil
    import threading
    svc = EdgeService(device_config(tmp_path, free_port(), threshold=1.0))   # offline, all offloaded
    svc.start()
    stop = threading.Event()

    def stream():
        i = 0
        while not stop.is_set():
            svc.classify(fmnist["test"].images[i % 1000])
            i += 1

    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(0.5)
        snap = tmp_path / "snap"
        snap.mkdir()
        db = tmp_path / "state" / "edge-infer.db"
        for suffix in ("", "-wal"):
            if Path(str(db) + suffix).exists():
                shutil.copy(str(db) + suffix, snap / ("edge-infer.db" + suffix))
    finally:
        stop.set()
        t.join()
        svc.stop()
    copy = Store(snap / "edge-infer.db")
    copy.open()
    import sqlite3
    conn = sqlite3.connect(snap / "edge-infer.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    a = copy.audit()
    # every stored result has its outbox row (they are written in one transaction)
    assert a["offloaded"] == sum(copy.outbox_counts().values()) > 0
    print(f"\n[db copy mid-write] results={a['results']} outbox={copy.outbox_counts()}")
    copy.close()
