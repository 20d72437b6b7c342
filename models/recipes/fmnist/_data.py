"""Shared helpers for the Fashion-MNIST recipes: the project's split, the card writer.

The split itself is defined once, in the installed edge_infer package
(edge_infer.tools.datasets.fashion_mnist_splits), so training, calibration and the
demo agree on it; the card is hashed with the runtime's own reader.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge_infer import modelcard
from edge_infer.tools import datasets

RECIPE_DIR = Path(__file__).resolve().parent
MODELS_DIR = RECIPE_DIR.parents[1]          # models/: one folder per model version
CACHE_DIR = MODELS_DIR / ".cache"  # git-ignored: logs, checkpoints, intermediate files

LABELS = list(datasets.FMNIST_LABELS)
DATASET_DESCRIPTION = (
    "Fashion-MNIST (Debian dataset-fashion-mnist), split from edge_infer.tools.datasets: "
    "55,000 train / 5,000 val / 10,000 test"
)


def splits():
    """dict train/val/test of datasets.LabelledImages (uint8 (N,28,28), int64 labels)."""
    return datasets.fashion_mnist_splits()


def sha256_file(path: str | Path) -> str:
    return modelcard.sha256_file(Path(path))


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_card(card_path: Path, card: dict) -> None:
    """Write a model card; keep an earlier evaluate.py run's metrics only if the model is unchanged."""
    if card_path.exists():
        old = read_json(card_path)
        if old.get("sha256") == card["sha256"]:
            card["metrics"] = old.get("metrics", {})
    write_json(card_path, card)
