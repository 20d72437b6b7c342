"""The backend contract, checked on every backend in the registry.

Each backend runs a shipped model of its format. A backend whose runtime is
not installed here is skipped with the reason its probe gives; backends that
need an accelerator carry the ``hardware`` marker (the Edge TPU, TensorRT).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from edge_infer import backends
from edge_infer.backends import REGISTRY, BackendError, check_backend, create_backend, default_options, options_class
from edge_infer.backends.guard import InvokeGuard
from edge_infer.errors import EdgeInferError
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor
from edge_infer.tomlcfg import describe

from ..conftest import CLOUD_CARD, EDGE_CARD, REPO

#: the Edge TPU model, made by models/recipes/fmnist/compile_edgetpu.py where edgetpu_compiler runs
EDGETPU_CARD = REPO / "models" / "fmnist-edge-v1-edgetpu" / "card.json"
#: the edge model's INT8 (Q/DQ) ONNX export, made by models/recipes/fmnist/export_trt_onnx.py
TENSORRT_CARD = REPO / "models" / "fmnist-edge-v1-trt" / "card_int8.json"
#: a shipped model each backend runs; a new backend adds its line here
MODELS = {"tflite-cpu": EDGE_CARD, "onnxruntime": CLOUD_CARD,
          "edgetpu": EDGETPU_CARD if EDGETPU_CARD.exists() else EDGE_CARD, "tensorrt": TENSORRT_CARD}
#: backends that need an accelerator (run with `pytest -m hardware` on the device)
HARDWARE: set[str] = {"edgetpu", "tensorrt"}
#: the modules each backend's runtime comes from, to simulate a machine without it
RUNTIME_MODULES = {
    "tflite-cpu": ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"),
    "onnxruntime": ("onnxruntime",),
    "edgetpu": ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"),
    "tensorrt": ("tensorrt", "tensorrt_bindings"),
}


def _params():
    return [pytest.param(name, id=name, marks=[pytest.mark.hardware] if name in HARDWARE else [])
            for name in REGISTRY]


@pytest.fixture(params=_params())
def name(request) -> str:
    try:
        check_backend(request.param)
    except BackendError as exc:
        pytest.skip(f"{request.param} cannot run here: {exc}")
    return request.param


@pytest.fixture
def loaded(name):
    card = load_card(MODELS[name])
    be = create_backend(name, card, verified_model_bytes(card))
    yield name, card, be
    be.close()


def _inputs(card, fmnist, n: int) -> np.ndarray:
    pre = Preprocessor(card.input)
    return pre.batch([pre.fit(im) for im in fmnist["test"].images[:n]])


def test_every_registered_backend_has_a_contract_model_and_is_documented():
    assert set(REGISTRY) <= set(MODELS), "add a shipped model for the new backend to MODELS"
    assert set(REGISTRY) <= set(RUNTIME_MODULES)
    docs = (REPO / "docs" / "backends.md").read_text()
    for name, entry in REGISTRY.items():
        assert f"`{name}`" in docs and f"[backend.{name}]" in docs, f"docs/backends.md does not describe {name}"
        assert load_card(MODELS[name]).format in entry.formats


@pytest.mark.parametrize("backend", REGISTRY)
def test_options_are_a_frozen_config_table_with_help(backend):
    cls = options_class(backend)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    opts = default_options(backend)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, dataclasses.fields(cls)[0].name, None)
    rows = describe(cls, f"backend.{backend}")
    assert rows and all(help_text for *_, help_text in rows)


def test_the_registry_and_the_options_import_no_runtime():
    """Config loading reads every backend's Options class: that must not import a runtime."""
    heavy = sorted({m for mods in RUNTIME_MODULES.values() for m in mods})
    code = ("import sys\n"
            "from edge_infer.config import parse_device_config\n"
            "from edge_infer.backends import REGISTRY, options_class\n"
            "cfg = parse_device_config({'device_id': 'd', 'model': {'card': 'c.json', 'backend': 'onnxruntime'},"
            " 'backend': {n: {} for n in REGISTRY}})\n"
            "print(cfg.backend_options)\n"
            f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr


def test_create_gives_what_the_card_describes(loaded, fmnist):
    name, card, be = loaded
    assert be.name == name and be.runtime
    assert len(be.input.shape) == len(card.input.shape) and be.input.shape[1:] == card.input.shape[1:]
    assert be.input.shape[0] in (1, -1) and be.input.dtype == card.input.dtype
    assert be.output.shape[-1] == len(card.labels) and be.output.dtype == card.output.dtype
    assert be.max_batch >= 1 and (be.max_batch == 1) == (be.input.shape[0] == 1)
    out = be.invoke(_inputs(card, fmnist, 1))
    assert out.shape == (1, len(card.labels)) and out.dtype == np.dtype(card.output.dtype)


def test_invoke_is_deterministic_and_its_result_is_not_overwritten(loaded, fmnist):
    _, card, be = loaded
    x = _inputs(card, fmnist, 2)
    first = be.invoke(x[:1])
    kept = first.copy()
    other = be.invoke(x[1:2])
    assert np.array_equal(first, kept), "the next invoke changed an earlier result"
    assert np.array_equal(be.invoke(x[:1]), kept)
    assert not np.array_equal(other, kept)


def test_invoke_batch_any_size_gives_the_single_answers(loaded, fmnist):
    _, card, be = loaded
    n = 2 * be.max_batch + 3 if be.max_batch > 1 else 5
    x = _inputs(card, fmnist, n)
    batch = be.invoke_batch(x)
    single = np.concatenate([be.invoke(x[i:i + 1]) for i in range(n)])
    assert batch.shape == (n, len(card.labels))
    assert np.array_equal(batch.argmax(-1), single.argmax(-1))
    np.testing.assert_allclose(batch.astype(np.float32), single.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_guard_runs_batches_and_close_is_idempotent(name, fmnist):
    card = load_card(MODELS[name])
    guard = InvokeGuard(create_backend(name, card, verified_model_bytes(card)))
    x = _inputs(card, fmnist, 3)
    assert guard.invoke_batch(x).shape == (3, len(card.labels)) and guard.stuck_for() == 0.0
    assert guard.max_batch == guard.backend.max_batch
    guard.close()
    guard.close()
    with pytest.raises(BackendError, match="closed"):
        guard.invoke(x[:1])


def test_a_card_of_another_format_is_refused_with_exit_2(name):
    other = next(c for n, c in MODELS.items() if load_card(c).format not in REGISTRY[name].formats)
    card = load_card(other)
    with pytest.raises(BackendError) as exc:
        create_backend(name, card, verified_model_bytes(card))
    assert exc.value.exit_code == 2 and not exc.value.transient
    assert card.format in str(exc.value)
    with pytest.raises(BackendError, match="runs"):
        check_backend(name, None, card)
    # the backend's own factory refuses it too, for callers that skip the registry
    module = __import__(REGISTRY[name].module, fromlist=["create"])
    with pytest.raises(BackendError):
        getattr(module, REGISTRY[name].factory)(card, verified_model_bytes(card), default_options(name))


def test_bytes_that_are_not_the_model_are_refused_with_exit_2(name):
    card = load_card(MODELS[name])
    with pytest.raises(BackendError) as exc:
        create_backend(name, card, b"\x00not a model" * 64)
    assert exc.value.exit_code == 2 and "cannot load" in str(exc.value)


def test_a_card_that_does_not_describe_the_model_is_refused(name):
    card = load_card(MODELS[name])
    fewer = dataclasses.replace(card, labels=card.labels[:5])
    with pytest.raises(BackendError, match="label") as exc:
        create_backend(name, fewer, verified_model_bytes(card))
    assert exc.value.exit_code == 2
    shape = list(card.input.shape)
    shape[-1] += 1
    wider = dataclasses.replace(card, input=dataclasses.replace(card.input, shape=tuple(shape)))
    with pytest.raises(BackendError, match="the card does not describe this model"):
        create_backend(name, wider, verified_model_bytes(card))


@pytest.mark.parametrize("backend", REGISTRY)
def test_a_missing_runtime_is_refused_with_exit_2_and_what_to_install(backend, monkeypatch):
    for module in RUNTIME_MODULES[backend]:
        monkeypatch.setitem(sys.modules, module, None)   # `import module` raises ImportError
    card = load_card(MODELS[backend])
    for call in (lambda: check_backend(backend, None, card),
                 lambda: create_backend(backend, card, verified_model_bytes(card))):
        with pytest.raises(BackendError) as exc:
            call()
        assert exc.value.exit_code == 2 and "install" in str(exc.value).lower()
    assert backends.available()[backend].startswith("unavailable: ")


def test_options_of_another_backend_are_a_programming_error():
    card = load_card(CLOUD_CARD)
    with pytest.raises(TypeError, match="takes edge_infer.backends.onnxrt.Options"):
        create_backend("onnxruntime", card, verified_model_bytes(card), default_options("tflite-cpu"))


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'tflite-gpu' \(did you mean 'tflite-cpu'\?\); "
                                           r"known backends: edgetpu, onnxruntime, tensorrt, tflite-cpu") as exc:
        check_backend("tflite-gpu")
    assert exc.value.exit_code == 2


def test_backend_error_exit_codes():
    err = BackendError("x")
    assert isinstance(err, EdgeInferError) and isinstance(err, RuntimeError)
    assert (err.exit_code, err.transient) == (2, False)
    gone = BackendError("no Edge TPU at 'usb'", transient=True)
    assert (gone.exit_code, gone.transient) == (1, True)     # the hardware may come back: a restart may cure it
    assert BackendError("x", transient=True, exit_code=2).exit_code == 2


def test_older_callers_backend_options_still_work():
    from edge_infer.backends import BackendOptions
    from edge_infer.backends.tflite_cpu import Options
    assert BackendOptions is Options and BackendOptions("auto", 1) == Options()
    card = load_card(EDGE_CARD)
    be = create_backend("tflite-cpu", card, verified_model_bytes(card), BackendOptions("auto", 1))
    be.close()


# ----------------------------------------------------------------------------- per backend

def test_tflite_cpu_runs_one_input_per_invoke():
    card = load_card(EDGE_CARD)
    be = create_backend("tflite-cpu", card, verified_model_bytes(card))
    assert be.max_batch == 1 and be.input.shape == card.input.shape
    be.close()


def test_onnxruntime_labels_equal_the_cloud_workers_on_the_same_model(fmnist):
    """The device's onnxruntime backend and the cloud worker's CloudModel, one ONNX model, 1000 test images."""
    pytest.importorskip("onnxruntime")
    from edge_infer.classifier import Classifier
    from edge_infer.config import ModelConfig, PolicyConfig
    from edge_infer_cloud.model import CloudModel

    images = fmnist["test"].images[:1000]
    cloud = CloudModel(CLOUD_CARD).predict_fitted(images)
    with Classifier(ModelConfig(card=CLOUD_CARD, backend="onnxruntime"), PolicyConfig()) as clf:
        assert clf.backend.max_batch == 32 and clf.backend.input.shape[0] == -1
        one_by_one = [clf.infer(im) for im in images]
        batched = clf.infer_many(list(images))
    assert np.array_equal([r.label for r in one_by_one], cloud)
    assert np.array_equal([r.label for r in batched], cloud)
    np.testing.assert_allclose([r.confidence for r in batched], [r.confidence for r in one_by_one], atol=1e-5)
    assert (cloud == fmnist["test"].labels[:1000]).mean() > 0.9


def test_onnxruntime_batch_of_one_option_and_a_missing_provider():
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from edge_infer.backends.onnxrt import Options
    card = load_card(CLOUD_CARD)
    be = create_backend("onnxruntime", card, verified_model_bytes(card), Options(max_batch=1))
    assert be.max_batch == 1
    be.close()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="CUDAExecutionProvider not in this onnxruntime build") as exc:
        check_backend("onnxruntime", Options(providers=("CUDAExecutionProvider", "CPUExecutionProvider")), card)
    assert exc.value.exit_code == 2


def test_classifier_batches_only_where_the_backend_does(name, fmnist):
    from edge_infer.classifier import Classifier
    from edge_infer.config import ModelConfig, PolicyConfig

    images = list(fmnist["test"].images[:70])
    with Classifier(ModelConfig(card=MODELS[name], backend=name), PolicyConfig(score="margin")) as clf:
        single = [clf.infer(im) for im in images]
        many = clf.infer_many(images)
    assert [r.label for r in many] == [r.label for r in single]
    assert all(np.array_equal(a.fitted, b.fitted) for a, b in zip(many, single))
    np.testing.assert_allclose([r.confidence for r in many], [r.confidence for r in single], atol=1e-5)
