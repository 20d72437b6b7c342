from pathlib import Path

import pytest

from edge_infer.config import load_device_config, parse_device_config
from edge_infer.tomlcfg import ConfigError

BASE = {"device_id": "dev-1", "model": {"card": "/m/card.json"}}


def test_minimal_config_gets_defaults():
    cfg = parse_device_config(BASE)
    assert cfg.device_id == "dev-1"
    assert cfg.mqtt.port == 1883 and cfg.policy.threshold == 0.9 and cfg.spool.dir is None
    assert cfg.client_id == "edge-infer-dev-1"


@pytest.mark.parametrize("table, key", [
    ({**BASE, "mqtt": {"prot": 1}}, "mqtt.prot"),
    ({**BASE, "colour": 1}, "colour"),
])
def test_unknown_keys_are_named(table, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        parse_device_config(table)


@pytest.mark.parametrize("table, needle", [
    ({**BASE, "mqtt": {"port": "1883"}}, "mqtt.port: expected an integer"),
    ({**BASE, "mqtt": {"port": 70000}}, "mqtt.port = 70000: must be between"),
    ({**BASE, "policy": {"threshold": 1.5}}, "policy.threshold = 1.5"),
    ({**BASE, "policy": {"offload": "yes"}}, "policy.offload: expected true or false"),
    ({**BASE, "device_id": "a/b"}, "device_id = 'a/b'"),
    ({**BASE, "model": {"card": "x", "runtime": "tensorflow"}}, "model.runtime = 'tensorflow': must be one of"),
    ({"device_id": "d"}, "model: required but missing"),
    ({**BASE, "mqtt": {"topic_prefix": "a/+/b"}}, "mqtt.topic_prefix"),
])
def test_bad_values_are_named(table, needle):
    with pytest.raises(ConfigError) as exc:
        parse_device_config(table)
    assert needle in str(exc.value)


def test_int_is_accepted_for_float_and_relative_paths_resolve(tmp_path: Path):
    f = tmp_path / "edge-infer.toml"
    f.write_text('device_id = "d1"\nstate_dir = "state"\n[model]\ncard = "models/card.json"\n'
                 '[policy]\nthreshold = 1\n[spool]\ndir = "spool"\n'
                 '[mqtt.tls]\nca_file = "pki/ca.pem"\ncert_file = "/abs/d1.pem"\nkey_file = "pki/d1.key"\n')
    cfg = load_device_config(f)
    assert cfg.mqtt.tls.ca_file == tmp_path / "pki/ca.pem" and cfg.mqtt.tls.key_file == tmp_path / "pki/d1.key"
    assert str(cfg.mqtt.tls.cert_file) == "/abs/d1.pem"
    assert cfg.policy.threshold == 1.0
    assert cfg.model.card == tmp_path / "models/card.json"
    assert cfg.state_dir == tmp_path / "state" and cfg.spool.dir == tmp_path / "spool"


def test_invalid_toml_and_missing_file(tmp_path: Path):
    f = tmp_path / "bad.toml"
    f.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_device_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_device_config(tmp_path / "nope.toml")


def test_tls_needs_cert_and_key_together():
    with pytest.raises(ConfigError, match="cert_file and tls.key_file"):
        parse_device_config({**BASE, "mqtt": {"tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem"}}})


def test_config_is_frozen():
    cfg = parse_device_config(BASE)
    with pytest.raises(AttributeError):
        cfg.device_id = "x"  # type: ignore[misc]


def test_both_programs_resolve_every_relative_path_against_their_config_file(tmp_path):
    """The worker once read its TLS files from the working directory; one resolver serves both configs now."""
    from edge_infer.config import load_device_config
    from edge_infer_cloud.config import load_worker_config
    tls = '[mqtt.tls]\nca_file = "pki/ca.pem"\ncert_file = "pki/me.pem"\nkey_file = "pki/me.key"\n'
    (tmp_path / "worker.toml").write_text('[model]\ncard = "m/card.json"\n' + tls)
    w = load_worker_config(tmp_path / "worker.toml")
    assert w.model.card == tmp_path / "m" / "card.json"
    assert (w.mqtt.tls.ca_file, w.mqtt.tls.cert_file, w.mqtt.tls.key_file) == (
        tmp_path / "pki" / "ca.pem", tmp_path / "pki" / "me.pem", tmp_path / "pki" / "me.key")
    (tmp_path / "device.toml").write_text('device_id = "d1"\nstate_dir = "state"\n[model]\ncard = "m/card.json"\n'
                                          '[spool]\ndir = "in"\n' + tls)
    d = load_device_config(tmp_path / "device.toml")
    assert (d.state_dir, d.model.card, d.spool.dir, d.mqtt.tls.key_file) == (
        tmp_path / "state", tmp_path / "m" / "card.json", tmp_path / "in", tmp_path / "pki" / "me.key")


# ----------------------------------------------------------------------------- backends

def test_backend_tables_are_each_backends_own_options():
    from edge_infer.backends.onnxrt import Options as OnnxOptions
    from edge_infer.backends.tflite_cpu import Options as TFLiteOptions
    cfg = parse_device_config({**BASE, "model": {"card": "c", "backend": "onnxruntime"},
                               "backend": {"onnxruntime": {"intra_op_threads": 2, "providers": ["CPUExecutionProvider"]},
                                           "tflite-cpu": {"num_threads": 4}}})
    assert cfg.backend_options == OnnxOptions(intra_op_threads=2, providers=("CPUExecutionProvider",))
    assert cfg.backend.get("tflite-cpu") == TFLiteOptions(num_threads=4)   # validated though not selected
    assert parse_device_config(BASE).backend_options == TFLiteOptions()    # no table: the defaults


@pytest.mark.parametrize("table, needle", [
    ({**BASE, "model": {"card": "c", "backend": "tflite-gpu"}},
     "model.backend = 'tflite-gpu': unknown backend (did you mean 'tflite-cpu'?); known backends: edgetpu, "
     "onnxruntime, tensorrt, tflite-cpu"),
    ({**BASE, "backend": {"openvino": {"device": "x"}}}, "[backend.openvino]: unknown backend 'openvino'"),
    ({**BASE, "backend": {"tensorrt": {"engine": "x"}}}, "unknown key 'backend.tensorrt.engine'"),
    ({**BASE, "backend": {"edgetpu": {"device": "usb0"}}}, "backend.edgetpu.device = 'usb0': must be"),
    ({**BASE, "backend": {"edgetpu": {"device": "/dev/apex_0"}}}, 'name the device, not its node: "pci:0"'),
    ({**BASE, "backend": {"edgetpu": {"performance": "max"}}}, "needs an indexed device"),
    ({**BASE, "backend": {"tflite-cpu": {"threads": 2}}}, "unknown key 'backend.tflite-cpu.threads'"),
    ({**BASE, "backend": {"tflite-cpu": {"runtime": "tensorflow"}}}, "backend.tflite-cpu.runtime = 'tensorflow'"),
    ({**BASE, "backend": {"onnxruntime": {"providers": []}}}, "must name at least one execution provider"),
    ({**BASE, "backend": {"onnxruntime": {"providers": ["CUDA"]}}}, "'CUDA' is not an execution provider name"),
    ({**BASE, "backend": {"onnxruntime": {"max_batch": 0}}}, "backend.onnxruntime.max_batch = 0"),
    ({**BASE, "backend": {"onnxruntime": 1}}, "expected a table [backend.onnxruntime]"),
    ({**BASE, "backend": 1}, "backend: expected tables"),
    ({**BASE, "model": {"card": "c", "runtime": "auto"}, "backend": {"tflite-cpu": {}}},
     "move model.runtime into [backend.tflite-cpu]"),
    ({**BASE, "model": {"card": "c", "backend": "onnxruntime", "num_threads": 2}},
     "model.num_threads: options of the tflite-cpu backend, but model.backend is 'onnxruntime'"),
])
def test_bad_backend_config_is_named(table, needle):
    with pytest.raises(ConfigError) as exc:
        parse_device_config(table)
    assert needle in str(exc.value)


def test_older_model_runtime_and_num_threads_still_apply_to_tflite_cpu():
    from edge_infer.backends.tflite_cpu import Options
    cfg = parse_device_config({**BASE, "model": {"card": "c", "runtime": "tflite-runtime", "num_threads": 2}})
    assert cfg.backend_options == Options(runtime="tflite-runtime", num_threads=2)


def test_shipped_device_config_uses_the_backend_table():
    from edge_infer.backends.tflite_cpu import Options
    cfg = load_device_config(Path(__file__).resolve().parents[2] / "deploy" / "config" / "edge-infer.toml")
    assert cfg.model.backend == "tflite-cpu" and cfg.model.legacy_options() == {}
    assert cfg.backend_options == Options(runtime="auto", num_threads=1)


# ----------------------------------------------------------------------------- tomlcfg

def test_tomlcfg_lists_hooks_and_path_mappings(tmp_path: Path):
    from dataclasses import dataclass, field

    from edge_infer.tomlcfg import build, describe, option, resolve_paths

    @dataclass(frozen=True, kw_only=True)
    class Leaf:
        names: tuple[str, ...] = option(("a", "b"), help="names")
        where: Path = option(Path("rel"), help="a path")

    @dataclass(frozen=True)
    class Named:
        tables: dict = field(default_factory=dict, hash=False)

        @classmethod
        def from_toml(cls, value, key):
            return cls({k: build(Leaf, v, f"{key}.{k}") for k, v in value.items()})

        @classmethod
        def toml_rows(cls, key):
            return describe(Leaf, f"{key}.<name>")

    @dataclass(frozen=True, kw_only=True)
    class Top:
        named: Named = option(factory=Named, help="[named.<name>] tables")

    top = build(Top, {"named": {"x": {"names": ["c"]}}})
    assert top.named.tables["x"] == Leaf(names=("c",))
    assert describe(Top) == [("named.<name>.names", "a list of strings", '["a", "b"]', "names"),
                             ("named.<name>.where", "a path string", '"rel"', "a path")]
    assert resolve_paths(top, tmp_path).named.tables["x"].where == tmp_path / "rel"
    with pytest.raises(ConfigError, match=r"named.x.names\[0\]: expected a string"):
        build(Top, {"named": {"x": {"names": [1]}}})


def test_an_id_with_a_trailing_newline_is_refused():
    """``$`` in a regex also matches before a final newline: ids are matched whole."""
    from edge_infer.config import topic_safe_id
    assert topic_safe_id("cam-1") is None
    assert topic_safe_id("cam-1\n") is not None
