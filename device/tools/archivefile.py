"""The exported hard-example archive: one portable .npz per device (what ``edge-infer archive export``
writes and ``edge-infer retrain`` reads).

Plain numpy arrays only (read with ``allow_pickle=False``), one row per sample:

==================  ==========================================================================
images              uint8 (N, H, W) or (N, H, W, 3): the sample decoded and fitted to the edge
                    card's input size, as the device's model saw it
cloud_label         int64: the cloud's correction (the training label)
cloud_confidence    float32
edge_label          int64: what the device's model answered
edge_confidence     float32
model_id            str: the edge model that answered (name:version)
cloud_model_id      str
offload_reason      str: below_threshold or audit
sample_id           str: unique per device
created_at          float64 (Unix time); corrected_at float64 (NaN: not recorded)
labels              str (C,): the edge card's label names (row labels index them)
device_id           str, 0-d
format              int, 0-d: FORMAT_VERSION
payload, payload_offsets, content_type   with ``--originals``: the bytes as sent, concatenated
                    (uint8), sample i at payload[offsets[i]:offsets[i+1]], and their content types
==================  ==========================================================================
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeInferError

FORMAT_VERSION = 1
ROW_ARRAYS = ("images", "cloud_label", "cloud_confidence", "edge_label", "edge_confidence", "model_id",
              "cloud_model_id", "offload_reason", "sample_id", "created_at", "corrected_at")


class ArchiveFileError(EdgeInferError):
    """An export cannot be read or does not fit the model; the message says which file and why (exit 2)."""

    exit_code = 2


@dataclass(frozen=True, eq=False)
class ArchiveSet:
    """One or more exports, concatenated (duplicates across files removed by device and sample id)."""
    images: np.ndarray
    cloud_label: np.ndarray
    cloud_confidence: np.ndarray
    edge_label: np.ndarray
    edge_confidence: np.ndarray
    model_id: np.ndarray
    offload_reason: np.ndarray
    device_id: np.ndarray      # per row
    sample_id: np.ndarray
    labels: tuple[str, ...]
    sources: tuple[str, ...]   # the files read
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.cloud_label)


def write_export(path: Path, rows: dict[str, np.ndarray], *, labels: Sequence[str], device_id: str,
                 originals: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """Write atomically (a temporary file renamed over ``path``), mode 0600: it holds images."""
    arrays = dict(rows)
    arrays.update(labels=np.asarray(list(labels), dtype=str), device_id=np.asarray(device_id),
                  format=np.asarray(FORMAT_VERSION))
    if originals is not None:
        arrays.update(payload=originals[0], payload_offsets=originals[1], content_type=originals[2])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_exports(paths: Iterable[Path], labels: Sequence[str], image_shape: tuple[int, ...]) -> ArchiveSet:
    """Read and concatenate exports made for a model with these ``labels`` and fitted ``image_shape``."""
    parts: list[dict[str, np.ndarray]] = []
    sources = []
    for path in paths:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in (*ROW_ARRAYS, "labels", "device_id", "format") if k not in z.files]
                if missing:
                    raise ArchiveFileError(f"{path}: not an archive export (missing {', '.join(missing)}); make it "
                                           "with `edge-infer archive export`")
                if int(z["format"]) != FORMAT_VERSION:
                    raise ArchiveFileError(f"{path}: export format {int(z['format'])}, this release reads "
                                           f"{FORMAT_VERSION}")
                part = {k: np.asarray(z[k]) for k in ROW_ARRAYS}
                file_labels = tuple(str(x) for x in z["labels"])
                device = str(z["device_id"])
        except (OSError, ValueError) as exc:
            raise ArchiveFileError(f"{path}: cannot read the archive export ({exc})") from None
        if file_labels != tuple(labels):
            raise ArchiveFileError(f"{path}: exported for a model with other labels ({', '.join(file_labels[:12])}); "
                                   "retrain a model of the same classes")
        n = len(part["cloud_label"])
        if any(len(v) != n for v in part.values()):
            raise ArchiveFileError(f"{path}: its arrays differ in length")
        if n and part["images"].shape[1:] != tuple(image_shape):
            raise ArchiveFileError(f"{path}: images of {list(part['images'].shape[1:])}, the model takes "
                                   f"{list(image_shape)}: export with the config of a device running this model")
        if n and (part["cloud_label"].min() < 0 or part["cloud_label"].max() >= len(labels)):
            raise ArchiveFileError(f"{path}: labels outside 0..{len(labels) - 1}")
        part["device_id"] = np.full(n, device)
        parts.append(part)
        sources.append(str(path))
    if not parts:
        raise ArchiveFileError("no archive exports given")
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
           for k in (*ROW_ARRAYS, "device_id")}
    if not len(cat["cloud_label"]):
        cat["images"] = np.zeros((0, *image_shape), np.uint8)
    # The same device exported twice (an earlier collection and a later one) holds the same rows.
    keys = np.char.add(np.char.add(cat["device_id"].astype(str), "\0"), cat["sample_id"].astype(str))
    _, first = np.unique(keys, return_index=True)
    keep = np.sort(first)
    return ArchiveSet(cat["images"][keep], cat["cloud_label"][keep].astype(np.int64),
                      cat["cloud_confidence"][keep].astype(np.float64), cat["edge_label"][keep].astype(np.int64),
                      cat["edge_confidence"][keep].astype(np.float64), cat["model_id"][keep],
                      cat["offload_reason"][keep], cat["device_id"][keep], cat["sample_id"][keep], tuple(labels),
                      tuple(sources), int(len(keys) - len(keep)))
