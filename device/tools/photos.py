"""Folders of labelled photos for the ImageNet demo and tests.

A photo's label comes from its name when it follows the foolbox package's
``imagenet_NN_LABEL.jpg`` pattern, or from the folder it is in when that
folder is named after one of the model's labels (or its index): the layout
``edge-infer calibrate`` reads too (a folder per class). Other photos are
classified but not scored.
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_FOOLBOX_NAME = re.compile(r"imagenet_\d+_(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)
#: what installs the default photos (only its data files are used: it is never imported)
FOOLBOX_INSTALL = "pip install --no-deps foolbox==3.3.4"


@dataclass(frozen=True)
class Photo:
    path: Path
    label: int | None         # None: not scored


def foolbox_photos_dir() -> Path | None:
    """The 20 labelled ImageNet photos the foolbox package carries, found without importing it
    (importing foolbox needs eagerpy and a framework; only its data folder is wanted)."""
    spec = importlib.util.find_spec("foolbox")
    for location in (spec.submodule_search_locations or []) if spec else []:
        data = Path(location) / "data"
        if any(data.glob("imagenet_*_*.jpg")):
            return data
    return None


def photo_label(path: Path, root: Path, labels: Sequence[str]) -> int | None:
    """The label a file's name or folder gives it, if any (pure)."""
    m = _FOOLBOX_NAME.match(path.name)
    if m and int(m.group(1)) < len(labels):
        return int(m.group(1))
    if path.parent != root:
        folder = path.parent.name
        by_name = {name.lower(): i for i, name in enumerate(labels)}
        if folder.lower() in by_name:
            return by_name[folder.lower()]
        if folder.isdigit() and int(folder) < len(labels):
            return int(folder)
    return None


def list_photos(root: Path, labels: Sequence[str], *, foolbox_only: bool = False) -> list[Photo]:
    """The photos under ``root`` (and its class folders, one level down), sorted by path."""
    files = [p for p in sorted(root.glob("*")) + sorted(root.glob("*/*"))
             if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES]
    if foolbox_only:
        files = [p for p in files if _FOOLBOX_NAME.match(p.name)]
    return [Photo(p, photo_label(p, root, labels)) for p in files]


def photo_stream(folder: Path | None, labels: Sequence[str], n: int) -> list[Path]:
    """``n`` photo paths for a benchmark: the folder's photos (default: foolbox's 20) cycled.
    Raises FileNotFoundError, saying what to install, when there are none."""
    root = folder or foolbox_photos_dir()
    photos = [p.path for p in list_photos(root, labels, foolbox_only=folder is None)] if root else []
    if not photos:
        raise FileNotFoundError(f"no photos in {root}" if root else f"no photos: pass a folder, or {FOOLBOX_INSTALL}")
    return [photos[i % len(photos)] for i in range(n)]
