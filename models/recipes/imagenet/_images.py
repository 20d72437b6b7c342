"""The images the build feeds the models: photos through the device's own preprocessing, their
deterministic calibration views, and seeded synthetic images.

Photos are decoded and resized with edge_infer.preprocess (decode_image: EXIF orientation;
resize_and_crop: torchvision's Resize(shorter side) + CenterCrop on Pillow images), so calibration
data and agreement checks see exactly the pixels the device will give the model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edge_infer.modelcard import ResizeSpec
from edge_infer.preprocess import decode_image, resize_and_crop

#: EfficientNet-Lite's input normalisation (efficientnet_lite_builder: MEAN_RGB 127, STDDEV_RGB 128 on 0..255)
MEAN, STD = 127.0, 128.0
#: the reference eval pipeline (tensorflow/tpu efficientnet preprocessing): a centre crop of
#: size / (size + 32) of the shorter side, resized with bicubic: shorter side = crop + 32
CROP_PADDING = 32
METHOD = "bicubic"


@dataclass(frozen=True)
class InputSize:
    crop: int

    @property
    def resize(self) -> ResizeSpec:
        return ResizeSpec(self.crop + CROP_PADDING, METHOD, "center")


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) pixels -> the float input (x - 127) / 128, NHWC float32."""
    return ((pixels.astype(np.float32) - MEAN) / STD).astype(np.float32)


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decode(path) -> Image.Image:
    """A photo file as the device decodes it (upright RGB)."""
    return Image.fromarray(decode_image(path.read_bytes()).pixels).convert("RGB")


def photo_pixels(paths: Sequence, size: InputSize) -> np.ndarray:
    """The model's input pixels for each photo: uint8 (N, crop, crop, 3)."""
    return np.stack([_view(decode(p), size, size.resize) for p in paths])


def _view(img: Image.Image, size: InputSize, spec: ResizeSpec) -> np.ndarray:
    return np.asarray(resize_and_crop(img, spec, (size.crop, size.crop)), dtype=np.uint8)


#: (name, what it does) of each calibration view of a photo, in order; "centre" is the device's view
VIEWS = (
    ("centre", "the device's own preprocessing (shorter side crop+32, bicubic, centre crop)"),
    ("flip", "the centre view mirrored left-right"),
    ("tight", "shorter side = crop (the whole shorter extent), centre crop"),
    ("zoom15", "shorter side x1.15, centre crop"),
    ("zoom30", "shorter side x1.30, centre crop"),
    ("zoom15-flip", "shorter side x1.15, centre crop, mirrored"),
    ("left", "the left 80% of the photo's width, then the device's preprocessing"),
    ("right", "the right 80% of the photo's width, then the device's preprocessing"),
)


def calibration_views(paths: Sequence, size: InputSize) -> np.ndarray:
    """Each photo in the VIEWS above, deterministic: uint8 (N * len(VIEWS), crop, crop, 3), photo-major."""
    out = []
    side = size.resize.shorter_side
    for p in paths:
        img = decode(p)
        w, h = img.size
        centre = _view(img, size, size.resize)
        zoom15 = _view(img, size, ResizeSpec(round(side * 1.15), METHOD, "center"))
        out += [
            centre,
            centre[:, ::-1],
            _view(img, size, ResizeSpec(size.crop, METHOD, "center")),
            zoom15,
            _view(img, size, ResizeSpec(round(side * 1.30), METHOD, "center")),
            zoom15[:, ::-1],
            _view(img.crop((0, 0, round(w * 0.8), h)), size, size.resize),
            _view(img.crop((w - round(w * 0.8), 0, w, h)), size, size.resize),
        ]
    return np.ascontiguousarray(np.stack(out))


def synthetic_pixels(n: int, crop: int, seed: int) -> np.ndarray:
    """n seeded random smooth images (uint8 (n, crop, crop, 3)): a random grid of 2..16 cells a
    side per image, upsampled bicubically, with a random gamma so that some are dark, some bright."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, crop, crop, 3), np.uint8)
    for i in range(n):
        g = int(rng.choice((2, 3, 4, 6, 8, 12, 16)))
        cells = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(cells).resize((crop, crop), Image.BICUBIC), dtype=np.float64)
        gamma = float(rng.uniform(0.5, 2.0))
        out[i] = np.clip(255.0 * (img / 255.0) ** gamma, 0, 255).round().astype(np.uint8)
    return out


def onnx2tf_sample(paths: Sequence) -> np.ndarray:
    """The photos as the (20, 128, 128, 3) float32 0..1 array onnx2tf loads (or else downloads) as
    calibration_image_sample_data_20x128x128x3_float32.npy before it reads -cind."""
    spec = ResizeSpec(128, METHOD, "center")
    return np.stack([_view(decode(p), InputSize(128), spec) for p in paths]).astype(np.float32) / 255.0
