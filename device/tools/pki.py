"""``edge-infer pki``: the fleet's certificates, made on an offline admin machine.

One fleet CA signs the broker's certificate and one certificate per device and
per cloud worker. The certificate's CN is the client's identity: the device id,
or ``worker:<id>`` for a worker; the broker maps it to the MQTT username
(``use_identity_as_username true``) and its ACL works on that name. Revocation
is a CRL that the broker loads (``crlfile``). deploy/pki/README.md is the
workflow; this module is a tool, never imported by the service.

Layout under the PKI directory (directories 0700, private keys 0600 whatever
the umask)::

    ca.pem  ca.key  crl.pem  index.json
    broker/{cert.pem,key.pem,ca.pem}
    devices/<id>/{cert.pem,key.pem,ca.pem}
    workers/<id>/{cert.pem,key.pem,ca.pem}
    readers/<name>/{cert.pem,key.pem,ca.pem}

A reader (CN ``reader:<name>``) is a read-only client: an integrator's
dashboard, or the fleet's health gate, which reads every device's retained
status from the Ansible controller (a device's own certificate cannot: the
broker uses the CN as the client id, so a second connection with it would
kick the service off).

Keys are ECDSA P-256 (Mosquitto with OpenSSL, Python's ssl/paho, and the
secure elements found on edge boards all take it), signatures SHA-256. The CA
lives 10 years (replacing it means touching every device), leaf certificates
2 years by default (devices may sit offline for months; revocation, not a short
lifetime, handles a lost device), the CRL 30 days (``refresh-crl`` re-signs it).
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Literal, Sequence

from ..dbfile import fsync_dir
from ..errors import EdgeInferError

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as _exc:     # a tool dependency, not a device one
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

Kind = Literal["device", "worker", "reader", "broker"]
KINDS: tuple[str, ...] = ("device", "worker", "reader", "broker")

CA_DAYS = 3650          # 10 years: a new CA means a new ca.pem on every device and the broker
LEAF_DAYS = 730         # 2 years: rotation is a deployment; a lost device is revoked, not waited out
CRL_DAYS = 30           # the broker refuses every client once the CRL is past its next update
BACKDATE = timedelta(minutes=5)   # a client whose clock is a little behind still accepts a fresh certificate
WORKER_PREFIX = "worker:"
READER_PREFIX = "reader:"
#: kind -> the prefix of its CN (a device's CN is its bare id)
CN_PREFIX = {"worker": WORKER_PREFIX, "reader": READER_PREFIX}
BROKER_NAME = "broker"
REASONS = ("unspecified", "key-compromise", "superseded", "cessation-of-operation", "affiliation-changed")

_DIRS = {"device": "devices", "worker": "workers", "reader": "readers"}
_HOST_RE = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                      r"[A-Za-z0-9])?)*$")


class PkiError(EdgeInferError):
    """The PKI directory or a request is wrong; the message says what to do."""

    exit_code = 2


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    cn: str
    serial: int
    not_after: datetime


def _hex(serial: int) -> str:
    h = format(serial, "X")
    return h if len(h) % 2 == 0 else "0" + h


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _time(s: str) -> datetime:
    return datetime.fromisoformat(s)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically: a temporary file created with ``mode`` (and chmod-ed, so the umask does not matter), renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_id_problem(value: str) -> str | None:
    from ..config import topic_safe_id    # the rule the device config applies to device_id
    if "\n" in value:      # a regex's "$" also matches before a final newline: never let one into a CN
        return topic_safe_id("\n")
    return topic_safe_id(value)


def check_name(name: str, kind: str) -> str:
    """The index name for ``kind``: a device id, a worker id or reader name (``worker:``/``reader:`` accepted and
    dropped) or ``broker``."""
    if kind not in KINDS:
        raise PkiError(f"unknown certificate kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "broker":
        return BROKER_NAME
    prefix = CN_PREFIX.get(kind)
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    problem = _client_id_problem(name)
    if problem:
        what = {"device": "device id", "worker": "worker id", "reader": "reader name"}[kind]
        raise PkiError(f"{what} {name!r} {problem}")
    return name


def _check_hosts(hosts: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    for h in hosts:
        if not _HOST_RE.match(h):
            raise PkiError(f"broker host {h!r} is not a DNS name (give addresses with --broker-ip)")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise PkiError(f"broker IP {ip!r} is not an IPv4 or IPv6 address") from None
    if not hosts and not ips:
        raise PkiError("the broker certificate needs at least one --broker-host or --broker-ip, the name or "
                       "address the devices connect to")
    return list(dict.fromkeys(hosts)), list(dict.fromkeys(ips))


class FleetPki:
    """The fleet CA in ``root`` and what it issued. Every change takes a lock and rewrites index.json atomically."""

    def __init__(self, root: Path) -> None:
        if _IMPORT_ERROR is not None:
            raise PkiError(f"the PKI tool needs the 'cryptography' package ({_IMPORT_ERROR}). Install it with: "
                           "pip install 'edge-infer[pki]'")
        self.root = Path(root)

    # --- paths --------------------------------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def dir_for(self, name: str, kind: str) -> Path:
        name = check_name(name, kind)
        return self.root / BROKER_NAME if kind == "broker" else self.root / _DIRS[kind] / name

    # --- state ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, *, creating: bool = False) -> Iterator[None]:
        import fcntl
        if not creating:
            self._require_ca()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _require_ca(self) -> None:
        if not self.ca_cert_path.exists() or not self.ca_key_path.exists() or not self.index_path.exists():
            raise PkiError(f"no fleet CA in {self.root}: create one with `edge-infer pki --dir {self.root} init` "
                           "(or pass the --dir that holds ca.pem, ca.key and index.json)")

    def _index(self) -> dict:
        self._require_ca()
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{self.index_path} cannot be read ({exc}); restore it from the admin machine's backup") \
                from None
        if index.get("format") != 1:
            raise PkiError(f"{self.index_path}: unknown format {index.get('format')!r}")
        return index

    def _save(self, index: dict) -> None:
        _write(self.index_path, (json.dumps(index, indent=2) + "\n").encode(), 0o644)

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self._require_ca()
        mode = self.ca_key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PkiError(f"{self.ca_key_path} is readable by others (mode {mode:04o}): chmod 600 it, and consider "
                           "the CA compromised if anyone else could read it")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        return cert, key

    # --- commands -------------------------------------------------------------------------------------------------
    def init(self, broker_hosts: Sequence[str] = ("localhost",), broker_ips: Sequence[str] = ("127.0.0.1",),
             days: int = CA_DAYS, *, broker_days: int | None = None, ca_name: str = "edge-infer fleet CA") -> None:
        """A new CA (``days`` long), an empty CRL and the broker's certificate. Refuses to replace a CA."""
        hosts, ips = _check_hosts(broker_hosts, broker_ips)
        if days < 1:
            raise PkiError(f"the CA lifetime must be at least one day, not {days}")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with self._locked(creating=True):
            existing = [p.name for p in (self.ca_cert_path, self.ca_key_path, self.index_path) if p.exists()]
            if existing:
                raise PkiError(f"{self.root} already holds a fleet CA ({', '.join(existing)}); a new CA would cut off "
                               "every device. Use another --dir for a new fleet, or add-device/rotate for this one")
            now = datetime.now(timezone.utc)
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-infer"),
                              x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
            cert = (x509.CertificateBuilder()
                    .subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=days))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                 key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                 decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            # The key first: a ca.pem without its key is an init that failed, one with it is a CA.
            _write(self.ca_key_path, _key_pem(key), 0o600)
            _write(self.ca_cert_path, _cert_pem(cert), 0o644)
            index = {"format": 1, "ca": {"subject": ca_name, "serial": _hex(cert.serial_number),
                                         "not_after": _iso(cert.not_valid_after_utc)},
                     "broker": {"hosts": hosts, "ips": ips}, "crl_number": 0, "certs": []}
            self._save(index)
            self._write_crl(index, cert, key)
            self._save(index)
            self._issue(index, hosts[0] if hosts else ips[0], "broker", days=broker_days)

    def add_device(self, device_id: str, days: int | None = None) -> Issued:
        return self.issue(device_id, "device", days=days)

    def add_worker(self, worker_id: str, days: int | None = None) -> Issued:
        return self.issue(WORKER_PREFIX + check_name(worker_id, "worker"), "worker", days=days)

    def add_reader(self, name: str, days: int | None = None) -> Issued:
        return self.issue(READER_PREFIX + check_name(name, "reader"), "reader", days=days)

    def issue(self, cn: str, kind: Kind, *, days: int | None = None, not_before: datetime | None = None) -> Issued:
        """A new key and certificate for a name with no valid certificate yet (``rotate`` replaces one).

        ``cn`` is the device id, ``worker:<id>`` (the bare id is accepted) or the broker's host name.
        ``not_before`` backdates it (tests make expired certificates so)."""
        with self._locked():
            return self._issue(self._index(), cn, kind, days=days, not_before=not_before)

    def revoke(self, name: str, kind: Kind = "device", *, reason: str = "unspecified") -> Path:
        """Every active certificate of ``name`` onto the CRL; returns crl.pem (copy it to the broker, reload it)."""
        name = check_name(name, kind)
        with self._locked():
            index = self._index()
            if not self._revoke_active(index, name, kind, reason=reason):
                known = [c for c in index["certs"] if c["name"] == name and c["kind"] == kind]
                raise PkiError(f"{kind} {name!r} has no active certificate to revoke"
                               + (" (all of its certificates are revoked already)" if known else
                                  f"; `edge-infer pki --dir {self.root} list` shows what was issued"))
            self._save(index)
            self._write_crl(index)
            self._save(index)
            return self.crl

    def rotate(self, name: str, kind: Kind = "device", *, days: int | None = None,
               broker_hosts: Sequence[str] | None = None, broker_ips: Sequence[str] | None = None) -> Issued:
        """A new key and certificate for ``name``; the old certificates revoked (superseded) once the new is on disk.

        For the broker, ``broker_hosts``/``broker_ips`` replace the names the certificate is valid for."""
        name = check_name(name, kind)
        with self._locked():
            index = self._index()
            old = [c for c in index["certs"] if c["name"] == name and c["kind"] == kind]
            if not old:
                raise PkiError(f"{kind} {name!r} was never issued a certificate: use add-{kind} for a new one")
            if kind == "broker":
                if broker_hosts is not None or broker_ips is not None:
                    hosts, ips = _check_hosts(broker_hosts if broker_hosts is not None else index["broker"]["hosts"],
                                              broker_ips if broker_ips is not None else index["broker"]["ips"])
                    index["broker"] = {"hosts": hosts, "ips": ips}
                b = index["broker"]
                cn = (b["hosts"] or b["ips"])[0]
            else:
                cn = WORKER_PREFIX + name if kind == "worker" else name
            issued = self._issue(index, cn, kind, days=days, replacing=True)
            self._revoke_active(index, name, kind, reason="superseded", keep=issued.serial)
            self._save(index)
            self._write_crl(index)
            self._save(index)
            return issued

    def refresh_crl(self, days: int = CRL_DAYS) -> Path:
        """Re-sign the CRL with a new next update (same revocations). Run it well within CRL_DAYS."""
        with self._locked():
            index = self._index()
            self._write_crl(index, days=days)
            self._save(index)
            return self.crl

    def certificates(self) -> list[dict]:
        """The index's certificates, newest last, with ``status`` active/revoked/expired."""
        now = datetime.now(timezone.utc)
        rows = []
        for c in self._index()["certs"]:
            status = c["status"]
            if status == "active" and _time(c["not_after"]) <= now:
                status = "expired"
            rows.append({**c, "status": status})
        return rows

    def crl_next_update(self) -> datetime:
        return x509.load_pem_x509_crl(self.crl.read_bytes()).next_update_utc

    # --- internals ------------------------------------------------------------------------------------------------
    def _issue(self, index: dict, cn: str, kind: str, *, days: int | None = None, not_before: datetime | None = None,
               replacing: bool = False) -> Issued:
        days = LEAF_DAYS if days is None else days
        if days < 1:
            raise PkiError(f"a certificate must be valid for at least one day, not {days}")
        if kind == "broker":
            name = BROKER_NAME
        else:
            name = check_name(cn, kind)
            cn = CN_PREFIX.get(kind, "") + name
        now = datetime.now(timezone.utc)
        if not replacing:
            valid = [c for c in index["certs"] if c["name"] == name and c["kind"] == kind and c["status"] == "active"
                     and _time(c["not_after"]) > now]
            if valid:
                raise PkiError(f"{kind} {name!r} already has a valid certificate (serial {valid[-1]['serial']}, until "
                               f"{valid[-1]['not_after']}): `edge-infer pki rotate {name}"
                               f"{' --' + kind if kind != 'device' else ''}` replaces it")
        ca_cert, ca_key = self._ca()
        start = (now - BACKDATE) if not_before is None else not_before.astimezone(timezone.utc)
        end = min(start + timedelta(days=days), ca_cert.not_valid_after_utc)   # never past the CA
        key = ec.generate_private_key(ec.SECP256R1())
        if kind == "broker":
            sans: list[x509.GeneralName] = [x509.DNSName(h) for h in index["broker"]["hosts"]]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in index["broker"]["ips"]]
            eku = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            sans = []
            eku = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        # Recorded before it is written: a certificate the index does not know could never be revoked.
        index["certs"].append({"name": name, "kind": kind, "cn": cn, "serial": _hex(cert.serial_number),
                               "not_before": _iso(cert.not_valid_before_utc),
                               "not_after": _iso(cert.not_valid_after_utc), "status": "active",
                               "issued_at": _iso(now)})
        self._save(index)
        out = self.root / BROKER_NAME if kind == "broker" else self.root / _DIRS[kind] / name
        if kind != "broker":
            _mkdir(out.parent)
        _mkdir(out)
        _write(out / "key.pem", _key_pem(key), 0o600)
        _write(out / "cert.pem", _cert_pem(cert), 0o644)
        _write(out / "ca.pem", self.ca_cert_path.read_bytes(), 0o644)
        return Issued(cert=out / "cert.pem", key=out / "key.pem", cn=cn, serial=cert.serial_number,
                      not_after=cert.not_valid_after_utc)

    def _revoke_active(self, index: dict, name: str, kind: str, *, reason: str, keep: int | None = None) -> int:
        if reason not in REASONS:
            raise PkiError(f"unknown revocation reason {reason!r}: one of {', '.join(REASONS)}")
        now = _iso(datetime.now(timezone.utc))
        n = 0
        for c in index["certs"]:
            if (c["name"] == name and c["kind"] == kind and c["status"] == "active"
                    and (keep is None or int(c["serial"], 16) != keep)):
                c.update(status="revoked", revoked_at=now, reason=reason)
                n += 1
        return n

    def _write_crl(self, index: dict, ca_cert: x509.Certificate | None = None,
                   ca_key: ec.EllipticCurvePrivateKey | None = None, *, days: int = CRL_DAYS) -> None:
        if ca_cert is None or ca_key is None:
            ca_cert, ca_key = self._ca()
        if days < 1:
            raise PkiError(f"the CRL must be valid for at least one day, not {days}")
        flags = {"unspecified": x509.ReasonFlags.unspecified, "key-compromise": x509.ReasonFlags.key_compromise,
                 "superseded": x509.ReasonFlags.superseded,
                 "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
                 "affiliation-changed": x509.ReasonFlags.affiliation_changed}
        now = datetime.now(timezone.utc)
        index["crl_number"] = int(index.get("crl_number", 0)) + 1
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(now - BACKDATE).next_update(now + timedelta(days=days))
                   .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        for c in index["certs"]:
            if c["status"] == "revoked":
                entry = (x509.RevokedCertificateBuilder()
                         .serial_number(int(c["serial"], 16)).revocation_date(_time(c["revoked_at"])))
                if c.get("reason", "unspecified") != "unspecified":
                    entry = entry.add_extension(x509.CRLReason(flags[c["reason"]]), critical=False)
                builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(ca_key, hashes.SHA256())
        _write(self.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        index["crl_next_update"] = _iso(crl.next_update_utc)


# --- the command line --------------------------------------------------------------------------------------------
def add_pki_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + ". Run it on an offline admin machine: ca.key never leaves it " \
                                            "(deploy/pki/README.md)."
    p.add_argument("--dir", type=Path, default=os.environ.get("EDGE_INFER_PKI_DIR"),
                   required="EDGE_INFER_PKI_DIR" not in os.environ,
                   help="the PKI directory (default: $EDGE_INFER_PKI_DIR)")
    sub = p.add_subparsers(dest="pki_command", required=True)

    i = sub.add_parser("init", help="create the fleet CA, an empty CRL and the broker's certificate")
    i.add_argument("--broker-host", action="append", default=None, metavar="NAME",
                   help="DNS name the devices connect to (repeat; default localhost)")
    i.add_argument("--broker-ip", action="append", default=None, metavar="IP",
                   help="IP address the devices connect to (repeat; default 127.0.0.1)")
    i.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"CA lifetime (default {CA_DAYS})")
    i.add_argument("--days", type=int, default=None, help=f"broker certificate lifetime (default {LEAF_DAYS})")

    for kind in ("device", "worker", "reader"):
        a = sub.add_parser(f"add-{kind}", help=f"a key and certificate for a new {kind}"
                                               + (" (read-only: results and status)" if kind == "reader" else ""))
        a.add_argument("name", metavar="ID")
        a.add_argument("--days", type=int, default=None, help=f"lifetime (default {LEAF_DAYS})")

    for cmd, what in (("revoke", "put the certificate on the CRL"), ("rotate", "a new key and certificate, the old "
                                                                                 "one revoked")):
        r = sub.add_parser(cmd, help=what)
        r.add_argument("name", metavar="NAME", nargs="?", help="device id, worker id (with --worker), reader name "
                                                              "(with --reader), or nothing with --broker")
        g = r.add_mutually_exclusive_group()
        g.add_argument("--worker", action="store_const", dest="kind", const="worker", default="device")
        g.add_argument("--reader", action="store_const", dest="kind", const="reader")
        g.add_argument("--broker", action="store_const", dest="kind", const="broker")
        if cmd == "revoke":
            r.add_argument("--reason", choices=REASONS, default="unspecified")
        else:
            r.add_argument("--days", type=int, default=None, help=f"lifetime (default {LEAF_DAYS})")
            r.add_argument("--broker-host", action="append", default=None, metavar="NAME",
                           help="with --broker: the new certificate's DNS names (repeat)")
            r.add_argument("--broker-ip", action="append", default=None, metavar="IP",
                           help="with --broker: the new certificate's IP addresses (repeat)")

    c = sub.add_parser("refresh-crl", help=f"re-sign the CRL (it expires {CRL_DAYS} days after each signing)")
    c.add_argument("--days", type=int, default=CRL_DAYS)
    sub.add_parser("list", help="the certificates issued: name, kind, serial, expiry, status")


def _deploy_hint(pki: FleetPki, issued: Issued, kind: str) -> str:
    folder = issued.cert.parent
    if kind == "broker":
        return (f"  broker: copy {folder}/{{cert.pem,key.pem}} to the broker (key 0600, owned by mosquitto), then "
                "systemctl reload mosquitto (SIGHUP reloads its certificate)")
    where = {"device": "/etc/edge-infer/tls/", "worker": "the worker's TLS directory",
             "reader": "the reading client (the Ansible controller for the health gate)"}[kind]
    return (f"  copy {folder}/{{cert.pem,key.pem,ca.pem}} to {where} (owned by the service user, key mode 0600); "
            f"then delete {issued.key} here if no one needs it again")


def _crl_hint(pki: FleetPki) -> str:
    return (f"  CRL: copy {pki.crl} to the broker's crlfile, then systemctl reload mosquitto (new connections are "
            "checked against it; restart it to also drop a revoked client connected now: deploy/pki/README.md)")


def run_pki(args: argparse.Namespace) -> int:
    pki = FleetPki(args.dir)
    cmd = args.pki_command
    if cmd == "init":
        hosts = args.broker_host if args.broker_host is not None else (["localhost"] if args.broker_ip is None else [])
        ips = args.broker_ip if args.broker_ip is not None else (["127.0.0.1"] if args.broker_host is None else [])
        pki.init(hosts, ips, days=args.ca_days, broker_days=args.days)
        broker = next(c for c in pki.certificates() if c["kind"] == "broker")
        print(f"fleet CA created in {pki.root} (until {json.loads(pki.index_path.read_text())['ca']['not_after']}); "
              f"broker certificate for {', '.join(hosts + ips)}, serial {broker['serial']}")
        print(f"  {pki.ca_key_path} is the fleet's master key: keep it on this machine, offline, backed up")
        print(f"  broker: copy {pki.root / BROKER_NAME}/{{cert.pem,key.pem,ca.pem}} and {pki.crl} to the broker")
    elif cmd in ("add-device", "add-worker", "add-reader"):
        kind = cmd[4:]
        add = {"device": pki.add_device, "worker": pki.add_worker, "reader": pki.add_reader}[kind]
        issued = add(args.name, args.days)
        print(f"{kind} {issued.cn}: serial {_hex(issued.serial)}, valid until {_iso(issued.not_after)}")
        print(_deploy_hint(pki, issued, kind))
    elif cmd in ("revoke", "rotate"):
        if args.name is None and args.kind != "broker":
            raise PkiError(f"{cmd} needs a NAME (a device id, a worker id with --worker, a reader name with "
                           "--reader), or --broker")
        name = args.name or BROKER_NAME
        if cmd == "revoke":
            pki.revoke(name, args.kind, reason=args.reason)
            print(f"{args.kind} {check_name(name, args.kind)} revoked; CRL {pki.crl} now lists "
                  f"{sum(c['status'] == 'revoked' for c in pki.certificates())} certificate(s)")
        else:
            if args.kind != "broker" and (args.broker_host or args.broker_ip):
                raise PkiError("--broker-host/--broker-ip go with rotate --broker")
            issued = pki.rotate(name, args.kind, days=args.days, broker_hosts=args.broker_host,
                                broker_ips=args.broker_ip)
            print(f"{args.kind} {issued.cn}: new serial {_hex(issued.serial)}, valid until {_iso(issued.not_after)};"
                  f" the previous certificate is revoked")
            print(_deploy_hint(pki, issued, args.kind))
        print(_crl_hint(pki))
    elif cmd == "refresh-crl":
        pki.refresh_crl(args.days)
        print(f"CRL {pki.crl} re-signed, next update {_iso(pki.crl_next_update())}")
        print(_crl_hint(pki))
    elif cmd == "list":
        rows = pki.certificates()
        table = [("NAME", "KIND", "SERIAL", "NOT_AFTER", "STATUS")]
        table += [(c["name"], c["kind"], c["serial"], c["not_after"], c["status"]) for c in rows]
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        for r in table:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        nxt = pki.crl_next_update()
        left = nxt - datetime.now(timezone.utc)
        print(f"CRL next update {_iso(nxt)}" + (" -- EXPIRED: run refresh-crl now, the broker refuses every client"
                                                if left.total_seconds() <= 0 else
                                                f" ({left.days} days left)"), file=sys.stderr)
    return 0
