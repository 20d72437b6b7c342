#!/usr/bin/env python3
"""Every GPU figure of issue 17 in one run, as one JSON: the TensorRT device backend and the cloud model on a GPU.

    python bench/gpu_check.py --out OUT/gpu_check.json          # bench/gpu_check.sh installs, then runs this

Device backend (device/backends/tensorrt.py, the edge model's ONNX exports in models/fmnist-edge-v1-trt/), for
FP16 and INT8 (and FP32 as the reference): engine build time (first start, empty cache) and load time with a
cache hit (second start); accuracy on the 10,000 test images and agreement with the TFLite CPU labels
(fmnist-edge-v1/predictions.npz) and with onnxruntime CPU on the same file; latency per image at batch 1
(p50/p90/p99 of single invokes, host to host: copy in, run, copy out); throughput at batch 64.
The service path too: `edge-infer classify` with backend = "tensorrt" (isolated child) against tflite-cpu.

Cloud model (models/fmnist-cloud-v1/model.onnx): images/s with onnxruntime's TensorRT and CUDA providers and
the CPU at the same batch sizes, with IO binding (input and output on the GPU: the model alone) and from host
memory (what a worker pays per batch: copy in and out); the TensorRT provider with its engine cache (first
session vs a second one that loads the cached engine); and the worker's own CloudModel on each provider.

Then the GPU tests (pytest -m "tensorrt or hardware"). Each part records its error instead of stopping the rest.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRT_DIR = REPO / "models" / "fmnist-edge-v1-trt"
EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"
CLOUD_CARD = REPO / "models" / "fmnist-cloud-v1" / "card.json"
CARDS = {"fp32": TRT_DIR / "card.json", "fp16": TRT_DIR / "card_fp16.json", "int8": TRT_DIR / "card_int8.json"}


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings",
                 "tensorrt-cu12-libs", "tensorrt-cu13-libs", "cuda-python", "cuda-bindings", "onnxruntime",
                 "onnxruntime-gpu", "numpy", "ai-edge-litert", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _nvidia_smi() -> dict[str, Any]:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return {"query": p.stdout.strip(), "rc": p.returncode}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}


def part(results: dict, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except BaseException as exc:   # one part failing must not lose the others' figures
        if isinstance(exc, KeyboardInterrupt):
            raise
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {json.dumps(results[name], default=str)[:1500]}", flush=True)


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.array(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4),
            "n": len(samples_s)}


# ----------------------------------------------------------------------------- the device backend

def device_backend(precision: str, test_images: np.ndarray, truth: np.ndarray, tflite: np.ndarray,
                   *, batch: int, latency_n: int) -> dict[str, Any]:
    from edge_infer.backends import create_backend
    from edge_infer.backends.onnxrt import Options as OrtOptions
    from edge_infer.backends.tensorrt import Options
    from edge_infer.modelcard import load_card, verified_model_bytes
    from edge_infer.preprocess import Preprocessor

    card = load_card(CARDS[precision])
    model = verified_model_bytes(card)
    x = Preprocessor(card.input).batch(list(test_images))
    cpu = create_backend("onnxruntime", card, model, OrtOptions(max_batch=500))
    cpu_labels = cpu.invoke_batch(x).argmax(1)
    cpu.close()
    out: dict[str, Any] = {"card": str(CARDS[precision].relative_to(REPO)), "sha256": card.sha256}
    with tempfile.TemporaryDirectory() as cache:
        opts = Options(precision=precision, max_batch=batch, engine_cache_dir=cache)
        t0 = time.perf_counter()
        be = create_backend("tensorrt", card, model, opts)
        out["first_start"] = {"load_s": round(time.perf_counter() - t0, 3), "build_s": round(be.build_s, 3),
                              "cache_hit": be.cache_hit, "engine_bytes": be.engine_file.stat().st_size}
        out["runtime"], out["engine_key"] = be.runtime, be.key.as_dict()
        try:
            labels = be.invoke_batch(x).argmax(1)
            out["test_accuracy"] = round(float((labels == truth).mean()), 4)
            out["agreement_with_tflite_cpu"] = round(float((labels == tflite).mean()), 4)
            out["agreement_with_onnxruntime_cpu"] = round(float((labels == cpu_labels).mean()), 4)
            out["onnxruntime_cpu_test_accuracy"] = round(float((cpu_labels == truth).mean()), 4)
            for i in range(200):                               # warm-up: clocks, caches
                be.invoke(x[i % len(x):i % len(x) + 1])
            samples = []
            for i in range(latency_n):
                one = x[i % len(x):i % len(x) + 1]
                t = time.perf_counter()
                be.invoke(one)
                samples.append(time.perf_counter() - t)
            out["latency_batch1"] = _percentiles(samples)
            full = x[:len(x) // batch * batch]
            be.invoke_batch(full[:batch * 20])
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                be.invoke_batch(full)
                rates.append(len(full) / (time.perf_counter() - t))
            out[f"throughput_batch{batch}"] = {"images_per_s_best": round(max(rates)),
                                               "images_per_s_median": round(statistics.median(rates)),
                                               "images": len(full), "runs": 3}
        finally:
            be.close()
        t0 = time.perf_counter()
        again = create_backend("tensorrt", card, model, opts)
        out["second_start"] = {"load_s": round(time.perf_counter() - t0, 3), "cache_hit": again.cache_hit,
                               "build_s": again.build_s}
        again.close()
    return out


def service_classify(test_images: np.ndarray, n: int = 32) -> dict[str, Any]:
    """`edge-infer classify` with backend = "tensorrt" (isolated, as on a device) vs tflite-cpu: same labels?"""
    from edge_infer.preprocess import encode_png
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        images = []
        for i in range(n):
            images.append(t / f"{i}.png")
            images[-1].write_bytes(encode_png(test_images[i]))
        results = {}
        for name, card, table in (("tflite-cpu", EDGE_CARD, ""),
                                  ("tensorrt", CARDS["int8"], f'[backend.tensorrt]\nengine_cache_dir = "{t / "cache"}"\n')):
            d = t / name
            d.mkdir()
            cfg = d / "edge-infer.toml"
            cfg.write_text(f'device_id = "gpu-check"\nstate_dir = "{d / "state"}"\n[model]\ncard = "{card}"\n'
                           f'backend = "{name}"\n' + table)
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "edge_infer", "classify", "--config", str(cfg),
                                *map(str, images)], capture_output=True, text=True, timeout=300)
            results[name] = {"rc": p.returncode, "s": round(time.perf_counter() - t0, 2),
                             "labels": [json.loads(line)["label"] for line in p.stdout.splitlines() if line.startswith("{")],
                             "stderr_tail": p.stderr[-800:]}
            check = subprocess.run([sys.executable, "-m", "edge_infer", "check-config", str(cfg)],
                                   capture_output=True, text=True, timeout=120)
            results[name]["check_config"] = (check.stdout + check.stderr).strip()[-600:]
        a, b = results["tflite-cpu"]["labels"], results["tensorrt"]["labels"]
        results["agree"] = round(sum(x == y for x, y in zip(a, b)) / max(len(a), 1), 4) if len(a) == len(b) else None
    return results


# ----------------------------------------------------------------------------- the cloud model

def _provider_sets(cache_dir: str, max_batch: int) -> dict[str, list]:
    profile = {"trt_profile_min_shapes": "input:1x1x28x28", "trt_profile_opt_shapes": f"input:{max_batch}x1x28x28",
               "trt_profile_max_shapes": f"input:{max_batch}x1x28x28"}
    trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir,
           "trt_timing_cache_enable": True, "trt_max_workspace_size": 1 << 30, **profile}
    return {"tensorrt_fp32": [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": 0})],
            "tensorrt_fp16": [("TensorrtExecutionProvider", {**trt, "trt_fp16_enable": True}),
                              ("CUDAExecutionProvider", {"device_id": 0})],
            "cuda": [("CUDAExecutionProvider", {"device_id": 0})]}


def _timed_runs(run: Callable[[], Any], images_per_run: int, seconds: float = 2.0) -> dict[str, float]:
    for _ in range(5):
        run()
    runs, t0 = 0, time.perf_counter()
    while True:
        run()
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and runs >= 5:
            break
    return {"images_per_s": round(images_per_run * runs / elapsed), "ms_per_batch": round(1000 * elapsed / runs, 4)}


def cloud_model(test_images: np.ndarray, batches: list[int]) -> dict[str, Any]:
    try:
        import tensorrt  # noqa: F401  # loads libnvinfer from the tensorrt wheels, for onnxruntime's TensorRT provider
    except ImportError:
        try:
            import tensorrt_bindings  # noqa: F401
        except ImportError:
            pass
    import onnxruntime as ort
    from edge_infer.modelcard import load_card, verified_model_bytes
    from edge_infer.preprocess import Preprocessor

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()   # CUDA/cuDNN from the nvidia-* wheels where present
        except Exception as exc:
            print(f"[gpu_check] onnxruntime.preload_dlls: {exc}")
    card = load_card(CLOUD_CARD)
    model = verified_model_bytes(card)
    pre = Preprocessor(card.input)
    x_all = pre.batch(list(test_images[:max(batches)]))
    ref = pre.batch(list(test_images[:1000]))
    out: dict[str, Any] = {"available_providers": ort.get_available_providers(), "batches": batches}

    def session(providers, threads: int = 0):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        t0 = time.perf_counter()
        s = ort.InferenceSession(model, sess_options=so, providers=providers)
        return s, time.perf_counter() - t0

    cpu_sessions = {"cpu_1_thread": session(["CPUExecutionProvider"], 1)[0],
                    f"cpu_{os.cpu_count()}_threads": session(["CPUExecutionProvider"], os.cpu_count() or 1)[0]}
    cpu_labels = cpu_sessions["cpu_1_thread"].run(None, {"input": ref})[0].argmax(1)
    for name, s in cpu_sessions.items():
        out[name] = {f"batch{b}": _timed_runs(lambda s=s, b=b: s.run(None, {"input": x_all[:b]}), b, 1.0)
                     for b in batches}
    with tempfile.TemporaryDirectory() as cache:
        for name, providers in _provider_sets(cache, max(*batches, 100)).items():
            rec: dict[str, Any] = {}
            out[name] = rec
            try:
                s, created = session(providers)
                t0 = time.perf_counter()
                first = s.run(None, {"input": ref[:1]})
                rec["session_s"], rec["first_run_s"] = round(created, 3), round(time.perf_counter() - t0, 3)
                rec["active_providers"] = s.get_providers()
                del first
                if providers[0][0] not in rec["active_providers"]:
                    # onnxruntime falls back to the CPU quietly: timing that would be the CPU's figure
                    raise RuntimeError(f"{providers[0][0]} did not start (onnxruntime runs {rec['active_providers']})")
                labels = np.concatenate([s.run(None, {"input": ref[i:i + 100]})[0] for i in range(0, 1000, 100)])
                rec["agreement_with_cpu_1000"] = round(float((labels.argmax(1) == cpu_labels).mean()), 4)
                for b in batches:
                    xb = np.ascontiguousarray(x_all[:b])
                    # the model alone: input and output stay on the GPU, bound once
                    dev_in = ort.OrtValue.ortvalue_from_numpy(xb, "cuda", 0)
                    dev_out = ort.OrtValue.ortvalue_from_shape_and_type((b, 10), np.float32, "cuda", 0)
                    io = s.io_binding()
                    io.bind_ortvalue_input("input", dev_in)
                    io.bind_ortvalue_output("logits", dev_out)

                    def on_device(io=io, s=s):
                        s.run_with_iobinding(io)
                        io.synchronize_outputs()

                    # what a worker pays: its batch in host memory, the logits back in host memory
                    io_host = s.io_binding()

                    def from_host(io=io_host, xb=xb, s=s):
                        io.bind_cpu_input("input", xb)
                        io.bind_output("logits", "cpu")
                        s.run_with_iobinding(io)
                        return io.copy_outputs_to_cpu()[0]

                    rec[f"batch{b}"] = {"iobinding_on_device": _timed_runs(on_device, b),
                                        "iobinding_from_host": _timed_runs(from_host, b),
                                        "plain_run": _timed_runs(lambda xb=xb, s=s: s.run(None, {"input": xb}), b)}
                if name.startswith("tensorrt"):
                    del s
                    s2, created2 = session(providers)
                    t0 = time.perf_counter()
                    s2.run(None, {"input": ref[:1]})
                    rec["second_session"] = {"session_s": round(created2, 3),
                                             "first_run_s": round(time.perf_counter() - t0, 3),
                                             "engine_cache_files": sorted(os.listdir(cache))[:20]}
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    return out


def worker_model(test_images: np.ndarray, batch: int) -> dict[str, Any]:
    """The cloud worker's own CloudModel (preprocessing, session.run, softmax) per provider: its corrections/s."""
    from edge_infer_cloud.model import CloudModel
    out: dict[str, Any] = {}
    fitted = None
    for name, providers in (("cpu", ("cpu",)), ("cuda", ("cuda",)), ("tensorrt", ("tensorrt", "cuda"))):
        try:
            m = CloudModel(CLOUD_CARD, providers=providers)
            if fitted is None:
                fitted = [m.pre.fit(im) for im in test_images[:batch]]
            r = _timed_runs(lambda m=m, f=fitted: m.predict_fitted_batch(f), batch)
            out[name] = {"runtime": m.runtime, "providers": m.providers, f"batch{batch}": r}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
    return out


def probe() -> str:
    from edge_infer.backends import check_backend
    return check_backend("tensorrt")


def gpu_tests() -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "tensorrt or hardware",
                        "tests/hardware/test_tensorrt_hw.py", "tests/unit/test_backends_contract.py", "-rs"],
                       cwd=REPO, capture_output=True, text=True, timeout=420)
    lines = (p.stdout + p.stderr).strip().splitlines()
    return {"rc": p.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-40:])[-6000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--batch", type=int, default=64, help="the device backend's max_batch and throughput batch")
    ap.add_argument("--latency-n", type=int, default=2000, help="single invokes timed per precision")
    ap.add_argument("--cloud-batches", default="1,64,256", help="batch sizes for the cloud model, comma-separated")
    ap.add_argument("--skip", default="", help="parts to skip, comma-separated (device_fp32, service, cloud, "
                                               "worker, tests, ...)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from edge_infer.tools.datasets import fashion_mnist_splits
    test = fashion_mnist_splits()["test"]
    tflite = np.load(EDGE_CARD.parent / "predictions.npz")["test_logits"].argmax(1)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "versions": _versions(), "nvidia_smi": _nvidia_smi(),
    }
    results["versions"]["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                text=True).stdout.strip()
    part(results, "probe", probe)
    for precision in ("fp16", "int8", "fp32"):
        if f"device_{precision}" not in skip:
            part(results, f"device_{precision}", lambda p=precision: device_backend(
                p, test.images, test.labels, tflite, batch=args.batch, latency_n=args.latency_n))
    if "service" not in skip:
        part(results, "service", lambda: service_classify(test.images))
    batches = [int(b) for b in args.cloud_batches.split(",")]
    if "cloud" not in skip:
        part(results, "cloud", lambda: cloud_model(test.images, batches))
    if "worker" not in skip:
        part(results, "worker", lambda: worker_model(test.images, 64))
    if "tests" not in skip:
        part(results, "tests", gpu_tests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
