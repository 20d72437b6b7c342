"""Isolation drills: the inference child killed (SIGKILL, SIGABRT), hung and unplugged, many times, while
real Fashion-MNIST test images stream through the spool of a real `edge-infer run` process and through
the classify() API, with a real Mosquitto and a real cloud worker.

The backend is the real tflite-cpu runtime, isolated (`isolate = true`). Each drill prints its figures
(kills by signal, inputs, lost, duplicates) and asserts that every input got exactly one first result
and every offloaded one exactly one correction, and that the service process never changed.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_infer.backends.isolated_child import FAILPOINT_ENV
from edge_infer.config import DeviceConfig, ModelConfig, MqttConfig, OutboxConfig, PolicyConfig
from edge_infer.errors import InferenceUnavailable
from edge_infer.preprocess import encode_png
from edge_infer.service import EdgeService
from edge_infer.store import Store

from ..conftest import EDGE_CARD, Recorder, drained, unique, wait_for
from .test_faults import WorkerProcess, wait_worker_ready

pytestmark = pytest.mark.faults

FAST = dict(invoke_timeout_s=0.5, restart_min_s=0.1, restart_max_s=0.5)


def fallback_card(tmp: Path) -> Path:
    """The shipped int8 model under its own card name: fallback answers are told apart by their model id."""
    data = json.loads(EDGE_CARD.read_text())
    data["name"] = "fmnist-edge-fallback"
    data["file"] = str(EDGE_CARD.parent / data["file"])
    card = tmp / "fallback" / "card.json"
    card.parent.mkdir()
    card.write_text(json.dumps(data))
    return card


def inference_children(pid: int) -> list[int]:
    """Live isolated-child processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"isolated_child" in cmd:
            found.append(int(entry))
    return found


def next_child(pid: int, not_in: set[int], timeout: float = 30.0) -> int:
    box: list[int] = []

    def fresh() -> bool:
        box[:] = [c for c in inference_children(pid) if c not in not_in]
        return bool(box)

    wait_for(fresh, timeout=timeout, what="a fresh inference child")
    return box[0]


class Faults:
    """Kills, hangs and unplugs the inference child of process ``pid``, one child at a time, each once it is
    up (``ready(pid)``) and has answered for a moment: a child that never answered is not retried at once."""

    def __init__(self, pid: int, hang: Path, unplug: Path, ready) -> None:
        self.pid, self.hang, self.unplug, self.ready = pid, hang, unplug, ready
        self.seen: set[int] = set()
        self.done: collections.Counter[str] = collections.Counter()

    def one(self, kind: str) -> None:
        while True:   # children that fail to load (unplugged) come and go: the next one that is up
            child = next_child(self.pid, self.seen)
            self.seen.add(child)
            wait_for(lambda c=child: self.ready(c) or c not in inference_children(self.pid), timeout=30,
                     what=f"child {child} up or gone")
            if self.ready(child):
                break
        time.sleep(0.2)
        if kind in ("SIGKILL", "SIGABRT"):
            os.kill(child, getattr(signal, kind))
        elif kind == "hang":
            self.hang.touch()                # its next invoke never returns: killed at invoke_timeout_s
            wait_for(lambda: not self.hang.exists(), timeout=20, what="the hang failpoint consumed")
        elif kind == "unplug":
            self.unplug.touch()              # the running child aborts; fresh ones cannot load
            time.sleep(1.0)
            self.unplug.unlink()
        wait_for(lambda: child not in inference_children(self.pid), timeout=20, what=f"child {child} gone")
        self.done[kind] += 1


def status_states(rec: Recorder, topic: str) -> list[tuple[str, str | None]]:
    """(state, inference state) of every retained status the device published, in order."""
    return [(m["state"], (m.get("inference") or {}).get("state")) for m in rec.json(topic)]


def one_first_result_one_correction(rec: Recorder, topic: str, ids: set[str], offloaded: set[str]) -> tuple[int, int]:
    """Every sample's published results: exactly one edge answer each, exactly one cloud one per offloaded.
    Returns (lost, duplicates)."""
    edge, cloud = collections.Counter(), collections.Counter()
    for r in rec.results(topic):
        (edge if r["origin"] == "edge" else cloud)[r["sample_id"]] += 1
    lost = sum(1 for s in ids if edge[s] == 0) + sum(1 for s in offloaded if cloud[s] == 0)
    dups = sum(n - 1 for n in edge.values() if n > 1) + sum(n - 1 for n in cloud.values() if n > 1)
    assert set(edge) == ids and set(cloud) == offloaded
    return lost, dups


def test_spool_drill_child_killed_hung_unplugged_with_cpu_fallback(tmp_path, broker, fmnist):
    dev, wid = unique("iso"), unique("w")
    worker = WorkerProcess(tmp_path, broker.port, wid, unique("g"))
    spool, state = tmp_path / "spool", tmp_path / "state"
    spool.mkdir()
    hang, unplug = tmp_path / "hang-now", tmp_path / "unplugged"
    unplug.touch()   # the accelerator is missing when the service starts
    cfg = tmp_path / "edge-infer.toml"
    cfg.write_text(
        f'device_id = "{dev}"\nstate_dir = "{state}"\n'
        f'[model]\ncard = "{EDGE_CARD}"\nbackend = "tflite-cpu"\nisolate = true\nfallback = "cpu"\n'
        f'fallback_card = "{fallback_card(tmp_path)}"\n' + "".join(f"{k} = {v}\n" for k, v in FAST.items()) +
        f'[mqtt]\nport = {broker.port}\nreconnect_max_s = 1\n[outbox]\nresend_after_s = 5\n'
        f'[spool]\ndir = "{spool}"\npoll_interval_s = 0.05\n')
    status_topic, results_topic = f"edge-infer/{dev}/status", f"edge-infer/{dev}/results"
    rec = Recorder(broker.port, status_topic, results_topic)
    test_images = fmnist["test"].images
    fed: list[int] = []
    stop_feed = threading.Event()

    def feed() -> None:
        # ~250 inputs a second (a camera or two) until the drill is over: real test images, each once
        for i, im in enumerate(test_images):
            if stop_feed.is_set() and i >= 2000:
                return
            (spool / f".{i}").write_bytes(encode_png(im))
            os.rename(spool / f".{i}", spool / f"{i:05d}.png")
            fed.append(i)
            if i % 25 == 24:
                time.sleep(0.1)

    log = open(tmp_path / "service.log", "w")
    env = {**os.environ, FAILPOINT_ENV: f"child_hang_when={hang},child_missing_while={unplug}"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    feeder = threading.Thread(target=feed)
    t0 = time.monotonic()
    try:
        wait_worker_ready(broker.port, wid)
        feeder.start()
        done = spool / "done"
        # started without its backend: degraded, answered by the fallback, retried in the background
        wait_for(lambda: ("degraded", "degraded") in status_states(rec, status_topic), timeout=30,
                 what="status degraded at start")
        wait_for(lambda: done.exists() and len(os.listdir(done)) >= 100, timeout=30, what="100 answered degraded")
        unplug.unlink()   # plugged in: the service returns to it by itself
        wait_for(lambda: status_states(rec, status_topic)[-1] == ("online", "healthy"), timeout=30,
                 what="status healthy again")
        service_log = tmp_path / "service.log"

        def up(child: int) -> bool:   # the service's own line for each child that came up
            return f"inference child (pid {child}) is up" in service_log.read_text()

        faults = Faults(proc.pid, hang, unplug, up)
        for kind in ["SIGKILL", "SIGABRT", "hang", "SIGKILL", "unplug", "SIGABRT", "hang", "SIGKILL", "SIGABRT",
                     "hang", "SIGKILL", "SIGABRT", "unplug", "SIGKILL"]:
            assert proc.poll() is None, "the service died"
            faults.one(kind)
        stop_feed.set()
        feeder.join(120)
        images = [test_images[i] for i in fed]
        wait_for(lambda: len(os.listdir(done)) == len(images), timeout=60, what="every file answered")
        store = Store(state / "edge-infer.db")
        store.open(requeue=False)
        try:
            wait_for(lambda: drained(store), timeout=90, what="every offloaded input corrected")
            results = store.all_results()
            audit, outbox = store.audit(), store.outbox_counts()
        finally:
            store.close()
        # the process started at the beginning is the one answering now: never restarted
        assert proc.poll() is None
        next_child(proc.pid, faults.seen)
        wait_for(lambda: status_states(rec, status_topic)[-1] == ("online", "healthy"), timeout=30,
                 what="healthy at the end")
        ids = {r.sample_id for r in results}
        offloaded = {r.sample_id for r in results if r.offloaded}
        wait_for(lambda: len({r["sample_id"] for r in rec.results(results_topic) if r["origin"] == "cloud"})
                 == len(offloaded), timeout=30, what="every correction published")
        lost, dups = one_first_result_one_correction(rec, results_topic, ids, offloaded)
        sources = collections.Counter(r.source for r in results)
        fallback = [r for r in results if r.fallback]
        lines = service_log.read_text()
        figures = {"inputs": len(images), "results": len(results), "kills": dict(faults.done),
                   "fallback_answers": len(fallback), "offloaded": len(offloaded), "corrected": outbox["corrected"],
                   "lost": lost + len(images) - len(sources), "duplicates": dups + sum(n - 1 for n in sources.values()),
                   "applied_twice": audit["applied_twice"], "degraded_warnings": lines.count("inference DEGRADED"),
                   "seconds": round(time.monotonic() - t0, 1), "service_pid": proc.pid}
        print(f"\n[isolation drill, spool] {figures}")
        assert set(sources) == {f"{i:05d}.png" for i in range(len(images))} and len(results) == len(images)
        assert figures["lost"] == 0 and figures["duplicates"] == 0 and audit["applied_twice"] == 0
        assert outbox["corrected"] == len(offloaded) > 0
        assert sum(faults.done.values()) >= 14 and not list((spool / "failed").glob("*"))
        # results say who answered: the fallback (its own model id) at start and while unplugged
        assert fallback and {r.model_id for r in fallback} == {"fmnist-edge-fallback:1.0.0"}
        assert all(r.backend == "tflite-cpu" for r in results)
        # loud, not per input: one warning per state change
        assert 1 <= figures["degraded_warnings"] <= sum(faults.done.values()) + 1 < len(fallback)
        assert "Traceback" not in lines
        # the retained status while degraded: the reason, the counter, the time since last healthy
        degraded = [m["inference"] for m in rec.json(status_topic) if m.get("inference", {}).get("state") == "degraded"]
        assert degraded and all(d["reason"] and d["fallback"] == "fmnist-edge-fallback:1.0.0 on tflite-cpu"
                                for d in degraded)
        assert degraded[0]["since_healthy_s"] is None                   # missing since the start
        assert any(isinstance(d["since_healthy_s"], float) for d in degraded[1:])
        assert max(d["fallback_answers"] for d in degraded) > 0
    finally:
        stop_feed.set()
        if feeder.is_alive():
            feeder.join()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        rec.close()
        worker.stop()
    assert inference_children(proc.pid) == []


def api_config(tmp_path: Path, port: int, **model) -> DeviceConfig:
    return DeviceConfig(
        device_id=unique("iso-api"), state_dir=tmp_path / "state",
        model=ModelConfig(card=EDGE_CARD, isolate=True, **{**FAST, **model}), policy=PolicyConfig(threshold=0.9),
        mqtt=MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        outbox=OutboxConfig(resend_after_s=5.0))


def test_api_drill_no_fallback_children_killed_and_hung(tmp_path, broker, fmnist, monkeypatch):
    """classify() from two threads while the child is killed and hung; no fallback: the in-flight input is
    retried on a fresh child, an input that still cannot be answered raises InferenceUnavailable (the
    caller submits it again), and the watchdog stays healthy while it recovers."""
    wid = unique("w")
    worker = WorkerProcess(tmp_path, broker.port, wid, unique("g"))
    hang, unplug = tmp_path / "hang-now", tmp_path / "unplugged"
    monkeypatch.setenv(FAILPOINT_ENV, f"child_hang_when={hang},child_missing_while={unplug}")
    svc = EdgeService(api_config(tmp_path, broker.port))
    images = fmnist["test"].images[3000:5000]
    answered: list = []
    errors: list[str] = []
    unhealthy: list[str] = []
    stop = threading.Event()

    def client(part) -> None:
        for im in part:
            while True:
                try:
                    answered.append(svc.classify(im))
                    break
                except InferenceUnavailable as exc:   # said clearly; the input is submitted again
                    errors.append(str(exc))
                    time.sleep(0.05)
            time.sleep(0.002)

    def watchdog() -> None:
        while not stop.wait(0.1):
            ok, why = svc.healthy(max_invoke_s=15.0)
            if not ok:
                unhealthy.append(why)

    try:
        wait_worker_ready(broker.port, wid)
        svc.start()
        wait_for(svc.link.connected.is_set)
        threads = [threading.Thread(target=client, args=(images[i::2],)) for i in range(2)]
        threads.append(threading.Thread(target=watchdog))
        for t in threads:
            t.start()
        iso = svc.classifier._isolated
        faults = Faults(os.getpid(), hang, unplug, lambda child: iso.pid == child and iso.problem() is None)
        for kind in ["SIGKILL", "SIGABRT", "hang", "SIGABRT", "SIGKILL", "hang", "SIGKILL", "SIGABRT", "hang",
                     "SIGKILL", "SIGABRT", "SIGKILL"]:
            faults.one(kind)
        for t in threads[:2]:
            t.join(120)
        stop.set()
        threads[2].join()
        svc.flush()
        wait_for(lambda: drained(svc.store), timeout=90, what="every offloaded input corrected")
        results = svc.store.all_results()
        audit, outbox = svc.store.audit(), svc.store.outbox_counts()
        ids = [r.sample_id for r in answered]
        c = svc.counters
        figures = {"inputs": len(images), "answered": len(answered), "stored": len(results), "kills": dict(faults.done),
                   "retried_on_fresh_child": c.get("inference_retries"), "unavailable_resubmitted": len(errors),
                   "child_failures": c.get("backend_child_failures"), "lost": len(images) - len(set(ids)),
                   "duplicates": len(results) - len(set(r.sample_id for r in results)),
                   "applied_twice": audit["applied_twice"], "unhealthy_ticks": len(unhealthy)}
        print(f"\n[isolation drill, API] {figures}")
        assert len(answered) == len(images) and {r.sample_id for r in results} == set(ids)
        assert figures["lost"] == 0 and figures["duplicates"] == 0 and audit["applied_twice"] == 0
        assert outbox["corrected"] == audit["offloaded"] > 0
        assert c.get("backend_child_failures") >= 12 and c.get("inference_retries") >= 3   # the hangs at least
        assert all("No fallback is configured" in e and "submit it again" in e for e in errors)
        assert unhealthy == []          # recovering within the grace: the watchdog is still pinged
        assert svc.status()["inference"]["state"] == "healthy" and not any(r.fallback for r in results)
    finally:
        stop.set()
        svc.stop()
        worker.stop()
    assert inference_children(os.getpid()) == []


def test_lost_without_fallback_fails_the_watchdog_after_the_grace_then_recovers(tmp_path, fmnist, monkeypatch):
    unplug = tmp_path / "unplugged"
    monkeypatch.setenv(FAILPOINT_ENV, f"child_missing_while={unplug}")
    svc = EdgeService(api_config(tmp_path, 1, failure_grace_s=1.0, restart_max_s=0.3))
    svc.start(connect=False)
    try:
        im = fmnist["test"].images[0]
        svc.classify(im)
        unplug.touch()
        with pytest.raises(InferenceUnavailable, match="died of SIGABRT"):
            svc.classify(im)
        assert svc.healthy()[0] and svc.status()["inference"]["state"] == "recovering"
        assert svc.status()["state"] == "degraded"
        time.sleep(1.3)
        ok, why = svc.healthy()
        assert not ok and "failure_grace_s" in why and "no fallback" in why
        st = svc.status()["inference"]
        assert st["state"] == "lost" and "no accelerator" in st["reason"] and st["since_healthy_s"] >= 1.0
        unplug.unlink()
        wait_for(lambda: svc.healthy()[0], timeout=10, what="healthy once it is back")
        assert svc.classify(im).backend == "tflite-cpu" and svc.status()["state"] == "online"
    finally:
        svc.stop()


def test_missing_at_start_without_fallback_exits_2_with_the_backends_message(tmp_path):
    unplug = tmp_path / "unplugged"
    unplug.touch()
    cfg = tmp_path / "edge-infer.toml"
    cfg.write_text(f'device_id = "{unique("iso")}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[model]\ncard = "{EDGE_CARD}"\nisolate = true\n[mqtt]\nport = 1\n')
    env = {**os.environ, FAILPOINT_ENV: f"child_missing_while={unplug}"}
    p = subprocess.run([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "cannot start" in p.stderr and f"no accelerator while {unplug} exists" in p.stderr
    assert 'fallback = \\"cpu\\"' in p.stderr or 'fallback = "cpu"' in p.stderr
    assert "Traceback" not in p.stderr
