#!/usr/bin/env python3
"""Write a second card for a shipped edge model that runs it on test-time views (card schema 3,
device/views.py): the image and its four one-pixel shifts, answers averaged. Same model file.

Why a card and not a device setting: the views change the model's confidence, and the
thresholds `edge-infer calibrate` picks are for that confidence; the card is what calibrate,
the device and the benches all read, so they cannot disagree.

    .venv/bin/python models/recipes/fmnist/views_card.py                 # -> models/fmnist-edge-v1/card_views5.json
    .venv/bin/python models/recipes/fmnist/views_card.py --card models/fmnist-edge-v2/card.json

The new card's "metrics" are measured here through the device's own path
(edge_infer.tools.runmodel.edge_logits: one invoke per view, 1 thread): val/test accuracy
and ms per image (all views). Needs only the runtime (.venv), not the training venv.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import _data  # this folder's helpers (the script's folder is on sys.path)

from edge_infer.modelcard import load_card
from edge_infer.tools.runmodel import edge_logits

#: the image as it is and its content moved one pixel right, left, down, up
SHIFTS4 = [{}, {"shift": [0, 1]}, {"shift": [0, -1]}, {"shift": [1, 0]}, {"shift": [-1, 0]}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", type=Path, default=_data.MODELS_DIR / "fmnist-edge-v1" / "card.json")
    ap.add_argument("--views", default=json.dumps(SHIFTS4), help="the views as JSON (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="default: card_views<N>.json beside --card")
    args = ap.parse_args()
    views = json.loads(args.views)
    data = _data.read_json(args.card)
    if data.get("input", {}).get("views"):
        raise SystemExit(f"{args.card} has views already: give the card without them")
    out = args.out or args.card.with_name(f"card_views{len(views)}.json")
    data["schema"] = max(3, data["schema"])
    data["version"] = f"{data['version']}+views{len(views)}"
    data["input"]["views"] = views
    data.pop("metrics", None)
    out.write_text(json.dumps(data, indent=2) + "\n")
    card = load_card(out)          # what the device will parse

    splits = _data.splits()
    logits = {s: edge_logits(card, splits[s].images, runtime="ai-edge-litert", progress=False) for s in ("val", "test")}
    acc = {s: float((logits[s].argmax(1) == splits[s].labels).mean()) for s in ("val", "test")}
    test = splits["test"].images[:1100]
    edge_logits(card, test[:100], runtime="ai-edge-litert", progress=False)   # warm-up
    t0 = time.perf_counter()
    edge_logits(card, test[100:], runtime="ai-edge-litert", progress=False)
    ms = 1000.0 * (time.perf_counter() - t0) / len(test[100:])
    from edge_infer.backends.tflite_cpu import load_interpreter_module
    data["metrics"] = {"val_accuracy": round(acc["val"], 4), "test_accuracy": round(acc["test"], 4),
                       "runtime": load_interpreter_module("ai-edge-litert")[1], "num_threads": 1,
                       "ms_per_image": round(ms, 4), "invokes_per_image": len(views)}
    out.write_text(json.dumps(data, indent=2) + "\n")
    load_card(out)
    print(f"{card.model_id}: val {acc['val']:.4f}  test {acc['test']:.4f}  {ms:.3f} ms/image "
          f"({len(views)} invokes) -> {out}")


if __name__ == "__main__":
    main()
