"""Images as cameras and tools produce them (issue 9): orientation, bit depth, alpha, size.

The device (spool, local API) and the cloud worker both decode through
edge_infer.preprocess.decode_image and fit through Preprocessor.fit, so
these tests cover both sides.
"""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from edge_infer.modelcard import load_card
from edge_infer.preprocess import Preprocessor, decode_image
from tests.conftest import CLOUD_CARD, EDGE_CARD

ORIENTATION = 0x0112


def blocks(h: int, w: int) -> np.ndarray:
    """Flat 8x8 blocks of distinct grey levels: survives JPEG, shows any flip or turn."""
    levels = (np.arange((h // 8) * (w // 8)) * 37 % 200 + 30).astype(np.uint8).reshape(h // 8, w // 8)
    return np.kron(levels, np.ones((8, 8), np.uint8))


def jpeg(pixels: np.ndarray, exif=None) -> bytes:
    buf = io.BytesIO()
    kw = {} if exif is None else {"exif": exif}
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif


def tiff_ifd(entries: list[tuple[int, int, int, bytes]], count: int | None = None) -> bytes:
    """A raw big-endian EXIF (TIFF) block with one IFD: (tag, type, count, 4-byte value) entries."""
    body = struct.pack(">H", len(entries) if count is None else count)
    body += b"".join(struct.pack(">HHL", t, typ, n) + v.ljust(4, b"\0") for t, typ, n, v in entries)
    return b"Exif\0\0MM\0\x2a\0\0\0\x08" + body + b"\0\0\0\0"


# -- EXIF orientation --------------------------------------------------------------------------

def test_exif_orientation_6_jpeg_decodes_turned_upright():
    stored = blocks(16, 32)                       # 16 rows x 32 columns as the sensor wrote them
    dec = decode_image(jpeg(stored, orientation_exif(6)))
    # 6: "rotate 90 degrees clockwise to display" -> 32 rows x 16 columns
    assert dec.pixels.shape[:2] == (32, 16)
    want = np.rot90(stored, k=-1)
    assert np.abs(dec.pixels[..., 0].astype(int) - want).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    data = jpeg(blocks(16, 32), orientation_exif(orientation))
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert np.array_equal(decode_image(data).pixels, want)


def test_png_exif_orientation_is_applied_too():
    native = blocks(16, 32)
    stored = np.rot90(native, k=1)                # the camera was turned: stored 90 degrees anticlockwise
    dec = decode_image(png(Image.fromarray(stored), exif=orientation_exif(6)))
    assert np.array_equal(dec.pixels, native)


def test_xmp_orientation_is_applied_where_there_is_no_exif_one():
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    Image.fromarray(blocks(16, 32)).save(buf, format="JPEG", xmp=xmp)
    assert decode_image(buf.getvalue()).pixels.shape == (32, 16)


@pytest.mark.parametrize("exif", [
    b"Exif\0\0" + bytes(range(256)) * 4,                                              # garbage after the header
    b"Exif\0\0MM\0\x2a\xff\xff\xff\xf0",                                              # IFD offset past the end
    tiff_ifd([(ORIENTATION, 2, 4, b"six\0")]),                                        # orientation as text
    tiff_ifd([(ORIENTATION, 3, 1, b"\0\x09")]),                                       # no such orientation
    tiff_ifd([(ORIENTATION, 3, 1000, b"\0\0\x10\0")]),                                # data beyond the block
    tiff_ifd([(0x8769, 4, 1, b"\0\0\0\x08")]),                                        # Exif IFD pointing to IFD0
], ids=["garbage", "bad-offset", "ascii", "out-of-range", "beyond", "loop"])
def test_broken_exif_never_fails_a_valid_image(exif, recwarn):
    stored = blocks(16, 32)
    plain = decode_image(jpeg(stored)).pixels
    dec = decode_image(jpeg(stored, exif))
    assert np.array_equal(dec.pixels, plain)      # orientation unusable -> the pixels as stored
    assert not [w for w in recwarn if "EXIF" in str(w.message) or "tag" in str(w.message)]   # no log noise


@pytest.mark.parametrize("exif", [
    tiff_ifd([(ORIENTATION, 3, 1, b"\0\x06")], count=60000),                         # claims 60,000 entries
    tiff_ifd([(ORIENTATION, 3, 2, b"\0\x06\0\x06")]),                                # two values (first counts)
    tiff_ifd([(ORIENTATION, 3, 1, b"\0\x06"), (0x010F, 2, 5000, b"\0\0\x10\0")]),     # another tag is broken
], ids=["truncated-ifd", "two-values", "other-tag-broken"])
def test_a_readable_orientation_in_a_damaged_block_is_applied(exif):
    assert decode_image(jpeg(blocks(16, 32), exif)).pixels.shape[:2] == (32, 16)


def test_oversized_exif_block_is_not_parsed():
    # A PNG eXIf chunk can be any size; past 64 KiB (the JPEG limit, no camera writes more) it is ignored.
    stored = blocks(16, 32)
    big = tiff_ifd([(ORIENTATION, 3, 1, b"\0\x06")]) + b"\0" * (70 * 1024)
    assert decode_image(png(Image.fromarray(stored), exif=big)).pixels.shape == (16, 32)
    small = tiff_ifd([(ORIENTATION, 3, 1, b"\0\x06")])
    assert decode_image(png(Image.fromarray(stored), exif=small)).pixels.shape == (32, 16)


# -- bit depth ---------------------------------------------------------------------------------

def gradient16() -> np.ndarray:
    return np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)     # 1,024 levels over the full range


def test_16_bit_png_keeps_its_gradient():
    v = gradient16()
    img = Image.fromarray(v)
    assert img.mode.startswith("I;16")
    dec = decode_image(png(img))
    assert dec.pixels.dtype == np.uint8 and dec.pixels.shape == v.shape
    assert np.array_equal(dec.pixels, ((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert len(np.unique(dec.pixels)) == 256 and np.all(np.diff(dec.pixels.ravel().astype(int)) >= 0)


def test_16_bit_pgm_keeps_its_gradient():
    v = gradient16()
    pgm = b"P5\n32 32\n65535\n" + v.astype(">u2").tobytes()      # Pillow opens this as mode I
    dec = decode_image(pgm)
    assert dec.content_type == "image/x-portable-graymap"
    assert np.array_equal(dec.pixels, ((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))


def test_10_bit_pgm_uses_its_maxval():
    v = np.arange(1024, dtype=np.uint16).reshape(32, 32)
    dec = decode_image(b"P5\n32 32\n1023\n" + v.astype(">u2").tobytes())
    assert dec.pixels[0, 0] == 0 and dec.pixels[-1, -1] == 255 and len(np.unique(dec.pixels)) == 256


def test_8_bit_values_stored_in_16_bits_come_back_exactly():
    v8 = np.arange(256, dtype=np.uint16).reshape(16, 16)
    assert np.array_equal(decode_image(png(Image.fromarray(v8 * 257))).pixels, v8.astype(np.uint8))


def test_16_bit_colour_png_is_scaled_not_clipped():
    v = (np.arange(16, dtype=np.uint16) * 4369).astype(">u2")     # 0 .. 65535
    rgb = np.stack([v] * 3, axis=-1).reshape(1, 16, 3)
    # Pillow writes no 16-bit RGB; a minimal one by hand (IHDR bit depth 16, colour type 2)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 1, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" + rgb.tobytes())) + chunk(b"IEND", b""))
    assert np.array_equal(decode_image(data).pixels[0, :, 0], np.arange(16) * 17)


def test_float_and_32_bit_modes():
    from edge_infer.preprocess import to_uint8
    f = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], np.float32))
    assert f.mode == "F"
    assert to_uint8(f).tolist() == [[0, 0, 128, 255, 255, 0]]       # [0, 1] convention, clipped, NaN -> 0
    i = Image.fromarray(np.array([[-5, 0, 257, 65535, 1 << 20]], np.int32))
    assert i.mode == "I"
    assert to_uint8(i).tolist() == [[0, 0, 1, 255, 255]]


# -- transparency ------------------------------------------------------------------------------

def test_alpha_is_composited_on_black():
    rgba = np.array([[[255, 255, 255, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], np.uint8)
    assert decode_image(png(Image.fromarray(rgba))).pixels.tolist() == [[[0, 0, 0], [100, 50, 25], [1, 2, 3]]]
    la = Image.fromarray(np.array([[[255, 0], [200, 128], [7, 255]]], np.uint8), "LA")
    assert decode_image(png(la)).pixels.tolist() == [[0, 100, 7]]    # grey stays grey


def test_transparent_palette_and_colour_keys_are_black():
    p = Image.fromarray(np.array([[0, 1, 1]], np.uint8), "P")
    p.putpalette([255, 255, 255, 255, 0, 0])
    assert decode_image(png(p, transparency=0)).pixels.tolist() == [[[0, 0, 0], [255, 0, 0], [255, 0, 0]]]
    assert decode_image(png(p)).pixels.tolist() == [[[255, 255, 255], [255, 0, 0], [255, 0, 0]]]
    grey = Image.fromarray(np.array([[0, 100, 200]], np.uint8))
    assert decode_image(png(grey, transparency=200)).pixels.tolist() == [[0, 100, 0]]


def test_fit_treats_an_rgba_array_like_a_decoded_one():
    pre = Preprocessor(load_card(EDGE_CARD).input)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255                            # white everywhere, but transparent
    assert not pre.fit(rgba).any()


# -- size --------------------------------------------------------------------------------------

def render(gray: np.ndarray, factor: int, how=Image.NEAREST) -> np.ndarray:
    h, w = gray.shape
    return np.asarray(Image.fromarray(gray).convert("RGB").resize((w * factor, h * factor), how))


@pytest.fixture(scope="module")
def edge():
    card = load_card(EDGE_CARD)
    return card, Preprocessor(card.input)


def test_nearest_neighbour_renderings_give_the_native_model_input(fmnist, edge):
    _, pre = edge
    for im in fmnist["test"].images[:300]:
        for factor in (2, 4):
            assert np.array_equal(pre.fit(render(im, factor)), im)


def test_nearest_neighbour_renderings_get_the_native_labels_from_the_real_model(fmnist, edge):
    from edge_infer.backends import BackendOptions, create_backend
    from edge_infer.modelcard import verified_model_bytes
    card, pre = edge
    be = create_backend("tflite-cpu", card, verified_model_bytes(card), BackendOptions("auto", 1))
    try:
        def label(px: np.ndarray) -> int:
            return int(be.invoke(pre.to_tensor(px)).argmax())
        images = fmnist["test"].images[:300]
        native = [label(im) for im in images]
        for factor in (2, 4):
            assert [label(render(im, factor)) for im in images] == native
    finally:
        be.close()


def test_the_right_size_grey_image_is_passed_through_untouched(edge):
    _, pre = edge
    px = np.zeros((28, 28), np.uint8)
    assert pre.fit(px) is px                       # the hot path: no copy, no Pillow


def test_resize_directions():
    from edge_infer.preprocess import resize
    native = blocks(32, 32)
    # non-whole factor shrink: an area average, so a flat image stays flat and values stay in range
    assert np.asarray(resize(Image.fromarray(np.full((50, 70), 90, np.uint8)), (28, 28))).tolist() == [[90] * 28] * 28
    # enlarging stays smooth (not the blocks BOX or NEAREST would make)
    up = np.asarray(resize(Image.fromarray(native), (64, 64)))
    assert not np.array_equal(up, np.kron(native, np.ones((2, 2), np.uint8)))
    assert np.array_equal(up, np.asarray(Image.fromarray(native).resize((64, 64), Image.BILINEAR)))
    # one axis each way: wide and short, repeated horizontally -> columns come back exactly
    short = native[::2]                                            # 16 rows x 32 columns
    wide = np.repeat(short, 2, axis=1)                             # 16 x 64
    out = np.asarray(resize(Image.fromarray(wide), (32, 32)))
    assert out.shape == (32, 32)
    assert np.array_equal(out, np.asarray(Image.fromarray(short).resize((32, 32), Image.BILINEAR)))


# -- the cloud worker's path -------------------------------------------------------------------

def test_cloud_worker_decodes_with_the_same_function():
    pytest.importorskip("paho.mqtt")
    import edge_infer.preprocess
    import edge_infer_cloud.worker
    assert edge_infer_cloud.worker.decode_image is edge_infer.preprocess.decode_image


def test_cloud_model_sees_the_exif_rotation(fmnist):
    pytest.importorskip("onnxruntime")
    from edge_infer_cloud.model import CloudModel
    model = CloudModel(CLOUD_CARD, intra_op_threads=1)
    images = fmnist["test"].images[:100]
    # what a worker receives: a PNG as the camera stored it (turned) with the orientation that undoes it
    payloads = [png(Image.fromarray(np.rot90(im, k=1)), exif=orientation_exif(6)) for im in images]
    received = [decode_image(p, expected_type="image/png").pixels for p in payloads]
    labels, _ = model.predict(received)
    native, _ = model.predict(list(images))
    assert labels.tolist() == native.tolist()


# --- the device's raw netpbm read directly -------------------------------------------------------------------------
from hypothesis import given as _given  # noqa: E402
from hypothesis import strategies as _st  # noqa: E402
from hypothesis.extra import numpy as _hnp  # noqa: E402


@_given(_hnp.arrays(np.uint8, _st.one_of(_hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                                          _st.tuples(_st.integers(1, 30), _st.integers(1, 30), _st.just(3)))))
def test_raw_netpbm_fast_path_reads_what_pillow_reads(pixels):
    import io as _io

    from PIL import Image as _Image

    from edge_infer.preprocess import _raw_netpbm, decode_image, encode_sample, to_uint8
    data, ctype = encode_sample(pixels)
    if not ctype.startswith("image/x-portable"):
        return                                   # too large for the raw encoding: PNG, Pillow's path
    fast = _raw_netpbm(data, 4_000_000, ctype)
    assert fast is not None and fast.content_type == ctype
    with _Image.open(_io.BytesIO(data)) as img:
        assert np.array_equal(fast.pixels, to_uint8(img))
    assert np.array_equal(decode_image(data, expected_type=ctype).pixels, pixels)


@pytest.mark.parametrize("data", [
    b"P5\n2 2\n255\n\x00\x01\x02",               # one byte short: Pillow decides (and refuses)
    b"P5\n2 2\n255\n\x00\x01\x02\x03\x04",       # one byte long
    b"P5\n2  2\n255\n\x00\x01\x02\x03",          # not the device's exact header
    b"P5\n2 2\n65535\n" + b"\x00" * 8,          # 16-bit
    b"P5\n0 2\n255\n",
])
def test_raw_netpbm_fast_path_leaves_anything_else_to_pillow(data):
    from edge_infer.preprocess import _raw_netpbm
    assert _raw_netpbm(data, 4_000_000, None) is None


def test_raw_netpbm_fast_path_keeps_the_pixel_limit_and_the_expected_type():
    from edge_infer.preprocess import ImageError, _raw_netpbm, decode_image
    data = b"P5\n4 4\n255\n" + bytes(16)
    assert _raw_netpbm(data, 15, None) is None
    with pytest.raises(ImageError):
        decode_image(data, max_pixels=15)
    assert _raw_netpbm(data, 100, "image/x-portable-pixmap") is None
