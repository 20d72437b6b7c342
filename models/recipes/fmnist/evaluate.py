#!/usr/bin/env python3
"""Evaluate the shipped models through the runtime's own code and update their cards.

- edge:  models/fmnist-edge-v1 (or --edge-dir) through the device's path (model card, sha256
         check, card-driven preprocessing, the tflite-cpu backend on
         ai-edge-litert with 1 thread, one image per invoke, dequantized logits):
         edge_infer.tools.runmodel.edge_logits.
- cloud: models/fmnist-cloud-v1 (or --cloud-dir) through the cloud worker's CloudModel
         (onnxruntime, 1 thread): edge_infer.tools.runmodel.cloud_outputs.

Writes card.json "metrics" (val/test accuracy, runtime, ms per image at batch 1)
and predictions.npz (float32 logits: val_logits, test_logits, val_labels,
test_labels) next to each model. For the offload trade between the two, run
`edge-infer calibrate` (docs/calibration.md).

    .venv-train/bin/pip install -e .      # the edge_infer package, for its runtime code
    .venv-train/bin/python models/recipes/fmnist/evaluate.py
    .venv-train/bin/python models/recipes/fmnist/evaluate.py --only edge --edge-dir models/fmnist-edge-v2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import _data  # this folder's helpers (the script's folder is on sys.path)
from edge_infer.modelcard import load_card
from edge_infer.tools.runmodel import cloud_outputs, edge_logits

EDGE_DIR = _data.MODELS_DIR / "fmnist-edge-v1"
CLOUD_DIR = _data.MODELS_DIR / "fmnist-cloud-v1"


def run_edge(card_path: Path, split_images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, str]:
    from edge_infer.backends.tflite_cpu import load_interpreter_module
    card = load_card(card_path)
    logits = {name: edge_logits(card, images, runtime="ai-edge-litert", progress=False)
              for name, images in split_images.items()}
    test = split_images["test"][:1100]
    edge_logits(card, test[:100], runtime="ai-edge-litert", progress=False)   # warm-up
    t0 = time.perf_counter()
    edge_logits(card, test[100:], runtime="ai-edge-litert", progress=False)
    ms = 1000.0 * (time.perf_counter() - t0) / len(test[100:])
    return logits, ms, load_interpreter_module("ai-edge-litert")[1]


def run_cloud(card_path: Path, split_images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, str]:
    from edge_infer_cloud.model import CloudModel
    model = CloudModel(card_path, intra_op_threads=1)
    logits = {name: cloud_outputs(model, images, batch_size=500, progress=False, label=f"cloud {name}")
              for name, images in split_images.items()}
    # latency at batch 1 (what one offloaded request costs), on 1,000 test images after warm-up
    test = split_images["test"][:1100]
    cloud_outputs(model, test[:100], batch_size=1, progress=False)
    t0 = time.perf_counter()
    cloud_outputs(model, test[100:], batch_size=1, progress=False)
    ms = 1000.0 * (time.perf_counter() - t0) / len(test[100:])
    return logits, ms, model.runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["edge", "cloud"], help="evaluate one model only")
    ap.add_argument("--edge-dir", type=Path, default=EDGE_DIR,
                    help="the edge model folder (card.json inside) to evaluate (default: %(default)s)")
    ap.add_argument("--cloud-dir", type=Path, default=CLOUD_DIR,
                    help="the cloud model folder (card.json inside) to evaluate (default: %(default)s)")
    args = ap.parse_args()

    data = _data.splits()
    images = {"val": data["val"].images, "test": data["test"].images}
    labels = {"val": data["val"].labels, "test": data["test"].labels}
    for role, folder, runner in (("edge", args.edge_dir, run_edge), ("cloud", args.cloud_dir, run_cloud)):
        if args.only and args.only != role:
            continue
        logits, ms, runtime = runner(folder / "card.json", images)
        acc = {s: float((logits[s].argmax(1) == labels[s]).mean()) for s in ("val", "test")}
        card = _data.read_json(folder / "card.json")
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
        print(f"{card['name']}: val {acc['val']:.4f}  test {acc['test']:.4f}  "
              f"{ms:.3f} ms/image ({runtime}, 1 thread, batch 1)  params {card['params']:,}  "
              f"{(folder / card['file']).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
