"""Networking for tests: a TCP port nothing listens on (yet)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default first ephemeral port


def ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (and to ``bind(0)``)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago, drawn below the kernel's ephemeral range: the ports
    the OS picks for outgoing connections (gRPC channels, Mooncake's TCP transport, HTTP clients) never land
    there, so a server a test restarts on its old port finds it free. Falls back to a port the OS picks."""
    low = ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(max(1024, low // 2), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
