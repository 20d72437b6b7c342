#!/usr/bin/env python3
"""Store scale benchmark: does what the store holds slow the device down? In one run.

    .venv/bin/python bench/store_scale_bench.py [--files 4000] [--calls 5000] [--out out/store-scale.json]

1. spool:   a real EdgeService (offline: its broker port has no listener) classifies
            N spool files (PNG, Fashion-MNIST test split) until all are in done/, on an
            EMPTY store and on one PRE-FILLED with 100,000 results + 100,000 queued
            samples (written with Store.record_many, ~800-byte payloads, distinct
            source keys), interleaved in rounds; then classify() on arrays (direct API)
            on the same service. Reported: files/s, wall and CPU us per file, classify()
            us per call and per input until committed, and per-round ratios
            prefilled/empty (goal >= 0.9). Also the cost of one maintenance pass
            (resend_stale + expire + prune_results at results.keep) on each store.
2. idle:    `edge-infer run` children connected to a real Mosquitto with no worker, one
            holding 100,000 delivered samples (awaiting correction) + 100,000 published
            results, one empty, measured in the same window: CPU from /proc/PID/stat
            over --idle-s seconds after start-up settled (goal < 1% of a core).
            outbox.resend_after_s = 3600, so nothing is resent during the window. Then the
            parts of one maintenance pass timed on that store directly.
3. dupes:   offline for 21,000 inputs, then online for 40,000 more at full speed; a
            paho subscriber counts (sample_id, state) pairs on the results topic.
4. memory:  a spawned child runs a 100,000-input full-speed burst (threshold 0.9,
            offload on, broker connected, no worker); its VmHWM and the backpressure_waits
            counter. The child loads only the test split (t10k). (Its ru_maxrss is kept
            in the JSON but is not its own: Linux carries the parent's peak across fork+exec.)
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from edge_infer import protocol  # noqa: E402
from edge_infer.config import (DeviceConfig, ModelConfig, MqttConfig, OutboxConfig, PolicyConfig,  # noqa: E402
                               SpoolConfig)
from edge_infer.tools.localbroker import LocalBroker, free_port  # noqa: E402
from edge_infer.mqtt_link import pack_user_properties  # noqa: E402
from edge_infer.preprocess import encode_png, encode_sample  # noqa: E402
from edge_infer.result import Result  # noqa: E402
from edge_infer.service import EdgeService  # noqa: E402
from edge_infer.store import OutboxItem, Store  # noqa: E402

EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"
THRESHOLD = 0.9
RESULTS_KEEP = 100_000      # the default results.keep
RESEND_AFTER_S = 3600.0     # idle check: far beyond the window, so nothing is resent in it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class LogTally(logging.Handler):
    """Warnings and errors the in-process services log, kept to report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count: Counter = Counter()
        self.first: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}: {record.msg}"
        self.count[key] += 1
        self.first.setdefault(key, record.getMessage()[:300])


# ---------------------------------------------------------------- stores
def prefill(path: Path, n: int, images: np.ndarray, state: str) -> float:
    """n results, each with its offloaded sample (state 'queued', or 'delivered' with its result published)."""
    store = Store(path)
    store.open()
    t0 = time.perf_counter()
    base = time.time() - 3600.0            # an hour old: younger than outbox.max_age_s, older than what comes next
    base_ns = time.time_ns() - 3600 * 10**9
    for b in range(0, n, 1000):
        entries = []
        for k in range(b, min(b + 1000, n)):
            sid = f"{base_ns + k * 1000:x}{k:08x}"
            created = base + k * 0.01
            payload, ctype = encode_sample(images[k % len(images)])
            meta = protocol.SampleMeta(sid, "bench-prefill", "fmnist-edge:1", k % 10, 0.5, created)
            r = Result(sample_id=sid, label=k % 10, label_name=str(k % 10), confidence=0.5, origin="edge",
                       state="provisional", offloaded=True, edge_label=k % 10, edge_confidence=0.5,
                       model_id="fmnist-edge:1", created_at=created, source=f"{k:06d}.png",
                       offload_reason="below_threshold", source_key=f"{k:06d}.png|{len(payload)}|{int(created * 1e9)}")
            entries.append((r, OutboxItem(sid, created, ctype, payload,
                                          pack_user_properties(protocol.sample_properties(meta)))))
        out = store.record_many(entries)
        if state == "delivered":
            sids = [r.sample_id for r, _ in entries]
            store.commit_progress(inflight=sids)
            store.commit_progress(delivered=sids, acked_results=list(zip(sids, out.seqs)))
    dt = time.perf_counter() - t0
    counts = store.counts()
    store.close()
    assert counts["results"] == n and counts[f"outbox.{state}"] == n, counts
    return dt


def maintenance_ms(db: Path, repeats: int = 5) -> dict:
    """The parts of the link worker's maintenance pass (run every second; prune every minute), on a
    closed store: median ms of a few calls (none of them changes anything on these stores)."""
    store = Store(db)
    store.open(check=False)
    out = {}
    for name, fn in (("resend_stale", store.resend_stale), ("expire", lambda: store.expire(24 * 3600.0)),
                     ("prune_results", lambda: store.prune_results(RESULTS_KEEP))):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    out["results"] = store.counts()["results"]
    store.close()
    return out


# ---------------------------------------------------------------- 1. spool + classify
def offline_config(tmp: Path, tag: str, dead_port: int, spool: Path | None = None, **outbox) -> DeviceConfig:
    return DeviceConfig(device_id=f"bench-{tag}", state_dir=tmp / f"state-{tag}", model=ModelConfig(card=EDGE_CARD),
                        policy=PolicyConfig(threshold=THRESHOLD),
                        mqtt=MqttConfig(host="127.0.0.1", port=dead_port, reconnect_min_s=0.2, reconnect_max_s=1.0),
                        outbox=OutboxConfig(**outbox), spool=SpoolConfig(dir=spool, poll_interval_s=0.05))


def spool_round(tmp: Path, tag: str, template: Path | None, pngs: list[bytes], arrays: np.ndarray,
                dead_port: int) -> dict:
    spool, stage = tmp / f"spool-{tag}", tmp / f"stage-{tag}"
    spool.mkdir()
    stage.mkdir()
    for i, data in enumerate(pngs):
        (stage / f"{i:05d}.png").write_bytes(data)
    cfg = offline_config(tmp, tag, dead_port, spool)
    Path(cfg.state_dir).mkdir()
    db = Path(cfg.state_dir) / "edge-infer.db"
    if template is not None:
        shutil.copyfile(template, db)
    # The copy and the staged files are still being written back: not during the measurement
    # (a durable commit's fsync would wait for them on some file systems).
    os.sync()
    svc = EdgeService(cfg)
    t0 = time.perf_counter()
    svc.start()
    start_s = time.perf_counter() - t0
    time.sleep(0.5)   # the first maintenance pass and connection attempt are behind us
    try:
        names = sorted(os.listdir(stage))
        c0, t0 = time.process_time(), time.perf_counter()
        for name in names:
            os.rename(stage / name, spool / name)
        deadline = time.monotonic() + 120
        while svc.counters.get("spool_processed") < len(names) and time.monotonic() < deadline:
            time.sleep(0.005)
        spool_s, spool_cpu = time.perf_counter() - t0, time.process_time() - c0
        done = len(os.listdir(spool / "done"))
        c0, t0 = time.process_time(), time.perf_counter()
        for im in arrays:
            svc.classify(im)
        t1 = time.perf_counter()
        svc.flush(60)
        t2, calls_cpu = time.perf_counter(), time.process_time() - c0
        counters = svc.counters.snapshot()
    finally:
        svc.stop()
    n, m = len(names), len(arrays)
    return {"start_s": start_s, "files": n, "done": done, "files_per_s": n / spool_s,
            "wall_us_per_file": spool_s / n * 1e6, "cpu_us_per_file": spool_cpu / n * 1e6,
            "classify_call_us": (t1 - t0) / m * 1e6, "classify_committed_us": (t2 - t0) / m * 1e6,
            "classify_cpu_us": calls_cpu / m * 1e6, "backpressure_waits": counters.get("backpressure_waits", 0),
            "maintenance_ms": maintenance_ms(db)}


# ---------------------------------------------------------------- 2. idle CPU
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime, all threads


class StatusWatch:
    """The retained/periodic status messages of some devices (the last one of each)."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.last: dict[str, dict] = {}
        self.seen: Counter = Counter()
        self._lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-status-{os.getpid()}",
                             protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(10), "status subscriber could not subscribe"

    def _on_message(self, c, u, msg) -> None:
        with self._lock:
            self.last[msg.topic] = json.loads(msg.payload)
            self.seen[msg.topic] += 1

    def online(self, topic: str) -> bool:
        with self._lock:
            return self.last.get(topic, {}).get("state") == "online"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def idle_cpu(tmp: Path, port: int, template: Path, idle_s: float, settle_s: float) -> dict:
    procs, topics, errs = {}, {}, {}
    for tag, db in (("prefilled", template), ("empty", None)):
        d = tmp / f"idle-{tag}"
        (d / "state").mkdir(parents=True)
        if db is not None:
            shutil.copyfile(db, d / "state" / "edge-infer.db")
        dev = f"bench-idle-{tag}"
        cfg = d / "edge-infer.toml"
        cfg.write_text(f'device_id = "{dev}"\nstate_dir = "{d / "state"}"\n[model]\ncard = "{EDGE_CARD}"\n'
                       f'[policy]\nthreshold = {THRESHOLD}\n[mqtt]\nport = {port}\n'
                       f'[outbox]\nresend_after_s = {RESEND_AFTER_S}\n')
        errs[tag] = d / "stderr.log"
        topics[tag] = protocol.Topics("edge-infer", dev).status
        with open(errs[tag], "wb") as fh:
            procs[tag] = subprocess.Popen([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)],
                                          stdout=subprocess.DEVNULL, stderr=fh, cwd=REPO)
    watch = StatusWatch(port, list(topics.values()))
    out: dict = {"window_s": idle_s, "settle_s": settle_s, "resend_after_s": RESEND_AFTER_S}
    try:
        deadline = time.monotonic() + 60
        while not all(watch.online(t) for t in topics.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        out["online_after_s"] = round(60 - (deadline - time.monotonic()), 2)
        time.sleep(settle_s)
        c0 = {tag: cpu_seconds(p.pid) for tag, p in procs.items()}
        t0 = time.perf_counter()
        time.sleep(idle_s)
        dt = time.perf_counter() - t0
        for tag, p in procs.items():
            cpu = cpu_seconds(p.pid) - c0[tag]
            st = watch.last.get(topics[tag], {})
            c = st.get("counters", {})
            out[tag] = {"cpu_s": round(cpu, 3), "core_pct": round(100 * cpu / dt, 3),
                        "outbox": st.get("outbox"), "results_stored": st.get("results_stored"),
                        "resent": c.get("resent"), "expired": c.get("expired"),
                        "broker_connected": st.get("broker_connected"), "status_messages": watch.seen[topics[tag]]}
    finally:
        watch.close()
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    for tag, f in errs.items():
        bad = [line for line in f.read_text(errors="replace").splitlines()
               if "Traceback" in line or " ERROR " in line or "WARNING" in line or "Error" in line]
        out[tag]["exit_code"] = procs[tag].returncode
        out[tag]["log_problems"] = bad[:5]
    return out


# ---------------------------------------------------------------- 3. duplicates
class ResultCounter:
    def __init__(self, port: int, topic: str) -> None:
        self.pairs: Counter = Counter()
        self.messages = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-results-{os.getpid()}",
                             protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(10), "results subscriber could not subscribe"

    def _on_message(self, c, u, msg) -> None:
        rs = protocol.decode_results(msg.payload)
        with self._lock:
            self.messages += 1
            self.pairs.update((r["sample_id"], r["state"]) for r in rs)

    def total(self) -> int:
        with self._lock:
            return sum(self.pairs.values())

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def duplicates(tmp: Path, images: np.ndarray, offline_n: int, online_n: int) -> dict:
    port = free_port()
    svc = EdgeService(offline_config(tmp, "dupes", port))
    svc.start()
    stopped = False
    try:
        t0 = time.perf_counter()
        ids = [svc.classify(images[i % len(images)]).sample_id for i in range(offline_n)]
        with LocalBroker(tmp / "dupes-broker", port=port) as b:
            rec = ResultCounter(b.port, svc.topics.results)
            try:
                ids += [svc.classify(images[i % len(images)]).sample_id for i in range(online_n)]
                n = len(ids)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not (rec.total() >= n and svc.store.unpublished_count() == 0):
                    time.sleep(0.05)
                elapsed = time.perf_counter() - t0
                time.sleep(0.5)   # anything published twice would have arrived by now
                with rec._lock:
                    pairs, messages = Counter(rec.pairs), rec.messages
            finally:
                rec.close()
                offloaded = svc.counters.get("offloaded")
                svc.stop()   # while the broker still runs: no disconnect warning
                stopped = True
    finally:
        if not stopped:
            svc.stop()
    seen = {sid for sid, _ in pairs}
    return {"inputs": n, "offline": offline_n, "online": online_n, "seconds": round(elapsed, 2),
            "messages": messages, "results_received": sum(pairs.values()), "pairs": len(pairs),
            "published_more_than_once": sum(1 for v in pairs.values() if v > 1),
            "missing": len(set(ids) - seen), "unexpected": len(seen - set(ids)),
            "provisional_pairs": sum(1 for _, s in pairs if s == "provisional"), "offloaded": offloaded}


# ---------------------------------------------------------------- 4. memory (child process)
def _vm(field: str) -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field + ":")))


def burst_child(conn, state_dir: str, port: int, n: int) -> None:
    import resource

    from edge_infer.tools.datasets import load_fashion_mnist
    try:
        images = load_fashion_mnist("t10k").images
        cfg = DeviceConfig(device_id="bench-burst", state_dir=Path(state_dir), model=ModelConfig(card=EDGE_CARD),
                           policy=PolicyConfig(threshold=THRESHOLD), mqtt=MqttConfig(host="127.0.0.1", port=port))
        svc = EdgeService(cfg)
        svc.start()
        deadline = time.monotonic() + 20
        while not svc.link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        connected = svc.link.connected.is_set()
        rss0 = _vm("VmRSS")
        t0 = time.perf_counter()
        for i in range(n):
            svc.classify(images[i % len(images)])
        t1 = time.perf_counter()
        svc.flush(60)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            c = svc.store.outbox_counts()
            if not (svc.store.unpublished_count() or c["queued"] or c["inflight"]):
                break
            time.sleep(0.02)
        t2 = time.perf_counter()
        counts = svc.store.counts()
        counters = svc.counters.snapshot()
        svc.stop()
        conn.send({"inputs": n, "connected": connected, "calls_s": round(t1 - t0, 2), "drained_s": round(t2 - t0, 2),
                   "rss_before_mb": round(rss0 / 1024, 1), "vm_hwm_mb": round(_vm("VmHWM") / 1024, 1),
                   "ru_maxrss_mb_incl_parent": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "backpressure_waits": counters.get("backpressure_waits", 0),
                   "classified": counters.get("classified", 0), "offloaded": counters.get("offloaded", 0),
                   "delivered": counters.get("delivered", 0), "results_published": counters.get("results_published", 0),
                   "store_unavailable": counters.get("store_unavailable", 0),
                   "left": {k: counts.get(k) for k in ("outbox.queued", "outbox.inflight", "results.unpublished")}})
    except BaseException as exc:   # report, do not hang the parent
        import traceback
        conn.send({"error": f"{exc!r}", "traceback": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


def memory(tmp: Path, port: int, n: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=burst_child, args=(child, str(tmp / "burst-state"), port, n))
    p.start()
    child.close()
    out = parent.recv() if parent.poll(300) else {"error": "child did not answer within 300 s"}
    p.join(30)
    out["exit_code"] = p.exitcode
    return out


# ---------------------------------------------------------------- report
def mmm(values: list[float], nd: int = 1) -> dict:
    return {"min": round(min(values), nd), "median": round(statistics.median(values), nd),
            "max": round(max(values), nd)}


def fmt(d: dict, nd: int = 1) -> str:
    return f"{d['min']:.{nd}f} / {d['median']:.{nd}f} / {d['max']:.{nd}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=3.0)
    ap.add_argument("--dupes-offline", type=int, default=21_000)
    ap.add_argument("--dupes-online", type=int, default=40_000)
    ap.add_argument("--burst", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("out/store-scale.json"))
    args = ap.parse_args()

    tally = LogTally()
    logging.getLogger().addHandler(tally)
    logging.getLogger().setLevel(logging.WARNING)
    t_start = time.perf_counter()

    from edge_infer.tools.datasets import fashion_mnist_splits
    test = fashion_mnist_splits()["test"].images
    pngs = [encode_png(test[i % len(test)]) for i in range(args.files)]
    arrays = test[: args.calls] if args.calls <= len(test) else test[np.arange(args.calls) % len(test)]
    report: dict = {"prefill": args.prefill, "files": args.files, "calls": args.calls, "rounds": args.rounds,
                    "threshold": THRESHOLD, "png_bytes_mean": round(float(np.mean([len(p) for p in pngs])))}

    with tempfile.TemporaryDirectory(prefix="store-scale-") as tmp_s:
        tmp = Path(tmp_s)
        # ---- the stores
        log(f"pre-filling two stores with {args.prefill} results + samples each")
        queued_db, delivered_db = tmp / "prefill-queued.db", tmp / "prefill-delivered.db"
        report["prefill_s"] = {"queued": round(prefill(queued_db, args.prefill, test, "queued"), 2),
                               "delivered": round(prefill(delivered_db, args.prefill, test, "delivered"), 2)}
        report["prefill_db_mb"] = round(queued_db.stat().st_size / 2**20, 1)
        report["payload_bytes"] = len(encode_sample(test[0])[0])

        # ---- 1. spool + classify, empty vs prefilled, interleaved
        dead_port = free_port()
        rounds: list[dict] = []
        for r in range(args.rounds):
            order = ("empty", "prefilled") if r % 2 == 0 else ("prefilled", "empty")
            one = {}
            for kind in order:
                log(f"round {r + 1}: spool {args.files} files + {args.calls} classify() on the {kind} store")
                one[kind] = spool_round(tmp, f"{kind}-{r}", queued_db if kind == "prefilled" else None, pngs, arrays,
                                        dead_port)
            rounds.append(one)
        s1: dict = {}
        for kind in ("empty", "prefilled"):
            rs = [one[kind] for one in rounds]
            s1[kind] = {k: mmm([x[k] for x in rs], 3) for k in
                        ("files_per_s", "wall_us_per_file", "cpu_us_per_file", "classify_call_us",
                         "classify_committed_us", "classify_cpu_us", "start_s")}
            s1[kind]["done_min"] = min(x["done"] for x in rs)
            s1[kind]["backpressure_waits"] = sum(x["backpressure_waits"] for x in rs)
            s1[kind]["maintenance_ms"] = {k: mmm([x["maintenance_ms"][k] for x in rs], 2)
                                          for k in ("resend_stale", "expire", "prune_results")}
            s1[kind]["maintenance_results"] = rs[0]["maintenance_ms"]["results"]
        # ratios per round (side by side), as throughput: prefilled / empty
        s1["ratio_spool_throughput"] = mmm([o["prefilled"]["files_per_s"] / o["empty"]["files_per_s"]
                                            for o in rounds], 3)
        s1["ratio_spool_cpu"] = mmm([o["empty"]["cpu_us_per_file"] / o["prefilled"]["cpu_us_per_file"]
                                     for o in rounds], 3)
        s1["ratio_classify_call"] = mmm([o["empty"]["classify_call_us"] / o["prefilled"]["classify_call_us"]
                                         for o in rounds], 3)
        s1["ratio_classify_committed"] = mmm([o["empty"]["classify_committed_us"] /
                                              o["prefilled"]["classify_committed_us"] for o in rounds], 3)
        report["spool_classify"] = s1
        report["spool_rounds"] = rounds

        with LocalBroker(tmp / "broker") as broker:
            # ---- 2. idle CPU
            log(f"idle CPU of two `edge-infer run` children over {args.idle_s:.0f} s")
            report["idle"] = idle_cpu(tmp, broker.port, delivered_db, args.idle_s, args.settle_s)
            report["idle"]["maintenance_ms_prefilled"] = maintenance_ms(delivered_db)
            # ---- 4. memory of a burst
            log(f"peak RSS of a {args.burst}-input burst in a spawned child")
            report["memory"] = memory(tmp, broker.port, args.burst)
        # ---- 3. duplicates
        log(f"duplicates: {args.dupes_offline} offline + {args.dupes_online} online")
        report["dupes"] = duplicates(tmp, test, args.dupes_offline, args.dupes_online)

    report["log_warnings"] = {k: {"count": n, "first": tally.first[k]} for k, n in tally.count.items()}
    report["total_s"] = round(time.perf_counter() - t_start, 1)

    e, p = s1["empty"], s1["prefilled"]
    idle, mem, dup = report["idle"], report["memory"], report["dupes"]
    print(f"store scale: {args.prefill} results + {args.prefill} samples of {report['payload_bytes']} bytes pre-filled "
          f"({report['prefill_db_mb']} MB, {report['prefill_s']['queued']} s to write); {args.rounds} rounds, "
          f"min / median / max")
    print(f"{'':34}{'empty store':>24}{'pre-filled store':>24}{'ratio p/e (goal>=0.9)':>26}")
    rows = [("spool files/s", "files_per_s", "ratio_spool_throughput", 0),
            ("spool wall us/file", "wall_us_per_file", None, 0),
            ("spool CPU us/file (all threads)", "cpu_us_per_file", "ratio_spool_cpu", 0),
            ("classify() us/call", "classify_call_us", "ratio_classify_call", 1),
            ("classify() us/input committed", "classify_committed_us", "ratio_classify_committed", 1),
            ("classify() CPU us/input", "classify_cpu_us", None, 1),
            ("service start-up s", "start_s", None, 2)]
    for label, key, ratio, nd in rows:
        print(f"  {label:32}{fmt(e[key], nd):>24}{fmt(p[key], nd):>24}"
              f"{fmt(s1[ratio], 3) if ratio else '':>26}")
    for part in ("resend_stale", "expire", "prune_results"):
        print(f"  {'maint. ' + part + ' ms':32}{fmt(e['maintenance_ms'][part], 2):>24}"
              f"{fmt(p['maintenance_ms'][part], 2):>24}")
    print(f"  (maintenance on the stores after a round: {e['maintenance_results']} vs {p['maintenance_results']} "
          f"results, results.keep = {RESULTS_KEEP}; files in done/ at least {e['done_min']} / {p['done_min']} "
          f"of {args.files}; backpressure waits {e['backpressure_waits']} / {p['backpressure_waits']})")
    ip, ie = idle["prefilled"], idle["empty"]
    print(f"idle CPU over {idle['window_s']:.0f} s, connected, no worker (resend_after_s = {RESEND_AFTER_S:.0f}):")
    print(f"  {args.prefill} delivered + {args.prefill} results: {ip['core_pct']:.3f}% of a core ({ip['cpu_s']} s CPU; "
          f"outbox {ip['outbox']}, resent {ip['resent']})   goal < 1%")
    im = idle["maintenance_ms_prefilled"]
    print(f"    its maintenance pass (every 1 s): resend_stale {im['resend_stale']:.2f} ms, expire {im['expire']:.2f} ms; "
          f"prune_results (every 60 s) {im['prune_results']:.2f} ms")
    print(f"  empty store: {ie['core_pct']:.3f}% of a core ({ie['cpu_s']} s CPU)")
    print(f"duplicates: {dup['offline']} offline + {dup['online']} online inputs: "
          f"{dup['published_more_than_once']} (sample, state) pairs published more than once (expect 0); "
          f"{dup['pairs']} pairs in {dup['messages']} messages, {dup['missing']} inputs missing, "
          f"{dup['provisional_pairs']} provisional = {dup['offloaded']} offloaded; {dup['seconds']} s")
    if "error" in mem:
        print(f"memory: child failed: {mem['error']}\n{mem.get('traceback', '')}")
    else:
        print(f"memory: {mem['inputs']}-input burst in a child, broker connected: peak RSS {mem['vm_hwm_mb']} MB "
              f"(VmHWM; {mem['rss_before_mb']} MB before the burst)   goal < 120 MB")
        print(f"  backpressure_waits {mem['backpressure_waits']}, offloaded {mem['offloaded']}, calls "
              f"{mem['calls_s']} s, drained {mem['drained_s']} s, left {mem['left']}")
    if report["log_warnings"]:
        print("warnings/errors logged by in-process services:")
        for v in report["log_warnings"].values():
            print(f"  {v['count']:6} x {v['first']}")
    for tag in ("prefilled", "empty"):
        if idle[tag]["log_problems"] or idle[tag]["exit_code"] not in (0, None):
            print(f"idle child ({tag}) exit {idle[tag]['exit_code']}, log: {idle[tag]['log_problems']}")
    print(f"total {report['total_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
