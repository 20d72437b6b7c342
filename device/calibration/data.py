"""What calibrate reads: labelled images (a Fashion-MNIST IDX folder, an .npz, or one folder
per class) split into validation and test, and the cloud model's answers (its model run here,
or a predictions file)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..scores import max_softmax_batch, probabilities
from ..tools.datasets import DatasetError, fashion_mnist_splits, load_npz
from ..tools.runmodel import cloud_outputs
from . import CalibrateError


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"}


@dataclass(frozen=True)
class ImageSet:
    images: Sequence[np.ndarray]    # uint8 (H, W) or (H, W, 3); an (N, H, W) array or a list
    labels: np.ndarray              # (N,) int64
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> ImageSet:
        return ImageSet(self.images[:n], self.labels[:n], self.source)


# ----------------------------------------------------------------------------- images

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def class_index(folder_name: str, labels: Sequence[str]) -> int | None:
    """A class folder's label index: the exact label, its index, or the label with every run of
    non-alphanumerics as '_' ("t-shirt/top" -> "t_shirt_top"), case-insensitive."""
    if folder_name in labels:
        return labels.index(folder_name)
    if folder_name.isdigit() and int(folder_name) < len(labels):
        return int(folder_name)
    slugs = [_slug(x) for x in labels]
    return slugs.index(_slug(folder_name)) if _slug(folder_name) in slugs else None


def load_class_folders(root: Path, labels: Sequence[str]) -> ImageSet:
    from ..preprocess import ImageError, decode_image
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise CalibrateError(f"{root} has no class sub-folders; expected one folder per class named like the "
                             f"card's labels or their indices (0..{len(labels) - 1})")
    images: list[np.ndarray] = []
    ys: list[int] = []
    for d in subdirs:
        idx = class_index(d.name, labels)
        if idx is None:
            named = ", ".join(f"{i}={x}" for i, x in enumerate(labels[:20]))
            more = f", ... ({len(labels)} labels: the card lists them)" if len(labels) > 20 else ""
            raise CalibrateError(f"{d}: folder name {d.name!r} is not a label of the edge card ({named}{more}); "
                                 "rename it to the label or its index")
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(decode_image(f.read_bytes()).pixels)
            except (OSError, ImageError) as exc:
                raise CalibrateError(f"{f}: {exc}; remove or replace the file") from None
            ys.append(idx)
    if not images:
        raise CalibrateError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return ImageSet(images, np.asarray(ys, dtype=np.int64), f"class folders {root}")


def _is_idx_folder(path: Path) -> bool:
    return path.is_dir() and (path / "train-images-idx3-ubyte.gz").exists() \
        and (path / "t10k-images-idx3-ubyte.gz").exists()


def load_image_set(path: Path, labels: Sequence[str]) -> ImageSet:
    if not path.exists():
        raise CalibrateError(f"{path} not found: give --data an IDX folder, an .npz or a folder of class folders")
    if path.is_file():
        if path.suffix != ".npz":
            raise CalibrateError(f"{path}: a data file must be an .npz with arrays 'images' and 'labels'")
        try:
            li = load_npz(path)
        except DatasetError as exc:
            raise CalibrateError(str(exc)) from None
        return ImageSet(li.images, li.labels, f"npz {path}")
    return load_class_folders(path, labels)


def load_data(data: Path, test_data: Path | None, labels: Sequence[str], seed: int) -> tuple[ImageSet, ImageSet, str]:
    """(validation, test, how they were made)."""
    if _is_idx_folder(data):
        try:
            sp = fashion_mnist_splits(data)
        except DatasetError as exc:
            raise CalibrateError(str(exc)) from None
        val = ImageSet(sp["val"].images, sp["val"].labels, f"Fashion-MNIST IDX {data} (val split)")
        if test_data is None:
            return val, ImageSet(sp["test"].images, sp["test"].labels, f"Fashion-MNIST IDX {data} (test split)"), \
                "the project's fixed Fashion-MNIST split (device/tools/datasets.py): val for choosing, test for reporting"
        return val, _load_test(test_data, labels), "val split of the IDX folder; separate test data"
    full = load_image_set(data, labels)
    if test_data is not None:
        return full, _load_test(test_data, labels), "separate validation and test data"
    order = np.random.default_rng(seed).permutation(len(full))
    half = len(full) // 2
    if half < 2:
        raise CalibrateError(f"{data}: {len(full)} images are too few to split into validation and test")
    pick = lambda idx: ImageSet([full.images[i] for i in idx] if isinstance(full.images, list)
                                else full.images[idx], full.labels[idx], full.source)
    vi, ti = np.sort(order[:half]), np.sort(order[half:])
    return pick(vi), pick(ti), f"{data} split in half at random (seed {seed}): validation / test"


def _load_test(path: Path, labels: Sequence[str]) -> ImageSet:
    if _is_idx_folder(path):
        sp = fashion_mnist_splits(path)
        return ImageSet(sp["test"].images, sp["test"].labels, f"Fashion-MNIST IDX {path} (test split)")
    return load_image_set(path, labels)


def check_labels(ds: ImageSet, num_classes: int, what: str) -> None:
    if len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= num_classes):
        raise CalibrateError(f"{what} ({ds.source}) has labels outside 0..{num_classes - 1}, the edge card's classes")


# ----------------------------------------------------------------------------- the cloud's answers

def cloud_predictions_from_model(card_path: Path, sets: dict[str, ImageSet], threads: int, progress: bool,
                                 batch: int = 256) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        from edge_infer_cloud.model import CloudModel   # the cloud side; calibrate is an ML engineer's tool
    except ImportError as exc:
        raise CalibrateError(f"cannot run the cloud model here ({exc}): install 'edge-infer[cloud]', or pass "
                             "--cloud-predictions with its answers") from None
    try:
        model = CloudModel(card_path, intra_op_threads=threads)
    except ModuleNotFoundError as exc:
        raise CalibrateError(f"cannot run the cloud model here ({exc}): install 'edge-infer[cloud]', or pass "
                             "--cloud-predictions with its answers") from None
    preds: dict[str, np.ndarray] = {}
    for name, ds in sets.items():
        outputs = cloud_outputs(model, ds.images, batch, progress, f"cloud {name}")
        labels, _ = max_softmax_batch(probabilities(outputs, model.card.output))   # as the worker answers
        preds[name] = np.asarray(labels, dtype=np.int64)
    return preds, {"card": str(card_path), "model": model.card.model_id, "runtime": model.runtime,
                   "labels": list(model.card.labels)}


def _as_labels(arr: np.ndarray, what: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        if arr.shape[1] != num_classes:
            raise CalibrateError(f"{what} has {arr.shape[1]} columns, the edge card has {num_classes} classes")
        return arr.argmax(axis=1).astype(np.int64)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        if len(arr) and (arr.min() < 0 or arr.max() >= num_classes):
            raise CalibrateError(f"{what} has labels outside 0..{num_classes - 1}")
        return arr.astype(np.int64)
    raise CalibrateError(f"{what} must be (N, classes) logits/probabilities or (N,) integer labels, "
                         f"got {arr.dtype} {arr.shape}")


def cloud_predictions_from_file(path: Path, full_sizes: dict[str, int], truth: dict[str, np.ndarray],
                                num_classes: int) -> dict[str, np.ndarray]:
    """The cloud's predicted labels for the full validation and test sets (before --limit).

    An .npz may carry val_labels/test_labels: they must equal the data's labels, which
    catches predictions made for other images or in another order."""
    if not path.is_file():
        raise CalibrateError(f"cloud predictions {path} not found")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            want = full_sizes["val"] + full_sizes["test"]
            if len(arr) != want:
                raise CalibrateError(f"{path}: {len(arr)} rows, expected {want} (validation {full_sizes['val']} "
                                     f"then test {full_sizes['test']})")
            labels = _as_labels(arr, str(path), num_classes)
            preds = {"val": labels[:full_sizes["val"]], "test": labels[full_sizes["val"]:]}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                preds = {}
                for split in ("val", "test"):
                    key = next((k for k in (f"{split}_logits", f"{split}_probabilities", f"{split}_predictions")
                                if k in keys), None)
                    if key is None:
                        raise CalibrateError(f"{path}: no {split}_logits, {split}_probabilities or "
                                             f"{split}_predictions array (it has: {', '.join(sorted(keys))})")
                    preds[split] = _as_labels(z[key], f"{path}:{key}", num_classes)
                    if f"{split}_labels" in keys:
                        stored = np.asarray(z[f"{split}_labels"]).astype(np.int64)
                        if stored.shape != truth[split].shape or not np.array_equal(stored, truth[split]):
                            raise CalibrateError(
                                f"{path}: {split}_labels differ from the {split} data's labels: these predictions "
                                "are for other images or in another order")
        else:
            raise CalibrateError(f"{path}: cloud predictions must be an .npz or .npy file")
    except (OSError, ValueError) as exc:
        raise CalibrateError(f"{path}: cannot read cloud predictions ({exc})") from None
    for split, n in full_sizes.items():
        if len(preds[split]) != n:
            raise CalibrateError(f"{path}: {len(preds[split])} {split} predictions for {n} {split} images")
    return preds
