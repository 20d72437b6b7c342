#!/usr/bin/env python3
"""Outbox benchmark: durable enqueue, and drain after an offline period, vs a bare paho loop.

    .venv/bin/python bench/outbox_bench.py [--samples 5000] [--out out/bench-outbox.json]

1. enqueue: results + samples committed to the SQLite outbox (WAL), in the
   service's group-commit batches and one transaction per sample, with
   synchronous=NORMAL (the service's choice) and FULL side by side.
2. drain:   a device classifies N inputs offline (all offloaded), then a local
   Mosquitto starts; time until the broker acknowledged every sample.
   Against: a bare paho-mqtt loop publishing the same payloads at QoS 1 with
   the same in-flight window, in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from edge_infer.config import DeviceConfig, ModelConfig, MqttConfig, OutboxConfig, PolicyConfig  # noqa: E402
from edge_infer.tools.datasets import load_fashion_mnist  # noqa: E402
from edge_infer.tools.localbroker import LocalBroker, free_port  # noqa: E402
from edge_infer.mqtt_link import pack_user_properties  # noqa: E402
from edge_infer.preprocess import encode_sample  # noqa: E402
from edge_infer.result import Result  # noqa: E402
from edge_infer.store import OutboxItem, Store  # noqa: E402

EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"


def entries(images: np.ndarray) -> list[tuple[Result, OutboxItem]]:
    out = []
    for i, im in enumerate(images):
        sid = f"{i:024x}"
        payload, ctype = encode_sample(im)
        r = Result(sample_id=sid, label=1, label_name="x", confidence=0.5, origin="edge", state="provisional",
                   offloaded=True, edge_label=1, edge_confidence=0.5, model_id="m:1", created_at=time.time())
        out.append((r, OutboxItem(sid, r.created_at, ctype, payload, pack_user_properties([("k", "v")]))))
    return out


def enqueue_rate(tmp: Path, data, synchronous: str, batch: int) -> float:
    store = Store(tmp / f"enq-{synchronous}-{batch}.db")
    store.open()
    store._conn().execute(f"PRAGMA synchronous={synchronous}")
    t0 = time.perf_counter()
    for i in range(0, len(data), batch):
        store.record_many(data[i:i + batch])
    dt = time.perf_counter() - t0
    store.close()
    return len(data) / dt


def bare_paho(port: int, payloads: list[bytes], window: int) -> float:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5)
    sem = threading.Semaphore(window)
    done = threading.Event()
    acked = [0]

    def on_publish(client, userdata, mid, rc, props):
        acked[0] += 1
        sem.release()
        if acked[0] == len(payloads):
            done.set()

    c.on_publish = on_publish
    c.max_inflight_messages_set(65535)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    for p in payloads:
        sem.acquire()
        c.publish("bench/bare/samples", p, qos=1)
    done.wait(120)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return len(payloads) / dt


def service_drain(tmp: Path, images: np.ndarray, window: int) -> dict:
    from edge_infer.service import EdgeService
    port = free_port()
    cfg = DeviceConfig(device_id="bench-drain", state_dir=tmp / "drain", model=ModelConfig(card=EDGE_CARD),
                       policy=PolicyConfig(threshold=1.0),
                       mqtt=MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5),
                       outbox=OutboxConfig(max_inflight=window))
    svc = EdgeService(cfg)
    svc.start()
    for im in images:
        svc.classify(im)
    svc.flush()
    queued = svc.store.outbox_counts()["queued"]
    with LocalBroker(tmp / "drain-broker", port=port):
        while not svc.link.connected.is_set():
            time.sleep(0.005)
        t0 = time.perf_counter()
        while svc.store.outbox_counts()["delivered"] < queued:
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        svc.stop()
    return {"samples": queued, "seconds": round(dt, 3), "per_s": round(queued / dt, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("out/bench-outbox.json"))
    args = ap.parse_args()
    images = load_fashion_mnist("t10k").images[: args.samples]
    data = entries(images)
    report: dict = {"samples": len(data), "window": args.window, "payload_bytes": len(data[0][1].payload)}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        report["enqueue_per_s"] = {f"{mode.lower()}_batch{b}": round(enqueue_rate(tmp, data, mode, b))
                                   for mode in ("NORMAL", "FULL") for b in (64, 1)}
        drain = service_drain(tmp, images, args.window)
        with LocalBroker(tmp / "bare-broker") as b:
            bare = bare_paho(b.port, [d[1].payload for d in data[: drain["samples"]]], args.window)
    report["drain"] = drain
    report["bare_paho_per_s"] = round(bare, 1)
    report["drain_vs_bare_ratio"] = round(drain["per_s"] / bare, 3)
    e = report["enqueue_per_s"]
    print(f"{len(data)} samples of {report['payload_bytes']} bytes (PGM), SQLite WAL")
    print(f"  enqueue, synchronous=NORMAL: {e['normal_batch64']:>8}/s in batches of 64, {e['normal_batch1']:>7}/s one per commit")
    print(f"  enqueue, synchronous=FULL:   {e['full_batch64']:>8}/s in batches of 64, {e['full_batch1']:>7}/s one per commit")
    print(f"  drain after offline:   {drain['per_s']:>8}/s ({drain['samples']} samples in {drain['seconds']} s, window {args.window})")
    print(f"  bare paho QoS 1 loop:  {bare:>8.1f}/s (same payloads, same window)")
    print(f"  ratio drain / bare:    {report['drain_vs_bare_ratio']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
