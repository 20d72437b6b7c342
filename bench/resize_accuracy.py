#!/usr/bin/env python3
"""Resize accuracy: the edge model on test images delivered larger than its input, old filter vs new.

    .venv/bin/python bench/resize_accuracy.py [--images 10000] [--out out/resize-accuracy.json]

Every Fashion-MNIST test image (the project's split, edge_infer.tools.datasets) is
rendered in RGB at 2x and 4x, once by nearest-neighbour upscaling (a camera
or tool that repeats pixels; the content is exactly the native image) and
once by bicubic upscaling (a smooth rendering: the content is not exactly
the native image, so some loss is expected whatever the filter). Each
rendering is fitted to the model's 28x28 grey input two ways, side by side
in one run:

    old  the previous Preprocessor.fit: convert to L, resize with BILINEAR
         (reproduced here, frozen)
    new  Preprocessor.fit as shipped (edge_infer.preprocess.resize: area
         average when shrinking)

then run through the device's own path: the model card (sha256 checked),
the card's pixel table (Preprocessor.batch), the tflite-cpu backend, one
image per invoke, argmax of the dequantized logits. Native-size accuracy is
the same path on the 28x28 originals. Also reported: how many fitted inputs
equal the native input exactly, and the fit cost per image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.backends import BackendOptions, create_backend  # noqa: E402
from edge_infer.tools.datasets import fashion_mnist_splits  # noqa: E402
from edge_infer.modelcard import load_card, verified_model_bytes  # noqa: E402
from edge_infer.preprocess import Preprocessor  # noqa: E402
from edge_infer.scores import dequantize  # noqa: E402

EDGE_CARD = REPO / "models" / "fmnist-edge-v1" / "card.json"
RENDERINGS = (("nearest", 2), ("nearest", 4), ("bicubic", 2), ("bicubic", 4))
UPSCALE = {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def render(gray: np.ndarray, how: str, factor: int) -> np.ndarray:
    """A native grey image as an RGB picture `factor` times larger."""
    h, w = gray.shape
    return np.asarray(Image.fromarray(gray).convert("RGB").resize((w * factor, h * factor), UPSCALE[how]))


def old_fit(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Preprocessor.fit before issue 9, for a grey model: convert, then BILINEAR."""
    img = Image.fromarray(pixels).convert("L")
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000, help="first N test images (default: all 10,000)")
    ap.add_argument("--out", type=Path, default=Path("out/resize-accuracy.json"))
    args = ap.parse_args()

    test = fashion_mnist_splits()["test"]
    images, labels = test.images[: args.images], test.labels[: args.images]
    card = load_card(EDGE_CARD)
    if card.input.color != "L":
        raise SystemExit(f"{EDGE_CARD}: this bench reproduces the old path for grey models only")
    pre = Preprocessor(card.input)
    size = (card.input.width, card.input.height)
    backend = create_backend("tflite-cpu", card, verified_model_bytes(card), BackendOptions("auto", 1))

    def label(fitted: np.ndarray) -> int:
        return int(dequantize(backend.invoke(pre.batch([fitted])), card.output).argmax())

    n = len(images)
    native = np.empty(n, np.int64)
    pred = {(r, f): np.empty(n, np.int64) for r in RENDERINGS for f in ("old", "new")}
    exact = {(r, f): 0 for r in RENDERINGS for f in ("old", "new")}
    fit_s = {(r, f): 0.0 for r in RENDERINGS for f in ("old", "new")}
    try:
        for i, im in enumerate(images):
            native[i] = label(pre.fit(im))
            for r in RENDERINGS:
                big = render(im, *r)
                for f, fit in (("old", lambda p: old_fit(p, size)), ("new", pre.fit)):
                    t0 = time.perf_counter()
                    fitted = fit(big)
                    fit_s[r, f] += time.perf_counter() - t0
                    exact[r, f] += bool(np.array_equal(fitted, im))
                    pred[r, f][i] = label(fitted)
    finally:
        backend.close()

    def acc(p: np.ndarray) -> float:
        return float((p == labels).mean())

    native_acc = acc(native)
    rows = []
    for r in RENDERINGS:
        row = {"rendering": f"{r[0]} {r[1]}x", "size": f"{size[0] * r[1]}x{size[1] * r[1]} RGB"}
        for f in ("old", "new"):
            row[f] = {"accuracy": round(acc(pred[r, f]), 4),
                      "points_vs_native": round(100 * (acc(pred[r, f]) - native_acc), 2),
                      "same_label_as_native": round(float((pred[r, f] == native).mean()), 4),
                      "input_equals_native": round(exact[r, f] / n, 4),
                      "fit_us_per_image": round(fit_s[r, f] / n * 1e6, 1)}
        rows.append(row)
    report = {"model": card.model_id, "runtime": backend.runtime, "images": n,
              "old_filter": "convert L, resize BILINEAR", "new_filter": "edge_infer.preprocess.resize (reduce/BOX down)",
              "native_accuracy": round(native_acc, 4), "renderings": rows}

    print(f"model {card.model_id} on {backend.runtime}, {n} Fashion-MNIST test images, one invoke each")
    print(f"  native 28x28 grey        accuracy {native_acc:.2%}")
    print(f"  {'rendering':<11}{'input':<13}{'old BILINEAR':>15}{'new BOX/reduce':>18}{'same input (old/new)':>24}"
          f"{'fit us (old/new)':>19}")
    for row in rows:
        o, w = row["old"], row["new"]
        print(f"  {row['rendering']:<11}{row['size']:<13}"
              f"{o['accuracy']:>7.2%} ({o['points_vs_native']:+5.2f})"
              f"{w['accuracy']:>10.2%} ({w['points_vs_native']:+5.2f})"
              f"{o['input_equals_native']:>14.1%} / {w['input_equals_native']:<7.1%}"
              f"{o['fit_us_per_image']:>10.1f} / {w['fit_us_per_image']:.1f}")
    print("  (points vs native in parentheses; goal for nearest renderings: within 1 point)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
