"""Test certificates made with the ``openssl`` command: a CA and one certificate it signed (serverAuth and
clientAuth, subjectAltName IP:127.0.0.1 and DNS:localhost, so one file serves a process in both roles),
and an unrelated second CA with its own certificate, for peers that must be refused. EC P-256 keys,
valid for two days. No Python crypto package is needed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")
SAN = "IP:127.0.0.1,DNS:localhost"
DAYS = "2"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class CertSet:
    """One process's files: certificate, private key, and the CA that signed it (PEM paths)."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        """The launchers' flags for these files."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


@dataclass(frozen=True)
class Certs:
    good: CertSet  # signed by the deployment's CA
    other: CertSet  # signed by an unrelated CA (its ``ca`` is that other CA)


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert), "-days", DAYS, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path]) -> CertSet:
    cert, key, csr, ext = (d / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(
        f"subjectAltName={SAN}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("req", "-new", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-out", str(cert), "-days", DAYS, "-extfile", str(ext),
    )  # fmt: skip
    return CertSet(cert, key, ca[0])


def make_certs(d: Path) -> Certs:
    """Writes both CAs and their certificates under ``d``. Needs ``openssl`` (``OPENSSL`` is None without)."""
    return Certs(_leaf(d, "pd-node", _ca(d, "pd-test-ca")), _leaf(d, "stranger", _ca(d, "other-ca")))
