"""[metrics] on both sides: off and on localhost by default, the address validated, prometheus_client optional."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edge_infer.config import DeviceConfig, parse_listen
from edge_infer.tomlcfg import ConfigError, build
from edge_infer_cloud.config import WorkerConfig

from ..conftest import CLOUD_CARD, EDGE_CARD, REPO

DEVICE = {"device_id": "d1", "model": {"card": str(EDGE_CARD)}}
WORKER = {"model": {"card": str(CLOUD_CARD)}}


def test_metrics_are_off_and_on_localhost_by_default():
    d = build(DeviceConfig, DEVICE).metrics
    w = build(WorkerConfig, WORKER).metrics
    assert (d.enabled, d.listen) == (False, "127.0.0.1:9464")
    assert (w.enabled, w.listen) == (False, "127.0.0.1:9465")


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:0", ("localhost", 0)),
    ("edge-17.site.example:9100", ("edge-17.site.example", 9100)),
])
def test_good_listen_addresses(value, expected):
    assert parse_listen(value) == expected
    assert build(DeviceConfig, {**DEVICE, "metrics": {"listen": value}}).metrics.listen == value


@pytest.mark.parametrize("value, says", [
    ("9464", "HOST:PORT"),
    (":9464", "no host"),
    ("127.0.0.1", "HOST:PORT"),
    ("127.0.0.1:99999", "0-65535"),
    ("127.0.0.1:-1", "HOST:PORT"),
    ("::1:9464", "in brackets"),
    ("[nope]:9464", "not an IPv6 address"),
    ("999.1.1.1:9464", "not an IPv4 address"),
    ("bad host:9464", "neither an IP address nor a host name"),
])
@pytest.mark.parametrize("config, table", [(DeviceConfig, DEVICE), (WorkerConfig, WORKER)], ids=["device", "worker"])
def test_a_bad_listen_address_is_a_config_error_naming_the_key(config, table, value, says):
    with pytest.raises(ConfigError, match=r"metrics\.listen") as err:
        build(config, {**table, "metrics": {"listen": value}})
    assert says in str(err.value)


def test_unknown_metrics_keys_are_refused():
    with pytest.raises(ConfigError, match="metrics.port"):
        build(DeviceConfig, {**DEVICE, "metrics": {"port": 9464}})


def test_the_packages_import_and_parse_metrics_config_without_prometheus_client():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import edge_infer.cli, edge_infer.service, edge_infer.metrics, edge_infer_cloud.worker, "
            "edge_infer_cloud.metrics, edge_infer_cloud.cli\n"
            "from edge_infer.metrics import require_prometheus\n"
            "try:\n    require_prometheus()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ConfigError metrics.enabled = true needs prometheus_client"), p.stdout
    assert "pip install 'edge-infer[metrics]'" in p.stdout
