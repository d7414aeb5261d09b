"""What every launcher shares: logging, the common flags, flags whose defaults come from a config
dataclass, forwarding flags to child processes, children that end with their parent, and reserving a port
before a child may bind it.

Nothing here imports torch (``pd-bootstrap`` and ``pd-proxy`` need none); the engine and worker
flags are in ``pd.launch.engine_args`` and ``pd.launch.worker``.

A flag that sets a config field takes its default from the frozen config dataclass
(``add_field_arg``), so each default is written once, in the dataclass; the action remembers the
field as ``config_field`` (the tests check every such flag against its dataclass).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import signal
import socket
import sys
from typing import Any

from pd.rpc.auth import read_token_file
from pd.rpc.tls import TLSConfig

LOG_LEVELS = ("debug", "info", "warning", "error")
# --transfer-granularity, of pd-prefill and pd-serve alike
GRANULARITY_HELP = (
    "prefill: when a chunk's KV pages start moving; layer: each layer's as soon as the forward stored it "
    "(overlapping the transfer with the rest of the forward), chunk: all after the chunk's forward"
)


def end_with_parent(sig: signal.Signals) -> None:
    """In a child before exec (``preexec_fn``): the kernel sends it ``sig`` when its parent dies, however the
    parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing), so no child outlives its launcher."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1: PR_SET_PDEATHSIG


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (``default_factory`` called)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def add_field_arg(
    group: argparse._ActionsContainer, flag: str, cls: type, name: str, **kwargs: Any
) -> argparse.Action:
    """Adds ``flag`` with the default of ``cls.name``: a bool field becomes ``--flag/--no-flag``, an int
    or float field gets that ``type``; ``(default: ...)`` is appended to the help unless it says it."""
    default = field_default(cls, name)
    if isinstance(default, bool):
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    elif isinstance(default, (int, float)) and "action" not in kwargs:
        kwargs.setdefault("type", type(default))
    text = kwargs.get("help")
    if (
        text is not None
        and text is not argparse.SUPPRESS
        and "%(default)" not in text
        and default not in (None, "")
    ):
        kwargs["help"] = f"{text} (default: %(default)s)"
    action = group.add_argument(flag, default=default, **kwargs)
    action.config_field = (cls, name)  # type: ignore[attr-defined]
    return action


def add_common_args(p: argparse.ArgumentParser, config: type) -> None:
    """--host (its default from ``config.host``), --log-level, --cluster-token-file, --tls-*."""
    g = p.add_argument_group("common")
    add_field_arg(g, "--host", config, "host", help="address to bind (127.0.0.1: loopback only)")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default: %(default)s)")
    g.add_argument(
        "--cluster-token-file",
        help="file holding a shared secret that every gRPC call between pd processes must carry",
    )
    g.add_argument(
        "--tls-cert",
        help="this process's certificate (PEM): with --tls-key and --tls-ca, every gRPC port and channel "
        "uses mutual TLS (and pd-proxy serves HTTPS). Needs a subjectAltName for each address peers dial "
        "(e.g. IP:127.0.0.1) and both serverAuth and clientAuth usages",
    )
    g.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    g.add_argument("--tls-ca", help="CA bundle (PEM) that peers' certificates must be signed by")


def forwarded(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """Command-line flags repeating the values of ``actions`` that differ from their defaults."""
    flags = []
    for a in actions:
        value = getattr(args, a.dest)
        if value == a.default:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            flags.append(a.option_strings[0] if value else a.option_strings[1])
        else:
            flags += [a.option_strings[0], str(value)]
    return flags


def cluster_token(args: argparse.Namespace) -> str | None:
    return read_token_file(args.cluster_token_file) if args.cluster_token_file else None


def tls_config(args: argparse.Namespace) -> TLSConfig | None:
    """The --tls-* files as a TLSConfig, None without them; exits naming what is missing or wrong."""
    try:
        return TLSConfig.from_paths(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def tls_flags(args: argparse.Namespace) -> list[str]:
    """The --tls-* flags to hand a child process (empty without TLS)."""
    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    return [word for flag, path in given.items() if path for word in (flag, path)]


class PortInUse(OSError):
    """A port a launcher is about to use is taken; the message names it and what it was for."""


def reserve_port(host: str, port: int, purpose: str, share_with_grpc: bool = False) -> socket.socket:
    """Binds ``host:port`` for ``purpose`` (words for the error message) and returns the socket.

    The bind fails, with ``PortInUse``, when anything listens on the port or holds it bound, gRPC
    servers included (they bind with SO_REUSEPORT, so two of them would share a port silently and the
    kernel would split connections between them). SO_REUSEADDR is set for the bind only, so
    connections of an earlier process left in TIME_WAIT do not block a restart on the same port.

    ``share_with_grpc``: afterwards, mark the socket SO_REUSEPORT so that this user's own gRPC server
    can still bind the port while the caller holds the socket; another launcher's reservation still
    fails (its bind does not ask for SO_REUSEPORT). Without it the socket holds the port alone and can
    be handed to a child (e.g. uvicorn) to listen on.
    """
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        if share_with_grpc:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as e:
        s.close()
        raise PortInUse(f"port {port} on {host} ({purpose}) is not available: {e.strerror or e}") from None
    return s
