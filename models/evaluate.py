#!/usr/bin/env python3
"""Evaluate the shipped models through their real runtimes and update their cards.

- edge:  models/fmnist-edge-v1/model.tflite through ai-edge-litert's Interpreter
         (num_threads=1), one image per invoke, preprocessed exactly as card.json
         says (x = pixel / pixel_scale, (x - mean) / std, quantized with the input
         tensor's scale / zero point), output logits dequantized with the output
         tensor's scale / zero point.
- cloud: models/fmnist-cloud-v1/model.onnx through onnxruntime (CPU, 1 thread),
         preprocessed as its card says.

Writes card.json "metrics" (val/test accuracy, runtime, ms per image at batch 1)
and predictions.npz (float32 logits: val_logits, test_logits, val_labels,
test_labels) next to each model, then prints the edge/cloud/hybrid summary.

    .venv-train/bin/python models/evaluate.py
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402

EDGE_DIR = _data.MODELS_DIR / "fmnist-edge-v1"
CLOUD_DIR = _data.MODELS_DIR / "fmnist-cloud-v1"


def load_card(folder: Path) -> tuple[dict, Path]:
    card = _data.read_json(folder / "card.json")
    model_path = folder / card["file"]
    digest = _data.sha256_file(model_path)
    if digest != card["sha256"]:
        raise SystemExit(f"{model_path}: sha256 {digest} does not match card.json {card['sha256']}")
    return card, model_path


def preprocess(images: np.ndarray, card: dict) -> np.ndarray:
    """uint8 (N,28,28) -> float32 in the card's layout (before any quantization)."""
    spec = card["input"]
    x = images.astype(np.float32) / np.float32(spec["pixel_scale"])
    x = (x - np.float32(spec["mean"])) / np.float32(spec["std"])
    if spec["layout"] == "NHWC":
        return x[..., None]
    if spec["layout"] == "NCHW":
        return x[:, None]
    raise ValueError(f"unknown layout {spec['layout']}")


def run_edge(card: dict, model_path: Path, split_images: dict[str, np.ndarray]):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path), num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    q = card["input"]["quantization"]
    oq = card["output"]["quantization"]
    assert np.isclose(q["scale"], in_scale) and q["zero_point"] == in_zp, "card input quantization is stale"
    assert np.isclose(oq["scale"], out_scale) and oq["zero_point"] == out_zp, "card output quantization is stale"
    assert list(inp["shape"]) == card["input"]["shape"] and inp["dtype"] == np.int8

    logits, times = {}, []
    for name, images in split_images.items():
        x = preprocess(images, card)
        xq = np.clip(np.round(x / in_scale + in_zp), -128, 127).astype(np.int8)
        res = np.empty((len(x), 10), np.float32)
        for i in range(len(x)):
            t0 = time.perf_counter()
            interp.set_tensor(inp["index"], xq[i:i + 1])
            interp.invoke()
            o = interp.get_tensor(out["index"])
            times.append(time.perf_counter() - t0)
            res[i] = (o[0].astype(np.float32) - out_zp) * out_scale
        logits[name] = res
    runtime = f"ai-edge-litert {metadata.version('ai-edge-litert')}"
    return logits, 1000.0 * float(np.mean(times[len(times) // 10:])), runtime  # skip warm-up


def run_cloud(card: dict, model_path: Path, split_images: dict[str, np.ndarray]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input" and sess.get_outputs()[0].name == "logits"
    logits = {}
    for name, images in split_images.items():
        x = preprocess(images, card)
        logits[name] = np.concatenate(
            [sess.run(["logits"], {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)]
        ).astype(np.float32)
    # latency at batch 1 (what one offloaded request costs), on 1,000 test images after warm-up
    x = preprocess(split_images["test"][:1100], card)
    times = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        sess.run(["logits"], {"input": x[i:i + 1]})
        times.append(time.perf_counter() - t0)
    runtime = f"onnxruntime {ort.__version__}"
    return logits, 1000.0 * float(np.mean(times[100:])), runtime


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def offload_threshold(conf: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, target: float):
    """Lowest confidence threshold t (keep on device iff conf >= t) whose hybrid accuracy
    is >= target, i.e. the largest share kept on the device. Returns (t, kept, acc)."""
    order = np.argsort(-conf, kind="stable")
    c, e, k = conf[order], edge_ok[order].astype(np.int64), cloud_ok[order].astype(np.int64)
    n = len(c)
    # keeping the top m (m = 0..n): edge correct in the first m + cloud correct in the rest
    acc = (np.concatenate([[0], np.cumsum(e)]) + np.concatenate([[k.sum()], k.sum() - np.cumsum(k)])) / n
    # only cut between distinct confidence values (ties go to the same side)
    valid = np.ones(n + 1, bool)
    valid[1:n] = c[1:] < c[:-1]
    ok = np.flatnonzero(valid & (acc >= target - 1e-12))
    if len(ok) == 0:
        return float("inf"), 0.0, float(acc[0])
    m = int(ok.max())
    t = float(c[m - 1]) if m > 0 else float("inf")
    return t, m / n, float(acc[m])


def hybrid(conf, edge_pred, cloud_pred, labels, t):
    keep = conf >= t
    pred = np.where(keep, edge_pred, cloud_pred)
    return float(keep.mean()), float((pred == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["edge", "cloud"], help="evaluate one model only (no summary)")
    args = ap.parse_args()

    data = _data.splits()
    images = {"val": data["val"].images, "test": data["test"].images}
    labels = {"val": data["val"].labels, "test": data["test"].labels}
    results = {}
    for role, folder, runner in (("edge", EDGE_DIR, run_edge), ("cloud", CLOUD_DIR, run_cloud)):
        if args.only and args.only != role:
            continue
        card, model_path = load_card(folder)
        logits, ms, runtime = runner(card, model_path, images)
        acc = {s: float((logits[s].argmax(1) == labels[s]).mean()) for s in ("val", "test")}
        card["metrics"] = {
            "val_accuracy": round(acc["val"], 4),
            "test_accuracy": round(acc["test"], 4),
            "runtime": runtime,
            "num_threads": 1,
            "ms_per_image": round(ms, 4),
        }
        _data.write_json(folder / "card.json", card)
        np.savez_compressed(
            folder / "predictions.npz",
            val_logits=logits["val"], test_logits=logits["test"],
            val_labels=labels["val"].astype(np.int64), test_labels=labels["test"].astype(np.int64),
        )
        results[role] = logits
        print(f"{card['name']}: val {acc['val']:.4f}  test {acc['test']:.4f}  "
              f"{ms:.3f} ms/image ({runtime}, 1 thread, batch 1)  params {card['params']:,}  "
              f"{model_path.stat().st_size:,} bytes")

    if len(results) < 2:
        return
    e, c = results["edge"], results["cloud"]
    conf = {s: softmax(e[s]).max(1) for s in ("val", "test")}
    ep = {s: e[s].argmax(1) for s in ("val", "test")}
    cp = {s: c[s].argmax(1) for s in ("val", "test")}
    cloud_val = float((cp["val"] == labels["val"]).mean())
    cloud_test = float((cp["test"] == labels["test"]).mean())
    edge_test = float((ep["test"] == labels["test"]).mean())
    print()
    print(f"edge (int8, ai-edge-litert) test accuracy: {edge_test:.4f}")
    print(f"cloud (onnxruntime)          test accuracy: {cloud_test:.4f}")
    print("hybrid = edge label if max-softmax(edge logits) >= t else cloud label; t chosen on val")
    for tol in (0.0, 0.0025, 0.005):
        target = cloud_val - tol
        t, kept_val, acc_val = offload_threshold(
            conf["val"], ep["val"] == labels["val"], cp["val"] == labels["val"], target)
        kept_test, acc_test = hybrid(conf["test"], ep["test"], cp["test"], labels["test"], t)
        print(f"  target val acc >= cloud val {cloud_val:.4f} - {tol * 100:.2f} pp: t = {t:.4f}; "
              f"val: kept {kept_val:.1%} on device, hybrid acc {acc_val:.4f}; "
              f"test: kept {kept_test:.1%}, hybrid acc {acc_test:.4f} (cloud {cloud_test:.4f})")
    both = (ep["test"] == labels["test"]) | (cp["test"] != labels["test"])
    print(f"  oracle router (offload only what the edge gets wrong and the cloud gets right): "
          f"kept {both.mean():.1%}, acc {float(((ep['test'] == labels['test']) | (cp['test'] == labels['test'])).mean()):.4f}")


if __name__ == "__main__":
    main()
