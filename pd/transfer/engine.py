"""A thin wrapper over Mooncake's transfer engine (``mooncake.engine.TransferEngine``).

P2PHANDSHAKE metadata mode: no metadata server; a peer is addressed by its session id
``"host:port"`` and the engines exchange segment descriptors on first contact.

What the wrapper sets up from ``TransferConfig`` (explicitly, before the engine is created,
because the native library reads these variables from the process environment):

- ``protocol="tcp"`` sets ``MC_FORCE_TCP=1``: without it the engine picks RDMA whenever it finds
  an HCA, whatever protocol was asked for.
- ``protocol="nvlink"`` sets ``MC_INTRANODE_NVLINK=1`` and passes ``"nvlink_intra"``: the CUDA
  builds only take the intra-node NVLink path with that variable (gpu/NOTES.md); without it they
  log "Using TCP transport" and move 1.6-2 GB/s.
- ``transfer_timeout_s`` bounds a call to a dead or hung peer: ``MC_TCP_PROGRESS_TIMEOUT_SEC``
  (sliding deadline for payload progress), ``MC_TCP_STATUS_TIMEOUT_SEC`` (deadline for the
  peer's status frame) and ``MC_HANDSHAKE_CONNECT_TIMEOUT`` get ``ceil(transfer_timeout_s)``
  (whole seconds); ``MC_TRANSFER_TIMEOUT`` (whole seconds, default 30) gets the same but the
  Python binding clamps it to at least 5 s, and allows ``nbytes / 1 GiB/s`` on top. Measured on
  the CPU build with 2 s: a SIGSTOPped peer fails a write in 2.0 s, a killed one at once.
  Not covered by any variable: the first contact with a peer (segment descriptor exchange) has a
  hard-coded 60 s read timeout in the library, so a peer that hangs before the first write to it
  holds that call for up to 60 s. Callers bound their own states (``pd.transfer.state``) and
  treat a late return as a failure.

Which transport is really in use cannot be read back through the Python API. The wrapper
captures the native log output of ``initialize`` (file descriptor 2, passed through unchanged)
and looks for the lines the engine prints when it installs a transport ("Using Intra-Node NVLink
transport", "installTransport, type=rdma", "TcpTransport: listen on port", ...). A build without
NVLink support is also visible as ``mooncake.engine.SUPPORT_INTRA_NVLINK``. When the transport
in use is not the one asked for, the wrapper logs a loud warning, or raises with
``require_protocol=True``. (``get_local_topology()`` lists the RDMA devices, but it starts a
second engine with its own listening ports to do so; it is not used.)

Both listening ports of the engine (handshake and TCP data) bind all interfaces whatever
``hostname`` says; ``MC_TCP_BIND_ADDRESS`` does not change that in P2PHANDSHAKE mode.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma", "nvlink")

# The native library's log lines that tell which transport it installed, most specific first.
_TRANSPORT_LINES: tuple[tuple[str, str], ...] = (
    ("nvlink", r"Using Intra-Node NVLink transport"),
    ("mnnvl", r"Using cross-node NVLink transport"),
    ("rdma", r"installTransport, type=rdma\b|Using RDMA transport \(|RdmaTransport: using"),
    ("tcp", r"MC_FORCE_TCP is set|Using TCP transport \(|TcpTransport: listen on port"),
)


STAGING_MODES = ("auto", "on", "off")  # TransferConfig.host_staging
GRANULARITIES = ("chunk", "layer")  # TransferConfig.granularity


class TransferError(RuntimeError):
    """A transfer-engine call failed (peer dead, hung, unreachable, or a bad address)."""


@dataclass(frozen=True)
class TransferConfig:
    """How this process's transfer engine is set up.

    ``hostname``: the address peers use to reach this engine (part of ``session_id``).
    ``protocol``: ``"tcp"``, ``"rdma"`` or ``"nvlink"`` (Mooncake's intra-node NVLink path).
    ``device_names``: comma-separated RDMA devices to use, empty for all.
    ``transfer_timeout_s``: bound on one call to a dead or hung peer (see the module docstring).
    ``max_batch_pieces``: pieces per native batch; the TCP transport rejects more than its
    per-peer queue (``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER``, default 1024) at once.
    ``require_protocol``: raise at start-up instead of warning when the engine falls back to
    another transport than ``protocol``.
    ``writers_per_peer``: rooms a prefill rank writes to one decode rank at once (each room's writes and
    notices stay in order on one writer thread; rooms are spread over the writers by id).
    ``host_staging``: ``auto`` (on when the transport is TCP and the pool on a GPU), ``on`` or ``off``: copy
    KV pages between the GPU and pinned host memory in bulk and let the engine move host memory only
    (``pd.transfer.staging`` says why); ``staging_mb``: the pinned host memory each rank stages through.
    ``kv_checksum``: the KV sender checksums every page it writes and the receiver verifies them
    before a room is DONE (``pd.transfer.checksum``); prefill and decode must agree (the registry
    refuses a pair that does not).
    ``granularity`` (prefill ranks): ``chunk`` ships a chunk's pages once its forward completed; ``layer``
    ships each layer's pages of a chunk as soon as the forward stored that layer, overlapping the transfer
    with the rest of the forward (``pd.transfer.layers``), direct and host-staged alike.
    """

    hostname: str = "127.0.0.1"
    protocol: str = "tcp"
    device_names: str = ""
    transfer_timeout_s: float = 5.0
    max_batch_pieces: int = 512
    require_protocol: bool = False
    kv_checksum: bool = False
    writers_per_peer: int = 1
    host_staging: str = "auto"
    staging_mb: int = 1024
    granularity: str = "chunk"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"TransferConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.host_staging not in STAGING_MODES:
            raise ValueError(
                f"TransferConfig.host_staging must be one of {STAGING_MODES}, got {self.host_staging!r}"
            )
        if self.staging_mb < 1:
            raise ValueError(f"TransferConfig.staging_mb must be >= 1, got {self.staging_mb}")
        if self.writers_per_peer < 1:
            raise ValueError(f"TransferConfig.writers_per_peer must be >= 1, got {self.writers_per_peer}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"TransferConfig.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.transfer_timeout_s > 0:
            raise ValueError(
                f"TransferConfig.transfer_timeout_s must be positive, got {self.transfer_timeout_s}"
            )
        if not 0 < self.max_batch_pieces <= 1024:
            raise ValueError(
                f"TransferConfig.max_batch_pieces must be in [1, 1024], got {self.max_batch_pieces}"
            )

    @property
    def mooncake_protocol(self) -> str:
        """The protocol string handed to ``TransferEngine.initialize``."""
        return "nvlink_intra" if self.protocol == "nvlink" else self.protocol

    @property
    def environment(self) -> dict[str, str | None]:
        """The ``MC_*`` variables this config sets (None: removed) before the engine is created."""
        secs = str(max(1, math.ceil(self.transfer_timeout_s)))
        return {
            "MC_FORCE_TCP": "1" if self.protocol == "tcp" else None,
            "MC_INTRANODE_NVLINK": "1" if self.protocol == "nvlink" else None,
            "MC_TRANSFER_TIMEOUT": secs,
            "MC_TCP_PROGRESS_TIMEOUT_SEC": secs,
            "MC_TCP_STATUS_TIMEOUT_SEC": secs,
            "MC_HANDSHAKE_CONNECT_TIMEOUT": secs,
        }


def detect_transport(native_log: str) -> str | None:
    """The transport the engine's start-up log says it installed: tcp, rdma, nvlink, mnnvl, or None."""
    for name, pattern in _TRANSPORT_LINES:
        if re.search(pattern, native_log):
            return name
    return None


def _with_captured_stderr(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Runs ``fn`` with file descriptor 2 redirected to a temporary file; returns its result and the text.

    The native library logs straight to fd 2. The text is written back to the real stderr, so
    nothing is lost. Only used around ``initialize`` (start-up, before other threads log).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    sys.stderr.write(text)
    sys.stderr.flush()
    return result, text


class TransferEngine:
    """One Mooncake engine per process, in P2PHANDSHAKE mode.

    Memory: ``register`` each long-lived region once (the KV pool, the aux buffer); pieces of a
    ``write`` must lie in regions registered here (source) and at the peer (destination).
    Threads: ``write`` may be called from several threads at once (the native calls release the
    GIL); each call blocks its thread until the pieces are written or failed.
    """

    def __init__(self, config: TransferConfig) -> None:
        try:
            from mooncake import engine as mc
        except ImportError as e:  # the package imports cleanly without mooncake; using it does not
            raise ImportError(
                "the Mooncake transfer engine is not installed: pip install 'pd[cpu]' "
                "(mooncake-transfer-engine-non-cuda) or 'pd[cuda]' (mooncake-transfer-engine-cuda13)"
            ) from e
        self.config = config
        if config.protocol == "nvlink" and not getattr(mc, "SUPPORT_INTRA_NVLINK", False):
            self._mismatch(
                "this Mooncake build has no intra-node NVLink support (SUPPORT_INTRA_NVLINK is false)"
            )
        for name, value in config.environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._engine = mc.TransferEngine()
        ret, native_log = _with_captured_stderr(
            lambda: self._engine.initialize(
                config.hostname, "P2PHANDSHAKE", config.mooncake_protocol, config.device_names
            )
        )
        if ret != 0:
            raise TransferError(
                f"TransferEngine.initialize({config.hostname!r}, P2PHANDSHAKE, {config.mooncake_protocol!r}) "
                f"returned {ret}"
            )
        self.session_id = f"{config.hostname}:{self._engine.get_rpc_port()}"
        self.transport = detect_transport(native_log)
        if self.transport != config.protocol:
            self._mismatch(
                f"asked for protocol {config.protocol!r} but the engine installed "
                f"{self.transport or 'an unrecognised transport'}"
            )
        logger.info(
            "transfer engine %s: transport %s (asked %s)", self.session_id, self.transport, config.protocol
        )
        self._regions: list[tuple[int, int]] = []

    def _mismatch(self, message: str) -> None:
        if self.config.require_protocol:
            raise TransferError(message + " (require_protocol=True)")
        logger.warning("!!! %s: transfers will run over the fallback, at its speed !!!", message)

    def register(self, ptr: int, nbytes: int) -> None:
        """Registers ``[ptr, ptr + nbytes)`` for transfers; registering the same region again is a no-op."""
        if nbytes <= 0:
            raise ValueError(f"cannot register {nbytes} bytes at {ptr:#x}")
        if (ptr, nbytes) in self._regions:
            return
        for start, size in self._regions:
            if ptr < start + size and start < ptr + nbytes:
                raise ValueError(
                    f"region [{ptr:#x}, +{nbytes}) overlaps the registered region [{start:#x}, +{size})"
                )
        ret = self._engine.register_memory(ptr, nbytes)
        if ret != 0:
            raise TransferError(f"register_memory({ptr:#x}, {nbytes}) returned {ret}")
        self._regions.append((ptr, nbytes))

    def write(
        self,
        peer_session: str,
        pieces: Sequence[tuple[int, int, int]],
        deadline: float | None = None,
    ) -> None:
        """Writes ``(local_addr, remote_addr, nbytes)`` pieces to ``peer_session``; raises ``TransferError``.

        Addresses are raw pointers (host or device memory) inside regions registered here
        (source) and at the peer (destination); the source bytes must stay valid and unchanged
        until the call returns. Pieces go in native batches of at most ``max_batch_pieces``; each
        batch blocks until it is written or failed. ``deadline`` (``time.monotonic()`` seconds):
        no batch starts after it. Returns only when no piece of this call is still in flight.
        """
        step = self.config.max_batch_pieces
        for i in range(0, len(pieces), step):
            if deadline is not None and time.monotonic() >= deadline:
                raise TransferError(
                    f"write to {peer_session}: deadline passed after {i} of {len(pieces)} pieces"
                )
            batch = pieces[i : i + step]
            src, dst, lengths = (list(column) for column in zip(*batch))
            ret = self._engine.batch_transfer_sync_write(peer_session, src, dst, lengths)
            if ret != 0:
                raise TransferError(
                    f"write of {len(batch)} pieces ({sum(lengths)} bytes) to {peer_session} failed "
                    f"(engine returned {ret}; peer dead, hung, or address not registered there)"
                )

    def close(self) -> None:
        """Unregisters the regions and drops the native engine (its destructor closes the ports)."""
        for ptr, _ in self._regions:
            self._engine.unregister_memory(ptr)
        self._regions.clear()
        self._engine = None
