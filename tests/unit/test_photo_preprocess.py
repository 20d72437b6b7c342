"""Photo preprocessing (card schema 2, input "resize"): the device's tensor against the reference pipeline.

The reference is written out here the way photo models are trained and evaluated (torchvision's
Resize(shorter side) then CenterCrop on a Pillow image, then the card's normalisation and
quantization), independently of edge_infer.preprocess; the device must match it to the last
quantization step, EXIF orientation included.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edge_infer.modelcard import ModelCardError, parse_card
from edge_infer.preprocess import Preprocessor, decode_image

from .test_preprocess_card import card_dict

SCALE, ZERO = 0.0078125, 0        # (x - 127) / 128 quantized: the usual EfficientNet-Lite input


def photo_card(tmp_path, side=256, crop=224, method="bilinear", dtype="int8", layout="NHWC", **over):
    shape = [1, crop, crop, 3] if layout == "NHWC" else [-1, 3, crop, crop]
    inp = {"shape": shape, "layout": layout, "dtype": dtype, "color": "RGB", "pixel_scale": 1.0,
           "mean": 127.0, "std": 128.0, "resize": {"shorter_side": side, "method": method, "crop": "center"}}
    if dtype == "int8":
        inp["quantization"] = {"scale": SCALE, "zero_point": ZERO}
    inp.update(over)
    return parse_card(card_dict(schema=2, input=inp), tmp_path / "card.json")


def reference(img: Image.Image, side: int, crop: int, method: int, quantize: bool, quantization=None) -> np.ndarray:
    """torchvision.transforms: Resize(side) -> CenterCrop(crop) -> (x - 127) / 128 [-> int8]."""
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        size = (side, int(side * h / w))
    else:
        size = (int(side * w / h), side)
    img = img.resize(size, method)
    top = int(round((img.height - crop) / 2.0))
    left = int(round((img.width - crop) / 2.0))
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float64)
    x = (x - 127.0) / 128.0
    if not quantize:
        return x.astype(np.float32)[None]
    scale, zero = (quantization.scale, quantization.zero_point) if quantization is not None else (SCALE, ZERO)
    return np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)[None]


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth synthetic photo with detail at every scale (so a one-pixel shift shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [127 + 60 * np.sin(xx / (5 + 7 * c) + yy / (9 + 3 * c)) + rng.normal(0, 25, (h, w)) for c in range(3)]
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (300, 400), (257, 1000), (224, 224), (1001, 333)])
@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_device_tensor_equals_the_reference_pipeline(tmp_path, w, h, method):
    card = photo_card(tmp_path, method=method)
    data = jpeg(photo(w, h, seed=w * h))
    got = Preprocessor(card.input).to_tensor(decode_image(data).pixels)
    want = reference(Image.open(io.BytesIO(data)), 256, 224, {"bilinear": Image.BILINEAR,
                                                             "bicubic": Image.BICUBIC}[method], True)
    assert got.shape == (1, 224, 224, 3) and got.dtype == np.int8
    assert np.array_equal(got, want)


def test_float_nchw_cloud_input_equals_the_reference(tmp_path):
    card = photo_card(tmp_path, side=297, crop=260, dtype="float32", layout="NCHW")
    data = jpeg(photo(500, 375, seed=3))
    got = Preprocessor(card.input).to_tensor(decode_image(data).pixels)
    want = reference(Image.open(io.BytesIO(data)), 297, 260, Image.BILINEAR, False).transpose(0, 3, 1, 2)
    assert got.shape == (1, 3, 260, 260) and np.allclose(got, want, atol=1e-6)


def test_crop_offsets_round_half_to_even_as_torchvision():
    """300x400 -> 256x341 (341.33 truncated); the crop's top is round(58.5) = 58, not 59."""
    from edge_infer.modelcard import ResizeSpec
    from edge_infer.preprocess import resize_and_crop
    img = Image.fromarray(np.arange(400 * 300 * 3, dtype=np.uint32).reshape(400, 300, 3).astype(np.uint8))
    assert img.resize((256, 341), Image.BILINEAR).size == (256, 341)
    out = resize_and_crop(img, ResizeSpec(256), (224, 224))
    ref = img.resize((256, 341), Image.BILINEAR).crop((16, 58, 240, 282))
    assert np.array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("orientation,turn", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                              (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied_before_the_crop(tmp_path, orientation, turn):
    """A camera stores the sensor's pixels and says how to turn them; the crop is of the upright photo."""
    card = photo_card(tmp_path)
    upright = photo(480, 640, seed=orientation)
    stored = upright.transpose(turn)               # what the sensor wrote; EXIF says turn it back
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)      # lossless, so the pixels can be compared exactly
    got = Preprocessor(card.input).to_tensor(decode_image(buf.getvalue()).pixels)
    assert np.array_equal(got, reference(upright, 256, 224, Image.BILINEAR, True))


def test_a_grey_photo_becomes_rgb_and_a_right_sized_one_is_still_resized_then_cropped(tmp_path):
    card = photo_card(tmp_path)
    grey = photo(224, 224, seed=9).convert("L")
    got = Preprocessor(card.input).to_tensor(np.asarray(grey))
    assert np.array_equal(got, reference(grey, 256, 224, Image.BILINEAR, True))


@pytest.mark.parametrize("resize,schema,match", [
    ({"shorter_side": 256}, 1, "schema 2"),
    ({"shorter_side": 200}, 2, "at least"),
    ({"shorter_side": "256"}, 2, "wrong type"),
    ({"shorter_side": 256, "method": "lanczos"}, 2, "method"),
    ({"shorter_side": 256, "crop": "random"}, 2, "crop"),
    ([256], 2, "object"),
])
def test_bad_resize_specs_are_refused_with_what_to_fix(tmp_path, resize, schema, match):
    inp = {"shape": [1, 224, 224, 3], "layout": "NHWC", "dtype": "float32", "color": "RGB", "resize": resize}
    with pytest.raises(ModelCardError, match=match):
        parse_card(card_dict(schema=schema, input=inp), tmp_path / "card.json")


def test_a_card_of_a_newer_schema_says_to_upgrade(tmp_path):
    with pytest.raises(ModelCardError, match="upgrade edge-infer"):
        parse_card(card_dict(schema=4), tmp_path / "card.json")
