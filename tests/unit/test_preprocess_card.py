import io
import json

import numpy as np
import pytest
from PIL import Image

from edge_infer.modelcard import ModelCardError, load_card, parse_card, verified_model_bytes
from edge_infer.preprocess import ImageError, Preprocessor, decode_image, encode_png


def card_dict(**over):
    d = {
        "schema": 1, "name": "m", "version": "1", "role": "edge", "format": "tflite", "file": "model.bin",
        "sha256": "0" * 64, "params": 1, "labels": ["a", "b"],
        "input": {"shape": [1, 4, 4, 1], "layout": "NHWC", "dtype": "int8", "color": "L", "pixel_scale": 255.0,
                  "mean": 0.0, "std": 1.0, "quantization": {"scale": 1 / 255, "zero_point": -128}},
        "output": {"kind": "logits", "dtype": "int8", "quantization": {"scale": 0.1, "zero_point": 0}},
    }
    d.update(over)
    return d


def test_int8_preprocessing_matches_the_formula(tmp_path):
    card = parse_card(card_dict(), tmp_path / "card.json")
    pre = Preprocessor(card.input)
    px = np.array([[0, 1, 128, 255]] * 4, dtype=np.uint8)
    t = pre.to_tensor(px)
    assert t.shape == (1, 4, 4, 1) and t.dtype == np.int8
    expected = np.clip(np.round(px / 255 / (1 / 255) - 128), -128, 127)
    assert np.array_equal(t[0, :, :, 0], expected.astype(np.int8))


def test_float_nchw_preprocessing_normalises(tmp_path):
    d = card_dict(input={"shape": [-1, 1, 4, 4], "layout": "NCHW", "dtype": "float32", "color": "L",
                         "pixel_scale": 255.0, "mean": 0.5, "std": 0.25})
    pre = Preprocessor(parse_card(d, tmp_path / "c.json").input)
    t = pre.to_tensor(np.full((4, 4), 255, np.uint8))
    assert t.shape == (1, 1, 4, 4) and t.dtype == np.float32 and np.allclose(t, 2.0)


def test_images_are_converted_and_resized(tmp_path):
    pre = Preprocessor(parse_card(card_dict(), tmp_path / "c.json").input)
    rgb = np.zeros((8, 10, 3), np.uint8)
    assert pre.to_tensor(rgb).shape == (1, 4, 4, 1)
    with pytest.raises(ImageError):
        pre.to_tensor(np.zeros((4, 4), np.float32))


def test_png_round_trip_and_bad_bytes():
    px = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    dec = decode_image(encode_png(px))
    assert dec.content_type == "image/png" and np.array_equal(dec.pixels, px)
    for bad in (b"", b"garbage" * 10, encode_png(px)[:40]):
        with pytest.raises(ImageError):
            decode_image(bad)
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(encode_png(px), max_bytes=10)
    with pytest.raises(ImageError, match="not accepted"):
        decode_image(encode_png(px), expected_type="image/jpeg")


def test_decompression_bomb_is_rejected():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="out of bounds"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)


def test_card_hash_is_checked(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"model")
    import hashlib
    good = hashlib.sha256(b"model").hexdigest()
    (tmp_path / "card.json").write_text(json.dumps(card_dict(sha256=good)))
    assert verified_model_bytes(load_card(tmp_path / "card.json")) == b"model"
    (tmp_path / "model.bin").write_bytes(b"tampered")
    with pytest.raises(ModelCardError, match="sha256"):
        verified_model_bytes(load_card(tmp_path / "card.json"))


@pytest.mark.parametrize("over, needle", [
    ({"schema": 4}, "unsupported card schema"),
    ({"labels": []}, "labels"),
    ({"sha256": "xyz"}, "64 hex"),
    ({"input": {"shape": [1, 4, 4], "layout": "NHWC", "dtype": "int8"}}, "4-D"),
    ({"output": {"dtype": "int8"}}, "quantization"),
])
def test_bad_cards(tmp_path, over, needle):
    with pytest.raises(ModelCardError, match=needle):
        parse_card(card_dict(**over), tmp_path / "card.json")


def test_missing_card_says_what_to_do(tmp_path):
    with pytest.raises(ModelCardError, match="not found"):
        load_card(tmp_path / "nope.json")


def test_raw_sample_encoding_round_trips_gray_and_rgb():
    from edge_infer.preprocess import encode_sample
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for px, ctype in ((gray, "image/x-portable-graymap"), (rgb, "image/x-portable-pixmap")):
        payload, got = encode_sample(px)
        assert got == ctype
        dec = decode_image(payload, expected_type=ctype)
        assert dec.content_type == ctype and np.array_equal(dec.pixels, px)
    big = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    payload, ctype = encode_sample(big)
    assert ctype == "image/png" and np.array_equal(decode_image(payload).pixels, big)
