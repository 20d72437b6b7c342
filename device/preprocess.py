"""Image decoding and preprocessing, driven by the model card.

Pure functions: bytes or arrays in, numpy tensors out. Decoding untrusted
bytes is bounded (size and pixel limits) and never trusts the file name.
What is accepted and how pixels are converted is in docs/inputs.md.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .errors import EdgeInferError
from .modelcard import InputSpec, ResizeSpec
from .views import expand

#: Formats accepted from the network and the spool (content type -> Pillow format).
CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/bmp": "BMP",
                 "image/x-portable-graymap": "PPM", "image/x-portable-pixmap": "PPM"}
MAX_PIXELS = 40_000_000
#: EXIF blocks larger than this are ignored rather than parsed. A JPEG APP1
#: segment cannot exceed 64 KiB, so no camera writes more; only a PNG eXIf
#: chunk could, and parsing a forged multi-megabyte block per sample is work
#: an attacker chooses. (The "Raw profile" text form is hex, twice the size.)
MAX_EXIF_BYTES = 64 * 1024
#: Where Pillow finds an orientation (Image.getexif reads EXIF, then XMP's tiff:Orientation).
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")


class ImageError(EdgeInferError, ValueError):
    """The bytes are not an image this runtime accepts (that input is refused; nothing else stops)."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray        # (H, W) or (H, W, 3) uint8
    content_type: str


#: the exact netpbm form encode_sample writes: binary P5 (gray) / P6 (RGB), one space, maxval 255
_RAW_NETPBM = re.compile(rb"P([56])\n([1-9][0-9]{0,4}) ([1-9][0-9]{0,4})\n255\n")


def _raw_netpbm(data: bytes, max_pixels: int, expected_type: str | None) -> DecodedImage | None:
    """The device's own raw encoding read directly (~2 us, Pillow takes ~55 us: a cloud worker
    decodes every sample); None for anything else, which Pillow then decodes and checks."""
    m = _RAW_NETPBM.match(data)
    if m is None:
        return None
    channels = 1 if m.group(1) == b"5" else 3
    ctype = "image/x-portable-graymap" if channels == 1 else "image/x-portable-pixmap"
    w, h = int(m.group(2)), int(m.group(3))
    if (expected_type is not None and expected_type != ctype) or w * h > max_pixels \
            or len(data) != m.end() + w * h * channels:
        return None
    pixels = np.frombuffer(data, np.uint8, offset=m.end()).reshape((h, w) if channels == 1 else (h, w, 3)).copy()
    return DecodedImage(pixels, ctype)


def decode_image(data: bytes, *, max_bytes: int = 16 * 1024 * 1024, max_pixels: int = MAX_PIXELS,
                 expected_type: str | None = None) -> DecodedImage:
    """Decode PNG/JPEG/BMP/PGM bytes safely into an upright uint8 array (EXIF orientation applied)."""
    if not data:
        raise ImageError("empty payload")
    if len(data) > max_bytes:
        raise ImageError(f"image of {len(data)} bytes exceeds the limit of {max_bytes}")
    if expected_type is not None and expected_type not in CONTENT_TYPES:
        raise ImageError(f"unsupported content type {expected_type!r}; accepted: {', '.join(CONTENT_TYPES)}")
    fast = _raw_netpbm(data, max_pixels, expected_type)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            # Pillow warns about damaged metadata (EXIF tags) on open and on read. Metadata is
            # advisory here, and these filters, being set per call, would print every time.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                allowed = set(CONTENT_TYPES.values())
                if expected_type is not None:
                    allowed = {CONTENT_TYPES[expected_type]}
                if fmt not in allowed:
                    raise ImageError(f"image format {fmt} is not accepted here (expected {', '.join(sorted(allowed))})")
                if img.width * img.height > max_pixels or img.width == 0 or img.height == 0:
                    raise ImageError(f"image size {img.width}x{img.height} is out of bounds")
                img.load()
                img = upright(img)
                pixels = to_uint8(img)
    except ImageError:
        raise
    except Exception as exc:
        # Whatever a decoder trips on in hostile bytes (OSError, ValueError, SyntaxError, EOFError,
        # struct.error, a decompression bomb, ...): the only error a caller sees is ImageError.
        raise ImageError(f"not a decodable image: {str(exc)[:300] or type(exc).__name__}") from None
    if expected_type is not None:
        ctype = expected_type
    elif fmt == "PPM":
        ctype = "image/x-portable-pixmap" if pixels.ndim == 3 else "image/x-portable-graymap"
    else:
        ctype = next(k for k, v in CONTENT_TYPES.items() if v == fmt)
    return DecodedImage(pixels, ctype)


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (``ImageOps.exif_transpose``).

    Cameras store the sensor's pixel order and record the way the camera was
    held in the EXIF Orientation tag; every viewer applies it, so a model must
    too. Metadata is advisory: an EXIF block that is too large is not read,
    and one that cannot be parsed is ignored, never failing a valid image.
    (Pillow's warnings about damaged tags are silenced by decode_image; a
    direct caller sees them.)
    """
    info = img.info
    if not any(k in info for k in _ORIENTATION_KEYS):
        return img   # no metadata that can carry an orientation: skip the parser (~5 us a sample)
    raw = info.get("exif")
    if raw is None:
        raw = info.get("Raw profile type exif", "")
        limit = 2 * MAX_EXIF_BYTES + 64   # hex text with a short header
    else:
        limit = MAX_EXIF_BYTES
    if len(raw) > limit:
        return img
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if isinstance(orientation, int) and 2 <= orientation <= 8:
            # in place: no copy of a large photo. exif_transpose turns the pixels before it
            # rewrites the metadata, the step a damaged block can fail in, so a readable
            # orientation is applied even then.
            ImageOps.exif_transpose(img, in_place=True)
    except Exception:   # whatever the parser trips on, the block has no usable orientation
        pass
    return img


def to_uint8(img: Image.Image) -> np.ndarray:
    """Any decoded Pillow image -> (H, W) or (H, W, 3) uint8 pixels, keeping the tonal range.

    - 16-bit grey (I;16*, and I, which Pillow uses for 16-bit PGM) is scaled
      to 8 bits, round(v * 255 / 65535): Pillow's own conversion clips at 255,
      turning a 16-bit image into pure black and white.
    - 32-bit float (F) is read as [0, 1] (the usual float-image convention),
      clipped, then scaled; NaN counts as 0.
    - Transparency (alpha, or a tRNS colour key) is composited on black, i.e.
      premultiplied: a transparent pixel is black whatever colour it hides,
      which encoders leave arbitrary. Black matches the shipped models'
      training data (objects on a dark background).
    - Grey stays grey (L, LA, 1-bit); everything else becomes RGB.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(img)
        # Every format accepted here stores at most 16 bits per sample, and Pillow keeps
        # them unscaled in I (it stretches a PGM maxval of e.g. 1023 to 65535 first), so
        # the 16-bit range is the file's own scale. Stretching to the image's min/max
        # instead would turn a dark frame into a full-contrast one. Values outside the
        # 16-bit range can only come from formats not accepted here; they are clipped.
        out = ((np.clip(v.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):
            out[v == key] = 0
        return out
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return np.round(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    if "transparency" in img.info or mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        if mode in ("1", "L", "LA", "La"):
            la = np.asarray(img.convert("LA"), dtype=np.uint8)
            return _premultiply(la[..., 0], la[..., 1])
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return _premultiply(rgba[..., :3], rgba[..., 3:])
    if mode in ("L", "RGB"):
        return np.asarray(img, dtype=np.uint8)
    return np.asarray(img.convert("L" if mode == "1" else "RGB"), dtype=np.uint8)   # P, CMYK, YCbCr, ...


def _premultiply(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite on black: color * alpha / 255, rounded."""
    return ((color.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


#: Below this many raw bytes a sample is sent as PGM/PPM: a header and the raw
#: pixels, encoded in a microsecond, where PNG costs ~150 us per small image
#: for little gain. Larger images are compressed as PNG.
RAW_ENCODE_MAX_BYTES = 64 * 1024


def encode_sample(pixels: np.ndarray) -> tuple[bytes, str]:
    """Lossless encoding of an array for offloading: (payload, content type)."""
    if pixels.nbytes <= RAW_ENCODE_MAX_BYTES and pixels.dtype == np.uint8:
        if pixels.ndim == 2:
            h, w = pixels.shape
            return b"P5\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(pixels).tobytes(), "image/x-portable-graymap"
        if pixels.ndim == 3 and pixels.shape[2] == 3:
            h, w, _ = pixels.shape
            return b"P6\n%d %d\n255\n" % (w, h) + np.ascontiguousarray(pixels).tobytes(), "image/x-portable-pixmap"
    return encode_png(pixels), "image/png"


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, small and fast (compress level 1) encoding for offloaded samples."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize for a model's input: an area average when shrinking, bilinear when enlarging.

    BILINEAR, when shrinking, widens its kernel with the factor and blurs
    across neighbouring blocks: 2x and 4x RGB renderings cost the edge model
    2.5 to 3.9 points of accuracy (docs/inputs.md, bench/resize_accuracy.py). The box
    filter averages exactly the source pixels that fall in each target pixel,
    so an image enlarged by whole-number nearest-neighbour scaling comes back
    to the original pixels; reduce() is that average for whole-number
    factors, and about twice as fast as resize(BOX). Enlarging keeps a smooth
    filter (BOX would repeat pixels into blocks). Each axis gets the filter
    for its own direction.
    """
    (w0, h0), (w, h) = img.size, size
    if (w0, h0) == (w, h):
        return img
    if w0 >= w and h0 >= h:
        if w0 % w == 0 and h0 % h == 0:
            return img.reduce((w0 // w, h0 // h))
        return img.resize(size, Image.BOX)
    if w0 <= w and h0 <= h:
        return img.resize(size, Image.BILINEAR)
    # one axis shrinks and the other grows: one pass per axis, each with its filter
    img = img.resize((w, h0), Image.BOX if w0 > w else Image.BILINEAR)
    return img.resize((w, h), Image.BOX if h0 > h else Image.BILINEAR)


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize_and_crop(img: Image.Image, spec: ResizeSpec, size: tuple[int, int]) -> Image.Image:
    """A photo to a model's input as torchvision's Resize(shorter_side) then CenterCrop(size) do it
    on a Pillow image, to the pixel: the pipeline photo models are trained and evaluated with.

    The longer side is truncated (``int``), and the crop offsets rounded half to even, as there."""
    (w0, h0), (w, h) = img.size, size
    s = spec.shorter_side
    nw, nh = (s, int(s * h0 / w0)) if w0 <= h0 else (int(s * w0 / h0), s)
    if (nw, nh) != (w0, h0):
        img = img.resize((max(nw, w), max(nh, h)), _FILTERS[spec.method])
    top, left = int(round((img.height - h) / 2.0)), int(round((img.width - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


class Preprocessor:
    """Turns uint8 images into the model's input tensor, as the card says.

    For int8/uint8 models the whole chain (scale, normalise, quantise) is a
    function of one uint8 pixel, so it is precomputed as a 256-entry table.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        x = np.arange(256, dtype=np.float64) / spec.pixel_scale
        x = (x - spec.mean) / spec.std
        if spec.quantization is not None:
            q = np.round(x / spec.quantization.scale + spec.quantization.zero_point)
            info = np.iinfo(np.dtype(spec.dtype))
            self._lut = np.clip(q, info.min, info.max).astype(spec.dtype)
        else:
            self._lut = x.astype(np.float32)

    def fit(self, pixels: np.ndarray) -> np.ndarray:
        """Convert colour mode and size to the card's input (uint8 HxW[xC])."""
        spec = self.spec
        if pixels.dtype != np.uint8:
            raise ImageError(f"expected uint8 pixels, got {pixels.dtype}")
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
            raise ImageError(f"expected an image array (H, W) or (H, W, 3), got shape {pixels.shape}")
        want_gray = spec.color == "L"
        if pixels.ndim == 2 and want_gray and pixels.shape == (spec.height, spec.width) and spec.resize is None:
            return pixels  # the common fast path: already the right size
        if pixels.ndim == 3 and pixels.shape[2] == 4:
            pixels = _premultiply(pixels[..., :3], pixels[..., 3:])   # as decode_image treats alpha
        img = Image.fromarray(pixels)
        img = img.convert("L" if want_gray else "RGB")
        if spec.resize is not None:
            return np.asarray(resize_and_crop(img, spec.resize, (spec.width, spec.height)), dtype=np.uint8)
        return np.asarray(resize(img, (spec.width, spec.height)), dtype=np.uint8)

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """One image -> a batch-of-one tensor in the card's layout and dtype."""
        return self.batch([self.fit(pixels)])

    def views_tensor(self, fitted: np.ndarray) -> np.ndarray:
        """One fitted image -> a (V, ...) tensor of the card's test-time views (:mod:`.views`)."""
        return self.batch(expand(fitted, self.spec.views))

    def batch(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Already-fitted images -> an (N, ...) tensor in the card's layout."""
        arr = self._lut[np.asarray(images)]
        if arr.ndim == 3:
            arr = arr[..., None]
        if self.spec.layout == "NCHW":
            arr = arr.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(arr)
