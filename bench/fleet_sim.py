#!/usr/bin/env python3
"""Fleet simulator: N simulated devices against a real local Mosquitto and K real cloud workers.

    .venv/bin/python bench/fleet_sim.py [--devices 1000] [--queued 3000] [--repeats 3]
                                        [--loads 50,100,200,400,800,1200] [--out out/fleet-sim]

Each simulated device is its own MQTT v5 client (own client id, own samples and
corrections topics, QoS 1 both ways, the sample's properties exactly as the
device sends them: tests/unit checks those against paho), all driven by one
selector loop in this process so that 1,000 of them cost no threads. Payloads
are real Fashion-MNIST test images encoded as the device encodes them. Workers
are real `edge-infer-cloud-worker` processes in one shared-subscription group.

It prints, measured in this one run (min/median/max over --repeats where repeated):
  1. worker/bare: corrections/s of one worker draining --queued samples queued in the
     broker (workers SIGSTOPped while they are published, then resumed) against bare
     onnxruntime on the same decoded images at the same batch size and threads, run just
     before each drain so that both of a pair see the same load on the machine: with
     onnxruntime's default threads, and with one thread (the deployed default, one worker
     per core), with and without the worker's shorter GIL switch interval;
  2. batching gain: the same drain with max_batch_size 32 against 1;
  3. scaling: 2 workers against 1 (one onnxruntime thread each);
  4. latency against offered load (1 worker, defaults): p50/p95/p99 of the time from a
     device's publish to its correction, throughput, broker and worker CPU, and the load
     where latency knees (p50 above twice the lowest load's, or throughput below 95%
     of offered);
  5. low-load latency: dynamic batching against batch 1 and against a fixed 5 ms wait;
and counts lost, duplicated and misrouted corrections over everything (all must be 0).
Writes fleet-sim.json and fleet-sim.png (latency and throughput against offered load).
The simulator, the broker and the workers share this machine's cores: on a 2-core
machine the simulated devices' own MQTT work competes with the worker it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from edge_infer import protocol  # noqa: E402
from edge_infer.mqtt_link import PackedProperties, pack_publish_properties  # noqa: E402
from edge_infer.preprocess import encode_sample  # noqa: E402
from edge_infer.tools.datasets import load_fashion_mnist  # noqa: E402
from edge_infer.tools.localbroker import LocalBroker, stop_process  # noqa: E402

CLOUD_CARD = REPO / "models" / "fmnist-cloud-v1" / "card.json"
PREFIX = "edge-infer"
GROUP = "sim"
BIN = Path(sys.executable).parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    sent: dict[str, float] = field(default_factory=dict)          # sample id -> publish time
    owner: dict[str, str] = field(default_factory=dict)           # sample id -> device id
    got: dict[str, float] = field(default_factory=dict)           # sample id -> first correction time
    duplicated: int = 0
    misrouted: int = 0
    errors: int = 0

    def latencies(self, ids: list[str]) -> np.ndarray:
        return np.array([self.got[i] - self.sent[i] for i in ids if i in self.got])


class Fleet:
    """N device clients on one selector loop."""

    def __init__(self, n: int, port: int, payloads: list[tuple[bytes, str]], run: str) -> None:
        self.tally = Tally()
        self.payloads = payloads
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self.devices = [f"sim{run}-{i:04d}" for i in range(n)]
        self._dirty: set[mqtt.Client] = set()
        self._seq = 0
        for dev in self.devices:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
            c.user_data_set(dev)
            c.on_message = self._on_message
            c.max_inflight_messages_set(1000)
            c.connect("127.0.0.1", port, keepalive=120)
            self.sel.register(c.socket(), selectors.EVENT_READ, c)
            c.subscribe(protocol.Topics(PREFIX, dev).corrections, qos=1)
            self.clients.append(c)
            self._dirty.add(c)
        self.pump(until=lambda: False, seconds=1.0)

    def _on_message(self, client: mqtt.Client, dev: str, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        sid = (getattr(msg.properties, "CorrelationData", None) or b"").decode("ascii", "replace")
        if sid not in self.tally.owner or self.tally.owner[sid] != dev or not msg.topic.startswith(f"{PREFIX}/{dev}/"):
            self.tally.misrouted += 1
            return
        if b'"error"' in msg.payload:
            self.tally.errors += 1
        if sid in self.tally.got:
            self.tally.duplicated += 1
        else:
            self.tally.got[sid] = now

    def send(self) -> str:
        """One sample from the next device (round robin), with the device's properties."""
        i = self._seq
        self._seq += 1
        c = self.clients[i % len(self.clients)]
        dev = self.devices[i % len(self.devices)]
        sid = f"{i:024x}"
        payload, ctype = self.payloads[i % len(self.payloads)]
        meta = protocol.SampleMeta(sid, dev, "fmnist-edge:1.0.0", 0, 0.5, time.time())
        props = PackedProperties(pack_publish_properties(ctype, protocol.Topics(PREFIX, dev).corrections,
                                                         sid.encode(), protocol.sample_properties(meta)))
        self.tally.sent[sid] = time.monotonic()
        self.tally.owner[sid] = dev
        c.publish(protocol.Topics(PREFIX, dev).samples, payload, qos=1, properties=props)
        self._dirty.add(c)
        return sid

    def pump(self, until, seconds: float) -> None:
        """Run the network loop until ``until()`` or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        misc = 0.0
        while time.monotonic() < deadline and not until():
            self._step(0.005)
            if time.monotonic() > misc:
                for c in self.clients:
                    c.loop_misc()
                misc = time.monotonic() + 1.0

    def _step(self, timeout: float) -> None:
        for c in list(self._dirty):
            if c.want_write():
                c.loop_write()
            else:
                self._dirty.discard(c)
        for key, _ in self.sel.select(timeout):
            c = key.data
            c.loop_read()
            self._dirty.add(c)

    def paced(self, rate: float, seconds: float) -> list[str]:
        """Offer ``rate`` samples/s for ``seconds`` (spread over the devices); returns the ids sent."""
        ids: list[str] = []
        t0 = time.monotonic()
        total = int(rate * seconds)
        while len(ids) < total:
            due = t0 + len(ids) / rate
            now = time.monotonic()
            if now >= due:
                ids.append(self.send())
            else:
                self._step(min(0.005, due - now))
        return ids

    def burst(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            ids.append(self.send())
            if len(ids) % 50 == 0:
                self._step(0)
        return ids

    def wait_answered(self, ids: list[str], timeout: float) -> None:
        self.pump(until=lambda: all(i in self.tally.got for i in ids), seconds=timeout)

    def close(self) -> None:
        for c in self.clients:
            try:
                c.disconnect()
                c.loop_write()
            except (OSError, ValueError):
                pass
            c.socket() and c.socket().close()


class Workers:
    """K edge-infer-cloud-worker processes in the group GROUP."""

    def __init__(self, tmp: Path, port: int, k: int, *, threads: int = 0, batch: int = 32,
                 delay_us: float = 0.0, spin: bool = False, switch_us: int | None = None, tag: str = "w") -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tmp
        for j in range(k):
            cfg = tmp / f"{tag}{j}.toml"
            cfg.write_text(f'[model]\ncard = "{CLOUD_CARD}"\nintra_op_threads = {threads}\n'
                           f'spin_wait = {str(spin).lower()}\n'
                           f'[worker]\nid = "{tag}{j}"\ngroup = "{GROUP}"\nmax_batch_size = {batch}\n'
                           f'max_queue_delay_us = {delay_us}\nstatus_interval_s = 3600\n'
                           + (f'switch_interval_us = {switch_us}\n' if switch_us is not None else '')
                           + f'[mqtt]\nport = {port}\n')
            self.procs.append(subprocess.Popen([str(BIN / "edge-infer-cloud-worker"), "run", "--config", str(cfg)],
                                               stdout=open(tmp / f"{tag}{j}.log", "w"), stderr=subprocess.STDOUT))
        self.ids = [f"{tag}{j}" for j in range(k)]

    def wait_online(self, port: int, timeout: float = 60) -> None:
        online: set[str] = set()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-watch-{time.monotonic_ns()}",
                        protocol=mqtt.MQTTv5)

        def on_message(cl, u, m):
            try:
                st = json.loads(m.payload)
            except ValueError:
                return
            if st.get("state") == "online":
                online.add(st.get("worker"))

        c.on_message = on_message
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{PREFIX}/_workers/+/status", 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        deadline = time.monotonic() + timeout
        while not set(self.ids) <= online and time.monotonic() < deadline:
            time.sleep(0.05)
        c.disconnect()
        c.loop_stop()
        if not set(self.ids) <= online:
            raise RuntimeError(f"workers {sorted(set(self.ids) - online)} did not come online")
        time.sleep(0.3)        # their subscriptions are made before "online"; give the broker a moment

    def signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, timeout=10)
        for tag in self.ids:
            counters = final_counters(self.tmp / f"{tag}.log")
            BATCH_SIZES[tag] = batch_sizes(counters)
            MODEL_BUSY_S[tag] = counters.get("model_busy_us", 0) / 1e6


#: worker id -> its batch-size histogram (bucket -> batches), from the counters it logs when it stops
BATCH_SIZES: dict[str, dict[str, int]] = {}
#: worker id -> seconds it spent inside the model, from the same counters
MODEL_BUSY_S: dict[str, float] = {}


def final_counters(log_file: Path) -> dict[str, int]:
    import ast
    for line in reversed(log_file.read_text(errors="replace").splitlines()):
        if " stopped: {" in line:
            return ast.literal_eval(line[line.index(" stopped: {") + len(" stopped: "):])
    return {}


def batch_sizes(counters: dict[str, int]) -> dict[str, int]:
    return {k[len("batch_size_"):]: v for k, v in sorted(counters.items(), key=lambda kv: int(
        kv[0][len("batch_size_"):].split("-")[0]) if kv[0].startswith("batch_size_") else 0)
        if k.startswith("batch_size_")}


class Bare:
    """onnxruntime alone on the decoded, fitted images (what a worker feeds it), with its threads
    spinning between runs (the faster, harder baseline): one session per thread count."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        from edge_infer_cloud.model import CloudModel
        self._model = lambda threads: CloudModel(CLOUD_CARD, threads, spin_wait=True)
        self._models: dict = {}
        self.batch = batch
        self.images = images
        self.fitted: list[np.ndarray] | None = None

    def rate(self, threads: int) -> float:
        """Images/s of one pass over the images; records its CPU per image in BARE_CPU[threads]."""
        if threads not in self._models:
            self._models[threads] = self._model(threads)
        model = self._models[threads]
        if self.fitted is None:
            self.fitted = [model.pre.fit(im) for im in self.images]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(self.fitted), self.batch):
            model.predict_fitted_batch(self.fitted[i:i + self.batch])
        BARE_CPU.setdefault(threads, []).append((time.process_time() - c0) / len(self.fitted) * 1e6)
        return len(self.fitted) / (time.perf_counter() - t0)


BARE_CPU: dict[int, list[float]] = {}   # onnxruntime threads -> CPU us per image of each bare pass


DRAIN_CPU: list[dict] = []   # per drain: CPU per correction of the workers, and the others' share of the cores


def drain_rate(fleet: Fleet, workers: Workers, n: int, timeout: float = 120, broker_pid: int | None = None) -> float:
    """Corrections/s while ``workers`` drain ``n`` samples queued for them in the broker."""
    workers.signal(signal.SIGSTOP)
    try:
        ids = fleet.burst(n)
        fleet.pump(until=lambda: not any(c.want_write() for c in fleet.clients), seconds=30)
        fleet.pump(until=lambda: False, seconds=0.5)          # the broker has them all
    finally:
        workers.signal(signal.SIGCONT)
    t0 = time.monotonic()
    w0, s0 = workers.cpu(), time.process_time()
    b0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    fleet.wait_answered(ids, timeout)
    answered = [fleet.tally.got[i] for i in ids if i in fleet.tally.got]
    if len(answered) < n:
        raise RuntimeError(f"only {len(answered)} of {n} queued samples were answered within {timeout}s")
    took = max(answered) - t0
    DRAIN_CPU.append({"worker_us_per_correction": (workers.cpu() - w0) / n * 1e6,
                      "simulator_cpu_share": (time.process_time() - s0) / took,
                      "broker_cpu_share": ((cpu_seconds(broker_pid) - b0) / took) if broker_pid else None})
    return n / took


def mmm(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def fmt(d: dict[str, float], unit: str = "", digits: int = 0) -> str:
    return "/".join(f"{d[k]:.{digits}f}" for k in ("min", "median", "max")) + unit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--queued", type=int, default=3000, help="samples queued for each drain measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loads", default="50,100,200,400,800,1200,1600", help="offered samples/s, comma separated")
    ap.add_argument("--step-s", type=float, default=4.0, help="seconds per offered load")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "fleet-sim")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * a.devices + 256)), hard))
    a.out.mkdir(parents=True, exist_ok=True)
    test = load_fashion_mnist("t10k")
    images = test.images[:2000]
    payloads = [encode_sample(im) for im in images]
    report: dict = {"devices": a.devices, "queued": a.queued, "repeats": a.repeats, "cores": os.cpu_count()}

    bare = Bare(images)
    bare.rate(0), bare.rate(1)                     # load both sessions, warm them
    BARE_CPU.clear()

    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as d:
        tmp = Path(d)
        broker = LocalBroker(tmp / "broker").start()
        fleet = None
        try:
            t0 = time.monotonic()
            fleet = Fleet(a.devices, broker.port, payloads, run=str(os.getpid() % 1000))
            print(f"{a.devices} simulated devices connected and subscribed in {time.monotonic() - t0:.1f}s",
                  flush=True)

            busy_share: dict[str, float] = {}
            #: tag -> bare images/s measured just before each of its drains (the pair of each ratio)
            paired: dict[str, list[float]] = {}

            def drains(tag: str, k: int, *, pair: int | None = None, **kw) -> list[float]:
                """``pair``: run bare onnxruntime with that many threads right before each drain, so
                that each worker/bare ratio compares two runs under the same load of the machine."""
                w = Workers(tmp, broker.port, k, tag=tag, **kw)
                rates = []
                try:
                    w.wait_online(broker.port)
                    fleet.pump(until=lambda: False, seconds=0.5)
                    for _ in range(a.repeats):
                        if pair is not None:
                            paired.setdefault(tag, []).append(bare.rate(pair))
                        rates.append(drain_rate(fleet, w, a.queued, broker_pid=broker.proc.pid))
                finally:
                    w.stop()
                # the workers run their model only while draining: its share of the drains' time
                busy_share[tag] = sum(MODEL_BUSY_S[i] for i in w.ids) / (k * sum(a.queued / r for r in rates))
                return rates

            print("draining queued samples: 1 worker, batch 32 ...", flush=True)
            w32 = drains("d32-", 1, pair=0)
            cpu32 = list(DRAIN_CPU)
            print("... batch 32, onnxruntime threads spinning ...", flush=True)
            w32s = drains("d32s-", 1, spin=True, pair=0)
            print("... batch 1 ...", flush=True)
            w1 = drains("d1-", 1, batch=1)
            print("... 1 and 2 workers with one onnxruntime thread each ...", flush=True)
            s1 = drains("s1-", 1, threads=1, pair=1)
            s2 = drains("s2-", 2, threads=1)
            print("... 1 worker, one thread, Python's default 5 ms GIL switch interval ...", flush=True)
            s1py = drains("s1py-", 1, threads=1, switch_us=0, pair=1)
            report["bare_images_per_s"] = {"batch32": mmm(paired["d32-"] + paired["d32s-"]),
                                           "batch32_1thread": mmm(paired["s1-"] + paired["s1py-"])}
            report["bare_cpu_us_per_image_batch32"] = mmm(BARE_CPU[0])
            report["paired_bare_images_per_s"] = paired
            report["model_busy_share_while_draining"] = busy_share
            report["drain_cpu_1worker_batch32"] = {k: mmm([c[k] for c in cpu32]) for k in cpu32[0]}
            report["drain_corrections_per_s"] = {"1worker_batch32": mmm(w32), "1worker_batch32_spin": mmm(w32s),
                                                 "1worker_batch1": mmm(w1),
                                                 "1worker_1thread": mmm(s1), "2workers_1thread": mmm(s2),
                                                 "1worker_1thread_python_switch": mmm(s1py)}

            # --- latency against offered load ---------------------------------------------------------------
            loads = [float(x) for x in a.loads.split(",")]
            steps = []
            w = Workers(tmp, broker.port, 1, tag="lat-")
            try:
                w.wait_online(broker.port)
                for rate in loads:
                    b0, w0, t0 = cpu_seconds(broker.proc.pid), w.cpu(), time.monotonic()
                    ids = fleet.paced(rate, a.step_s)
                    fleet.wait_answered(ids, 30)
                    took = time.monotonic() - t0
                    lat = fleet.tally.latencies(ids) * 1000
                    answered = [fleet.tally.got[i] for i in ids if i in fleet.tally.got]
                    span = (max(answered) - fleet.tally.sent[ids[0]]) if answered else float("nan")
                    step = {"offered_per_s": rate, "sent": len(ids), "answered": len(lat),
                            "throughput_per_s": len(answered) / span if answered else 0.0,
                            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                            "p99_ms": float(np.percentile(lat, 99)),
                            "broker_cpu_share": (cpu_seconds(broker.proc.pid) - b0) / took,
                            "worker_cpu_share": (w.cpu() - w0) / took}
                    steps.append(step)
                    print(f"  offered {rate:6.0f}/s: {step['throughput_per_s']:7.1f}/s answered, latency p50 "
                          f"{step['p50_ms']:6.1f} p95 {step['p95_ms']:6.1f} p99 {step['p99_ms']:6.1f} ms, broker "
                          f"{step['broker_cpu_share']:.0%} worker {step['worker_cpu_share']:.0%} of a core",
                          flush=True)
                    if step["p50_ms"] > 2000:
                        break            # far past the knee: the rest would only measure the queue
            finally:
                w.stop()
            report["latency_vs_load"] = steps
            base = steps[0]["p50_ms"]
            knee = next((s["offered_per_s"] for s in steps
                         if s["p50_ms"] > 2 * base or s["throughput_per_s"] < 0.95 * s["offered_per_s"]), None)
            report["knee_offered_per_s"] = knee

            # --- low load: dynamic batching vs batch 1 vs a fixed 5 ms wait ------------------------------------
            low = {}
            for tag, kw in (("dynamic", {}), ("batch1", {"batch": 1}), ("fixed5ms", {"delay_us": 5000})):
                w = Workers(tmp, broker.port, 1, tag=f"low-{tag}-", **kw)
                try:
                    w.wait_online(broker.port)
                    ids = fleet.paced(50, a.step_s)
                    fleet.wait_answered(ids, 30)
                    lat = fleet.tally.latencies(ids) * 1000
                    low[tag] = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
                finally:
                    w.stop()
            report["low_load_50_per_s"] = low
            t = fleet.tally
            report["lost"] = sum(1 for i in t.sent if i not in t.got)
            report["duplicated"], report["misrouted"], report["error_replies"] = t.duplicated, t.misrouted, t.errors
            report["samples_sent"] = len(t.sent)
        finally:
            if fleet is not None:
                fleet.close()
            broker.stop()

    d = report["drain_corrections_per_s"]
    bare = report["bare_images_per_s"]
    def over(tag: str, rates: list[float]) -> dict[str, float]:
        return mmm([x / b for x, b in zip(rates, report["paired_bare_images_per_s"][tag])])
    ratio = over("d32-", w32)
    report["worker_over_bare"] = ratio
    report["worker_spin_over_bare"] = over("d32s-", w32s)
    # One onnxruntime thread per worker is the deployed default (one instance per core): its
    # model thread can have a core to itself while the MQTT work runs on the other.
    report["worker_over_bare_1thread"] = over("s1-", s1)
    report["worker_over_bare_1thread_python_switch"] = over("s1py-", s1py)
    report["batching_gain"] = mmm([x / statistics.median(w1) for x in w32])
    report["scaling_2_over_1"] = mmm([x / statistics.median(s1) for x in s2])
    report["batch_sizes"] = {k: v for k, v in BATCH_SIZES.items() if k.startswith(("d32-", "lat-", "low-dynamic-"))}
    (a.out / "fleet-sim.json").write_text(json.dumps(report, indent=2))
    plot(report, a.out / "fleet-sim.png")

    low = report["low_load_50_per_s"]
    print(f"\n=== fleet simulator: {a.devices} devices, {report['cores']} cores, min/median/max over {a.repeats} ===")
    print(f"bare onnxruntime batch 32:       {fmt(bare['batch32'], ' images/s')}")
    print(f"worker draining {a.queued} queued: {fmt(d['1worker_batch32'], ' corrections/s')}")
    print(f"worker / bare:                   {fmt(ratio, '', 2)}  (with spinning threads: "
          f"{fmt(report['worker_spin_over_bare'], '', 2)}; each ratio against bare run just before its drain)")
    print(f"worker / bare, 1 thread each:    {fmt(report['worker_over_bare_1thread'], '', 2)}  "
          f"(bare {fmt(bare['batch32_1thread'], '/s')}, worker {fmt(d['1worker_1thread'], '/s')}; with Python's "
          f"5 ms GIL switch interval {fmt(report['worker_over_bare_1thread_python_switch'], '', 2)})")
    busy = report["model_busy_share_while_draining"]
    print(f"model busy while draining:       {busy['s1-']:.0%} (1 thread), {busy['s1py-']:.0%} (1 thread, Python's "
          f"switch interval), {busy['d32-']:.0%} (onnxruntime's default threads)")
    dc = report["drain_cpu_1worker_batch32"]
    print(f"CPU per sample: worker {fmt(dc['worker_us_per_correction'], ' us')}, bare "
          f"{fmt(report['bare_cpu_us_per_image_batch32'], ' us')}; while draining the simulator took "
          f"{fmt(dc['simulator_cpu_share'], '', 2)} and the broker {fmt(dc['broker_cpu_share'], '', 2)} of a core")
    print(f"batching gain (32 vs batch 1):   {fmt(report['batching_gain'], 'x', 2)}  "
          f"(batch 1: {fmt(d['1worker_batch1'], '/s')})")
    print(f"2 workers / 1 (1 thread each):   {fmt(report['scaling_2_over_1'], 'x', 2)}  "
          f"(1: {fmt(d['1worker_1thread'], '/s')}, 2: {fmt(d['2workers_1thread'], '/s')})")
    for tag, what in (("d32-0", "draining a backlog"), ("lat-0", "the load sweep"), ("low-dynamic-0", "50/s")):
        if BATCH_SIZES.get(tag):
            print(f"batch sizes, {what + ':':21s}{' '.join(f'{k}:{v}' for k, v in BATCH_SIZES[tag].items())}")
    print(f"latency knee at offered:         {report['knee_offered_per_s']} samples/s")
    print(f"low load (50/s) p50/p99 ms:      dynamic {low['dynamic']['p50_ms']:.1f}/{low['dynamic']['p99_ms']:.1f}, "
          f"batch 1 {low['batch1']['p50_ms']:.1f}/{low['batch1']['p99_ms']:.1f}, "
          f"fixed 5 ms wait {low['fixed5ms']['p50_ms']:.1f}/{low['fixed5ms']['p99_ms']:.1f}")
    print(f"samples {report['samples_sent']}: lost {report['lost']}, duplicated {report['duplicated']}, "
          f"misrouted {report['misrouted']}, error replies {report['error_replies']}")
    print(f"wrote {a.out / 'fleet-sim.json'} and {a.out / 'fleet-sim.png'}")
    return 0 if report["lost"] == report["duplicated"] == report["misrouted"] == 0 else 1


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    steps = report["latency_vs_load"]
    x = [s["offered_per_s"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax1.plot(x, [s[key] for s in steps], marker="o", label=key[:3])
    ax1.set_xlabel("offered samples/s")
    ax1.set_ylabel("correction latency (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title(f"{report['devices']} devices, 1 worker")
    ax2.plot(x, [s["throughput_per_s"] for s in steps], marker="o", label="answered/s")
    ax2.plot(x, x, linestyle="--", color="grey", label="offered")
    ax2.set_xlabel("offered samples/s")
    ax2.set_ylabel("corrections/s")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
