"""`edge-infer` with backend = "tensorrt" on a machine without TensorRT: the operator's line, exit 2, and the fallback.

The real start path (check-config, run, classify: config, card, the isolated child
that loads the backend, the classifier's fallback), not the backend alone. On a
machine with TensorRT these tests skip; tests/hardware/test_tensorrt_hw.py runs there.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from edge_infer.preprocess import encode_png

from ..conftest import EDGE_CARD, REPO, device_toml

TRT_CARD = REPO / "models" / "fmnist-edge-v1-trt" / "card_int8.json"
MISSING = "TensorRT's Python bindings are not installed (No module named 'tensorrt'); install them: "

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_bindings")),
                                reason="this machine has TensorRT: tests/hardware/test_tensorrt_hw.py runs instead")


def _config(tmp_path, model_extra: str = "", table: str = 'precision = "int8"\n'):
    cfg = device_toml(tmp_path, 1883)
    text = cfg.read_text().replace(f'card = "{EDGE_CARD}"', f'card = "{TRT_CARD}"\nbackend = "tensorrt"\n{model_extra}')
    cfg.write_text(text + f"[backend.tensorrt]\n{table}")
    return cfg


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edge_infer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_check_config_and_run_stop_with_exit_2_and_what_to_install(tmp_path):
    cfg = _config(tmp_path)
    p = _cli("check-config", str(cfg))
    assert p.returncode == 2, p.stderr
    assert f"INVALID: {MISSING}" in p.stderr and "apt-get install python3-libnvinfer" in p.stderr
    p = _cli("run", "--config", str(cfg), timeout=90)
    assert p.returncode == 2, p.stderr
    assert f"cannot start: {MISSING}" in p.stderr and "Traceback" not in p.stderr


def test_with_the_fallback_the_cpu_model_answers_and_says_so(tmp_path, fmnist):
    images = []
    for i in range(8):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(encode_png(fmnist["test"].images[i]))
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    cpu = _cli("classify", "--config", str(device_toml(cpu_dir, 1883)), *map(str, images))
    cfg = _config(tmp_path, 'fallback = "cpu"\n')   # the card's fallback_card: ../fmnist-edge-v1/card.json
    p = _cli("check-config", str(cfg))
    assert p.returncode == 2 and MISSING in p.stderr   # check-config still says what is missing
    trt = _cli("classify", "--config", str(cfg), *map(str, images))
    assert cpu.returncode == 0 and trt.returncode == 0, trt.stderr
    labels = [json.loads(line)["label"] for line in trt.stdout.splitlines()]
    assert labels == [json.loads(line)["label"] for line in cpu.stdout.splitlines()] and len(labels) == 8
    assert "inference DEGRADED: backend tensorrt cannot answer (" in trt.stderr and MISSING in trt.stderr
    assert "Traceback" not in trt.stderr


def test_a_precision_that_is_not_the_cards_file_is_named(tmp_path):
    cfg = _config(tmp_path, table='precision = "fp16"\n')
    # without TensorRT the missing runtime is said first; the precision itself is checked by tests/unit
    p = _cli("check-config", str(cfg))
    assert p.returncode == 2 and MISSING in p.stderr
    bad = _config(tmp_path, table='precision = "int4"\n')
    p = _cli("check-config", str(bad))
    assert p.returncode == 2 and "backend.tensorrt.precision = 'int4': must be one of" in p.stderr
