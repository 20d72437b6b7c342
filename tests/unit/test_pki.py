"""edge-infer pki: the fleet CA, broker/device/worker certificates, rotation and revocation (deploy/pki/README.md)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_infer.cli import main
from edge_infer.errors import EdgeInferError
from edge_infer.tools.localbroker import LocalBroker, free_port
from edge_infer.tools.pki import CA_DAYS, CRL_DAYS, LEAF_DAYS, FleetPki, Issued, PkiError


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> FleetPki:
    """One fleet for the read-only checks: a CA, the broker, device cam-1, worker w1."""
    pki = FleetPki(tmp_path_factory.mktemp("fleet") / "pki")
    pki.init()
    pki.add_device("cam-1")
    pki.add_worker("w1")
    pki.add_reader("reader:gate")
    return pki


@pytest.fixture
def pki(tmp_path) -> FleetPki:
    p = FleetPki(tmp_path / "pki")
    p.init()
    return p


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl_serials(pki: FleetPki) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(pki.crl.read_bytes())}


def openssl_verify(pki: FleetPki, leaf: Path, purpose: str = "sslclient") -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca_cert_path), "-CRLfile", str(pki.crl),
                           "-crl_check", "-purpose", purpose, str(leaf)], capture_output=True, text=True)


def eku(c: x509.Certificate) -> list:
    return list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- what is issued -----------------------------------------------------------------------------------------------
def test_the_ca_is_a_p256_ca_for_ten_years_that_signs_certificates_and_crls_only(fleet):
    ca = cert(fleet.ca_cert_path)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert abs((ca.not_valid_after_utc - ca.not_valid_before_utc) - timedelta(days=CA_DAYS)) < timedelta(hours=1)


def test_device_worker_and_broker_certificates_carry_the_identity_and_purpose(fleet):
    dev = cert(fleet.root / "devices" / "cam-1" / "cert.pem")
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    assert eku(dev) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not dev.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert dev.public_key().curve.name == "secp256r1"
    assert abs((dev.not_valid_after_utc - dev.not_valid_before_utc) - timedelta(days=LEAF_DAYS)) < timedelta(hours=1)

    wrk = cert(fleet.root / "workers" / "w1" / "cert.pem")
    assert wrk.subject.rfc4514_string() == "CN=worker:w1"
    assert eku(wrk) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    rdr = cert(fleet.root / "readers" / "gate" / "cert.pem")      # "reader:" given, stored once
    assert rdr.subject.rfc4514_string() == "CN=reader:gate"
    assert eku(rdr) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    brk = cert(fleet.root / "broker" / "cert.pem")
    assert brk.subject.rfc4514_string() == "CN=localhost"
    assert eku(brk) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = brk.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    for leaf in ("devices/cam-1", "workers/w1", "broker"):   # the CA copy that deploys with each certificate
        assert (fleet.root / leaf / "ca.pem").read_bytes() == fleet.ca_cert_path.read_bytes()


def test_the_chains_verify_with_openssl_and_with_cryptography(fleet):
    from cryptography.x509.verification import PolicyBuilder, Store

    for leaf, purpose in (("devices/cam-1", "sslclient"), ("workers/w1", "sslclient"), ("broker", "sslserver")):
        p = openssl_verify(fleet, fleet.root / leaf / "cert.pem", purpose)
        assert p.returncode == 0, p.stdout + p.stderr
    store = Store([cert(fleet.ca_cert_path)])
    builder = PolicyBuilder().store(store)
    brk = cert(fleet.root / "broker" / "cert.pem")
    for name in (x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))):
        builder.build_server_verifier(name).verify(brk, [])
    # (cryptography's client verifier insists on a subjectAltName; a client's identity here is its CN)
    for leaf in ("devices/cam-1", "workers/w1"):
        cert(fleet.root / leaf / "cert.pem").verify_directly_issued_by(cert(fleet.ca_cert_path))


def test_init_takes_the_broker_names_and_lifetimes(tmp_path):
    pki = FleetPki(tmp_path / "pki")
    pki.init(["mqtt.example.com", "broker.lan"], ["10.0.0.5", "::1"], days=400, broker_days=90)
    brk = cert(pki.root / "broker" / "cert.pem")
    assert brk.subject.rfc4514_string() == "CN=mqtt.example.com"
    san = brk.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.com", "broker.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("10.0.0.5"), ip_address("::1")]
    assert (brk.not_valid_after_utc - brk.not_valid_before_utc).days == 90
    assert (cert(pki.ca_cert_path).not_valid_after_utc - datetime.now(timezone.utc)).days in (399, 400)
    dev = pki.add_device("short", days=7)
    assert (dev.not_after - datetime.now(timezone.utc)).days == 6
    long = pki.add_device("long", days=10_000)       # never past the CA
    assert long.not_after == cert(pki.ca_cert_path).not_valid_after_utc


def test_keys_are_0600_and_folders_0700_whatever_the_umask(tmp_path):
    with umask(0):
        pki = FleetPki(tmp_path / "pki")
        pki.init()
        issued = pki.add_device("cam-9")
        pki.add_worker("w9")
        pki.revoke("cam-9")
    keys = [pki.ca_key_path, *pki.root.glob("*/*/key.pem"), pki.root / "broker" / "key.pem"]
    assert len(keys) == 4 and issued.key in keys
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600, k
    dirs = [pki.root, *(p for p in pki.root.rglob("*") if p.is_dir())]
    assert len(dirs) == 6
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for public in (pki.ca_cert_path, pki.crl, issued.cert):
        assert stat.S_IMODE(public.stat().st_mode) == 0o644, public
    assert not list(pki.root.rglob("*.tmp"))


def test_issued_describes_the_files_and_the_index_records_it(fleet):
    issued = fleet.add_device("cam-2")
    assert isinstance(issued, Issued) and issued.cn == "cam-2"
    c = cert(issued.cert)
    assert c.serial_number == issued.serial and c.not_valid_after_utc == issued.not_after
    assert c.public_key() == serialization.load_pem_private_key(issued.key.read_bytes(), None).public_key()
    entry = [e for e in json.loads(fleet.index_path.read_text())["certs"] if e["name"] == "cam-2"]
    assert len(entry) == 1 and int(entry[0]["serial"], 16) == issued.serial
    assert entry[0]["kind"] == "device" and entry[0]["status"] == "active"


# --- refusals -----------------------------------------------------------------------------------------------------
def test_init_refuses_to_replace_a_ca(fleet):
    before = fleet.ca_key_path.read_bytes(), fleet.index_path.read_bytes()
    with pytest.raises(PkiError, match="already holds a fleet CA"):
        fleet.init()
    assert (fleet.ca_key_path.read_bytes(), fleet.index_path.read_bytes()) == before


@pytest.mark.parametrize("bad", ["", "a/b", "cam+1", "#", "a b", "-lead", "x" * 65, "worker:cam", "cam\n"])
def test_ids_that_are_not_topic_safe_are_refused(fleet, bad):
    with pytest.raises(PkiError, match="must be 1-64 characters"):
        fleet.add_device(bad)
    if bad != "worker:cam":
        with pytest.raises(PkiError, match="must be 1-64 characters"):
            fleet.add_worker(bad)
    assert not (fleet.root / "devices" / bad).exists() or bad == ""


def test_a_second_certificate_for_a_valid_one_is_refused_with_the_way_to_rotate(fleet):
    with pytest.raises(PkiError, match="rotate cam-1"):
        fleet.add_device("cam-1")
    with pytest.raises(PkiError, match="rotate w1 --worker"):
        fleet.add_worker("w1")


def test_commands_without_a_ca_say_how_to_make_one(tmp_path):
    with pytest.raises(PkiError, match="init"):
        FleetPki(tmp_path / "none").add_device("cam-1")
    assert issubclass(PkiError, EdgeInferError) and PkiError("x").exit_code == 2


def test_bad_broker_names_are_refused(tmp_path):
    for hosts, ips in ((["bad host"], []), ([], ["300.1.1.1"]), ([], [])):
        with pytest.raises(PkiError):
            FleetPki(tmp_path / "pki").init(hosts, ips)
    assert not (tmp_path / "pki" / "ca.key").exists()


def test_a_world_readable_ca_key_is_refused(pki):
    os.chmod(pki.ca_key_path, 0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        pki.add_device("cam-1")


# --- revocation and rotation --------------------------------------------------------------------------------------
def test_revoke_puts_the_serial_on_the_crl_and_openssl_then_refuses_it(pki):
    keep, gone = pki.add_device("keep"), pki.add_device("gone")
    assert crl_serials(pki) == set()
    assert openssl_verify(pki, gone.cert).returncode == 0
    assert pki.revoke("gone") == pki.crl
    assert crl_serials(pki) == {gone.serial}
    p = openssl_verify(pki, gone.cert)
    assert p.returncode != 0 and "revoked" in p.stdout + p.stderr
    assert openssl_verify(pki, keep.cert).returncode == 0
    status = {c["name"]: c["status"] for c in pki.certificates()}
    assert status["gone"] == "revoked" and status["keep"] == "active"
    with pytest.raises(PkiError, match="no active certificate"):
        pki.revoke("gone")
    again = pki.add_device("gone")          # a revoked id may get a new certificate
    assert again.serial != gone.serial and openssl_verify(pki, again.cert).returncode == 0


def test_revoking_a_worker_takes_its_id_or_its_cn(pki):
    w = pki.add_worker("w1")
    pki.revoke("worker:w1", "worker", reason="key-compromise")
    entry = x509.load_pem_x509_crl(pki.crl.read_bytes()).get_revoked_certificate_by_serial_number(w.serial)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise


def test_rotate_issues_a_new_key_and_serial_and_revokes_the_old(pki, tmp_path):
    old = pki.add_device("cam-1")
    old_cert = tmp_path / "old.pem"
    shutil.copy(old.cert, old_cert)
    old_key = old.key.read_bytes()
    new = pki.rotate("cam-1")
    assert new.serial != old.serial and new.cert == old.cert and new.key.read_bytes() != old_key
    assert crl_serials(pki) == {old.serial}
    assert openssl_verify(pki, old_cert).returncode != 0
    assert openssl_verify(pki, new.cert).returncode == 0
    assert [c["status"] for c in pki.certificates() if c["name"] == "cam-1"] == ["revoked", "active"]
    with pytest.raises(PkiError, match="never issued"):
        pki.rotate("cam-2")


def test_rotate_the_broker_with_new_names(pki):
    old = cert(pki.root / "broker" / "cert.pem")
    new = pki.rotate("broker", "broker", broker_hosts=["mqtt.example.com"])
    san = cert(new.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert new.cn == "mqtt.example.com" and san.get_values_for_type(x509.DNSName) == ["mqtt.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    assert crl_serials(pki) == {old.serial_number}


def test_an_expired_certificate_can_be_made_and_is_listed_expired(pki):
    past = datetime.now(timezone.utc) - timedelta(days=3)
    exp = pki.issue("old-cam", "device", days=1, not_before=past)
    assert exp.not_after < datetime.now(timezone.utc)
    p = openssl_verify(pki, exp.cert)
    assert p.returncode != 0 and "expired" in p.stdout + p.stderr
    assert [c["status"] for c in pki.certificates() if c["name"] == "old-cam"] == ["expired"]
    assert pki.add_device("old-cam").serial != exp.serial     # an expired one does not block a new one


def test_refresh_crl_re_signs_the_same_revocations(pki):
    gone = pki.add_device("gone")
    pki.revoke("gone")
    before = x509.load_pem_x509_crl(pki.crl.read_bytes())
    pki.refresh_crl()
    after = x509.load_pem_x509_crl(pki.crl.read_bytes())
    number = lambda c: c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    assert number(after) == number(before) + 1 and after.next_update_utc >= before.next_update_utc
    assert crl_serials(pki) == {gone.serial}
    assert after.is_signature_valid(cert(pki.ca_cert_path).public_key())
    left = after.next_update_utc - datetime.now(timezone.utc)
    assert timedelta(days=CRL_DAYS - 1) < left <= timedelta(days=CRL_DAYS)


# --- the command line ---------------------------------------------------------------------------------------------
def test_the_cli_from_zero_to_a_revoked_device(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert main(["pki", "--dir", d, "init", "--broker-host", "mqtt.lan", "--broker-ip", "10.1.2.3"]) == 0
    assert "ca.key" in capsys.readouterr().out
    assert main(["pki", "--dir", d, "add-device", "cam-7", "--days", "30"]) == 0
    assert "/etc/edge-infer/tls/" in capsys.readouterr().out
    assert main(["pki", "--dir", d, "add-worker", "w1"]) == 0
    assert main(["pki", "--dir", d, "rotate", "w1", "--worker"]) == 0
    assert main(["pki", "--dir", d, "revoke", "cam-7"]) == 0
    assert "systemctl reload mosquitto" in capsys.readouterr().out
    assert main(["pki", "--dir", d, "refresh-crl"]) == 0
    assert main(["pki", "--dir", d, "rotate", "--broker"]) == 0
    capsys.readouterr()
    assert main(["pki", "--dir", d, "list"]) == 0
    out = capsys.readouterr()
    rows = [line.split() for line in out.out.splitlines()]
    assert rows[0] == ["NAME", "KIND", "SERIAL", "NOT_AFTER", "STATUS"]
    assert [(r[0], r[1], r[4]) for r in rows[1:]] == [
        ("broker", "broker", "revoked"), ("cam-7", "device", "revoked"), ("w1", "worker", "revoked"),
        ("w1", "worker", "active"), ("broker", "broker", "active")]
    assert "CRL next update" in out.err


def test_cli_errors_exit_2_with_what_to_do(tmp_path, capsys):
    d = str(tmp_path / "pki")
    assert main(["pki", "--dir", d, "add-device", "cam-1"]) == 2
    assert "edge-infer pki --dir" in capsys.readouterr().err
    assert main(["pki", "--dir", d, "init"]) == 0
    assert main(["pki", "--dir", d, "init"]) == 2
    assert main(["pki", "--dir", d, "add-device", "a/b"]) == 2
    assert "must be 1-64 characters" in capsys.readouterr().err
    assert main(["pki", "--dir", d, "revoke"]) == 2


# --- a real Mosquitto ---------------------------------------------------------------------------------------------
def mqtt_connect(pki: FleetPki, issued: Issued, port: int, timeout: float = 3.0) -> str:
    """'connected' or why not, for a paho client with this certificate (as the device and the worker connect)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    ctx.load_cert_chain(issued.cert, issued.key)
    outcome: list[str] = []

    def on_connect(client, userdata, flags, reason, props):
        outcome.append("connected" if not reason.is_failure else f"refused: {reason}")

    def on_disconnect(client, userdata, flags, reason, props):
        outcome.append(f"disconnected: {reason}")

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=issued.cn, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    try:
        c.connect("localhost", port)        # TLS 1.2 refuses here; with TLS 1.3 the refusal follows the handshake
    except ssl.SSLError as exc:
        return f"refused: {exc}"
    deadline = time.monotonic() + timeout
    while not outcome and time.monotonic() < deadline:
        c.loop(0.02)                        # no network thread: the answer is read here
    c.disconnect()
    return outcome[0] if outcome else "no answer"


def refused(outcome: str) -> bool:
    return outcome.startswith(("refused", "disconnected"))


@pytest.mark.integration
def test_mosquitto_accepts_fleet_certificates_and_refuses_revoked_and_expired_ones(pki, tmp_path):
    ok, gone = pki.add_device("dev-ok"), pki.add_device("dev-gone")
    worker = pki.add_worker("w1")
    expired = pki.issue("dev-old", "device", days=1, not_before=datetime.now(timezone.utc) - timedelta(days=3))
    b = pki.root / "broker"
    port = free_port()
    extra = (f"cafile {b / 'ca.pem'}\ncertfile {b / 'cert.pem'}\nkeyfile {b / 'key.pem'}\ncrlfile {pki.crl}\n"
             "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
    with LocalBroker(tmp_path / "broker", port=port, listener=f"listener {port} 127.0.0.1",
                     extra_config=extra) as broker:
        assert mqtt_connect(pki, ok, port) == "connected"
        assert mqtt_connect(pki, worker, port) == "connected"
        assert mqtt_connect(pki, gone, port) == "connected"
        assert refused(mqtt_connect(pki, expired, port))
        pki.revoke("dev-gone")
        os.kill(broker.proc.pid, signal.SIGHUP)       # systemctl reload mosquitto: it re-reads crlfile
        time.sleep(0.3)
        assert refused(mqtt_connect(pki, gone, port))
        assert mqtt_connect(pki, ok, port) == "connected"
        log = broker.log_path.read_text()
    assert "as dev-ok" in log and "u'dev-ok'" in log and "u'worker:w1'" in log   # CN -> username
    assert "certificate verify failed" in log
