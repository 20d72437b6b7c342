"""The TensorRT backend's parts that need no GPU: the engine cache key, the options, the ONNX reader, the messages.

The engine is built and run on a GPU by tests/hardware/test_tensorrt_hw.py; what the
shipped ONNX models are (their Q/DQ structure, their accuracy on the CPU) is in
test_trt_models.py.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from edge_infer.backends import BackendError, check_backend, create_backend
from edge_infer.backends.onnxgraph import TensorInfo, inspect_onnx
from edge_infer.backends.tensorrt import (DEFAULT_CACHE_DIR, EngineKey, Options, check_io, check_precision,
                                          engine_path, import_cudart, profile_shapes, write_engine)
from edge_infer.config import parse_device_config
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.tomlcfg import ConfigError

from ..conftest import CLOUD_CARD, REPO

TRT_DIR = REPO / "models" / "fmnist-edge-v1-trt"
CARDS = {"fp32": TRT_DIR / "card.json", "fp16": TRT_DIR / "card_fp16.json", "int8": TRT_DIR / "card_int8.json"}
BASE = {"device_id": "d", "model": {"card": "c.json", "backend": "tensorrt"}}

KEY = EngineKey(model_sha256="ab" * 32, tensorrt="10.3.0.30", gpu="Orin", compute_capability="8.7",
                precision="int8", shapes=((1, 1, 28, 28), (64, 1, 28, 28)), workspace_mib=256)


# ----------------------------------------------------------------------------- the engine cache key

@pytest.mark.parametrize("change", [
    {"model_sha256": "cd" * 32},
    {"tensorrt": "10.3.0.31"},              # a JetPack upgrade
    {"tensorrt": "11.4.0.106"},
    {"gpu": "NVIDIA H200"},
    {"compute_capability": "9.0"},
    {"precision": "fp16"},
    {"shapes": ((1, 1, 28, 28),)},          # max_batch = 1
    {"shapes": ((1, 1, 28, 28), (32, 1, 28, 28))},
    {"workspace_mib": 512},
])
def test_every_component_changes_the_key_and_the_file(change, tmp_path):
    other = dataclasses.replace(KEY, **change)
    assert other.digest() != KEY.digest()
    assert engine_path(tmp_path, other, "fmnist-edge-int8") != engine_path(tmp_path, KEY, "fmnist-edge-int8")


def test_the_key_is_stable_and_names_the_file():
    same = EngineKey(**{f.name: getattr(KEY, f.name) for f in dataclasses.fields(KEY)})
    assert same.digest() == KEY.digest() and len(KEY.digest()) == 64
    # a fixed value: a change of the digest's recipe would silently orphan every cached engine
    assert KEY.digest() == "025907e55df573eb442c0055830b9686244d7d301080b7bac5338ec53918390f"
    path = engine_path("/var/lib/edge-infer/tensorrt", KEY, "fmnist-edge-int8")
    assert str(path) == f"/var/lib/edge-infer/tensorrt/fmnist-edge-int8-int8-{KEY.digest()[:16]}.engine"
    assert engine_path("/c", KEY, "../../etc/x y").parent.as_posix() == "/c"     # a card name is not a path


def test_the_engine_and_its_key_are_written_atomically(tmp_path):
    path = engine_path(tmp_path / "cache", KEY, "m")
    write_engine(path, b"plan", KEY)
    write_engine(path, b"plan2", KEY)
    assert path.read_bytes() == b"plan2"
    import json
    assert json.loads(path.with_suffix(".json").read_text())["tensorrt"] == "10.3.0.30"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def test_profiles_are_static_shapes():
    assert profile_shapes((-1, 1, 28, 28), True, 1) == ((1, 1, 28, 28),)
    assert profile_shapes((-1, 1, 28, 28), True, 64) == ((1, 1, 28, 28), (64, 1, 28, 28))
    assert profile_shapes((1, 1, 28, 28), False, 64) == ((1, 1, 28, 28),)   # a batch-1 model stays batch 1


# ----------------------------------------------------------------------------- options

def test_defaults_and_config_table():
    opts = Options()
    assert (opts.precision, opts.max_batch, opts.engine_cache_dir, opts.workspace_mib, opts.device) == \
        ("auto", 1, DEFAULT_CACHE_DIR, 256, 0)
    cfg = parse_device_config({**BASE, "backend": {"tensorrt": {"precision": "int8", "max_batch": 64,
                                                                "engine_cache_dir": "/var/cache/trt",
                                                                "workspace_mib": 1024}}})
    assert cfg.backend_options == Options(precision="int8", max_batch=64, engine_cache_dir="/var/cache/trt",
                                          workspace_mib=1024)
    assert cfg.model.isolated, "an accelerator runs isolated by default"
    assert parse_device_config({**BASE, "backend": {"tensorrt": {"engine_cache_dir": ""}}}).backend_options \
        .engine_cache_dir == ""


@pytest.mark.parametrize("table, needle", [
    ({"precision": "int4"}, "backend.tensorrt.precision = 'int4': must be one of: 'auto', 'fp32', 'fp16', 'int8'"),
    ({"precision": "FP16"}, "backend.tensorrt.precision = 'FP16'"),
    ({"max_batch": 0}, "backend.tensorrt.max_batch = 0: must be between 1 and 4096"),
    ({"workspace_mib": 8}, "backend.tensorrt.workspace_mib = 8: must be between 16 and 65536"),
    ({"engine_cache_dir": "cache"}, "backend.tensorrt.engine_cache_dir = 'cache': must be an absolute path"),
    ({"device": -1}, "backend.tensorrt.device = -1"),
    ({"calibrator": "entropy"}, "unknown key 'backend.tensorrt.calibrator'"),
    ({"fp16": True}, "unknown key 'backend.tensorrt.fp16'"),
])
def test_bad_options_are_named(table, needle):
    with pytest.raises(ConfigError) as exc:
        parse_device_config({**BASE, "backend": {"tensorrt": table}})
    assert needle in str(exc.value) and exc.value.exit_code == 2


# ----------------------------------------------------------------------------- the ONNX reader

@pytest.mark.parametrize("precision", CARDS)
def test_the_reader_tells_each_shipped_files_precision(precision):
    card = load_card(CARDS[precision])
    graph = inspect_onnx(verified_model_bytes(card))
    assert graph.precision == precision
    (inp,), (out,) = graph.inputs, graph.outputs
    assert inp == TensorInfo("image", "float32", ("batch", 1, 28, 28)) and inp.batch_is_dynamic
    assert out == TensorInfo("logits", "float32", ("batch", 10))
    assert graph.count("Conv") == 6 and graph.count("Gemm") == 1
    assert graph.quantized == (precision == "int8")
    assert check_io(card, graph) == ((-1, 1, 28, 28), True)


def test_the_reader_agrees_with_onnx_on_every_shipped_model():
    onnx = pytest.importorskip("onnx", reason="the onnx package is a dev dependency (pip install onnx)")
    from collections import Counter
    for path in [*(load_card(c).file for c in CARDS.values()), load_card(CLOUD_CARD).file]:
        graph = inspect_onnx(path.read_bytes())
        model = onnx.load(path)
        assert dict(graph.op_counts) == Counter(n.op_type for n in model.graph.node)
        assert dict(graph.initializer_types) == Counter(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer)
        assert graph.ir_version == model.ir_version
        assert [i.name for i in graph.inputs] == [i.name for i in model.graph.input]


@pytest.mark.parametrize("data", [b"", b"\x00not a model" * 64, b"\x08\x08", b"\x08\x08:\x05\x0a\x03abc",
                                  b"\x08\x08:\xff\xff\xff\xff\x0f", load_card(CLOUD_CARD).file.read_bytes()[:5000],
                                  (REPO / "models" / "fmnist-edge-v1" / "model.tflite").read_bytes()])
def test_bytes_that_are_not_onnx_are_a_backend_error(data):
    with pytest.raises(BackendError) as exc:
        inspect_onnx(data, "x.onnx")
    assert exc.value.exit_code == 2 and "x.onnx" in str(exc.value)


def test_a_precision_that_is_not_the_files_is_refused_naming_the_card():
    card = load_card(CARDS["fp16"])
    graph = inspect_onnx(verified_model_bytes(card))
    assert check_precision(graph, "auto", card) == check_precision(graph, "fp16", card) == "fp16"
    with pytest.raises(BackendError) as exc:
        check_precision(graph, "int8", card)
    assert exc.value.exit_code == 2
    assert "precision = 'int8', but" in str(exc.value) and "is a fp16 model" in str(exc.value)
    assert "card_int8.json" in str(exc.value)


def test_a_card_that_does_not_describe_the_model_is_refused():
    card = load_card(CARDS["int8"])
    graph = inspect_onnx(verified_model_bytes(card))
    fewer = dataclasses.replace(card, labels=card.labels[:5])
    with pytest.raises(BackendError, match="5 labels"):
        check_io(fewer, graph)
    wider = dataclasses.replace(card, input=dataclasses.replace(card.input, shape=(-1, 1, 28, 29)))
    with pytest.raises(BackendError, match="the card does not describe this model"):
        check_io(wider, graph)
    nhwc = dataclasses.replace(card, input=dataclasses.replace(card.input, dtype="int8"))
    with pytest.raises(BackendError, match="the card does not describe this model"):
        check_io(nhwc, graph)


# ----------------------------------------------------------------------------- without TensorRT

def test_without_tensorrt_check_and_create_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
    card = load_card(CARDS["int8"])
    for call in (lambda: check_backend("tensorrt", None, card),
                 lambda: create_backend("tensorrt", card, verified_model_bytes(card))):
        with pytest.raises(BackendError) as exc:
            call()
        msg = str(exc.value)
        assert exc.value.exit_code == 2 and not exc.value.transient
        assert msg.startswith("TensorRT's Python bindings are not installed (")
        assert "apt-get install python3-libnvinfer" in msg and "pip install tensorrt-cu12" in msg


def test_without_cuda_python_the_message_names_it(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError) as exc:
        import_cudart()
    assert exc.value.exit_code == 2 and "cuda-python is not installed" in str(exc.value)
    assert "pip install 'cuda-python>=12.6,<13'" in str(exc.value)


def test_a_tflite_card_is_refused_before_anything_is_imported():
    card = load_card(REPO / "models" / "fmnist-edge-v1" / "card.json")
    with pytest.raises(BackendError, match="backend tensorrt runs onnx models; .* describes a tflite model"):
        create_backend("tensorrt", card, verified_model_bytes(card))


def test_the_module_imports_no_runtime():
    code = ("import sys\nimport edge_infer.backends.tensorrt, edge_infer.backends.onnxgraph\n"
            "heavy = [m for m in ('tensorrt', 'tensorrt_bindings', 'cuda', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
