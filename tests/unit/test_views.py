"""Test-time views (card schema 3): the pure transforms, the card's validation, and the device's
answers with a views card equal to an independent reference built from the plain card."""
import json

import numpy as np
import pytest

from edge_infer.modelcard import ModelCardError, load_card, parse_card
from edge_infer.preprocess import Preprocessor
from edge_infer.scores import softmax
from edge_infer.views import View, apply_view, combine, expand

from ..conftest import EDGE_CARD, MODELS
from .test_preprocess_card import card_dict

VIEWS5_CARD = MODELS / "fmnist-edge-v1" / "card_views5.json"
SHIFTS4 = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))


def shifted_raw(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The reference: whole raw images moved with a plain loop, the uncovered border black."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = images[:, y - dy, x - dx]
    return out


# ----------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("dy,dx", [(0, 1), (0, -1), (1, 0), (-1, 0), (2, -3), (-4, 4), (0, 0)])
def test_a_shift_moves_the_content_and_blackens_the_uncovered_border(dy, dx):
    img = np.random.default_rng(100 + dy * 10 + dx).integers(1, 256, (7, 9), dtype=np.uint8)
    got = apply_view(img, View(dy, dx))
    assert got.shape == img.shape and got.dtype == img.dtype
    assert np.array_equal(got, shifted_raw(img[None], dy, dx)[0])


def test_mirror_comes_before_the_shift_and_colour_images_keep_their_channels():
    img = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    got = apply_view(img, View(0, 1, mirror=True))
    assert np.array_equal(got, shifted_raw(img[None, :, ::-1], 0, 1)[0])
    assert expand(img, (View(), View(mirror=True))).shape == (2, 5, 6, 3)
    assert View().is_identity and not View(mirror=True).is_identity


def test_combine_is_the_log_of_the_mean_softmax():
    z = np.random.default_rng(2).normal(0, 3, (5, 10))
    got = combine(z)
    np.testing.assert_allclose(np.exp(got), softmax(z).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(softmax(combine(z[:1])[None])[0], softmax(z[:1])[0], rtol=1e-5)   # one view: itself
    np.testing.assert_allclose(combine(z + np.arange(5)[:, None] * 7.0), got, rtol=1e-5)   # per-view offsets cancel
    with pytest.raises(ValueError):
        combine(np.zeros((0, 10)))


# ----------------------------------------------------------------------------- the card

def views_card(views, schema=3, shape=(1, 4, 4, 1)):
    inp = dict(card_dict()["input"], shape=list(shape), views=views)
    return card_dict(schema=schema, input=inp)


def test_a_schema_3_card_reads_its_views(tmp_path):
    card = parse_card(views_card([{}, {"shift": [0, 1]}, {"mirror": True, "shift": [-1, 0]}]), tmp_path / "c.json")
    assert card.input.views == (View(), View(0, 1), View(-1, 0, True))
    assert parse_card(card_dict(schema=3), tmp_path / "c.json").input.views == ()


@pytest.mark.parametrize("views,schema,match", [
    ([{}], 2, "schema 3"),
    ([], 3, "1 to 16"),
    ([{}] * 17, 3, "1 to 16"),
    ({"shift": [0, 1]}, 3, "list"),
    ([{"shfit": [0, 1]}], 3, "only 'shift'"),
    (["left"], 3, "object"),
    ([{"shift": [1]}], 3, "two whole numbers"),
    ([{"shift": [0.5, 0]}], 3, "two whole numbers"),
    ([{"shift": [True, 0]}], 3, "two whole numbers"),
    ([{"shift": [0, 9]}], 3, "too far"),
    ([{"shift": [4, 0]}], 3, "too far"),          # the 4x4 input: nothing would be left
    ([{"mirror": "yes"}], 3, "true or false"),
])
def test_bad_views_are_refused_with_what_to_fix(tmp_path, views, schema, match):
    with pytest.raises(ModelCardError, match=match):
        parse_card(views_card(views, schema=schema), tmp_path / "card.json")


def test_the_shipped_views_card_is_the_plain_model_run_on_five_views():
    plain, views = load_card(EDGE_CARD), load_card(VIEWS5_CARD)
    assert views.file == plain.file and views.sha256 == plain.sha256 and views.labels == plain.labels
    assert views.input.views == tuple(View(dy, dx) for dy, dx in SHIFTS4)
    assert views.model_id != plain.model_id           # results say which way the model was run
    assert json.loads(VIEWS5_CARD.read_text())["metrics"]["invokes_per_image"] == 5


# ----------------------------------------------------------------------------- the device's answers

@pytest.fixture(scope="module")
def reference(fmnist):
    """The plain card's logits on raw images shifted by the reference loop, combined by hand."""
    from edge_infer.tools.runmodel import edge_logits
    images = fmnist["test"].images[:300]
    plain = load_card(EDGE_CARD)
    per_view = [softmax(edge_logits(plain, shifted_raw(images, dy, dx), progress=False).astype(np.float64))
                for dy, dx in SHIFTS4]
    return images, np.mean(per_view, axis=0)


def test_the_views_tensor_is_the_plain_tensor_of_the_shifted_images(fmnist):
    card = load_card(VIEWS5_CARD)
    pre = Preprocessor(card.input)
    im = fmnist["test"].images[3]
    want = np.concatenate([pre.to_tensor(shifted_raw(im[None], dy, dx)[0]) for dy, dx in SHIFTS4])
    assert np.array_equal(pre.views_tensor(pre.fit(im)), want)


def test_edge_logits_of_a_views_card_match_the_reference(reference):
    from edge_infer.tools.runmodel import edge_logits
    images, probs = reference
    got = edge_logits(load_card(VIEWS5_CARD), images, progress=False)
    np.testing.assert_allclose(np.exp(got), probs, atol=1e-5)


@pytest.mark.parametrize("score", ["max_softmax", "margin"])
def test_the_classifier_answers_a_views_card_as_the_reference(reference, score):
    from edge_infer.classifier import Classifier
    from edge_infer.config import ModelConfig, PolicyConfig
    from edge_infer.scores import ScoreParams, make_scorer
    images, probs = reference
    want = make_scorer(score, ScoreParams())(np.log(probs))
    with Classifier(ModelConfig(card=VIEWS5_CARD), PolicyConfig(score=score)) as clf:
        got = [clf.infer(im) for im in images]
        many = clf.infer_many(list(images[:40]))
    assert [r.label for r in got] == list(probs.argmax(1))
    np.testing.assert_allclose([r.confidence for r in got], want, atol=1e-5)
    assert [(r.label, r.confidence) for r in many] == [(r.label, r.confidence) for r in got[:40]]
    assert all(np.array_equal(r.fitted, im) for r, im in zip(got, images))   # offloaded as it came, not shifted
    # the views change answers: on these 300 some confidences move (else the test would prove nothing)
    with Classifier(ModelConfig(card=EDGE_CARD), PolicyConfig(score=score)) as plain:
        once = [plain.infer(im).confidence for im in images]
    assert np.abs(np.asarray(once) - [r.confidence for r in got]).max() > 0.05


def test_a_batching_backend_runs_the_views_in_one_batch(tmp_path, fmnist):
    """onnxruntime on a dynamic-batch ONNX edge model: the five views go in as one batch of 5 and the
    answers equal five single runs."""
    pytest.importorskip("onnxruntime")
    from edge_infer.classifier import Classifier
    from edge_infer.config import ModelConfig, PolicyConfig
    src = MODELS / "fmnist-edge-v1-trt" / "card.json"
    data = json.loads(src.read_text())
    data.update(schema=3, version=data["version"] + "+views5", file=str(src.parent / data["file"]))
    data["input"]["views"] = [{"shift": list(s)} for s in SHIFTS4]
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(data))
    images = fmnist["test"].images[:50]
    with Classifier(ModelConfig(card=card_path, backend="onnxruntime"), PolicyConfig()) as clf:
        assert clf.backend.max_batch >= 5
        got = [clf.infer(im) for im in images]
    with Classifier(ModelConfig(card=src, backend="onnxruntime"), PolicyConfig()) as plain:
        shifted = [shifted_raw(images, dy, dx) for dy, dx in SHIFTS4]
        logits = np.stack([[plain.backend.invoke(plain.pre.to_tensor(im))[0] for im in view] for view in shifted])
    want = softmax(logits.astype(np.float64)).mean(axis=0)
    assert [r.label for r in got] == list(want.argmax(1))
    np.testing.assert_allclose([r.confidence for r in got], want.max(1), atol=1e-5)


def test_the_cloud_worker_refuses_a_views_card(tmp_path):
    pytest.importorskip("onnxruntime")
    from edge_infer_cloud.model import CloudModel
    src = MODELS / "fmnist-cloud-v1" / "card.json"
    data = json.loads(src.read_text())
    data.update(schema=3, file=str(src.parent / data["file"]))
    data["input"]["views"] = [{}, {"shift": [0, 1]}]
    (tmp_path / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="views.*edge models"):
        CloudModel(tmp_path / "card.json")
