"""``edge-infer demo``: the whole loop on one machine, on the shipped models and data.

Starts a local Mosquitto, one cloud worker (a separate process, as in
production) and the device service; streams the Fashion-MNIST test split
through ``classify()``; waits for the corrections; prints and writes the
figures. The cloud-only accuracy comes from the worker's own ``evaluate``
command on the same images, so the device package never imports the cloud side.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from ..service import EdgeService
    from .localbroker import LocalBroker

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_models_dir() -> Path:
    for candidate in (Path.cwd() / "models", REPO_ROOT / "models"):
        if (candidate / "fmnist-edge-v1" / "card.json").exists():
            return candidate
    return Path.cwd() / "models"


def _default_threshold() -> float:
    """The shipped device config's threshold (chosen on validation), read by the config parser itself."""
    from ..config import PolicyConfig, load_device_config
    cfg = REPO_ROOT / "deploy" / "config" / "edge-infer.toml"
    return load_device_config(cfg).policy.threshold if cfg.exists() else PolicyConfig().threshold


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=10000, help="test images to stream (default: all 10,000)")
    p.add_argument("--threshold", type=float, default=None,
                   help="offload threshold (default: the shipped config's, chosen on validation)")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--out", type=Path, default=Path("out/demo.json"), help="where the JSON report goes")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the corrections")
    p.add_argument("--workers", type=int, default=1, help="cloud worker processes")
    p.add_argument("--paced", type=int, default=200, help="unsure inputs sent at a modest pace for the "
                                                           "no-backlog latency figure (0 = skip)")
    p.add_argument("--paced-rate", type=float, default=100.0, help="inputs per second for that phase")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--models", choices=("fmnist", "imagenet"), default="fmnist",
                   help="fmnist: the Fashion-MNIST pair on its test split (default); imagenet: the "
                        "EfficientNet-Lite pair on photos (--photos)")
    p.add_argument("--photos", type=Path, default=None,
                   help="with --models imagenet: a folder of photos (JPEG/PNG; a file named like foolbox's "
                        "imagenet_NN_LABEL.png or in a folder named after its class is scored); default: the 20 "
                        "ImageNet photos of the foolbox package")


def _percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


class ResultsMonitor:
    """An integrator's view: subscribe to the device's results topic and count what arrives."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        self.counts = {"provisional": 0, "final": 0, "final_cloud": 0}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-monitor-{os.getpid()}",
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *a: self._ready.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        self._ready.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        from ..protocol import decode_results
        with self._lock:
            self.counts["messages"] = self.counts.get("messages", 0) + 1
            for r in decode_results(msg.payload):
                self.counts[r["state"]] += 1
                if r["state"] == "final" and r["origin"] == "cloud":
                    self.counts["final_cloud"] += 1

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _wait_worker_online(host: str, port: int, topic: str, procs: list[subprocess.Popen], timeout: float) -> None:
    import paho.mqtt.client as mqtt
    online = threading.Event()

    def on_message(c, u, msg):
        if json.loads(msg.payload).get("state") == "online":
            online.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-wait-{os.getpid()}", protocol=mqtt.MQTTv5)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    c.on_message = on_message
    c.connect(host, port)
    c.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while not online.wait(0.2):
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"cloud worker exited with {p.returncode}; see its log above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cloud worker not online after {timeout}s")
    finally:
        c.disconnect()
        c.loop_stop()


class LocalLoop(NamedTuple):
    broker: "LocalBroker"
    service: "EdgeService"
    monitor: ResultsMonitor


@contextlib.contextmanager
def local_loop(tmp: Path, *, edge_card: Path, cloud_card: Path, threshold: float, workers: int = 1,
               device_id: str = "demo-device") -> Iterator[LocalLoop]:
    """A local Mosquitto, ``workers`` cloud worker processes (as in production) and the device
    service, all connected; everything is stopped on exit. Raises BrokerError without mosquitto."""
    from ..config import DeviceConfig, ModelConfig, MqttConfig, OutboxConfig, PolicyConfig
    from ..protocol import Topics, worker_status_topic
    from ..service import EdgeService
    from .localbroker import LocalBroker, stop_process

    broker = LocalBroker(tmp / "broker").start()
    procs: list[subprocess.Popen] = []
    service = None
    monitor = None
    try:
        print(f"broker: mosquitto on 127.0.0.1:{broker.port}", file=sys.stderr)
        worker_cfg = tmp / "cloud-worker.toml"
        worker_cfg.write_text(
            f'[model]\ncard = "{cloud_card.resolve()}"\n\n[worker]\ngroup = "demo"\n\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n')
        worker_log = open(tmp / "worker.log", "w")
        for i in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_infer_cloud", "run", "--config", str(worker_cfg),
                 "--worker-id", f"demo-{i + 1}"], stdout=worker_log, stderr=subprocess.STDOUT))
        for i in range(workers):
            _wait_worker_online("127.0.0.1", broker.port, worker_status_topic("edge-infer", f"demo-{i + 1}"),
                                procs, timeout=60)
        print(f"cloud worker(s): {workers} online", file=sys.stderr)
        cfg = DeviceConfig(
            device_id=device_id, state_dir=tmp / "device",
            model=ModelConfig(card=edge_card, num_threads=1),
            policy=PolicyConfig(threshold=threshold),
            mqtt=MqttConfig(host="127.0.0.1", port=broker.port),
            outbox=OutboxConfig(max_inflight=64))
        monitor = ResultsMonitor("127.0.0.1", broker.port, Topics(cfg.mqtt.topic_prefix, cfg.device_id).results)
        service = EdgeService(cfg)
        service.start()
        deadline = time.monotonic() + 15
        while not service.link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield LocalLoop(broker, service, monitor)
    finally:
        if service is not None:
            service.stop()
        if monitor is not None:
            monitor.stop()
        for p in procs:
            p.terminate()      # all at once, then wait for each
        for p in procs:
            stop_process(p)
        broker.stop()


def wait_for_corrections(service: "EdgeService", timeout: float, show: bool | None) -> None:
    """Until every offloaded sample is answered (or given up), or ``timeout`` seconds."""
    from .progress import Progress
    offloaded = service.counters.get("offloaded")
    bar = Progress(offloaded, "corrections", enabled=show)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = service.store.outbox_counts()
        done = counts["corrected"] + counts["failed"] + counts["expired"]
        bar.update(done)
        if done >= offloaded and service.store.unpublished_count() == 0:
            break
        time.sleep(0.05)
    bar.close()
    time.sleep(0.3)  # let the last results reach the monitor


def run_demo(args: argparse.Namespace) -> int:
    if args.models == "imagenet":
        from .demo_photos import run_photo_demo
        return run_photo_demo(args)
    if args.photos is not None:
        print("error: --photos goes with --models imagenet", file=sys.stderr)
        return 2
    from ..logsetup import setup_logging
    from .datasets import DEFAULT_FMNIST_DIR, fashion_mnist_splits
    from .localbroker import BrokerError

    setup_logging("WARNING")
    models = args.models_dir or _default_models_dir()
    edge_card = models / "fmnist-edge-v1" / "card.json"
    cloud_card = models / "fmnist-cloud-v1" / "card.json"
    for card in (edge_card, cloud_card):
        if not card.exists():
            print(f"error: model card {card} not found; run from the repository root or pass --models-dir",
                  file=sys.stderr)
            return 2
    threshold = args.threshold if args.threshold is not None else _default_threshold()
    data = fashion_mnist_splits(args.data or DEFAULT_FMNIST_DIR)["test"]
    n = min(args.images, len(data))
    images, labels = data.images[:n], data.labels[:n]
    show = False if args.no_progress else None

    # Cloud-only accuracy, measured by the worker's own model code on the same images.
    ev = subprocess.run([sys.executable, "-m", "edge_infer_cloud", "evaluate", "--card", str(cloud_card),
                         "--split", "test", "--limit", str(n)]
                        + (["--data", str(args.data)] if args.data else []),
                        capture_output=True, text=True, check=True)
    cloud_eval = json.loads(ev.stdout.strip().splitlines()[-1])

    try:
        with tempfile.TemporaryDirectory(prefix="edge-infer-demo-") as tmp_s, \
                local_loop(Path(tmp_s), edge_card=edge_card, cloud_card=cloud_card, threshold=threshold,
                           workers=args.workers) as loop:
            report = _stream_test_set(loop, images, labels, args, show)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report |= {"threshold": threshold, "cloud_model": cloud_eval["model"],
               "cloud_only_accuracy": round(cloud_eval["accuracy"], 4)}
    return _finish(report, args.out, _print_report)


def _finish(report: dict, out: Path, printer) -> int:
    printer(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport written to {out}")
    ok = report["offloaded_without_correction"] == 0
    if not ok:
        print("warning: some offloaded samples got no correction before the timeout", file=sys.stderr)
    return 0 if ok else 1


def _stream_test_set(loop: LocalLoop, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace,
                     show: bool | None) -> dict:
    from .progress import Progress
    service, monitor = loop.service, loop.monitor
    n = len(images)
    ids, unsure = [], []
    bar = Progress(n, "classify", enabled=show)
    t0 = time.perf_counter()
    for i in range(n):
        r = service.classify(images[i], source=f"fmnist-test-{i}")
        ids.append(r.sample_id)
        if r.offloaded:
            unsure.append(i)
        if i % 64 == 0:
            bar.update(i + 1)
    stream_s = time.perf_counter() - t0
    bar.update(n)
    bar.close()
    service.flush()

    wait_for_corrections(service, args.timeout, show)

    # Latency without a backlog: unsure inputs at a modest pace once the queue is empty.
    paced_ids = []
    for i in unsure[:args.paced]:
        paced_ids.append(service.classify(images[i], source=f"paced-{i}").sample_id)
        time.sleep(1.0 / args.paced_rate)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            (r := service.result(s)) is not None and r.state == "final" for s in paced_ids):
        time.sleep(0.02)
    paced = [service.result(s) for s in paced_ids]
    paced_lat = [r.corrected_at - r.created_at for r in paced if r.corrected_at]

    results = {r.sample_id: r for r in service.store.all_results()}
    rs = [results[s] for s in ids]
    edge_pred = np.array([r.edge_label for r in rs])
    final_pred = np.array([r.label for r in rs])
    offl = np.array([r.offloaded for r in rs])
    corrected = [r for r in rs if r.origin == "cloud"]
    latencies = [r.corrected_at - r.created_at for r in corrected]
    counts = service.store.outbox_counts()
    return {
        "images": n,
        "edge_model": service.card.model_id,
        "runtime": service.backend.runtime,
        "edge_only_accuracy": round(float((edge_pred == labels).mean()), 4),
        "hybrid_accuracy": round(float((final_pred == labels).mean()), 4),
        "kept_on_device_share": round(1 - float(offl.mean()), 4),
        "offloaded": int(offl.sum()),
        "corrections_received": len(corrected),
        "corrections_changed_label": int(sum(r.label != r.edge_label for r in corrected)),
        "offloaded_without_correction": int(offl.sum()) - len(corrected),
        "outbox": counts,
        # from sample creation to correction applied, while streaming the whole set as fast as
        # the device can (samples queue up behind the worker) ...
        "correction_latency_ms": {"p50": _percentile_ms(latencies, 50), "p99": _percentile_ms(latencies, 99)},
        # ... and for unsure inputs arriving at a modest pace (no backlog)
        "correction_latency_paced_ms": {"inputs": len(paced_lat), "rate_per_s": args.paced_rate,
                                        "p50": _percentile_ms(paced_lat, 50),
                                        "p99": _percentile_ms(paced_lat, 99)},
        "device_throughput_per_s": round(n / stream_s, 1),
        "device_us_per_input": round(stream_s / n * 1e6, 1),
        "results_seen_by_subscriber": dict(monitor.counts),
        "device_counters": service.counters.snapshot(),
    }


def _print_report(r: dict) -> None:
    lat = r["correction_latency_ms"]
    rows = [
        ("images", f"{r['images']}"),
        ("threshold", f"{r['threshold']:.4f}"),
        ("edge-only accuracy", f"{r['edge_only_accuracy']:.2%}  ({r['edge_model']}, {r['runtime']})"),
        ("cloud-only accuracy", f"{r['cloud_only_accuracy']:.2%}  ({r['cloud_model']})"),
        ("hybrid accuracy", f"{r['hybrid_accuracy']:.2%}"),
        ("kept on device", f"{r['kept_on_device_share']:.2%}"),
        ("offloaded", f"{r['offloaded']}"),
        ("corrections received", f"{r['corrections_received']} ({r['corrections_changed_label']} changed the label)"),
        ("correction latency", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms (streaming all inputs at full speed)"),
        ("  ... at a steady pace", f"p50 {r['correction_latency_paced_ms']['p50']} ms, "
                                   f"p99 {r['correction_latency_paced_ms']['p99']} ms "
                                   f"({r['correction_latency_paced_ms']['inputs']} unsure inputs at "
                                   f"{r['correction_latency_paced_ms']['rate_per_s']:.0f}/s)"),
        ("device throughput", f"{r['device_throughput_per_s']:.0f} inputs/s ({r['device_us_per_input']} us/input)"),
    ]
    print()
    for k, v in rows:
        print(f"  {k:<22} {v}")
