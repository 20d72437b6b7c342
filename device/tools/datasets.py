"""Labelled image sets in the forms the shipped models use (IDX gzip, npz).

Pure readers: they return numpy arrays and never download anything. The
Fashion-MNIST split used by every script (train / validation / test) is
defined here once so the training, calibration and demo code agree on it.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ..errors import EdgeInferError

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_LABELS: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
#: Training images held out for validation / calibration (never trained on).
VALIDATION_SIZE = 5000
SPLIT_SEED = 20261123

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(EdgeInferError, ValueError):
    """A dataset file is missing or not in the expected format."""

    exit_code = 2


@dataclass(frozen=True)
class LabelledImages:
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | slice) -> "LabelledImages":
        return LabelledImages(self.images[index], self.labels[index])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path} not found. Fashion-MNIST ships in the Debian package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: expected {expected} data bytes for shape {shape}, got {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(kind: str, root: str | Path = DEFAULT_FMNIST_DIR) -> LabelledImages:
    """kind: 'train' (60,000) or 't10k' (10,000, the test split)."""
    if kind not in ("train", "t10k"):
        raise ValueError("kind must be 'train' or 't10k'")
    root = Path(root)
    images = read_idx(root / f"{kind}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{kind}-labels-idx1-ubyte.gz").astype(np.int64)
    return LabelledImages(images, labels)


def fashion_mnist_splits(root: str | Path = DEFAULT_FMNIST_DIR) -> dict[str, LabelledImages]:
    """The project's fixed split: train (55,000), val (5,000), test (10,000).

    The validation images are a seeded random draw from the official training
    set; the official test set is kept untouched for evaluation.
    """
    train = load_fashion_mnist("train", root)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    val_idx = np.sort(order[:VALIDATION_SIZE])
    train_idx = np.sort(order[VALIDATION_SIZE:])
    return {
        "train": train.subset(train_idx),
        "val": train.subset(val_idx),
        "test": load_fashion_mnist("t10k", root),
    }


def load_npz(path: str | Path) -> LabelledImages:
    """An .npz with arrays 'images' (N,H,W[,C] uint8) and 'labels' (N,)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return LabelledImages(np.asarray(z["images"]), np.asarray(z["labels"]).astype(np.int64))
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read labelled npz ({exc}); expected arrays 'images' and 'labels'") from exc
