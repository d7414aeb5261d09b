"""Optional mutual TLS on every gRPC server port and channel between pd processes.

Each process has one set of PEM files: its certificate (chain), its private key, and the CA bundle that
signed its peers' certificates. A server presents its certificate and admits only clients whose
certificate the CA signed (``require_client_auth``); a client presents its certificate and checks the
server's against the CA and against the address it dials. So one certificate per process serves both
roles: it needs both extended key usages (serverAuth and clientAuth, or no EKU at all) and a
subjectAltName for every address peers dial it at (``IP:10.0.0.5`` for ``--host 10.0.0.5``, ``DNS:name``
for a name; 127.0.0.1 on one machine). No target-name override: the name checked is the one dialed.

``bind``, ``open_channel`` and ``open_aio_channel`` are the one place pd opens gRPC ports and channels:
secure with a ``TLSConfig``, plain (insecure) with None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# What each path must hold (checked when the config is made, so a wrong file fails at start, naming it).
_PEM_MARKERS = {
    "cert": "-----BEGIN CERTIFICATE-----",
    "key": "PRIVATE KEY-----",
    "ca": "-----BEGIN CERTIFICATE-----",
}
_FLAGS = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"}


@dataclass(frozen=True)
class TLSConfig:
    """Paths of this process's certificate, its private key and the CA bundle peers are checked
    against (PEM). Made with all three files present and in PEM format, else ValueError naming the path."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for name, marker in _PEM_MARKERS.items():
            path = getattr(self, name)
            try:
                text = Path(path).read_text(errors="replace")
            except OSError as e:
                raise ValueError(f"TLS {name} {path} ({_FLAGS[name]}): {e.strerror or e}") from None
            if marker not in text:
                raise ValueError(f"TLS {name} {path} ({_FLAGS[name]}) holds no PEM '{marker.strip('-')}'")

    @classmethod
    def from_paths(cls, cert: str | None, key: str | None, ca: str | None) -> TLSConfig | None:
        """None when no path is given; a config when all three are; else ValueError naming the missing."""
        given = {"cert": cert, "key": key, "ca": ca}
        if not any(given.values()):
            return None
        missing = [_FLAGS[name] for name, path in given.items() if not path]
        if missing:
            raise ValueError(
                f"TLS needs --tls-cert, --tls-key and --tls-ca together; missing: {', '.join(missing)}"
            )
        assert cert and key and ca
        return cls(cert, key, ca)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Presents the certificate; admits only clients with a certificate the CA signed."""
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Presents the certificate; trusts only servers with a certificate the CA signed."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def bind(server: grpc.Server | grpc.aio.Server, address: str, tls: TLSConfig | None) -> int:
    """Adds a listening port at ``address`` to ``server`` (sync or aio): mutual TLS with ``tls``, plain
    without. Returns the bound port (0 when it could not bind; recent grpcio raises RuntimeError)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def open_channel(target: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A sync channel to ``target`` ("host:port"): mutual TLS with ``tls``, plain without."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials(), options=list(options))


def open_aio_channel(
    target: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` ("host:port"): mutual TLS with ``tls``, plain without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(options))
