#!/usr/bin/env python3
"""Device benchmark: the service path vs a bare interpreter loop, in one run.

    .venv/bin/python bench/device_bench.py [--images 10000] [--out out/bench-device.json]
    .venv/bin/python bench/device_bench.py --models imagenet [--photos DIR] [--images 200]

1. bare:    set_tensor/invoke/get_tensor on pre-quantized inputs (the runtime alone)
2. service: EdgeService.classify() on raw uint8 images with a real local Mosquitto
            connected (preprocess, score, policy, SQLite result + outbox, publishing)
   Both run interleaved in rounds so machine noise hits both alike; the ratio
   and the per-input overhead (service - bare) are reported.
3. memory:  peak RSS (VmHWM) of a real `edge-infer run` process classifying
            spool files, read from /proc.
With --models imagenet the inputs are photos (default: the foolbox package's 20,
cycled to --images) given to classify() as their file bytes, the model is
EfficientNet-Lite0 int8, and a third loop times the "bare pipeline" a user
would write around the interpreter: decode, resize and crop, quantize, invoke.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.backends import BackendOptions, create_backend  # noqa: E402
from edge_infer.config import DeviceConfig, ModelConfig, MqttConfig, PolicyConfig  # noqa: E402
from edge_infer.tools.datasets import load_fashion_mnist  # noqa: E402
from edge_infer.tools.localbroker import LocalBroker  # noqa: E402
from edge_infer.modelcard import load_card, verified_model_bytes  # noqa: E402
from edge_infer.preprocess import Preprocessor, decode_image, encode_png  # noqa: E402
from edge_infer.tools.photos import photo_stream  # noqa: E402
from edge_infer.service import EdgeService  # noqa: E402

EDGE_CARDS = {"fmnist": REPO / "models" / "fmnist-edge-v1" / "card.json",
              "imagenet": REPO / "models" / "imagenet-edge-lite0-v1" / "card.json"}


def bare_loop(backend, tensors: np.ndarray) -> float:
    t0 = time.perf_counter()
    for t in tensors:
        backend.invoke(t)
    return time.perf_counter() - t0


def pipeline_loop(backend, pre: Preprocessor, inputs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for data in inputs:
        backend.invoke(pre.to_tensor(decode_image(data).pixels))
    return time.perf_counter() - t0


def service_loop(svc: EdgeService, images) -> tuple[float, float]:
    """(seconds inside classify() calls, seconds until every result is stored and acknowledged
    by the broker and every sample handed over) -- the second is the sustainable rate."""
    t0 = time.perf_counter()
    for im in images:
        svc.classify(im)
    t1 = time.perf_counter()
    svc.flush()
    while svc.store.unpublished_count() or svc.store.outbox_counts()["queued"]:
        time.sleep(0.002)
    return t1 - t0, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def peak_memory(tmp: Path, port: int, card: Path, files: list[tuple[bytes, str]], threshold: float) -> dict:
    spool = tmp / "spool"
    spool.mkdir()
    cfg = tmp / "edge-infer.toml"
    cfg.write_text(f'device_id = "bench-mem"\nstate_dir = "{tmp / "state-mem"}"\n'
                   f'[model]\ncard = "{card}"\n[policy]\nthreshold = {threshold}\n'
                   f'[mqtt]\nport = {port}\n[spool]\ndir = "{spool}"\npoll_interval_s = 0.05\n')
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)],
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        for i, (data, suffix) in enumerate(files):
            (spool / f".{i}.tmp").write_bytes(data)
            (spool / f".{i}.tmp").rename(spool / f"{i:05d}{suffix}")
        def done_count() -> int:   # the service makes spool/done once it is up
            return len(list((spool / "done").iterdir())) if (spool / "done").is_dir() else 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and done_count() < len(files):
            time.sleep(0.1)
        done = done_count()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"files": len(files), "classified": done, "peak_rss_mb": round(hwm_kb / 1024, 1),
            "rss_mb": round(rss_kb / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--memory-files", type=int, default=2000)
    ap.add_argument("--models", choices=sorted(EDGE_CARDS), default="fmnist")
    ap.add_argument("--photos", type=Path, default=None, help="with --models imagenet: a folder of photos")
    ap.add_argument("--out", type=Path, default=None, help="default: out/bench-device[-imagenet].json")
    args = ap.parse_args()
    args.out = args.out or Path("out/bench-device.json" if args.models == "fmnist" else "out/bench-device-imagenet.json")

    card_path = EDGE_CARDS[args.models]
    card = load_card(card_path)
    pre = Preprocessor(card.input)
    backend = create_backend("tflite-cpu", card, verified_model_bytes(card), BackendOptions("auto", 1))
    if args.models == "fmnist":
        images = load_fashion_mnist("t10k").images[: args.images]
        tensors = np.stack([pre.to_tensor(im) for im in images])
        spool_files = [(encode_png(im), ".png") for im in images[: args.memory_files]]
        encoded = None
    else:
        paths = photo_stream(args.photos, card.labels, args.images)
        encoded = [p.read_bytes() for p in paths]
        images = encoded                              # classify() takes the file bytes
        tensors = np.stack([pre.to_tensor(decode_image(b).pixels) for b in encoded])
        spool_files = [(b, p.suffix) for p, b in zip(paths, encoded[: args.memory_files])]

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        with LocalBroker(tmp / "broker") as broker:
            cfg = DeviceConfig(device_id="bench", state_dir=tmp / "state", model=ModelConfig(card=card_path),
                               policy=PolicyConfig(threshold=args.threshold),
                               mqtt=MqttConfig(host="127.0.0.1", port=broker.port))
            svc = EdgeService(cfg)
            svc.start()
            while not svc.link.connected.is_set():
                time.sleep(0.01)
            bare_s, call_s, svc_s, broker_cpu, pipe_s = [], [], [], [], []
            for _ in range(args.rounds):
                bare_s.append(bare_loop(backend, tensors))
                if encoded is not None:
                    pipe_s.append(pipeline_loop(backend, pre, encoded))
                c0 = cpu_seconds(broker.proc.pid)
                calls, total = service_loop(svc, images)   # returns once the service is idle again
                broker_cpu.append(cpu_seconds(broker.proc.pid) - c0)
                call_s.append(calls)
                svc_s.append(total)
            offload_share = svc.counters.get("offloaded") / max(svc.counters.get("classified"), 1)
            svc.stop()
            # the same with offloading off: what every input costs, apart from offloaded samples
            local_cfg = DeviceConfig(device_id="bench-local", state_dir=tmp / "state-local", model=cfg.model,
                                     policy=PolicyConfig(threshold=args.threshold, offload=False), mqtt=cfg.mqtt)
            svc = EdgeService(local_cfg)
            svc.start()
            while not svc.link.connected.is_set():
                time.sleep(0.01)
            local_s = []
            for _ in range(args.rounds):
                bare_s.append(bare_loop(backend, tensors))
                local_s.append(service_loop(svc, images)[1])
            svc.stop()
            mem = peak_memory(tmp, broker.port, card_path, spool_files, args.threshold)

    n = len(images)
    bare_us = statistics.median(bare_s) / n * 1e6
    call_us = statistics.median(call_s) / n * 1e6
    svc_us = statistics.median(svc_s) / n * 1e6
    broker_us = statistics.median(broker_cpu) / n * 1e6
    local_us = statistics.median(local_s) / n * 1e6
    per_offload_us = (svc_us - local_us) / offload_share if offload_share else None
    report = {
        "images": n, "rounds": args.rounds, "runtime": backend.runtime, "model": card.model_id,
        "threshold": args.threshold, "offload_share": round(offload_share, 4),
        "bare_us_per_input": round(bare_us, 1), "classify_call_us_per_input": round(call_us, 1),
        "service_us_per_input": round(svc_us, 1),
        "service_overhead_us_per_input": round(svc_us - bare_us, 1),
        "broker_cpu_us_per_input": round(broker_us, 1),
        "service_no_offload_us_per_input": round(local_us, 1),
        "service_overhead_no_offload_us_per_input": round(local_us - bare_us, 1),
        "extra_us_per_offloaded_sample": None if per_offload_us is None else round(per_offload_us, 1),
        "service_vs_bare_throughput_ratio": round(bare_us / svc_us, 3),
        "bare_inputs_per_s": round(1e6 / bare_us), "service_inputs_per_s": round(1e6 / svc_us),
        "memory": mem,
    }
    if pipe_s:
        pipe_us = statistics.median(pipe_s) / n * 1e6
        report |= {"bare_pipeline_us_per_input": round(pipe_us, 1),
                   "service_vs_bare_pipeline_throughput_ratio": round(pipe_us / svc_us, 3),
                   "bare_us_per_input_min_median_max": [round(x / n * 1e6, 1) for x in
                                                        (min(bare_s), statistics.median(bare_s), max(bare_s))],
                   "service_us_per_input_min_median_max": [round(x / n * 1e6, 1) for x in
                                                           (min(svc_s), statistics.median(svc_s), max(svc_s))]}
    print(f"model {card.model_id} on {backend.runtime}, {n} images x {args.rounds} rounds (medians)")
    print(f"  bare interpreter loop   {bare_us:8.1f} us/input  {1e6 / bare_us:8.0f}/s")
    print(f"  classify() calls        {call_us:8.1f} us/input  {1e6 / call_us:8.0f}/s   (what a caller waits per input)")
    print(f"  service, sustained      {svc_us:8.1f} us/input  {1e6 / svc_us:8.0f}/s   "
          f"(until stored and published; offloaded {offload_share:.1%})")
    print(f"  service overhead        {svc_us - bare_us:8.1f} us/input  (goal < 100)")
    print(f"  ... with offload off    {local_us - bare_us:8.1f} us/input  (results stored and published; "
          f"each offloaded sample adds {per_offload_us or 0:.0f} us)")
    print(f"  of which the broker     {broker_us:8.1f} us/input of CPU (Mosquitto shares these 2 cores here; "
          f"on a device the broker is remote)")
    print(f"  throughput ratio        {bare_us / svc_us:8.3f}  (service / bare)")
    if pipe_s:
        print(f"  bare pipeline           {report['bare_pipeline_us_per_input']:8.1f} us/input  (decode, resize and "
              f"crop, quantize, invoke: what a user would write)")
        print(f"  throughput ratio        {report['service_vs_bare_pipeline_throughput_ratio']:8.3f}  "
              f"(service / bare pipeline)")
    print(f"  peak RSS of `edge-infer run` over {mem['classified']} spool files: {mem['peak_rss_mb']} MB "
          f"(goal < {120 if args.models == 'fmnist' else 150})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
