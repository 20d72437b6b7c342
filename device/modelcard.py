"""Model cards: the contract between a model file and the code that runs it.

A card (``card.json`` beside the model) states the input spec, labels,
version, sha256 and measured accuracy. Both sides read their preprocessing
from the card, so the device and the cloud worker cannot disagree on it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeInferError
from .views import MAX_VIEWS, View


class ModelCardError(EdgeInferError, ValueError):
    """The card is missing, malformed, or does not match its model file."""

    exit_code = 2


@dataclass(frozen=True)
class Quantization:
    scale: float
    zero_point: int


#: card schemas this version reads: 2 adds the input's "resize" (photos: shorter side, then a crop),
#: 3 the input's test-time "views" (each input run several times, shifted or mirrored)
CARD_SCHEMAS = (1, 2, 3)
#: the largest shift a view may ask for, in pixels of the fitted image
MAX_VIEW_SHIFT = 8
RESIZE_METHODS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class ResizeSpec:
    """How a photo of any size becomes the model's input: the shorter side scaled to
    ``shorter_side`` (``method``: Pillow's filters, which is what torchvision uses on Pillow images),
    then a centred crop of the input's height and width."""

    shorter_side: int
    method: str = "bilinear"
    crop: str = "center"


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]   # -1 marks a dynamic batch dimension
    layout: str              # NHWC or NCHW
    dtype: str               # int8, uint8 or float32
    color: str               # L (grayscale) or RGB
    pixel_scale: float
    mean: float
    std: float
    quantization: Quantization | None
    #: None: the image is resized to the input's size whatever its aspect (schema 1)
    resize: ResizeSpec | None = None
    #: test-time views (schema 3, :mod:`edge_infer.views`): empty, the model runs once on the image
    views: tuple[View, ...] = ()

    @property
    def height(self) -> int:
        return self.shape[1] if self.layout == "NHWC" else self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[2] if self.layout == "NHWC" else self.shape[3]

    @property
    def channels(self) -> int:
        return self.shape[3] if self.layout == "NHWC" else self.shape[1]


@dataclass(frozen=True)
class OutputSpec:
    kind: str                # logits or probabilities
    dtype: str
    quantization: Quantization | None


@dataclass(frozen=True)
class ModelCard:
    path: Path               # the card file
    name: str
    version: str
    role: str
    format: str
    file: Path               # absolute path of the model file
    sha256: str
    params: int
    labels: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    metrics: dict[str, Any]
    #: the CPU model answering for this one with [model] fallback = "cpu" (an Edge TPU model's source
    #: int8 model): the card's optional "fallback_card", relative to this card's folder
    fallback_card: Path | None = None

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"


def _req(d: dict, key: str, typ: type | tuple, where: str) -> Any:
    if key not in d:
        raise ModelCardError(f"{where}: missing key {key!r}")
    value = d[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ModelCardError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _number(d: dict, key: str, default: float, where: str) -> float:
    """An optional finite number (a JSON integer or float; not a string, not true/false)."""
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ModelCardError(f"{where}: {key!r} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ModelCardError(f"{where}: {key!r} must be a finite number")
    return number


def _quant(d: Any, dtype: str, where: str) -> Quantization | None:
    if dtype in ("int8", "uint8"):
        if not isinstance(d, dict):
            raise ModelCardError(f"{where}: a {dtype} tensor needs 'quantization' {{scale, zero_point}}")
        _req(d, "scale", (int, float), where)
        scale = _number(d, "scale", 0.0, where)
        if scale <= 0:
            raise ModelCardError(f"{where}: quantization scale must be > 0")
        zero_point = _req(d, "zero_point", int, where)
        if not -(1 << 31) <= zero_point < (1 << 31):
            raise ModelCardError(f"{where}: quantization zero_point {zero_point} is out of range")
        return Quantization(scale, zero_point)
    return None


def _resize(d: Any, schema: int, shape: tuple, layout: str, where: str) -> ResizeSpec | None:
    if d is None:
        return None
    if schema < 2:
        # A schema 1 reader ignores the key and would squash the photo instead: the card must say 2.
        raise ModelCardError(f"{where}: 'resize' needs card schema 2")
    if not isinstance(d, dict):
        raise ModelCardError(f"{where}: 'resize' must be an object {{shorter_side, method, crop}}")
    side = _req(d, "shorter_side", int, where + " resize")
    h, w = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    if not max(h, w) <= side < (1 << 16):
        raise ModelCardError(f"{where}: resize shorter_side {side} must be at least the input's size ({h}x{w})")
    method = d.get("method", "bilinear")
    if method not in RESIZE_METHODS:
        raise ModelCardError(f"{where}: resize method must be one of {', '.join(RESIZE_METHODS)}")
    if d.get("crop", "center") != "center":
        raise ModelCardError(f"{where}: resize crop must be 'center'")
    return ResizeSpec(side, method, "center")


def _views(d: Any, schema: int, shape: tuple, layout: str, where: str) -> tuple[View, ...]:
    if d is None:
        return ()
    if schema < 3:
        # A schema 1 or 2 reader would ignore the key and run the model once, against thresholds
        # calibrated on the views' combined answer: the card must say 3.
        raise ModelCardError(f"{where}: 'views' needs card schema 3")
    if not isinstance(d, list) or not 1 <= len(d) <= MAX_VIEWS:
        raise ModelCardError(f"{where}: 'views' must be a list of 1 to {MAX_VIEWS} views like "
                             '{"shift": [0, 1]} or {"mirror": true} ({} is the image as it is)')
    height, width = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    views = []
    for i, v in enumerate(d):
        at = f"{where} views[{i}]"
        if not isinstance(v, dict) or set(v) - {"shift", "mirror"}:
            raise ModelCardError(f"{at}: a view is an object with only 'shift' ([dy, dx] pixels) and 'mirror' "
                                 "(true/false)")
        shift = v.get("shift", [0, 0])
        if (not isinstance(shift, list) or len(shift) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in shift)):
            raise ModelCardError(f"{at}: 'shift' must be two whole numbers of pixels [dy, dx]")
        dy, dx = shift
        if max(abs(dy), abs(dx)) > MAX_VIEW_SHIFT or abs(dy) >= height or abs(dx) >= width:
            raise ModelCardError(f"{at}: 'shift' {shift} is too far: at most {MAX_VIEW_SHIFT} pixels, and less than "
                                 f"the input's {height}x{width}")
        mirror = v.get("mirror", False)
        if not isinstance(mirror, bool):
            raise ModelCardError(f"{at}: 'mirror' must be true or false")
        views.append(View(dy, dx, mirror))
    return tuple(views)


def parse_card(data: Any, card_path: Path) -> ModelCard:
    """A card from its parsed JSON. Raises ModelCardError (and nothing else) for anything malformed."""
    where = str(card_path)
    if not isinstance(data, dict):
        raise ModelCardError(f"{where}: expected a JSON object")
    schema = _req(data, "schema", int, where)
    if schema not in CARD_SCHEMAS:
        raise ModelCardError(f"{where}: unsupported card schema {schema} (this version reads "
                             f"{', '.join(map(str, CARD_SCHEMAS))}): upgrade edge-infer to use this model")
    inp = _req(data, "input", dict, where)
    out = _req(data, "output", dict, where)
    labels = tuple(_req(data, "labels", list, where))
    if not labels or not all(isinstance(x, str) for x in labels):
        raise ModelCardError(f"{where}: 'labels' must be a non-empty list of strings")
    shape = tuple(_req(inp, "shape", list, where + " input"))
    layout = _req(inp, "layout", str, where + " input")
    if layout not in ("NHWC", "NCHW") or len(shape) != 4:
        raise ModelCardError(f"{where}: input must be 4-D NHWC or NCHW, got {layout} {shape}"[:300])
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < (1 << 31) for n in shape[1:]) or not (
            isinstance(shape[0], int) and not isinstance(shape[0], bool) and (shape[0] == -1 or 0 < shape[0] < (1 << 31))):
        raise ModelCardError(f"{where}: input shape must be 4 positive integers (the batch may be -1), got {shape}"[:300])
    in_dtype = _req(inp, "dtype", str, where + " input")
    out_dtype = _req(out, "dtype", str, where + " output")
    for dt in (in_dtype, out_dtype):
        if dt not in ("int8", "uint8", "float32"):
            raise ModelCardError(f"{where}: unsupported dtype {dt[:40]!r} (int8, uint8, float32)")
    color = inp.get("color", "L")
    if not isinstance(color, str) or color not in ("L", "RGB"):
        raise ModelCardError(f"{where}: input color must be 'L' or 'RGB'")
    std = _number(inp, "std", 1.0, where + " input")
    if std <= 0:
        raise ModelCardError(f"{where}: input std must be > 0")
    spec = InputSpec(
        shape=shape, layout=layout, dtype=in_dtype, color=color,
        pixel_scale=_number(inp, "pixel_scale", 255.0, where + " input"),
        mean=_number(inp, "mean", 0.0, where + " input"), std=std,
        quantization=_quant(inp.get("quantization"), in_dtype, where + " input"),
        resize=_resize(inp.get("resize"), schema, shape, layout, where + " input"),
        views=_views(inp.get("views"), schema, shape, layout, where + " input"),
    )
    if spec.channels != (1 if color == "L" else 3):
        raise ModelCardError(f"{where}: input color {color} does not match {spec.channels} channels")
    kind = out.get("kind", "logits")
    if not isinstance(kind, str) or kind not in ("logits", "probabilities"):
        raise ModelCardError(f"{where}: output kind must be 'logits' or 'probabilities'")
    file = card_path.parent / _req(data, "file", str, where)
    sha = _req(data, "sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelCardError(f"{where}: 'sha256' must be 64 hex digits")
    params = data.get("params", 0)
    if not isinstance(params, int) or isinstance(params, bool) or params < 0:
        raise ModelCardError(f"{where}: 'params' must be a whole number of parameters")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ModelCardError(f"{where}: 'metrics' must be an object")
    role = data.get("role", "")
    if not isinstance(role, str):
        raise ModelCardError(f"{where}: 'role' must be a string")
    fallback = _fallback_card(data.get("fallback_card"), card_path, where)
    return ModelCard(
        path=card_path, name=_req(data, "name", str, where), version=_req(data, "version", str, where),
        role=role, format=_req(data, "format", str, where), file=file, sha256=sha,
        params=params, labels=labels, input=spec,
        output=OutputSpec(kind, out_dtype, _quant(out.get("quantization"), out_dtype, where + " output")),
        metrics=dict(metrics), fallback_card=fallback,
    )


def _fallback_card(value: Any, card_path: Path, where: str) -> Path | None:
    """The optional "fallback_card": a relative path to another card (models are installed as folders,
    so a bundle keeps working wherever it is unpacked)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ModelCardError(f"{where}: 'fallback_card' must be a path like \"../model-v1/card.json\"")
    if Path(value).is_absolute():
        raise ModelCardError(f"{where}: 'fallback_card' must be relative to the card's folder, not {value[:200]!r}")
    path = card_path.parent / value
    if path.resolve() == card_path.resolve():
        raise ModelCardError(f"{where}: 'fallback_card' names the card itself; name the CPU model's card")
    return path


def load_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelCardError(f"model card {path} not found; set [model] card to the card.json beside the model") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelCardError(f"model card {path} is not readable JSON: {str(exc)[:300] or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"model card {path}: expected a JSON object")
    return parse_card(data, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified_model_bytes(card: ModelCard) -> bytes:
    """The model file's bytes, after checking them against the card's sha256.

    Reading once and hashing the same bytes that are loaded closes the gap
    between checking a file and loading a different one.
    """
    try:
        data = card.file.read_bytes()
    except OSError as exc:
        raise ModelCardError(f"model file {card.file} (from {card.path}) cannot be read: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.sha256:
        raise ModelCardError(
            f"model file {card.file} has sha256 {digest}, but its card says {card.sha256}: the file is corrupt "
            "or does not belong to this card. Reinstall the model, or update the card if you replaced it on purpose."
        )
    return data
