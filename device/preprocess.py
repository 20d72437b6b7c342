"""Image decoding and preprocessing, driven by the model card.

Pure functions: bytes or arrays in, numpy tensors out. Decoding untrusted
bytes is bounded (size and pixel limits) and never trusts the file name.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .modelcard import InputSpec

#: Formats accepted from the network and the spool (content type -> Pillow format).
CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/bmp": "BMP",
                 "image/x-portable-graymap": "PPM", "image/x-portable-pixmap": "PPM"}
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """The bytes are not an image this runtime accepts."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray        # (H, W) or (H, W, 3) uint8
    content_type: str


def decode_image(data: bytes, *, max_bytes: int = 16 * 1024 * 1024, max_pixels: int = MAX_PIXELS,
                 expected_type: str | None = None) -> DecodedImage:
    """Decode PNG/JPEG/BMP/PGM bytes safely into a uint8 array."""
    if not data:
        raise ImageError("empty payload")
    if len(data) > max_bytes:
        raise ImageError(f"image of {len(data)} bytes exceeds the limit of {max_bytes}")
    if expected_type is not None and expected_type not in CONTENT_TYPES:
        raise ImageError(f"unsupported content type {expected_type!r}; accepted: {', '.join(CONTENT_TYPES)}")
    try:
        with warnings.catch_warnings():
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
                if img.mode not in ("L", "RGB"):
                    img = img.convert("RGB" if img.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
                pixels = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a decodable image: {exc}") from None
    if expected_type is not None:
        ctype = expected_type
    elif fmt == "PPM":
        ctype = "image/x-portable-pixmap" if pixels.ndim == 3 else "image/x-portable-graymap"
    else:
        ctype = next(k for k, v in CONTENT_TYPES.items() if v == fmt)
    return DecodedImage(pixels, ctype)


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
        if pixels.ndim == 2 and want_gray and pixels.shape == (spec.height, spec.width):
            return pixels  # the common fast path: already the right size
        img = Image.fromarray(pixels)
        img = img.convert("L" if want_gray else "RGB")
        if img.size != (spec.width, spec.height):
            img = img.resize((spec.width, spec.height), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def to_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """One image -> a batch-of-one tensor in the card's layout and dtype."""
        return self.batch([self.fit(pixels)])

    def batch(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Already-fitted images -> an (N, ...) tensor in the card's layout."""
        arr = self._lut[np.asarray(images)]
        if arr.ndim == 3:
            arr = arr[..., None]
        if self.spec.layout == "NCHW":
            arr = arr.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(arr)
