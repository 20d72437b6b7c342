"""On a device with a Coral Edge TPU: the compiled model runs on it and answers as the CPU model does.

Run on the device (docs/backends.md, "Verify it runs on the accelerator"):

    pytest -m edgetpu tests/hardware -v
    EDGE_INFER_TEST_EDGETPU_DEVICE=pci:0 pytest -m "edgetpu or hardware" -v   # one device, and the contract tests

Every test here skips, saying why, where there is no Edge TPU, no libedgetpu, or
no compiled model (models/recipes/fmnist/compile_edgetpu.py makes it where
edgetpu_compiler runs). Skips are not passes: a run on a device must show them
passed.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from edge_infer.backends import BackendError, create_backend
from edge_infer.backends.edgetpu import Options, check_library
from edge_infer.backends.edgetpu_sysfs import find_edgetpus, read_apex_thermal
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor

from ..conftest import EDGE_CARD, REPO

pytestmark = [pytest.mark.edgetpu, pytest.mark.hardware]

EDGETPU_CARD = REPO / "models" / "fmnist-edge-v1-edgetpu" / "card.json"
DEVICE = os.environ.get("EDGE_INFER_TEST_EDGETPU_DEVICE", "")


@pytest.fixture(scope="module")
def devices():
    try:
        check_library(Options().library)
    except BackendError as exc:
        pytest.skip(f"no Edge TPU runtime here: {exc}")
    found = find_edgetpus()
    if not found:
        pytest.skip("no Edge TPU here: no USB 1a6e:089a or 18d1:9302 and no /sys/class/apex/apex_*")
    return found


@pytest.fixture(scope="module")
def compiled(devices):
    if not EDGETPU_CARD.exists():
        pytest.skip(f"{EDGETPU_CARD} is missing: make it with models/recipes/fmnist/compile_edgetpu.py where "
                    "edgetpu_compiler runs (x86-64 Debian/Ubuntu) and copy the folder here")
    card = load_card(EDGETPU_CARD)
    return card, verified_model_bytes(card)


def _inputs(card, fmnist, n):
    pre = Preprocessor(card.input)
    return pre.batch([pre.fit(im) for im in fmnist["test"].images[:n]])


def test_sysfs_sees_a_device_this_user_may_open(devices):
    assert all(d.accessible for d in devices), [d.describe() for d in devices]


def test_the_compiled_model_runs_on_the_edgetpu_and_agrees_with_the_cpu_model(compiled, fmnist):
    card, model = compiled
    be = create_backend("edgetpu", card, model, Options(device=DEVICE))
    try:
        assert be.ops.compiled_for_edgetpu and not be.ops.mostly_cpu, be.ops.summary()
        n = 1000
        tpu = be.invoke_batch(_inputs(card, fmnist, n)).argmax(-1)
    finally:
        be.close()
    cpu_card = load_card(EDGE_CARD)
    cpu_be = create_backend("tflite-cpu", cpu_card, verified_model_bytes(cpu_card))
    try:
        cpu = cpu_be.invoke_batch(_inputs(cpu_card, fmnist, n)).argmax(-1)
    finally:
        cpu_be.close()
    labels = fmnist["test"].labels[:n]
    # the Edge TPU's int8 kernels round differently from XNNPACK's: a few labels may change, not the accuracy
    assert (tpu == cpu).mean() >= 0.98
    assert (tpu == labels).mean() >= (cpu == labels).mean() - 0.01


def test_close_releases_the_device_so_it_can_be_opened_again(compiled):
    card, model = compiled
    for _ in range(3):   # what a fallback's periodic retry does
        be = create_backend("edgetpu", card, model, Options(device=DEVICE))
        be.close()


@pytest.mark.parametrize("selector", ["usb:9", "pci:9"])
def test_a_selector_with_no_device_is_the_operator_message(compiled, selector):
    card, model = compiled
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, model, Options(device=selector))
    assert exc.value.transient and exc.value.exit_code == 2
    assert str(exc.value).startswith(f"no Edge TPU could be opened at device {selector!r}: ")


def test_the_uncompiled_model_is_refused_on_the_device(devices):
    card = load_card(EDGE_CARD)
    with pytest.raises(BackendError, match="needs a model compiled by edgetpu_compiler"):
        create_backend("edgetpu", card, verified_model_bytes(card), Options(device=DEVICE))


def test_pcie_temperature_is_read(devices):
    if not any(d.kind == "pci" for d in devices):
        pytest.skip("no PCIe/M.2 Edge TPU here (a USB Accelerator reports no temperature)")
    for t in read_apex_thermal():
        assert t.temp_c is not None and 0 < t.temp_c < 120, t
        assert t.trip_points_c and list(t.trip_points_c) == sorted(t.trip_points_c)
        assert np.isfinite(t.temp_c)
