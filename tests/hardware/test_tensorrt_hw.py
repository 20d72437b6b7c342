"""On a machine with an NVIDIA GPU and TensorRT: the edge model's engines build, cache and answer as on the CPU.

Run there (docs/backends.md, "TensorRT"; bench/gpu_check.sh runs these and the figures):

    pytest -m tensorrt tests/hardware -v
    pytest -m "tensorrt or hardware" -v          # and the backend contract tests on the GPU

Every test skips, saying why, without TensorRT's Python bindings, cuda-python or a CUDA GPU.
Skips are not passes: on a GPU machine each of them must show passed.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_infer.backends import BackendError, check_backend, create_backend
from edge_infer.backends.tensorrt import Options, engine_path
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor

from ..conftest import EDGE_CARD, REPO

pytestmark = [pytest.mark.tensorrt, pytest.mark.hardware]

TRT_DIR = REPO / "models" / "fmnist-edge-v1-trt"
CARDS = {"fp32": TRT_DIR / "card.json", "fp16": TRT_DIR / "card_fp16.json", "int8": TRT_DIR / "card_int8.json"}
#: share of test labels the GPU engine must share with onnxruntime on the CPU, running the same file
AGREEMENT_WITH_CPU = {"fp32": 0.999, "fp16": 0.998, "int8": 0.99}


@pytest.fixture(scope="module")
def gpu() -> str:
    try:
        return check_backend("tensorrt")
    except BackendError as exc:
        pytest.skip(f"no TensorRT GPU here: {exc}")


def _card(precision):
    card = load_card(CARDS[precision])
    return card, verified_model_bytes(card)


def _inputs(card, images):
    pre = Preprocessor(card.input)
    return pre.batch(list(images))


@pytest.fixture(scope="module")
def cpu_labels(fmnist):
    """What onnxruntime on the CPU answers for the whole test split with each file (the cards' measurement)."""
    from edge_infer.backends.onnxrt import Options as OrtOptions
    out = {}
    for precision in CARDS:
        card, model = _card(precision)
        be = create_backend("onnxruntime", card, model, OrtOptions(max_batch=500))
        try:
            out[precision] = be.invoke_batch(_inputs(card, fmnist["test"].images)).argmax(1)
        finally:
            be.close()
    return out


@pytest.mark.parametrize("precision", CARDS)
def test_the_engine_answers_as_onnxruntime_on_the_cpu(gpu, precision, cpu_labels, fmnist, tmp_path):
    card, model = _card(precision)
    be = create_backend("tensorrt", card, model, Options(precision=precision, max_batch=64,
                                                         engine_cache_dir=str(tmp_path)))
    try:
        assert be.precision == precision and be.max_batch == 64 and be.input.shape == (-1, 1, 28, 28)
        labels = be.invoke_batch(_inputs(card, fmnist["test"].images)).argmax(1)
    finally:
        be.close()
    truth = fmnist["test"].labels
    assert (labels == cpu_labels[precision]).mean() >= AGREEMENT_WITH_CPU[precision]
    assert abs((labels == truth).mean() - card.metrics["test_accuracy"]) <= 0.003
    tflite = np.load(EDGE_CARD.parent / "predictions.npz")["test_logits"].argmax(1)
    assert (labels == tflite).mean() >= 0.98


def test_the_second_start_loads_the_cached_engine(gpu, tmp_path, fmnist):
    card, model = _card("int8")
    opts = Options(max_batch=8, engine_cache_dir=str(tmp_path / "cache"))
    first = create_backend("tensorrt", card, model, opts)
    x = _inputs(card, fmnist["test"].images[:20])
    try:
        assert not first.cache_hit and first.build_s > 0
        assert first.engine_file == engine_path(tmp_path / "cache", first.key, card.name)
        assert first.engine_file.exists() and first.engine_file.with_suffix(".json").exists()
        want = first.invoke_batch(x)
    finally:
        first.close()
    second = create_backend("tensorrt", card, model, opts)
    try:
        assert second.cache_hit and second.build_s == 0.0
        np.testing.assert_array_equal(second.invoke_batch(x), want)
    finally:
        second.close()
    other = create_backend("tensorrt", card, model, Options(max_batch=4, engine_cache_dir=str(tmp_path / "cache")))
    try:
        assert not other.cache_hit and other.engine_file != first.engine_file   # another shape: another engine
    finally:
        other.close()


def test_a_damaged_cached_engine_is_built_again(gpu, tmp_path, caplog):
    card, model = _card("fp16")
    opts = Options(engine_cache_dir=str(tmp_path))
    be = create_backend("tensorrt", card, model, opts)
    path = be.engine_file
    be.close()
    path.write_bytes(b"\0" * 1000)
    be = create_backend("tensorrt", card, model, opts)
    try:
        assert not be.cache_hit and "does not load" in caplog.text
        assert path.stat().st_size > 1000
    finally:
        be.close()


def test_batches_pad_to_the_static_profile_and_answer_as_single_invokes(gpu, tmp_path, fmnist):
    card, model = _card("fp32")
    be = create_backend("tensorrt", card, model, Options(max_batch=16, engine_cache_dir=str(tmp_path)))
    try:
        x = _inputs(card, fmnist["test"].images[:37])           # 16 + 16 + 5 (padded)
        batch = be.invoke_batch(x)
        single = np.concatenate([be.invoke(x[i:i + 1]) for i in range(len(x))])
        assert batch.shape == (37, 10)
        np.testing.assert_allclose(batch, single, rtol=1e-4, atol=1e-4)
        first = be.invoke(x[:1])
        kept = first.copy()
        be.invoke(x[1:2])
        np.testing.assert_array_equal(first, kept)     # a fresh array, not the pinned buffer
    finally:
        be.close()
        be.close()
    with pytest.raises(BackendError, match="closed"):
        be.invoke(x[:1])


def test_a_wrong_precision_or_device_is_refused(gpu, tmp_path):
    card, model = _card("fp16")
    with pytest.raises(BackendError, match="is a fp16 model"):
        create_backend("tensorrt", card, model, Options(precision="int8", engine_cache_dir=str(tmp_path)))
    with pytest.raises(BackendError, match="backend.tensorrt.device = 63"):
        create_backend("tensorrt", card, model, Options(device=63, engine_cache_dir=str(tmp_path)))


def test_an_unwritable_cache_costs_a_build_not_the_start(gpu, tmp_path, caplog):
    card, model = _card("int8")
    ro = tmp_path / "ro"
    ro.write_text("a file where the folder should be")
    be = create_backend("tensorrt", card, model, Options(engine_cache_dir=str(ro / "cache")))
    try:
        assert not be.cache_hit and "cannot keep the TensorRT engine" in caplog.text
    finally:
        be.close()
