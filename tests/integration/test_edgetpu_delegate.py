"""The Edge TPU backend against the real TFLite runtime's load_delegate, without Coral hardware.

Three failures from the field, each with its operator message and exit code:
the delegate library is not installed (the real libedgetpu.so.1 is absent on
these machines), no device answers at the selector (a fake libedgetpu whose
tflite_plugin_create_delegate returns NULL, as the real one does), and a model
that was not compiled for the Edge TPU. A fake delegate that opens "a device"
runs the whole backend, delegate attached, on the shipped CPU model.
"""
from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

import numpy as np
import pytest

from edge_infer.backends import BackendError, create_backend
from edge_infer.backends.edgetpu import Options, open_delegate
from edge_infer.backends.tflite_cpu import load_interpreter_module
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import Preprocessor, encode_png

from ..conftest import EDGE_CARD, REPO, device_toml
from ..edgetpu_fakes import build_fake_delegate, with_first_op_on_the_edgetpu

LIBRARY_MISSING = ("the Edge TPU library libedgetpu.so.1 cannot be loaded (libedgetpu.so.1: cannot open shared "
                   "object file: No such file or directory); install the Edge TPU runtime from Coral's apt "
                   "repository (coral-edgetpu-stable; docs/backends.md): `apt-get install libedgetpu1-std` (or "
                   "libedgetpu1-max for the full clock: a USB Accelerator then runs hot); the Dev Board's Mendel "
                   "Linux ships it; or point backend.edgetpu.library at the file")


def _has_real_libedgetpu() -> bool:
    try:
        ctypes.CDLL("libedgetpu.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    return build_fake_delegate(tmp_path_factory.mktemp("fake-edgetpu"))


@pytest.fixture
def card():
    return load_card(EDGE_CARD)


def _inputs(card, fmnist, n):
    pre = Preprocessor(card.input)
    return pre.batch([pre.fit(im) for im in fmnist["test"].images[:n]])


# ----------------------------------------------------------------------------- library missing

def test_the_real_library_missing_is_exit_2_with_what_to_install(card):
    if _has_real_libedgetpu():
        pytest.skip("this machine has libedgetpu.so.1")
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, verified_model_bytes(card))
    assert str(exc.value) == LIBRARY_MISSING
    assert exc.value.exit_code == 2 and not exc.value.transient


# the runtime's Delegate.__del__ fails on a library that never loaded: the noise check_library spares the journal
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_runtimes_own_load_delegate_failing_on_a_missing_library_gives_the_same_advice(tmp_path):
    """open_delegate maps the runtime's OSError too (the library removed after the check)."""
    module, _ = load_interpreter_module("auto")
    lib = tmp_path / "libedgetpu.so.1"
    with pytest.raises(BackendError) as exc:
        open_delegate(module, Options(library=str(lib)))
    assert str(exc.value).startswith(f"the Edge TPU library {lib} cannot be loaded (")
    assert "apt-get install libedgetpu1-std" in str(exc.value) and exc.value.exit_code == 2
    del exc
    gc.collect()   # the half-made Delegate goes now, inside this test's filter


# ----------------------------------------------------------------------------- device not found

def test_no_device_at_the_selector_is_transient_but_exit_2(card, fake_lib, monkeypatch, tmp_path):
    log = tmp_path / "options.txt"
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "absent")
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, verified_model_bytes(card),
                       Options(library=str(fake_lib), device="usb:1", allow_cpu_only=True))
    msg = str(exc.value)
    # transient: a fallback may retry it; exit 2: a start without one does not restart in a loop
    assert exc.value.transient and exc.value.exit_code == 2
    assert msg.startswith(f"no Edge TPU could be opened at device 'usb:1': Failed to load delegate from {fake_lib}. "
                          "Seen now: ")
    for needle in ("lsusb", "1a6e:089a", "18d1:9302", "USB 3 port or a powered hub", "plugdev", "udev rules"):
        assert needle in msg, needle
    assert "/dev/apex_0" not in msg          # a USB selector gets the USB advice only
    assert log.read_text() == "device=usb:1\n"   # the selector reached the library as libedgetpu's "device" option


def test_no_pcie_device_names_the_node_the_driver_and_the_one_holder_rule(card, fake_lib, monkeypatch):
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "absent")
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, verified_model_bytes(card),
                       Options(library=str(fake_lib), device="pci", allow_cpu_only=True))
    msg = str(exc.value)
    for needle in ("/dev/apex_0", "gasket-dkms", "lsmod | grep apex", "only one process may hold it", "fuser"):
        assert needle in msg, needle
    assert "lsusb" not in msg


# ----------------------------------------------------------------------------- the model

def test_a_model_not_compiled_for_the_edgetpu_is_refused(card, fake_lib, monkeypatch):
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "present")
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, verified_model_bytes(card), Options(library=str(fake_lib)))
    assert exc.value.exit_code == 2 and not exc.value.transient
    assert str(exc.value).startswith(f"{card.file}: backend edgetpu needs a model compiled by edgetpu_compiler, "
                                     "and this one is not compiled for the Edge TPU (no edgetpu-custom-op)")


def test_garbage_bytes_are_refused_before_the_device_is_opened(card, fake_lib, monkeypatch, tmp_path):
    log = tmp_path / "options.txt"
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "present")
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    with pytest.raises(BackendError, match="backend edgetpu cannot load .*the file is not a TFLite model") as exc:
        create_backend("edgetpu", card, b"\x00not a model" * 64, Options(library=str(fake_lib)))
    assert exc.value.exit_code == 2 and not log.exists()


def test_a_partly_compiled_model_warns_and_a_delegate_that_takes_nothing_is_named(card, fake_lib, monkeypatch,
                                                                                 caplog):
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "present")
    compiled = with_first_op_on_the_edgetpu(verified_model_bytes(card))
    with pytest.raises(BackendError) as exc:
        create_backend("edgetpu", card, compiled, Options(library=str(fake_lib)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("most of this model runs on the CPU, not the Edge TPU: 9 of 10 operator nodes (90%)" in w
               for w in warnings), warnings
    assert "Encountered unresolved custom op: edgetpu-custom-op" in str(exc.value)
    assert "The delegate did not take the Edge TPU operators" in str(exc.value) and exc.value.exit_code == 2


def test_tflite_cpu_names_a_model_compiled_for_the_edgetpu(card):
    compiled = with_first_op_on_the_edgetpu(verified_model_bytes(card))
    with pytest.raises(BackendError, match='was compiled for the Edge TPU .* use backend = "edgetpu"'):
        create_backend("tflite-cpu", card, compiled)


# ----------------------------------------------------------------------------- with a delegate that opens

def test_the_backend_runs_with_the_delegate_attached(card, fake_lib, monkeypatch, tmp_path, fmnist):
    log = tmp_path / "options.txt"
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "present")
    monkeypatch.setenv("FAKE_EDGETPU_LOG", str(log))
    be = create_backend("edgetpu", card, verified_model_bytes(card),
                        Options(library=str(fake_lib), device="pci:0", performance="medium", allow_cpu_only=True))
    cpu = create_backend("tflite-cpu", card, verified_model_bytes(card))
    try:
        assert be.name == "edgetpu" and be.max_batch == 1 and be.runtime.endswith(f"+ {fake_lib} (pci:0)")
        assert be.input.shape == card.input.shape and be.output.shape == (1, len(card.labels))
        assert not be.ops.compiled_for_edgetpu
        x = _inputs(card, fmnist, 50)
        assert np.array_equal(be.invoke_batch(x), cpu.invoke_batch(x))
    finally:
        be.close()
        be.close()
        cpu.close()
    with pytest.raises(BackendError, match="closed"):
        be.invoke(x[:1])
    assert log.read_text() == "device=pci:0\nPerformance=Medium\n"


# ----------------------------------------------------------------------------- the command line

def _edgetpu_config(tmp_path, table: str = ""):
    cfg = device_toml(tmp_path, 1883)
    text = cfg.read_text().replace(f'card = "{EDGE_CARD}"', f'card = "{EDGE_CARD}"\nbackend = "edgetpu"')
    cfg.write_text(text + (f"[backend.edgetpu]\n{table}\n" if table else ""))
    return cfg


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edge_infer", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_check_config_and_run_stop_with_exit_2_when_libedgetpu_is_missing(tmp_path):
    if _has_real_libedgetpu():
        pytest.skip("this machine has libedgetpu.so.1")
    cfg = _edgetpu_config(tmp_path)
    for command in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        p = _cli(*command)
        assert p.returncode == 2, p.stderr
        assert LIBRARY_MISSING in p.stderr and "Traceback" not in p.stderr


def test_run_without_a_device_and_without_a_fallback_exits_2_at_once(tmp_path, fake_lib):
    """A missing accelerator at start: one clear line and exit 2 (RestartPreventExitStatus=2), no restart loop."""
    import os
    cfg = _edgetpu_config(tmp_path, f'library = "{fake_lib}"\ndevice = "usb"\nallow_cpu_only = true')
    env = {**os.environ, "FAKE_EDGETPU_MODE": "absent"}
    p = _cli("check-config", str(cfg), env=env)
    assert p.returncode == 0, p.stderr
    assert "on edgetpu (" in p.stdout and f"+ {fake_lib}; Edge TPUs seen: " in p.stdout
    p = _cli("run", "--config", str(cfg), env=env, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "no Edge TPU could be opened at device 'usb': Failed to load delegate from" in p.stderr
    assert "Traceback" not in p.stderr


def test_classify_with_the_delegate_answers_as_the_cpu(tmp_path, fake_lib, fmnist):
    import os
    images = []
    for i in range(5):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(encode_png(fmnist["test"].images[i]))
    cpu_cfg = device_toml(tmp_path, 1883)
    cpu = _cli("classify", "--config", str(cpu_cfg), *map(str, images))
    tpu_dir = tmp_path / "tpu"
    tpu_dir.mkdir()
    cfg = _edgetpu_config(tpu_dir, f'library = "{fake_lib}"\nallow_cpu_only = true')
    tpu = _cli("classify", "--config", str(cfg), *map(str, images), env={**os.environ, "FAKE_EDGETPU_MODE": "present"})
    assert cpu.returncode == 0 and tpu.returncode == 0, tpu.stderr
    labels = [json.loads(line)["label"] for line in tpu.stdout.splitlines()]
    assert labels == [json.loads(line)["label"] for line in cpu.stdout.splitlines()] and len(labels) == 5
    assert "the Edge TPU does nothing for this model" in tpu.stderr   # the WARNING is not silenced


def test_inspect_model_reports_what_runs_where(tmp_path):
    from ..edgetpu_fakes import synthetic_model
    compiled = tmp_path / "model_edgetpu.tflite"
    compiled.write_bytes(synthetic_model(["edgetpu-custom-op", "SOFTMAX"]))
    shipped = EDGE_CARD.parent / "model.tflite"
    p = _cli("inspect-model", str(compiled))
    assert p.returncode == 0 and p.stdout == (f"{compiled}: compiled for the Edge TPU: 1 Edge TPU segment(s) "
                                              "(edgetpu-custom-op), 1 of 2 operator nodes (50%) on the CPU (SOFTMAX)\n")
    p = _cli("inspect-model", "--json", str(shipped))
    assert p.returncode == 1 and json.loads(p.stdout)["compiled_for_edgetpu"] is False
    p = _cli("inspect-model", str(tmp_path / "missing.tflite"))
    assert p.returncode == 2 and "cannot be read" in p.stderr and "Traceback" not in p.stderr
