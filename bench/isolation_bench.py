#!/usr/bin/env python3
"""Isolation benchmark: the same CPU model in-process and isolated in a child process, in one run.

    .venv/bin/python bench/isolation_bench.py [--images 5000] [--rounds 5] [--kills 5] [--out out/bench-isolation.json]

1. backend: invoke() of the tflite-cpu backend on pre-quantized Fashion-MNIST test
            tensors, in-process vs `IsolatedBackend` (tensors through a memfd, one
            SEQPACKET round trip per input); the two alternate round by round so the
            machine's noise hits both alike: min/median/max us per input, the ratio,
            and the isolation's cost per input (goal: under 50 us)
2. classify: Classifier.infer() on raw uint8 images (preprocessing and scoring
            included), isolate = false vs true: the cost as the service pays it
3. restart: the time from SIGKILL of the child to the next answer (the input that
            waits for the fresh child), beside a bare interpreter with the child's imports
            (what a forkserver, which forks a pre-imported process, could save)
4. memory:  the child's resident set (VmRSS)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.backends import create_backend, default_options  # noqa: E402
from edge_infer.backends.isolated import IsolatedBackend, IsolationSettings  # noqa: E402
from edge_infer.classifier import Classifier  # noqa: E402
from edge_infer.config import ModelConfig, PolicyConfig  # noqa: E402
from edge_infer.modelcard import load_card, verified_model_bytes  # noqa: E402
from edge_infer.preprocess import Preprocessor, decode_image  # noqa: E402
from edge_infer.tools.photos import photo_stream  # noqa: E402
from edge_infer.tools.datasets import load_fashion_mnist  # noqa: E402

EDGE_CARDS = {"fmnist": REPO / "models" / "fmnist-edge-v1" / "card.json",
              "imagenet": REPO / "models" / "imagenet-edge-lite0-v1" / "card.json"}


def per_input_us(run, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        run(x)
    return (time.perf_counter() - t0) / len(items) * 1e6


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 1), "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def alternate(runs, items, rounds: int) -> list[list[float]]:
    """Rounds of every run in turn (the order rotating round by round), each a full pass over ``items``."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        for k in range(len(runs)):
            i = (k + r) % len(runs)
            times[i].append(per_input_us(runs[i], items))
    return times


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def interpreter_and_imports_s(repeats: int = 5) -> float:
    """A fresh `python -I` importing what a child imports before it loads a model."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "import numpy, ai_edge_litert.interpreter, "
                        "edge_infer.backends.tflite_cpu, edge_infer.modelcard"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def restart_times(iso: IsolatedBackend, x: np.ndarray, kills: int) -> list[float]:
    out = []
    for _ in range(kills):
        iso.invoke(x)
        t0 = time.perf_counter()
        os.kill(iso.pid, signal.SIGKILL)
        iso.invoke(x)   # finds the child gone (or is told by the watch) and waits for the fresh one
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--models", choices=sorted(EDGE_CARDS), default="fmnist",
                    help="imagenet: EfficientNet-Lite0 int8 on photos (default: foolbox's 20, cycled to --images)")
    ap.add_argument("--photos", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: out/bench-isolation[-imagenet].json")
    args = ap.parse_args()
    args.out = args.out or Path("out/bench-isolation.json" if args.models == "fmnist"
                                else "out/bench-isolation-imagenet.json")

    edge_card = EDGE_CARDS[args.models]
    card = load_card(edge_card)
    if args.models == "fmnist":
        images = load_fashion_mnist("t10k").images[: args.images]
    else:
        images = [decode_image(p.read_bytes()).pixels for p in photo_stream(args.photos, card.labels, args.images)]
    pre = Preprocessor(card.input)
    tensors = [pre.batch(pre.fit(im)[None]) for im in images]
    opts = default_options("tflite-cpu")
    inproc = create_backend("tflite-cpu", card, verified_model_bytes(card), opts)
    settings = IsolationSettings()
    with IsolatedBackend("tflite-cpu", card, opts, settings) as iso:
        assert all(np.array_equal(inproc.invoke(t), iso.invoke(t)) for t in tensors[:200]), "answers differ"
        for run in (inproc.invoke, iso.invoke):
            per_input_us(run, tensors[:500])   # warm each
        t_in, t_iso = alternate([inproc.invoke, iso.invoke], tensors, args.rounds)
        child_rss = rss_mb(iso.pid)
        service_rss = rss_mb(os.getpid())
        restarts = restart_times(iso, tensors[0], args.kills)
        runtime = iso.runtime
    inproc.close()

    policy = PolicyConfig()
    with Classifier(ModelConfig(card=edge_card), policy) as c_in, \
            Classifier(ModelConfig(card=edge_card, isolate=True), policy) as c_iso:
        c_in.infer(images[0])
        c_iso.infer(images[0])
        k_in, k_iso = alternate([c_in.infer, c_iso.infer], list(images), args.rounds)
    boot = interpreter_and_imports_s()

    overhead = [b - a for a, b in zip(t_in, t_iso)]
    k_overhead = [b - a for a, b in zip(k_in, k_iso)]
    med_in, med_iso = statistics.median(t_in), statistics.median(t_iso)
    restart_med = statistics.median(restarts)
    report = {
        "images": len(images), "rounds": args.rounds, "model": card.model_id, "runtime": runtime,
        "backend_in_process_us": spread(t_in), "backend_isolated_us": spread(t_iso),
        "backend_isolation_cost_us": spread(overhead), "backend_ratio_isolated_vs_in_process": round(med_iso / med_in, 3),
        "classify_in_process_us": spread(k_in), "classify_isolated_us": spread(k_iso),
        "classify_isolation_cost_us": spread(k_overhead),
        "restart_after_sigkill_s": {"min": round(min(restarts), 3), "median": round(restart_med, 3),
                                    "max": round(max(restarts), 3)},
        "child_interpreter_and_imports_s": round(boot, 3),
        "child_rss_mb": child_rss, "service_rss_mb_during_bench": service_rss,
        "start_method": "spawn: a fresh `python -I -m edge_infer.backends.isolated_child` (subprocess, pass_fds)",
    }
    print(f"model {card.model_id}, {len(images)} images x {args.rounds} rounds, {runtime}")
    print(f"  backend invoke   in-process  {spread(t_in)} us/input")
    print(f"                   isolated    {spread(t_iso)} us/input")
    print(f"                   cost        {spread(overhead)} us/input (goal < 50), "
          f"ratio {med_iso / med_in:.2f}x")
    print(f"  classify()       in-process  {spread(k_in)} us/input")
    print(f"                   isolated    {spread(k_iso)} us/input, cost {spread(k_overhead)} us/input")
    print(f"  restart after SIGKILL: {restart_med * 1e3:.0f} ms median (min {min(restarts) * 1e3:.0f}, "
          f"max {max(restarts) * 1e3:.0f}) until the next answer; a bare `python -I` with the child's imports "
          f"takes {boot * 1e3:.0f} ms: nearly all of it, and what a forkserver could save (loading this model "
          "takes milliseconds)")
    print(f"  child RSS {child_rss} MB (the service's own here: {service_rss} MB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
