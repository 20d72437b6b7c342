"""The broker's identity and ACL against the measured attacks, on a real Mosquitto.

The broker runs the SHIPPED deploy/mosquitto/edge-infer-tls.conf (its paths and
port replaced by brokerconf.render_conf, nothing else) and the shipped
edge-infer.acl rendered for one fleet; every certificate comes from the PKI
tool (edge_infer.tools.pki). Device B, a valid member of the fleet, attacks
device A and the workers; the real EdgeService and CloudWorker run the loop.
What each rule stops: docs/security.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_infer import protocol
from edge_infer.config import TlsConfig
from edge_infer.service import EdgeService
from edge_infer.tools.brokerconf import pki_readers, pki_workers, render_acl, render_conf
from edge_infer.tools.localbroker import LocalBroker, free_port
from edge_infer_cloud.worker import CloudWorker

from ..conftest import REPO, paho_properties, unique, wait_for
from .helpers import device_config, worker_config

pytestmark = pytest.mark.integration

SHIPPED = REPO / "deploy" / "mosquitto"
P = "edge-infer"
A, B, C, D = "dev-a", "dev-b", "dev-c", "dev-d"   # devices; B attacks, C shows one id per certificate, D is revoked live
W1, W2 = "w1", "w2"                           # workers with an ACL block; W1 runs, W2 only as a test client
READER = "dash"                                # an integrator (CN reader:dash)
GROUP = "cloud-workers"                        # the worker's default shared subscription group
NOT_AUTHORIZED = 135


def accepted(code: int) -> bool:
    """A PUBACK reason below 128 is a success (0, or 16: accepted, no subscriber matched)."""
    return code < 128


class ShippedBroker(LocalBroker):
    """LocalBroker's process handling, with the shipped config file instead of LocalBroker's."""

    def __init__(self, workdir: Path, text: str, port: int) -> None:
        super().__init__(workdir, port=port)
        self._text = text

    def config_text(self) -> str:
        return self._text


@dataclass
class Fleet:
    pki: object
    other_pki: object
    broker: ShippedBroker
    expired: object
    revoked: object
    reader: tuple[Path, Path]

    @property
    def ca(self) -> Path:
        return self.pki.root / "ca.pem"

    def tls(self, kind: str, name: str) -> TlsConfig:
        d = self.pki.root / ("devices" if kind == "device" else "workers") / name
        return TlsConfig(ca_file=self.ca, cert_file=d / "cert.pem", key_file=d / "key.pem")

    def cert(self, kind: str, name: str) -> tuple[Path, Path]:
        t = self.tls(kind, name)
        return t.cert_file, t.key_file


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    from edge_infer.tools.pki import FleetPki
    root = tmp_path_factory.mktemp("security")
    pki = FleetPki(root / "pki")
    pki.init(broker_hosts=["localhost"], broker_ips=["127.0.0.1"])
    for dev in (A, B, C, D):
        pki.add_device(dev)
    for w in (W1, W2):
        pki.add_worker(w)
    expired = pki.issue("dev-expired", "device", days=1, not_before=datetime.now(timezone.utc) - timedelta(days=3))
    revoked = pki.add_device("dev-revoked")
    pki.revoke("dev-revoked")
    other = FleetPki(root / "other-ca")            # another CA, same names: a certificate it signs is worth nothing
    other.init(broker_hosts=["localhost"], broker_ips=["127.0.0.1"])
    other.add_device(A)
    issued = pki.add_reader(READER)
    reader = (issued.cert, issued.key)

    workdir = root / "broker"
    workdir.mkdir()
    acl = workdir / "edge-infer.acl"
    acl.write_text(render_acl((SHIPPED / "edge-infer.acl").read_text(), prefix=P, workers=pki_workers(pki.root),
                              readers=pki_readers(pki.root)))
    port = free_port()
    extra = [f"persistence_location {workdir}/", f"log_dest file {workdir / 'mosquitto.log'}",
             "log_type error", "log_type warning", "log_type notice", "log_type information"]
    if os.geteuid() == 0:
        extra.append("user root")   # otherwise it drops to 'mosquitto' and cannot write here
    text = render_conf((SHIPPED / "edge-infer-tls.conf").read_text(), {
        "listener": f"{port} 127.0.0.1", "cafile": str(pki.root / "ca.pem"),
        "certfile": str(pki.root / "broker" / "cert.pem"), "keyfile": str(pki.root / "broker" / "key.pem"),
        "crlfile": str(pki.crl), "acl_file": str(acl)}, extra="\n".join(extra))
    broker = ShippedBroker(workdir, text, port).start()
    yield Fleet(pki, other, broker, expired, revoked, reader)
    broker.stop()


class Peer:
    """A plain paho client over TLS: what an attacker (or an integrator) can do with its certificate."""

    def __init__(self, fleet: Fleet, cert: tuple[Path, Path] | None, *, client_id: str | None = None,
                 ca: Path | None = None, will: tuple[str, bytes] | None = None, tls: bool = True) -> None:
        self.port = fleet.broker.port
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or unique("peer"),
                             protocol=mqtt.MQTTv5)
        if tls:
            self.c.tls_set(ca_certs=str(ca or fleet.ca), certfile=str(cert[0]) if cert else None,
                           keyfile=str(cert[1]) if cert else None, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.reconnect_delay_set(5, 5)
        self.messages: list[mqtt.MQTTMessage] = []
        self.acks: dict[int, int] = {}
        self.connected, self.closed, self.subscribed = threading.Event(), threading.Event(), threading.Event()
        self.disconnects = 0
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.c.on_message = lambda c, u, m: self.messages.append(m)
        self.c.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, c, u, flags, rc, props) -> None:
        if rc.is_failure:
            self.closed.set()
        else:
            self.connected.set()

    def _on_disconnect(self, c, u, flags, rc, props) -> None:
        self.disconnects += 1
        self.closed.set()

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker accepted the connection (CONNACK success), False when TLS or MQTT refused it."""
        try:
            self.c.connect("127.0.0.1", self.port)
        except (ssl.SSLError, OSError):
            return False
        self.c.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed.is_set():
            if self.connected.wait(0.02):
                # With TLS 1.3 the broker verifies the client certificate after the client's
                # handshake ends: a refusal can still arrive just after a CONNACK could have.
                return not self.closed.wait(0.2)
        return False

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.c.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, props=None) -> int:
        """The PUBACK reason code (MQTT v5, QoS 1): below 128 accepted, 135 not authorized."""
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=props)
        wait_for(lambda: info.mid in self.acks, timeout=5, what=f"PUBACK for {topic}")
        return self.acks[info.mid]

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker then publishes the will)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def peers(fleet):
    made: list[Peer] = []

    def make(cert, **kw) -> Peer:
        p = Peer(fleet, cert, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.close()
        except Exception:
            pass


@pytest.fixture
def device_a(fleet, tmp_path):
    """The real device A with its certificate; ``make(**device_config kwargs)``."""
    made: list[EdgeService] = []

    def make(threshold: float = 1.0, **outbox) -> EdgeService:
        cfg = device_config(tmp_path / f"a{len(made)}", fleet.broker.port, threshold=threshold, device_id=A, **outbox)
        svc = EdgeService(replace(cfg, mqtt=replace(cfg.mqtt, tls=fleet.tls("device", A))))
        svc.start()
        made.append(svc)
        wait_for(svc.link.connected.is_set, timeout=10, what="device A connected over mutual TLS")
        return svc

    yield make
    for svc in made:
        svc.stop()


@pytest.fixture
def worker_w1(fleet):
    cfg = worker_config(fleet.broker.port, group=GROUP)
    cfg = replace(cfg, worker=replace(cfg.worker, id=W1), mqtt=replace(cfg.mqtt, tls=fleet.tls("worker", W1)))
    w = CloudWorker(cfg)
    w.start()
    wait_for(w.link.connected.is_set, timeout=10, what="worker w1 connected over mutual TLS")
    yield w
    w.stop()


def _offloaded(svc: EdgeService, images) -> list:
    rs = [svc.classify(im) for im in images]
    assert all(r.offloaded for r in rs)
    svc.flush()
    return rs


# ---------------------------------------------------------------- who can connect

def test_only_a_client_with_a_valid_certificate_of_the_fleet_ca_connects(fleet, peers):
    assert peers(fleet.cert("device", B)).connect(), "a valid fleet certificate must connect"
    refused = {
        "no TLS at all": peers(None, tls=False),
        "TLS without a client certificate": peers(None),
        "another CA's certificate (same CN as A)": peers((fleet.other_pki.root / "devices" / A / "cert.pem",
                                                           fleet.other_pki.root / "devices" / A / "key.pem")),
        "an expired certificate": peers((fleet.expired.cert, fleet.expired.key)),
        "a revoked certificate": peers((fleet.revoked.cert, fleet.revoked.key)),
    }
    connected = [what for what, p in refused.items() if p.connect(timeout=3)]
    assert connected == []


def test_a_certificate_revoked_while_the_broker_runs_is_refused_after_a_reload(fleet, peers):
    held = peers(fleet.cert("device", D))
    assert held.connect()
    time.sleep(1.0)                      # the new CRL must be dated later than the one the broker loaded
    fleet.pki.revoke(D)
    fleet.broker.proc.send_signal(signal.SIGHUP)   # systemctl reload mosquitto
    wait_for(lambda: "Reloading config" in fleet.broker.log_path.read_text(), timeout=5, what="the reload")
    assert not peers(fleet.cert("device", D)).connect(timeout=3)
    assert peers(fleet.cert("device", B)).connect()
    # a connection made before the reload stays up: restart the broker to cut it off at once
    assert held.connected.is_set() and not held.closed.is_set()


# ---------------------------------------------------------------- reads

def test_device_b_reads_nothing_of_device_a_and_an_integrator_reads_results_and_status(
        fleet, peers, device_a, fmnist):
    b = peers(fleet.cert("device", B))
    assert b.connect()
    b.subscribe("#", f"{P}/#", f"{P}/{A}/samples", f"{P}/{A}/results", f"{P}/{A}/status", f"{P}/+/corrections",
                f"{P}/_workers/+/status", "$SYS/#")
    reader = peers(fleet.reader)
    assert reader.connect()
    reader.subscribe(f"{P}/+/results", f"{P}/+/status", f"{P}/{A}/samples")
    svc = device_a()
    rs = _offloaded(svc, fmnist["test"].images[:20])
    # the integrator gets every (provisional) result and A's status: the ACL grants what it should
    wait_for(lambda: sum(len(protocol.decode_results(m.payload)) for m in reader.messages
                         if m.topic == f"{P}/{A}/results") == len(rs), timeout=10, what="results at the reader")
    wait_for(lambda: any(m.topic == f"{P}/{A}/status" for m in reader.messages), timeout=10, what="A's status")
    time.sleep(0.5)
    assert [m.topic for m in b.messages] == []                                  # nothing at all reaches B
    assert [m.topic for m in reader.messages if m.topic.endswith("/samples")] == []   # images: workers only


# ---------------------------------------------------------------- writes

def test_forged_corrections_for_a_are_refused_and_a_applies_nothing(fleet, peers, device_a, fmnist):
    svc = device_a()                      # no worker runs: A's samples wait for a reply
    rs = _offloaded(svc, fmnist["test"].images[:11])
    wait_for(lambda: svc.store.outbox_counts()["delivered"] == len(rs), what="A's samples delivered")
    b = peers(fleet.cert("device", B))
    assert b.connect()
    codes = []
    for r in rs:                          # B knows A's sample ids (the strongest attacker: it read them somewhere)
        forged = protocol.encode_correction(protocol.Correction(
            r.sample_id, (r.label + 1) % 10, "forged", 0.99, "evil:1", "evil"))
        codes.append(b.publish(f"{P}/{A}/corrections", forged,
                               props=paho_properties(correlation=r.sample_id.encode())))
    assert codes == [NOT_AUTHORIZED] * len(rs)
    time.sleep(1.0)
    after = [svc.result(r.sample_id) for r in rs]
    assert [(x.state, x.origin, x.label) for x in after] == [("provisional", "edge", r.label) for r in rs]
    counts = svc.counters.snapshot()
    assert {k: v for k, v in counts.items() if v and k.startswith(("replies_", "corrected"))} == {}


def test_retained_status_of_a_device_or_a_worker_cannot_be_overwritten(fleet, peers, device_a, worker_w1):
    device_a()
    b = peers(fleet.cert("device", B))
    assert b.connect()
    forged = b"{\"state\":\"offline\",\"forged\":true}"
    assert b.publish(f"{P}/{A}/status", forged, retain=True) == NOT_AUTHORIZED
    assert b.publish(f"{P}/_workers/{W1}/status", forged, retain=True) == NOT_AUTHORIZED
    assert accepted(b.publish(f"{P}/{B}/status", b"{\"state\":\"online\"}", retain=True))   # its own: allowed
    # nor through a last will: B connects with a will on A's status and vanishes
    ghost = peers(fleet.cert("device", B), will=(f"{P}/{A}/status", forged))
    assert ghost.connect()
    ghost.drop()
    # a worker's certificate: its own status only, and no device rights under its CN
    w2 = peers(fleet.cert("worker", W2))
    assert w2.connect()
    assert w2.publish(f"{P}/_workers/{W1}/status", forged, retain=True) == NOT_AUTHORIZED
    assert w2.publish(f"{P}/worker:{W2}/status", forged, retain=True) == NOT_AUTHORIZED
    assert w2.publish(f"{P}/worker:{W2}/samples", b"x") == NOT_AUTHORIZED
    assert w2.publish(f"{P}/{A}/samples", b"x") == NOT_AUTHORIZED
    assert accepted(w2.publish(f"{P}/_workers/{W2}/status", b"{\"state\":\"online\"}", retain=True))
    time.sleep(0.5)
    reader = peers(fleet.reader)
    assert reader.connect()
    reader.subscribe(f"{P}/+/status", f"{P}/_workers/+/status")
    wait_for(lambda: {m.topic for m in reader.messages} >= {f"{P}/{A}/status", f"{P}/_workers/{W1}/status"},
             timeout=5, what="retained statuses")
    retained = {m.topic: json.loads(m.payload) for m in reader.messages}
    assert retained[f"{P}/{A}/status"]["device"] == A and retained[f"{P}/{A}/status"]["state"] == "online"
    assert retained[f"{P}/_workers/{W1}/status"]["worker"] == W1
    assert "forged" not in str(retained)


def test_device_b_cannot_kick_device_a_off_with_its_client_id(fleet, peers, device_a):
    svc = device_a()
    t0 = time.monotonic()
    for client_id in (svc.cfg.client_id, A, svc.cfg.client_id, A):   # A's configured id, and the id the broker uses
        b = peers(fleet.cert("device", B), client_id=client_id)
        assert b.connect(), "B itself is a valid client"
        time.sleep(0.4)
        assert svc.link.connected.is_set()
    assert time.monotonic() - t0 >= 1.5
    assert svc.counters.snapshot().get("connects") == 1            # A never lost its connection
    # the client id is the certificate's CN: a second connection with C's own certificate does replace the first
    first = peers(fleet.cert("device", C), client_id="one")
    second = peers(fleet.cert("device", C), client_id="two")
    assert first.connect() and second.connect()
    wait_for(first.closed.is_set, timeout=5, what="the older connection of C closed")


def test_a_packet_larger_than_the_broker_limit_closes_the_connection(fleet, peers):
    b = peers(fleet.cert("device", B))
    assert b.connect()
    assert accepted(b.publish(f"{P}/{B}/samples", b"\0" * (1024 * 1024)))   # a sample at the worker's 1 MiB limit
    info = b.c.publish(f"{P}/{B}/samples", b"\0" * (1024 * 1024 + 64 * 1024), qos=1)   # over max_packet_size
    wait_for(b.closed.is_set, timeout=5, what="the broker closing the connection")
    assert info.mid not in b.acks


# ---------------------------------------------------------------- the worker group

def test_device_b_in_the_worker_group_gets_no_sample_and_every_sample_is_still_answered(
        fleet, peers, device_a, worker_w1, fmnist):
    b = peers(fleet.cert("device", B))
    assert b.connect()
    b.subscribe(f"$share/{GROUP}/{P}/+/samples", f"{P}/+/samples")
    svc = device_a(resend_after_s=3.0)
    rs = _offloaded(svc, fmnist["test"].images[:40])
    wait_for(lambda: worker_w1.counters.snapshot().get("received", 0) >= 1, what="the worker received samples")
    time.sleep(1.0)
    got_by_worker = worker_w1.counters.snapshot().get("received", 0)
    assert b.messages == []                                       # B, in the workers' group, gets no image
    # Mosquitto 2.0's acl_file cannot refuse the SUBSCRIBE: B's turns in the group's round robin are
    # dropped at delivery. Those samples are answered when the device sends them again.
    b.close()
    wait_for(lambda: all(svc.result(r.sample_id).origin == "cloud" for r in rs), timeout=30,
             what="every sample answered after the resend")
    print(f"\nworker got {got_by_worker} of {len(rs)} samples while B was in its group; "
          f"resent {svc.counters.snapshot().get('resent', 0)}")
    # B's own sample asking for the reply on A's corrections topic: the worker does not answer there
    b = peers(fleet.cert("device", B))
    assert b.connect()
    before = worker_w1.counters.snapshot().get("rejected_bad_response_topic", 0)
    sample = rs[0]
    assert accepted(b.publish(f"{P}/{B}/samples", b"P5 1 1 255 \0", props=paho_properties(
        content_type="image/x-portable-graymap", response_topic=f"{P}/{A}/corrections",
        correlation=sample.sample_id.encode(), user=[("v", "1"), ("sample_id", sample.sample_id),
                                                     ("device_id", B)])))
    wait_for(lambda: worker_w1.counters.snapshot().get("rejected_bad_response_topic", 0) == before + 1,
             timeout=5, what="the worker refusing B's reply address")
    time.sleep(0.3)
    assert svc.counters.snapshot().get("replies_duplicate", 0) == svc.counters.snapshot().get("replies_unknown", 0) == 0


# ---------------------------------------------------------------- the legitimate loop

def test_the_loop_runs_through_the_acl_every_offloaded_sample_is_corrected(fleet, peers, device_a, worker_w1,
                                                                           fmnist):
    reader = peers(fleet.reader)
    assert reader.connect()
    reader.subscribe(f"{P}/{A}/results")
    svc = device_a(threshold=0.9678)
    rs = [svc.classify(im) for im in fmnist["test"].images[:400]]
    offloaded = [r for r in rs if r.offloaded]
    assert len(offloaded) >= 50
    wait_for(lambda: all(svc.result(r.sample_id).origin == "cloud" for r in offloaded), timeout=30,
             what="every offloaded sample corrected")
    wait_for(lambda: sum(1 for m in reader.messages for x in protocol.decode_results(m.payload)
                         if x["origin"] == "cloud") == len(offloaded), timeout=10, what="corrections at the reader")
    counts = svc.counters.snapshot()
    assert counts.get("samples_refused", 0) == counts.get("results_refused", 0) == 0
    assert worker_w1.counters.snapshot().get("replies_refused", 0) == 0
