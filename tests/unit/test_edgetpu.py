"""The Edge TPU backend's pure parts: options, the model file's operators, sysfs devices and temperature."""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys

import pytest

from edge_infer.backends import BackendError
from edge_infer.backends import edgetpu
from edge_infer.backends.edgetpu import Options, check_compiled, check_library, device_not_found_message
from edge_infer.backends.edgetpu_sysfs import EdgeTpuDevice, find_edgetpus, read_apex_thermal
from edge_infer.backends.tflitemodel import BUILTIN_NAMES, inspect_model, main as tflitemodel_main
from edge_infer.modelcard import load_card
from edge_infer.tomlcfg import ConfigError

from ..conftest import EDGE_CARD
from ..edgetpu_fakes import schema, synthetic_model

SHIPPED = EDGE_CARD.parent / "model.tflite"


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("device", ["", "usb", "usb:0", "usb:12", "pci", "pci:0", "pci:3", ":0", ":1"])
def test_device_selectors_libedgetpu_accepts(device):
    assert Options(device=device).delegate_options() == {"device": device}


@pytest.mark.parametrize("device, needle", [
    ("usb0", "must be"), ("USB", "must be"), ("pcie", "must be"), ("usb:", "must be"), ("usb:-1", "must be"),
    ("usb:01", "must be"), (":", "must be"), ("usb:0 ", "must be"), ("tpu", "must be"),
    ("/dev/apex_0", 'name the device, not its node: "pci:0"'), ("/dev/apex_1", '"pci:1"'),
])
def test_bad_device_selectors_are_named(device, needle):
    from edge_infer.config import parse_device_config
    with pytest.raises(ConfigError) as exc:
        parse_device_config({"device_id": "d", "model": {"card": "c", "backend": "edgetpu"},
                             "backend": {"edgetpu": {"device": device}}})
    assert f"backend.edgetpu.device = {device!r}" in str(exc.value) and needle in str(exc.value)
    assert exc.value.exit_code == 2


def test_performance_is_libedgetpus_option_and_needs_an_indexed_device():
    assert Options(device="usb:0", performance="high").delegate_options() == {"device": "usb:0",
                                                                              "Performance": "High"}
    assert Options(device=":1", performance="low").delegate_options()["Performance"] == "Low"
    for device in ("", "usb", "pci"):
        with pytest.raises(ConfigError, match="needs an indexed device"):
            Options(device=device, performance="max")


def test_defaults_and_config_table():
    from edge_infer.config import parse_device_config
    opts = Options()
    assert (opts.device, opts.library, opts.runtime, opts.allow_cpu_only) == ("", "libedgetpu.so.1", "auto", False)
    cfg = parse_device_config({"device_id": "d", "model": {"card": "c", "backend": "edgetpu"},
                               "backend": {"edgetpu": {"device": "pci:0", "library": "/opt/lib/libedgetpu.so.1",
                                                       "num_threads": 2}}})
    assert cfg.backend_options == Options(device="pci:0", library="/opt/lib/libedgetpu.so.1", num_threads=2)
    with pytest.raises(ConfigError, match="unknown key 'backend.edgetpu.selector'"):
        parse_device_config({"device_id": "d", "model": {"card": "c"}, "backend": {"edgetpu": {"selector": "usb"}}})


# ----------------------------------------------------------------------------- the model file

def test_the_shipped_cpu_model_has_no_edgetpu_operator():
    ops = inspect_model(SHIPPED.read_bytes())
    assert not ops.compiled_for_edgetpu and ops.edgetpu_ops == 0
    assert ops.operators == ops.cpu_ops == 10 and ops.cpu_share == 1.0 and ops.subgraphs == 1
    assert dict(ops.cpu_op_counts) == {"CONV_2D": 4, "DEPTHWISE_CONV_2D": 2, "MAX_POOL_2D": 2,
                                       "FULLY_CONNECTED": 1, "MEAN": 1}
    assert ops.mostly_cpu and "CONV_2D" in ops.heavy_cpu_ops
    assert ops.summary().startswith("not compiled for the Edge TPU (no edgetpu-custom-op): all 10 operators")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.cpu_ops = 0


def test_the_reader_agrees_with_the_tflite_schema_on_the_shipped_model():
    s = schema()
    model = s.Model.GetRootAsModel(SHIPPED.read_bytes(), 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    sg = model.Subgraphs(0)
    names = [BUILTIN_NAMES[max(codes[sg.Operators(i).OpcodeIndex()].BuiltinCode(),
                               codes[sg.Operators(i).OpcodeIndex()].DeprecatedBuiltinCode())]
             for i in range(sg.OperatorsLength())]
    ops = inspect_model(SHIPPED.read_bytes())
    assert sorted(dict(ops.cpu_op_counts).items()) == sorted({n: names.count(n) for n in set(names)}.items())


def test_builtin_names_are_the_schemas():
    s = schema()
    for code, name in enumerate(BUILTIN_NAMES):
        assert getattr(s.BuiltinOperator, name) == code, name


def test_a_fully_compiled_model():
    ops = inspect_model(synthetic_model(["edgetpu-custom-op"]))
    assert ops.compiled_for_edgetpu and (ops.edgetpu_ops, ops.cpu_ops, ops.operators) == (1, 0, 1)
    assert not ops.mostly_cpu and ops.cpu_share == 0.0
    assert ops.summary() == ("compiled for the Edge TPU: 1 Edge TPU segment(s) (edgetpu-custom-op), 0 of 1 "
                             "operator nodes (0%) on the CPU (none)")


@pytest.mark.parametrize("ops_in_file, share, mostly", [
    (["edgetpu-custom-op", "SOFTMAX"], 0.5, False),                    # a small op beside the segment
    (["QUANTIZE", "edgetpu-custom-op", "DEQUANTIZE"], 2 / 3, True),    # more nodes on the CPU
    (["edgetpu-custom-op", "CONV_2D"], 0.5, True),                     # a convolution left on the CPU
    (["edgetpu-custom-op", "edgetpu-custom-op", "FULLY_CONNECTED", "RESHAPE"], 0.5, True),
])
def test_partly_compiled_models(ops_in_file, share, mostly):
    ops = inspect_model(synthetic_model(ops_in_file))
    assert ops.compiled_for_edgetpu and ops.cpu_share == pytest.approx(share) and ops.mostly_cpu is mostly


def test_codes_past_127_and_other_custom_ops_and_subgraphs():
    ops = inspect_model(synthetic_model(["edgetpu-custom-op", "GELU", "TFLite_Detection_PostProcess"],
                                        subgraphs=2))
    assert dict(ops.cpu_op_counts) == {"GELU": 2, "TFLite_Detection_PostProcess": 2}
    assert (ops.edgetpu_ops, ops.subgraphs, ops.operators) == (2, 2, 6)


@pytest.mark.parametrize("data, needle", [
    (b"", "is not a TFLite model"),
    (b"\x00" * 3, "is not a TFLite model"),
    (b"not a model at all, just text" * 10, "is not a TFLite model"),
    (b"\x10\x00\x00\x00TFL3" + b"\xff" * 8, "is not a valid TFLite model"),
    (b"\xff\xff\xff\x7fTFL3", "is not a valid TFLite model"),
])
def test_garbage_is_a_backend_error(data, needle):
    with pytest.raises(BackendError, match=needle) as exc:
        inspect_model(data, "x.tflite")
    assert exc.value.exit_code == 2 and not exc.value.transient and "x.tflite" in str(exc.value)


def test_damaged_models_raise_only_backend_error():
    """Truncations and flipped bytes of a real model: a report or a BackendError, never another exception."""
    good = SHIPPED.read_bytes()
    rng = random.Random(13)
    refused = 0
    cases = [good[:n] for n in (8, 12, 40, 200, len(good) // 2)]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(8, 600)] = rng.randrange(256)   # the header, vtables and offsets live up front
        cases.append(bytes(data))
    for data in cases:
        try:
            inspect_model(data)
        except BackendError as exc:
            assert exc.exit_code == 2
            refused += 1
    assert refused >= 5   # every truncation at least


def test_the_report_command(tmp_path, capsys):
    compiled = tmp_path / "model_edgetpu.tflite"
    compiled.write_bytes(synthetic_model(["edgetpu-custom-op"]))
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"nope")
    assert tflitemodel_main([str(compiled)]) == 0
    assert tflitemodel_main([str(SHIPPED)]) == 1
    assert tflitemodel_main([str(compiled), str(bad)]) == 2
    assert tflitemodel_main(["--json", str(compiled)]) == 0
    out, err = capsys.readouterr()
    assert f"{compiled}: compiled for the Edge TPU: 1 Edge TPU segment(s)" in out
    assert f"{SHIPPED}: not compiled for the Edge TPU" in out
    assert f"{bad} is not a TFLite model" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["compiled_for_edgetpu"] is True and report["edgetpu_ops"] == 1 and report["cpu_share"] == 0.0


# ----------------------------------------------------------------------------- compiled or not

def test_a_model_without_edgetpu_operators_is_refused_with_what_to_do():
    card = load_card(EDGE_CARD)
    ops = inspect_model(SHIPPED.read_bytes())
    with pytest.raises(BackendError) as exc:
        check_compiled(card, ops, Options())
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and not exc.value.transient
    assert msg.startswith(f"{card.file}: backend edgetpu needs a model compiled by edgetpu_compiler, and this "
                          "one is not compiled for the Edge TPU (no edgetpu-custom-op)")
    assert "`edgetpu_compiler model.tflite` writes model_edgetpu.tflite" in msg and 'backend = "tflite-cpu"' in msg


def test_allow_cpu_only_loads_it_with_a_warning(caplog):
    card = load_card(EDGE_CARD)
    with caplog.at_level(logging.INFO, "edge_infer.backends.edgetpu"):
        check_compiled(card, inspect_model(SHIPPED.read_bytes()), Options(allow_cpu_only=True))
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and "the Edge TPU does nothing for this model" in rec.getMessage()


def test_mostly_on_the_cpu_warns_loudly_naming_the_share(caplog):
    card = load_card(EDGE_CARD)
    ops = inspect_model(synthetic_model(["edgetpu-custom-op", "CONV_2D", "RESHAPE", "SOFTMAX"]))
    with caplog.at_level(logging.INFO, "edge_infer.backends.edgetpu"):
        check_compiled(card, ops, Options())
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING
    assert "most of this model runs on the CPU, not the Edge TPU: 3 of 4 operator nodes (75%)" in msg
    assert "heavy operators on the CPU: CONV_2D" in msg and "_edgetpu.log" in msg


def test_a_well_compiled_model_is_reported_at_info(caplog):
    card = load_card(EDGE_CARD)
    with caplog.at_level(logging.INFO, "edge_infer.backends.edgetpu"):
        check_compiled(card, inspect_model(synthetic_model(["edgetpu-custom-op", "SOFTMAX"])), Options())
    assert [r.levelno for r in caplog.records] == [logging.INFO]


# ----------------------------------------------------------------------------- library and device messages

def test_a_missing_library_says_what_to_install(tmp_path):
    lib = tmp_path / "libedgetpu.so.1"
    with pytest.raises(BackendError) as exc:
        check_library(str(lib))
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and not exc.value.transient
    assert msg.startswith(f"the Edge TPU library {lib} cannot be loaded ({lib}: cannot open shared object file")
    assert "apt-get install libedgetpu1-std" in msg and "libedgetpu1-max" in msg and "Dev Board" in msg


def test_a_library_that_is_not_a_delegate_is_named():
    import ctypes.util
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand for a library that is not a delegate")
    with pytest.raises(BackendError, match=f"{libm} is not a TFLite delegate library \\(it lacks "
                                           "tflite_plugin_create_delegate, tflite_plugin_destroy_delegate\\)"):
        check_library(libm)


@pytest.mark.parametrize("device, usb, pci", [("usb", True, False), ("usb:1", True, False), ("pci:0", False, True),
                                              ("", True, True), (":1", True, True)])
def test_device_not_found_hints_follow_the_selector(device, usb, pci):
    msg = device_not_found_message(Options(device=device), "Failed to load delegate from libedgetpu.so.1", ())
    assert ("lsusb" in msg and "1a6e:089a" in msg and "18d1:9302" in msg and "plugdev" in msg
            and "USB 3" in msg) is usb
    assert ("/dev/apex_0" in msg and "gasket" in msg and "only one process may hold it" in msg) is pci
    assert "Failed to load delegate from libedgetpu.so.1" in msg and "Seen now: no Edge TPU" in msg


def test_device_not_found_lists_what_the_kernel_sees():
    seen = (EdgeTpuDevice("usb", "2-1", "/dev/bus/usb/002/003", usb_id="1a6e:089a", state="no firmware yet",
                          speed_mbps=480, accessible=False),)
    msg = device_not_found_message(Options(device="usb"), "x", seen, pycoral=[])
    assert ("Seen now: USB 2-1 1a6e:089a: no firmware yet, 480 Mbit/s (a USB 2 port: use a USB 3 port or a "
            "powered USB 3 hub), but this process may not open /dev/bus/usb/002/003 read-write") in msg
    assert "pycoral lists []" in msg


def test_pypi_pycoral_is_never_imported(tmp_path, monkeypatch):
    """Only a pycoral from Coral's Debian packages is used; the PyPI project of that name is never run."""
    fake = tmp_path / "pycoral"
    fake.mkdir()
    marker = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pycoral", raising=False)
    assert edgetpu.coral_pycoral_devices() is None
    assert not marker.exists()


def test_the_module_imports_no_runtime_and_no_library():
    import subprocess
    code = ("import sys\nimport edge_infer.backends.edgetpu as e\n"
            "print(e.Options(device='pci:0').delegate_options())\n"
            "bad = [m for m in ('ai_edge_litert', 'tflite_runtime', 'pycoral') if m in sys.modules]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------- sysfs: devices and temperature

def _usb(root, port: str, vendor: str, product: str, speed: str = "5000", bus: int = 2, dev: int = 3):
    d = root / "sys" / "bus" / "usb" / "devices" / port
    d.mkdir(parents=True)
    for name, value in (("idVendor", vendor), ("idProduct", product), ("speed", speed), ("busnum", str(bus)),
                        ("devnum", str(dev))):
        (d / name).write_text(value + "\n")
    return d


def test_find_edgetpus_reads_both_usb_ids_and_apex_nodes(tmp_path):
    _usb(tmp_path, "2-1", "18d1", "9302", bus=2, dev=3)
    _usb(tmp_path, "1-1.4", "1a6e", "089a", speed="480", bus=1, dev=7)
    _usb(tmp_path, "1-1.2", "046d", "c52b")                       # a keyboard receiver: not an Edge TPU
    apex0 = tmp_path / "sys" / "class" / "apex" / "apex_0"
    apex0.mkdir(parents=True)
    for name, value in (("status", "ALIVE"), ("is_device_owned", "1"), ("device_owner", "4242")):
        (apex0 / name).write_text(value + "\n")
    (tmp_path / "proc" / "4242").mkdir(parents=True)
    (tmp_path / "proc" / "4242" / "comm").write_text("frigate\n")
    (tmp_path / "sys" / "class" / "apex" / "apex_1").mkdir(parents=True)
    node = tmp_path / "dev" / "bus" / "usb" / "002" / "003"
    node.parent.mkdir(parents=True)
    node.write_text("")
    (tmp_path / "dev" / "apex_0").write_text("")
    found = find_edgetpus(tmp_path / "sys", tmp_path / "dev", tmp_path / "proc")
    assert [(d.kind, d.name, d.usb_id) for d in found] == [("usb", "1-1.4", "1a6e:089a"), ("usb", "2-1", "18d1:9302"),
                                                           ("pci", "apex_0", ""), ("pci", "apex_1", "")]
    boot, ready, apex0, apex1 = found
    assert boot.speed_mbps == 480 and "USB 2 port" in boot.describe() and boot.accessible is None
    assert "no firmware yet" in boot.state
    assert ready.node == str(node) and ready.accessible is True and ready.state == "firmware loaded"
    assert apex0.node == str(tmp_path / "dev" / "apex_0") and apex0.accessible is True
    assert apex0.describe() == "PCIe apex_0 (driver status ALIVE), held by PID 4242 (frigate)"
    assert apex1.accessible is None and apex1.owner == "" and "does not exist" in apex1.describe()
    assert find_edgetpus(tmp_path / "nothing", tmp_path / "dev") == ()


def _apex(root, name="apex_0", **attrs):
    d = root / "class" / "apex" / name
    d.mkdir(parents=True)
    for key, value in attrs.items():
        (d / key).write_text(f"{value}\n")


def test_apex_temperature_and_trip_points(tmp_path):
    _apex(tmp_path, temp=45250, trip_point0_temp=85000, trip_point1_temp=90000, trip_point2_temp=95000,
          temp_poll_interval=1000, hw_temp_warn1=100000, hw_temp_warn1_en=1, hw_temp_warn2=110000, hw_temp_warn2_en=0)
    (t,) = read_apex_thermal(tmp_path)
    assert (t.name, t.temp_c, t.trip_points_c, t.poll_interval_ms) == ("apex_0", 45.25, (85.0, 90.0, 95.0), 1000)
    assert t.hw_warn_c == ((100.0, True), (110.0, False))
    assert not t.throttling and t.clock_divider == 1 and t.trip_points_passed == 0
    assert t.as_status() == {"name": "apex_0", "temp_c": 45.25, "throttling": False, "clock_divider": 1,
                             "trip_points_c": [85.0, 90.0, 95.0], "dfs": True}


@pytest.mark.parametrize("temp, poll, throttling, divider", [
    (85000, 1000, True, 2), (91000, 1000, True, 4), (99000, 1000, True, 8),
    (91000, 0, False, 1),          # the driver's polling is off: it does not throttle
    (91000, None, True, 4),        # an older driver without the attribute: assume it does
])
def test_apex_throttling(tmp_path, temp, poll, throttling, divider):
    attrs = dict(temp=temp, trip_point0_temp=85000, trip_point1_temp=90000, trip_point2_temp=95000)
    if poll is not None:
        attrs["temp_poll_interval"] = poll
    _apex(tmp_path, **attrs)
    (t,) = read_apex_thermal(tmp_path)
    assert (t.throttling, t.clock_divider) == (throttling, divider)
    assert t.as_status()["dfs"] == (None if poll is None else poll > 0)


def test_apex_attributes_missing_or_unreadable(tmp_path):
    _apex(tmp_path, "apex_0", temp="garbage")
    _apex(tmp_path, "apex_1")
    a, b = read_apex_thermal(tmp_path)
    assert (a.name, a.temp_c, a.trip_points_c, a.hw_warn_c) == ("apex_0", None, (), ())
    assert not a.throttling and b.temp_c is None and b.poll_interval_ms is None
    assert read_apex_thermal(tmp_path / "no-such-sysfs") == ()


def test_edgetpu_health_follows_the_selector(tmp_path):
    from edge_infer.backends.edgetpu import edgetpu_health
    _apex(tmp_path, "apex_0", temp=50000)
    _apex(tmp_path, "apex_1", temp=93000, trip_point0_temp=85000, temp_poll_interval=1000)
    assert [t.name for t in edgetpu_health(Options(device="pci:1"), str(tmp_path))] == ["apex_1"]
    assert [t.name for t in edgetpu_health(Options(), str(tmp_path))] == ["apex_0", "apex_1"]
    assert edgetpu_health(Options(device="usb:0"), str(tmp_path)) == ()
    (hot,) = edgetpu_health(Options(device="pci:1"), str(tmp_path))
    assert hot.as_status()["throttling"] is True and hot.temp_c == 93.0


def test_the_status_telemetry_hook_reads_the_selected_card_and_other_backends_have_none(tmp_path):
    from edge_infer.backends import backend_telemetry
    from edge_infer.backends.edgetpu import Options, telemetry
    _apex(tmp_path, "apex_0", temp=91000, trip_point0_temp=85000, trip_point1_temp=90000, temp_poll_interval=1000)
    _apex(tmp_path, "apex_1", temp=40000)
    assert [t["name"] for t in telemetry(Options(device="pci:1"), str(tmp_path))] == ["apex_1"]
    (hot,) = telemetry(Options(device="pci:0"), str(tmp_path))
    assert hot["temp_c"] == 91.0 and hot["throttling"] and hot["clock_divider"] == 4
    assert telemetry(Options(device="usb"), str(tmp_path)) == []        # a USB Accelerator reports none
    assert backend_telemetry("tflite-cpu") == []
