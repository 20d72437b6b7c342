"""The client certificate's identity must be the configured one.

With mutual TLS the broker takes the MQTT username (and the client id) from
the certificate's CN (``use_identity_as_username``, ``use_username_as_clientid``),
and its ACL grants topics to that name: a device may publish only under its
own id. A device whose ``device_id`` differs from its certificate's CN would
connect, publish under ``device_id``'s topics and have every message refused;
so both programs check at start and refuse to run (exit 2: the operator must
install the right certificate or fix the id).

The CN is read with ``cryptography`` where it is installed (the PKI tool's
dependency, not the device's) and with the standard library's ``ssl``
otherwise.
"""
from __future__ import annotations

from pathlib import Path

from .errors import EdgeInferError

WORKER_CN_PREFIX = "worker:"


class IdentityError(EdgeInferError):
    """The client certificate cannot be read, or its CN is not this client's configured identity."""

    exit_code = 2


def _cns_cryptography(pem: bytes) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    cert = x509.load_pem_x509_certificate(pem)
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _cns_ssl(path: Path) -> list[str]:
    import ssl
    decoded = ssl._ssl._test_decode_cert(str(path))   # CPython's own PEM decoder (private, no other in the stdlib)
    return [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]


def certificate_cns(cert_file: str | Path) -> list[str]:
    """The subject CNs of the first certificate in a PEM file, in order."""
    path = Path(cert_file)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read the client certificate {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise IdentityError(f"{path} is not a PEM certificate (no BEGIN CERTIFICATE line)")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        reader = _cns_ssl
        arg: object = path
    else:
        reader = _cns_cryptography
        arg = pem[pem.index(b"-----BEGIN CERTIFICATE-----"):]
    try:
        return reader(arg)
    except Exception as exc:   # a damaged file: cryptography raises ValueError, ssl raises SSLError
        raise IdentityError(f"cannot decode the client certificate {path}: {exc}") from None


def check_certificate_identity(cert_file: str | Path, expected_cn: str, *, setting: str = "device_id") -> str:
    """Return the certificate's CN when it is ``expected_cn``; raise IdentityError (exit 2) otherwise.

    ``setting`` names the configuration key the operator would change.
    """
    cns = certificate_cns(cert_file)
    if not cns:
        raise IdentityError(f"the client certificate {cert_file} has no CN; the broker takes the client's "
                            f"identity from it: issue one with CN {expected_cn!r}")
    if len(cns) > 1:
        raise IdentityError(f"the client certificate {cert_file} has {len(cns)} CNs ({', '.join(map(repr, cns))}); "
                            f"the broker would use the first only: issue one with the single CN {expected_cn!r}")
    if cns[0] != expected_cn:
        raise IdentityError(
            f"the client certificate {cert_file} is for {cns[0]!r}, but {setting} makes this client "
            f"{expected_cn!r}: the broker names a client by its certificate's CN, so its ACL would refuse this "
            f"client's topics. Install this client's own certificate (edge-infer pki) or fix {setting}")
    return cns[0]


def check_tls_identity(tls, expected_cn: str, *, setting: str = "device_id") -> str | None:
    """``check_certificate_identity`` for an ``mqtt.tls`` table (a TlsConfig or None): nothing to check
    without a client certificate. Returns the CN checked, or None."""
    cert_file = getattr(tls, "cert_file", None) if tls is not None else None
    if cert_file is None:
        return None
    return check_certificate_identity(cert_file, expected_cn, setting=setting)


def worker_cn(worker_id: str) -> str:
    """A cloud worker's certificate CN."""
    return WORKER_CN_PREFIX + worker_id
