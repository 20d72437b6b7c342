"""A throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1, client certificates."""
from __future__ import annotations

import subprocess
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class ThrowawayPKI:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _run("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=edge-infer test CA",
             cwd=root)
        self.ca = root / "ca.pem"
        self.server_cert, self.server_key = self.issue("localhost", san="DNS:localhost,IP:127.0.0.1")

    def issue(self, cn: str, san: str | None = None) -> tuple[Path, Path]:
        _run("req", *EC, "-keyout", f"{cn}.key", "-out", f"{cn}.csr", "-subj", f"/CN={cn}", cwd=self.root)
        ext = self.root / f"{cn}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        _run("x509", "-req", "-in", f"{cn}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{cn}.pem", "-days", "2", "-extfile", str(ext), cwd=self.root)
        return self.root / f"{cn}.pem", self.root / f"{cn}.key"
