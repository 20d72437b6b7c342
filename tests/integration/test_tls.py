"""Mutual TLS to a real Mosquitto: the device and the worker authenticate with certificates."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from edge_infer.config import TlsConfig
from edge_infer.tools.localbroker import LocalBroker, free_port
from edge_infer.service import EdgeService
from edge_infer_cloud.worker import CloudWorker

from ..conftest import unique, wait_for
from ..pki import ThrowawayPKI
from .helpers import device_config, worker_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    pki = ThrowawayPKI(root / "pki")
    port = free_port()
    extra = (f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
             "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
    b = LocalBroker(root / "broker", port=port, listener=f"listener {port} 127.0.0.1", extra_config=extra).start()
    yield b, pki
    b.stop()


def with_tls(cfg, tls: TlsConfig):
    return replace(cfg, mqtt=replace(cfg.mqtt, tls=tls, port=cfg.mqtt.port))


def test_the_loop_over_mutual_tls(tmp_path, tls_broker, fmnist):
    broker, pki = tls_broker
    dev = unique("tlsdev")
    dcert, dkey = pki.issue(dev)
    wcert, wkey = pki.issue(unique("tlsworker"))
    wcfg = worker_config(broker.port, group=unique("g"))
    w = CloudWorker(replace(wcfg, mqtt=replace(wcfg.mqtt, tls=TlsConfig(ca_file=pki.ca, cert_file=wcert, key_file=wkey))))
    w.start()
    svc = EdgeService(with_tls(device_config(tmp_path, broker.port, threshold=1.0, device_id=dev),
                               TlsConfig(ca_file=pki.ca, cert_file=dcert, key_file=dkey)))
    svc.start()
    try:
        wait_for(lambda: w.link.connected.is_set() and svc.link.connected.is_set(), what="TLS connections")
        rs = [svc.classify(im) for im in fmnist["test"].images[:20]]
        wait_for(lambda: all(svc.result(r.sample_id).origin == "cloud" for r in rs if r.offloaded), timeout=30,
                 what="corrections over TLS")
    finally:
        svc.stop()
        w.stop()


def test_a_client_without_a_certificate_is_refused_and_the_device_keeps_answering(tmp_path, tls_broker, fmnist):
    broker, pki = tls_broker
    svc = EdgeService(with_tls(device_config(tmp_path, broker.port), TlsConfig(ca_file=pki.ca)))
    svc.start()
    try:
        time.sleep(1.5)
        assert not svc.link.connected.is_set()
        r = svc.classify(fmnist["test"].images[0])       # the local answer does not need the broker
        assert r.origin == "edge" and r.label_name
    finally:
        svc.stop()
