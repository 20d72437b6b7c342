"""Shared helpers for the model scripts: the project's Fashion-MNIST split.

The split itself is defined once in device/datasets.py (fashion_mnist_splits);
this helper imports that module straight from the repository so the scripts do
not depend on the edge_infer package being installed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
REPO_ROOT = MODELS_DIR.parent
CACHE_DIR = MODELS_DIR / ".cache"  # git-ignored: logs, checkpoints, intermediate files

if str(REPO_ROOT / "device") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "device"))

import datasets  # noqa: E402  (device/datasets.py)
import modelcard  # noqa: E402  (device/modelcard.py: the card reader the runtime uses)

LABELS = list(datasets.FMNIST_LABELS)
DATASET_DESCRIPTION = (
    "Fashion-MNIST (Debian dataset-fashion-mnist), split from device/datasets.py: "
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
