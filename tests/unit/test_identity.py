"""The configured identity must be the client certificate's CN (edge_infer.identity), checked at start."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from edge_infer.config import TlsConfig
from edge_infer.identity import IdentityError, certificate_cns, check_certificate_identity, check_tls_identity

from ..conftest import CLOUD_CARD, device_toml


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from edge_infer.tools.pki import FleetPki
    p = FleetPki(tmp_path_factory.mktemp("identity") / "pki")
    p.init()
    p.add_device("cam-1")
    p.add_worker("w1")
    return p


def dev(pki, name="cam-1"):
    d = pki.root / "devices" / name
    return TlsConfig(ca_file=pki.root / "ca.pem", cert_file=d / "cert.pem", key_file=d / "key.pem")


def wrk(pki, name="w1"):
    d = pki.root / "workers" / name
    return TlsConfig(ca_file=pki.root / "ca.pem", cert_file=d / "cert.pem", key_file=d / "key.pem")


def test_the_certificate_of_the_configured_identity_passes(pki):
    assert check_certificate_identity(dev(pki).cert_file, "cam-1") == "cam-1"
    assert check_tls_identity(wrk(pki), "worker:w1") == "worker:w1"


def test_another_identity_is_refused_with_exit_2_naming_both(pki):
    with pytest.raises(IdentityError) as e:
        check_certificate_identity(dev(pki).cert_file, "cam-2")
    assert e.value.exit_code == 2
    assert "'cam-1'" in str(e.value) and "'cam-2'" in str(e.value) and "device_id" in str(e.value)
    with pytest.raises(IdentityError):
        check_tls_identity(wrk(pki), "w1")                       # a worker's CN is worker:<id>


def test_nothing_to_check_without_a_client_certificate(pki):
    assert check_tls_identity(None, "cam-1") is None
    assert check_tls_identity(TlsConfig(ca_file=pki.root / "ca.pem"), "cam-1") is None


def test_the_standard_library_reads_the_same_cn_when_cryptography_is_missing(pki, monkeypatch):
    with_cryptography = certificate_cns(dev(pki).cert_file)
    monkeypatch.setitem(sys.modules, "cryptography", None)      # import cryptography -> ImportError
    assert certificate_cns(dev(pki).cert_file) == with_cryptography == ["cam-1"]


def test_a_missing_or_damaged_certificate_is_an_identity_error(tmp_path):
    with pytest.raises(IdentityError, match="cannot read"):
        certificate_cns(tmp_path / "missing.pem")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="not a PEM certificate"):
        certificate_cns(tmp_path / "key.pem")
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match="cannot decode"):
        certificate_cns(tmp_path / "bad.pem")


def test_the_service_refuses_to_start_before_loading_the_model(pki, tmp_path):
    from edge_infer.service import EdgeService

    from ..integration.helpers import device_config
    cfg = device_config(tmp_path, 1, device_id="cam-2")
    svc = EdgeService(replace(cfg, mqtt=replace(cfg.mqtt, tls=dev(pki))))
    svc.classifier.start = lambda: pytest.fail("the model was loaded")
    with pytest.raises(IdentityError, match="'cam-1'"):
        svc.start()
    svc.stop()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_edge_infer_run_exits_2_with_another_devices_certificate(pki, tmp_path):
    t = dev(pki)
    toml = device_toml(tmp_path, 1, device_id="cam-2",
                       **{"mqtt.tls": f'ca_file = "{t.ca_file}"\ncert_file = "{t.cert_file}"\n'
                                      f'key_file = "{t.key_file}"'})
    p = _run("-m", "edge_infer", "run", "--config", str(toml))
    assert p.returncode == 2, p.stderr
    assert "cannot start" in p.stderr and "'cam-1'" in p.stderr and "'cam-2'" in p.stderr


def test_the_worker_exits_2_unless_its_id_is_its_certificates(pki, tmp_path):
    t = wrk(pki)
    toml = tmp_path / "cloud-worker.toml"
    toml.write_text(f'[model]\ncard = "{CLOUD_CARD}"\n[worker]\nid = "w1"\n[mqtt]\nport = 1\n[mqtt.tls]\n'
                    f'ca_file = "{t.ca_file}"\ncert_file = "{t.cert_file}"\nkey_file = "{t.key_file}"\n')
    p = _run("-m", "edge_infer_cloud", "run", "--config", str(toml), "--worker-id", "w2")
    assert p.returncode == 2, p.stderr
    assert "'worker:w1'" in p.stderr and "'worker:w2'" in p.stderr and "--worker-id" in p.stderr


def test_check_config_refuses_a_certificate_of_another_device(tmp_path):
    """What the start refuses, check-config (run by Ansible before a restart) refuses too."""
    from edge_infer.cli import main
    from edge_infer.tools.pki import FleetPki

    from ..conftest import EDGE_CARD
    pki = FleetPki(tmp_path / "pki")
    pki.init()
    other = pki.add_device("cam-2")
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'device_id = "cam-1"\n[model]\ncard = "{EDGE_CARD}"\n[mqtt.tls]\nca_file = "{tmp_path}/pki/ca.pem"\n'
                   f'cert_file = "{other.cert}"\nkey_file = "{other.key}"\n')
    assert main(["check-config", str(cfg)]) == 2
