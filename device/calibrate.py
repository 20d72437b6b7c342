"""``edge-infer calibrate``: choose the offload score and threshold from labelled data.

Runs the edge model through the same backend and preprocessing code the device
uses, gets the cloud model's answers (by running it, or from a predictions
file), fits the temperature and the router on the validation split, chooses a
threshold per score on validation for the target, reports every score on the
untouched test split, and writes:

- ``policy.toml``   the ``[policy]`` snippet for the device (score, threshold,
                    temperature, router_file)
- ``router.json``   the router, when the router is the chosen score
- ``calibration.json``  the full report
- ``offload_curve.png`` hybrid accuracy against the share offloaded, per score

The maths lives in :mod:`edge_infer.calibration` (pure); this module is I/O.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import (
    DEFAULT_ROUTER_FEATURES, ROUTER_MODELS, Calibration, RouterTraining, Split, calibrate_arrays,
)
from .router import FEATURES, ROUTER_TARGETS, save_router
from .scores import SCORES, max_softmax_batch, probabilities
from .tools.datasets import DEFAULT_FMNIST_DIR, DatasetError, fashion_mnist_splits, load_npz
from .tools.runmodel import cloud_outputs, edge_logits
from .modelcard import ModelCardError, load_card

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"}
POLICY_FILE = "policy.toml"
ROUTER_FILE = "router.json"
REPORT_FILE = "calibration.json"
PLOT_FILE = "offload_curve.png"
PLOT_EXTRA = "calibrate"   # pip install 'edge-infer[calibrate]' brings matplotlib


class CalibrateError(Exception):
    """A user-facing problem with the inputs; the message says what to do."""


@dataclass(frozen=True)
class ImageSet:
    images: Sequence[np.ndarray]    # uint8 (H, W) or (H, W, 3); an (N, H, W) array or a list
    labels: np.ndarray              # (N,) int64
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> ImageSet:
        return ImageSet(self.images[:n], self.labels[:n], self.source)


# ----------------------------------------------------------------------------- arguments

def _share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (a share, e.g. 0.3 for 30%)")
    return v


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    if p.description is None and __doc__:
        p.description = __doc__.split("\n\n")[0]
    m = p.add_argument_group("models")
    m.add_argument("--edge-card", type=Path, required=True, help="the edge model's card.json")
    cloud = m.add_mutually_exclusive_group(required=True)
    cloud.add_argument("--cloud-card", type=Path, help="the cloud model's card.json (run with onnxruntime; "
                                                       "needs the 'cloud' extra)")
    cloud.add_argument("--cloud-predictions", type=Path,
                       help="the cloud model's answers instead: .npz with val_logits/test_logits (or "
                            "val_predictions/test_predictions), or .npy with validation then test rows")
    m.add_argument("--backend", default="tflite-cpu", help="edge backend (default: tflite-cpu)")
    m.add_argument("--runtime", default="auto", help="TFLite runtime: auto, ai-edge-litert or tflite-runtime")
    m.add_argument("--cloud-threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, default=DEFAULT_FMNIST_DIR,
                   help="labelled validation data: a Fashion-MNIST IDX folder (gives both the val and the test "
                        "split), an .npz (images, labels), or a folder with one sub-folder per class "
                        "(default: %(default)s)")
    d.add_argument("--test-data", type=Path, default=None,
                   help="labelled test data, never used for choosing (same forms; without it a non-IDX --data "
                        "is split in half, seeded)")
    d.add_argument("--limit", type=int, default=None, help="use only the first N images of each split "
                                                          "(a quick look, not a calibration)")
    t = p.add_argument_group("target (one of)")
    tg = t.add_mutually_exclusive_group()
    tg.add_argument("--target", choices=["cloud"], default="cloud",
                    help="reach the cloud model's validation accuracy with the least offloading (default)")
    t.add_argument("--tolerance", type=_share, default=0.0, metavar="POINTS",
                   help="with --target cloud: accept this much below the cloud's accuracy, in accuracy points "
                        "(0.0025 = 0.25 pp); near the top the curve is flat, so a little keeps much more local")
    tg.add_argument("--target-accuracy", type=_share, default=None, metavar="ACC",
                    help="reach this hybrid accuracy (e.g. 0.92) with the least offloading")
    tg.add_argument("--max-offload-share", type=_share, default=None, metavar="SHARE",
                    help="offload at most this share of inputs (a bandwidth/cost budget), best accuracy within it")
    s = p.add_argument_group("scores")
    s.add_argument("--scores", default=",".join(SCORES),
                   help="comma-separated scores to evaluate (default: all: %(default)s)")
    s.add_argument("--pick", choices=SCORES, default=None,
                   help="write the snippet for this score instead of the best one (e.g. when the devices "
                        "do not support the router yet)")
    s.add_argument("--router-model", choices=ROUTER_MODELS, default="logistic")
    s.add_argument("--router-target", choices=ROUTER_TARGETS, default="edge_correct",
                   help="what the router predicts: the edge answer is right (default), or offloading would "
                        "not fix it")
    s.add_argument("--router-features", default=",".join(DEFAULT_ROUTER_FEATURES),
                   help=f"comma-separated router inputs from: {', '.join(FEATURES)} (default: %(default)s)")
    s.add_argument("--router-hidden", type=int, default=16, help="hidden units of the MLP router")
    s.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the router (default: 5)")
    s.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("calibration"),
                   help="output folder for policy.toml, calibration.json, offload_curve.png, router.json "
                        "(default: %(default)s)")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    o.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- data

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
    from .preprocess import ImageError, decode_image
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise CalibrateError(f"{root} has no class sub-folders; expected one folder per class named like the "
                             f"card's labels or their indices (0..{len(labels) - 1})")
    images: list[np.ndarray] = []
    ys: list[int] = []
    for d in subdirs:
        idx = class_index(d.name, labels)
        if idx is None:
            raise CalibrateError(f"{d}: folder name {d.name!r} is not a label of the edge card ("
                                 + ", ".join(f"{i}={x}" for i, x in enumerate(labels))
                                 + "); rename it to the label or its index")
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


def _check_labels(ds: ImageSet, num_classes: int, what: str) -> None:
    if len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= num_classes):
        raise CalibrateError(f"{what} ({ds.source}) has labels outside 0..{num_classes - 1}, the edge card's classes")


# ----------------------------------------------------------------------------- models

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


# ----------------------------------------------------------------------------- outputs

def _toml_str(s: str) -> str:
    return json.dumps(s)   # a JSON string is a valid TOML basic string


def policy_snippet(score: str, threshold: float, temperature: float, router_file: str | None, header: str) -> str:
    """The ``[policy]`` table for the device config. ``router_file`` is written only when there is
    one (the device's loader rejects an empty path; it needs the key only for score = "router")."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [
        "[policy]",
        f"score = {_toml_str(score)}",
        f"threshold = {float(threshold)!r}",
        f"temperature = {float(temperature)!r}",
        f"router_file = {_toml_str(router_file)}" if router_file
        else '# router_file: only for score = "router"',
    ]
    return "\n".join(lines) + "\n"


def build_report(cal: Calibration, picked: str | None, inputs: dict[str, Any], runtime_s: dict[str, float]) -> dict:
    chosen = cal.results.get(picked) if picked else None
    return {
        "tool": "edge-infer calibrate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "sizes": cal.sizes,
        "target": cal.target.to_dict() | {"test_accuracy_to_reach": cal.test_target_accuracy},
        "edge_only_accuracy": cal.edge_accuracy,
        "cloud_only_accuracy": cal.cloud_accuracy,
        "temperature": cal.temperature,
        "router": cal.router_note,
        "best_on_validation": cal.chosen,
        "chosen": None if chosen is None else {
            "score": picked, "threshold": chosen.val.threshold if chosen.val else None,
            "validation": chosen.val.to_dict() if chosen.val else None,
            "test": chosen.test.to_dict() if chosen.test else None,
        },
        "scores": {k: r.to_dict() | {"validation_gain_vs_max_softmax": cal.val_gain[k].to_dict()
                                     if k in cal.val_gain else None} for k, r in cal.results.items()},
        "oracle_router": cal.oracle.to_dict(),
        "curves": {k: {s: c.sampled(100) for s, c in v.items()} for k, v in cal.curves.items()},
        "runtime_s": {k: round(v, 2) for k, v in runtime_s.items()},
    }


def plot_offload_curves(path: Path, cal: Calibration, picked: str | None) -> None:
    """The reference figure: hybrid accuracy against share offloaded, every score, both splits;
    the bottom row zooms in on the cloud's accuracy, where the threshold is chosen."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CalibrateError(f"the plot needs matplotlib: pip install 'edge-infer[{PLOT_EXTRA}]', or pass "
                             "--no-plot") from None
    fig = Figure(figsize=(12, 9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    colors = {"max_softmax": "tab:blue", "temperature": "tab:orange", "margin": "tab:green",
              "entropy": "tab:purple", "router": "tab:red"}
    result = cal.results.get(picked) if picked else None
    for col, split, title in ((0, "val", "validation (threshold chosen here)"),
                              (1, "test", "test (reported; untouched while choosing)")):
        edge, cloud = cal.edge_accuracy[split], cal.cloud_accuracy[split]
        best = max([c[split].accuracy.max() for c in cal.curves.values()] + [cloud])
        oracle_best = cal.oracle_curves[split].accuracy.max()
        for row, (lo, hi) in enumerate(((edge - 0.01, oracle_best + 0.005), (cloud - 0.015, best + 0.004))):
            ax = axes[row, col]
            for name, curves in cal.curves.items():
                c = curves[split]
                ax.plot(c.offloaded_share * 100, c.accuracy * 100, color=colors.get(name), lw=1.3,
                        label=name + (" (chosen)" if name == picked else ""))
            oc = cal.oracle_curves[split]
            ax.plot(oc.offloaded_share * 100, oc.accuracy * 100, color="gray", ls=":", lw=1,
                    label="oracle router (upper bound)")
            ax.axhline(edge * 100, color="gray", ls="--", lw=1, label=f"edge only {edge:.2%}")
            ax.axhline(cloud * 100, color="black", ls="--", lw=1, label=f"cloud only {cloud:.2%}")
            if cal.target.kind == "accuracy":
                ax.axhline(cal.target.value * 100, color="tab:red", ls=":", lw=1,
                           label=f"target {cal.target.value:.2%}")
                hi = max(hi, cal.target.value + 0.002)
            if cal.target.kind == "max_offload_share":
                ax.axvline(cal.target.value * 100, color="tab:red", ls=":", lw=1,
                           label=f"budget {cal.target.value:.0%}")
            pt = None if result is None else (result.val if split == "val" else result.test)
            if pt is not None:
                ax.plot([pt.offloaded_share * 100], [pt.accuracy * 100], marker="o", ms=9, mfc="none", mew=2,
                        color=colors.get(picked, "black"), label=f"chosen: {pt.kept_share:.1%} kept, {pt.accuracy:.2%}")
            ax.set_xlim(0, 100)
            ax.set_ylim(lo * 100, hi * 100)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{title}, n={cal.sizes[split]:,}")
                ax.legend(loc="lower right", fontsize=8)
            else:
                ax.set_title("zoom on the cloud's accuracy", fontsize=9)
                ax.set_xlabel("inputs offloaded to the cloud (%)")
        axes[0, 0].set_ylabel("hybrid accuracy (%)")
        axes[1, 0].set_ylabel("hybrid accuracy (%)")
    fig.suptitle("edge-infer calibrate: hybrid accuracy vs share offloaded\n(" + cal.target.describe() + ")",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _table(cal: Calibration, picked: str | None) -> str:
    rows = [(f"{'score':<12} {'val kept':>9} {'val acc':>8} {'test kept':>10} {'test acc':>9} {'gap acc':>8} "
             f"{'threshold':>10}")]
    for name, r in cal.results.items():
        if r.val is None:
            rows.append(f"{name:<12} {'target unreachable on validation (best ' + f'{r.val_best.accuracy:.4f})':>50}")
            continue
        mark = "  <- chosen" if name == picked else ""
        rows.append(f"{name:<12} {r.val.kept_share:>9.1%} {r.val.accuracy:>8.4f} {r.test.kept_share:>10.1%} "
                    f"{r.test.accuracy:>9.4f} {r.test.accuracy - r.val.accuracy:>+8.4f} {r.val.threshold:>10.5f}{mark}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the command

def _target(args: argparse.Namespace) -> tuple[str, float | None]:
    if getattr(args, "target_accuracy", None) is not None:
        return "accuracy", args.target_accuracy
    if getattr(args, "max_offload_share", None) is not None:
        return "max_offload_share", args.max_offload_share
    return "cloud", None


def run_calibrate(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (CalibrateError, ModelCardError, DatasetError) as exc:
        print(f"edge-infer calibrate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # an unwritable --out, a file that vanished while reading
        print(f"edge-infer calibrate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .backends import BackendError
        if isinstance(exc, BackendError):
            print(f"edge-infer calibrate: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    progress = not args.no_progress
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise CalibrateError(f"--scores: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(SCORES)}")
    if args.pick and args.pick not in scores:
        raise CalibrateError(f"--pick {args.pick} is not among --scores {','.join(scores)}")
    features = tuple(f.strip() for f in args.router_features.split(",") if f.strip())
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise CalibrateError(f"--router-features: unknown {', '.join(bad) or '(none given)'}; "
                             f"choose from {', '.join(FEATURES)}")
    if args.folds < 2:
        raise CalibrateError("--folds must be at least 2")
    if args.tolerance and (args.target_accuracy is not None or args.max_offload_share is not None):
        raise CalibrateError("--tolerance applies to --target cloud only")
    if args.limit is not None and args.limit < 2:
        raise CalibrateError("--limit must be at least 2")
    if not args.no_plot:   # fail before minutes of work, not after
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise CalibrateError(f"the plot needs matplotlib: pip install 'edge-infer[{PLOT_EXTRA}]', or pass "
                                 "--no-plot")

    card = load_card(args.edge_card)
    labels = list(card.labels)
    if args.cloud_card is not None and list(load_card(args.cloud_card).labels) != labels:
        raise CalibrateError(f"{args.cloud_card}: the cloud card's labels differ from the edge card's "
                             f"({args.edge_card}); both models must use the same classes in the same order")
    t0 = time.monotonic()
    val_set, test_set, split_note = load_data(args.data, args.test_data, labels, args.seed)
    full_sizes = {"val": len(val_set), "test": len(test_set)}
    full_labels = {"val": val_set.labels, "test": test_set.labels}
    if args.limit:
        val_set, test_set = val_set.head(args.limit), test_set.head(args.limit)
    _check_labels(val_set, len(labels), "validation data")
    _check_labels(test_set, len(labels), "test data")
    timings["load_data"] = time.monotonic() - t0
    log.info("validation %d images, test %d images (%s)", len(val_set), len(test_set), split_note)

    t0 = time.monotonic()
    logits = {name: edge_logits(card, ds.images, args.backend, args.runtime, progress, f"edge {name}")
              for name, ds in (("val", val_set), ("test", test_set))}
    timings["edge_inference"] = time.monotonic() - t0

    t0 = time.monotonic()
    if args.cloud_card is not None:
        cloud_pred, cloud_info = cloud_predictions_from_model(
            args.cloud_card, {"val": val_set, "test": test_set}, args.cloud_threads, progress)
    else:
        full = cloud_predictions_from_file(args.cloud_predictions, full_sizes, full_labels, len(labels))
        cloud_pred = {"val": full["val"][:len(val_set)], "test": full["test"][:len(test_set)]}
        cloud_info = {"predictions": str(args.cloud_predictions)}
    timings["cloud_predictions"] = time.monotonic() - t0

    t0 = time.monotonic()
    kind, value = _target(args)
    router_cfg = RouterTraining(model=args.router_model, features=features, target=args.router_target,
                                hidden=args.router_hidden, seed=args.seed)
    try:
        cal = calibrate_arrays(Split(logits["val"], val_set.labels, cloud_pred["val"]),
                               Split(logits["test"], test_set.labels, cloud_pred["test"]),
                               target_kind=kind, target_value=value, scores=scores, router_cfg=router_cfg,
                               folds=args.folds, seed=args.seed, tolerance=args.tolerance)
    except ValueError as exc:
        raise CalibrateError(str(exc)) from None
    timings["calibration"] = time.monotonic() - t0

    picked = args.pick or cal.chosen
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    written = []
    res = cal.results.get(picked) if picked else None
    if args.pick and (res is None or res.val is None):
        print(f"edge-infer calibrate: --pick {args.pick} "
              + ("was skipped: " + cal.router_note if res is None else "does not meet the target on validation"),
              file=sys.stderr)
        res, rc = None, 1
    policy_path = out / POLICY_FILE
    if res is None or res.val is None:
        best = max(cal.results.values(), key=lambda r: r.val_best.accuracy, default=None)
        if rc == 0:
            print("edge-infer calibrate: no score meets the target on validation ("
                  + cal.target.describe() + ")"
                  + (f"; the best is {best.score} at accuracy {best.val_best.accuracy:.4f} offloading "
                     f"{best.val_best.offloaded_share:.1%}" if best else "")
                  + ". Lower --target-accuracy or raise --max-offload-share. No policy snippet written.",
                  file=sys.stderr)
        rc = 1
        if policy_path.exists():
            policy_path.unlink()   # never leave a stale snippet beside a new report
    else:
        router_file = None
        if picked == "router":
            assert cal.router is not None
            router_path = out / ROUTER_FILE
            save_router(cal.router, router_path)
            router_file = ROUTER_FILE   # relative paths in a device config are relative to the config's folder
            written.append(router_path)
        threshold = res.val.threshold
        if threshold > 1.0:
            log.warning("the target needs every input offloaded; threshold %.6g is written as 1.0 (inputs scoring "
                        "exactly 1.0 stay on the device)", threshold)
            threshold = 1.0
        header = (f"written by edge-infer calibrate on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
                  f"edge {card.model_id}; target: {cal.target.describe()}\n"
                  f"validation: kept {res.val.kept_share:.2%} on device, hybrid accuracy {res.val.accuracy:.4f}\n"
                  f"test:       kept {res.test.kept_share:.2%} on device, hybrid accuracy {res.test.accuracy:.4f}\n"
                  "offload when score < threshold; temperature is used by score \"temperature\" only,\n"
                  "router_file by score \"router\" only (a relative path is relative to the config file's\n"
                  "folder: install router.json beside the config)")
        policy_path.write_text(policy_snippet(picked, threshold, cal.temperature, router_file, header))
        written.append(policy_path)
    stale_router = out / ROUTER_FILE
    if picked != "router" and stale_router.exists():
        stale_router.unlink()

    inputs = {
        "edge": {"card": str(args.edge_card), "model": card.model_id, "backend": args.backend,
                 "runtime": args.runtime},
        "cloud": cloud_info, "data": {"validation": val_set.source, "test": test_set.source, "split": split_note,
                                      "limit": args.limit},
        "python": platform.python_version(), "seed": args.seed,
        "scores": list(scores), "picked_by": "--pick" if args.pick else "most kept on validation at the target",
    }
    if not args.no_plot:
        t0 = time.monotonic()
        plot_offload_curves(out / PLOT_FILE, cal, picked if res is not None else None)
        timings["plot"] = time.monotonic() - t0
        written.append(out / PLOT_FILE)
    timings["total"] = time.monotonic() - t_start
    report = build_report(cal, picked if res is not None else None, inputs, timings)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    written.append(out / REPORT_FILE)

    print(f"edge-only accuracy  val {cal.edge_accuracy['val']:.4f}  test {cal.edge_accuracy['test']:.4f}")
    print(f"cloud-only accuracy val {cal.cloud_accuracy['val']:.4f}  test {cal.cloud_accuracy['test']:.4f}")
    print(f"target: {cal.target.describe()}; temperature {cal.temperature:.4f}")
    print(_table(cal, picked if res is not None else None))
    gain = cal.val_gain.get(picked) if picked and res is not None else None
    if gain is not None and res is not None and cal.results["max_softmax"].val is not None:
        verdict = "beyond noise" if gain.significant else "WITHIN NOISE (consider --pick max_softmax)"
        point = res.val.kept_share - cal.results["max_softmax"].val.kept_share
        print(f"{picked} vs max_softmax on validation: {point * 100:+.1f} pp kept, 95% interval "
              f"[{gain.low * 100:+.1f}, {gain.high * 100:+.1f}] (paired bootstrap): {verdict}")
    if cal.oracle.test_kept_at_target is not None:
        print(f"oracle router (offloads exactly what the cloud fixes): kept {cal.oracle.test_kept_at_target:.1%} "
              "on test at the target")
    for p in written:
        print(f"wrote {p}")
    print(f"calibrate took {timings['total']:.1f}s")
    return rc

