"""Prometheus metrics scraped over HTTP from a real device service and a real worker (real Mosquitto,
real models, Fashion-MNIST images), checked against what happened; and what [metrics] opens and refuses."""
from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_infer.config import MetricsConfig
from edge_infer.preprocess import encode_png
from edge_infer.protocol import Topics
from edge_infer.service import EdgeService
from edge_infer.tomlcfg import ConfigError
from edge_infer.tools.localbroker import free_port
from edge_infer_cloud.config import WorkerMetricsConfig
from edge_infer_cloud.worker import CloudWorker

from ..conftest import REPO, drained, paho_properties, unique, wait_for
from .helpers import device_config, worker_config

ON = MetricsConfig(enabled=True, listen="127.0.0.1:0")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict, name: str, **labels: str) -> float:
    return page[name, frozenset(labels.items())]


def listening_ports() -> set[int]:
    """TCP ports this process listens on (its own sockets, matched by inode in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:   # state LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.integration
def test_scraped_device_and_worker_metrics_match_what_happened(tmp_path, broker, fmnist, recorder_factory):
    group = unique("g")
    worker = CloudWorker(replace(worker_config(broker.port, group=group),
                                 metrics=WorkerMetricsConfig(enabled=True, listen="127.0.0.1:0")))
    worker.start()
    cfg = device_config(tmp_path, broker.port)
    svc = EdgeService(replace(cfg, metrics=ON, policy=replace(cfg.policy, audit_rate=0.2)))
    svc.start()
    try:
        wait_for(lambda: worker.link.connected.is_set() and svc.link.connected.is_set(), what="both connected")
        n = 200
        results = [svc.classify(im, source=f"m{i}") for i, im in enumerate(fmnist["test"].images[:n])]
        offloaded = [r for r in results if r.offloaded]
        by_reason = {why: sum(r.offload_reason == why for r in offloaded) for why in ("below_threshold", "audit")}
        assert by_reason["below_threshold"] > 0 and by_reason["audit"] > 0, by_reason
        svc.flush()   # committed first: before that the outbox looks drained
        wait_for(lambda: drained(svc.store), timeout=60, what="all corrections applied")
        final = [svc.result(r.sample_id) for r in offloaded]
        agreed = sum(f.label == f.edge_label for f in final)
        assert all(f.origin == "cloud" for f in final)

        # a bad sample straight to the worker (another device's topic): rejected with an error reply
        t = Topics("edge-infer", unique("dev"))
        rec = recorder_factory(t.corrections)
        rec.publish(t.samples, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
                    paho_properties("image/png", t.corrections, b"bad-1", [("v", "1")]))
        wait_for(lambda: rec.on(t.corrections), what="the error reply")
        rec.publish(t.samples, encode_png(fmnist["test"].images[0]),
                    paho_properties("image/png", t.corrections, b"good-1", [("v", "1")]))
        wait_for(lambda: len(rec.on(t.corrections)) == 2, what="the correction")

        d = scrape(svc.metrics.server.url)
        assert value(d, "edge_infer_inputs_total") == n
        assert value(d, "edge_infer_offloads_total", reason="below_threshold") == by_reason["below_threshold"]
        assert value(d, "edge_infer_offloads_total", reason="audit") == by_reason["audit"]
        assert value(d, "edge_infer_corrections_total", outcome="agreed") == agreed
        assert value(d, "edge_infer_corrections_total", outcome="changed_label") == len(offloaded) - agreed
        audited = [f for f, r in zip(final, offloaded) if r.offload_reason == "audit"]
        assert value(d, "edge_infer_audit_corrections_total", outcome="agreed") == sum(
            f.label == f.edge_label for f in audited)
        assert value(d, "edge_infer_inference_seconds_count") == n
        assert 0 < value(d, "edge_infer_inference_seconds_sum") < n * 1.0
        assert value(d, "edge_infer_inference_seconds_bucket", le="+Inf") == n
        assert value(d, "edge_infer_outbox_samples", state="corrected") == len(offloaded)
        for state in ("queued", "inflight", "delivered"):
            assert value(d, "edge_infer_outbox_samples", state=state) == 0
            assert value(d, "edge_infer_outbox_oldest_age_seconds", state=state) == 0
        assert value(d, "edge_infer_outbox_bytes") == 0     # payloads dropped with their corrections
        assert value(d, "edge_infer_broker_connected") == 1
        assert value(d, "edge_infer_inference_state", state="healthy") == 1
        assert value(d, "edge_infer_inference_state", state="lost") == 0
        assert value(d, "edge_infer_samples_expired_total") == value(d, "edge_infer_samples_evicted_total") == 0
        assert value(d, "edge_infer_cloud_error_replies_total") == 0

        w = scrape(worker.metrics.server.url)
        batches = worker.counters.get("batches")
        assert value(w, "edge_infer_worker_received_total") == len(offloaded) + 2
        assert value(w, "edge_infer_worker_corrected_total") == len(offloaded) + 1
        assert value(w, "edge_infer_worker_batches_total") == batches > 0
        assert value(w, "edge_infer_worker_batch_size_count") == batches
        assert value(w, "edge_infer_worker_batch_size_sum") == len(offloaded) + 1   # every corrected sample once
        assert value(w, "edge_infer_worker_batch_size_bucket", le="1.0") == worker.counters.get("batch_size_1")
        assert value(w, "edge_infer_worker_model_seconds_count") == batches
        assert value(w, "edge_infer_worker_rejected_total", code="bad_image") == 1
        assert value(w, "edge_infer_worker_rejected_total", code="too_large") == 0
        assert value(w, "edge_infer_worker_error_replies_total") == 1
        assert value(w, "edge_infer_worker_queue_depth") == 0
        assert value(w, "edge_infer_worker_broker_connected") == 1

        # the shipped dashboard queries only what the two programs export
        dashboard = json.loads((REPO / "deploy" / "grafana" / "edge-infer.json").read_text())
        queried = set(re.findall(r"\bedge_infer_\w+", json.dumps(dashboard)))
        exported = {name for name, _ in d} | {name for name, _ in w}
        assert len(queried) > 20 and queried <= exported, queried - exported
    finally:
        svc.stop()
        worker.stop()


def test_waiting_samples_show_in_outbox_depth_and_oldest_age_while_offline(tmp_path, fmnist):
    svc = EdgeService(replace(device_config(tmp_path, free_port(), threshold=1.0), metrics=ON))
    svc.start(connect=False)   # no network: every offloaded sample waits in the outbox
    try:
        results = [svc.classify(im) for im in fmnist["test"].images[:20]]
        svc.flush()
        oldest = next(r for r in results if r.offloaded).created_at
        time.sleep(0.3)
        before = time.time()
        page = scrape(svc.metrics.server.url)
        after = time.time()
        queued = sum(r.offloaded for r in results)
        assert value(page, "edge_infer_outbox_samples", state="queued") == queued
        age = value(page, "edge_infer_outbox_oldest_age_seconds", state="queued")
        assert 0.3 <= before - oldest <= age <= after - oldest
        assert value(page, "edge_infer_outbox_oldest_age_seconds", state="delivered") == 0
        assert value(page, "edge_infer_outbox_bytes") > 0
        assert value(page, "edge_infer_broker_connected") == 0
    finally:
        svc.stop()


def test_metrics_off_opens_no_port_and_on_opens_exactly_the_configured_one(tmp_path):
    before = listening_ports()
    off = EdgeService(device_config(tmp_path / "off", free_port()))
    off.start(connect=False)
    try:
        assert listening_ports() == before and off.metrics is None
        assert not [t for t in threading.enumerate() if t.name == "metrics-http"]
    finally:
        off.stop()
    port = free_port()
    on = EdgeService(replace(device_config(tmp_path / "on", free_port()),
                             metrics=MetricsConfig(enabled=True, listen=f"127.0.0.1:{port}")))
    on.start(connect=False)
    try:
        assert listening_ports() == before | {port}
        assert on.metrics.server.address == ("127.0.0.1", port)
    finally:
        on.stop()
    assert listening_ports() == before   # released at stop


def test_a_port_in_use_stops_the_start_with_a_config_error_and_leaves_nothing_running(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        svc = EdgeService(replace(device_config(tmp_path, free_port()), metrics=MetricsConfig(enabled=True,
                                                                                              listen=listen)))
        with pytest.raises(ConfigError, match=r"metrics\.listen = '127\.0\.0\.1:\d+': cannot listen there"):
            svc.start(connect=False)
        assert not [t for t in threading.enumerate() if t.name in ("store-writer", "metrics-http")]
        with pytest.raises(RuntimeError, match="store is not open"):
            svc.store.counts()
    finally:
        taken.close()


def test_enabled_without_prometheus_client_fails_the_start_saying_what_to_install(tmp_path, broker, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)   # as if not installed
    svc = EdgeService(replace(device_config(tmp_path, free_port()), metrics=ON))
    with pytest.raises(ConfigError, match=r"needs prometheus_client.*pip install 'edge-infer\[metrics\]'"):
        svc.start(connect=False)
    assert svc.backend is None   # refused before the model was loaded
    worker = CloudWorker(replace(worker_config(broker.port), metrics=WorkerMetricsConfig(enabled=True)))
    with pytest.raises(ConfigError, match=r"metrics\.enabled = true needs prometheus_client"):
        worker.start()
    assert worker.model is None and worker.link is None
