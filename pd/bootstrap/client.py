"""Client of the bootstrap registry: registers one rank, keeps its lease, looks peers up."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from pd.bootstrap.compat import rank_label
from pd.rpc import bootstrap_pb2 as pb
from pd.rpc import bootstrap_pb2_grpc as pb_grpc
from pd.rpc.auth import with_token
from pd.rpc.channel import RECONNECT_OPTIONS
from pd.rpc.tls import TLSConfig, open_channel

log = logging.getLogger(__name__)

T = TypeVar("T")
# Codes worth retrying: the server is down, restarting, or slow. Everything else is an answer.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class BootstrapError(Exception):
    """The registry refused a call, or stayed unreachable; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class IncompatibleRankError(BootstrapError):
    """Registration refused: the rank disagrees with the live ranks (the message names the fields)."""


def _error(e: grpc.RpcError) -> BootstrapError:
    code, details = e.code(), e.details() or ""
    cls = IncompatibleRankError if code == grpc.StatusCode.FAILED_PRECONDITION else BootstrapError
    return cls(code, details)


def new_incarnation() -> str:
    """A random id for one process start of one rank (16 hex digits)."""
    return secrets.token_hex(8)


class BootstrapClient:
    """Talks to the bootstrap server at ``target`` ("host:port"). Thread-safe.

    ``timeout``: deadline of each call, seconds. ``retry_for``: how long ``register``, ``list``,
    ``lookup`` and ``deregister`` keep retrying (exponential backoff from ``backoff_min`` up to
    ``backoff_max`` seconds) while the server is unreachable before raising BootstrapError. Any
    other refusal raises at once.
    """

    def __init__(
        self,
        target: str,
        cluster_token: str | None = None,
        timeout: float = 5.0,
        retry_for: float = 30.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        tls: TLSConfig | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self.retry_for = retry_for
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._channel = with_token(open_channel(target, tls, RECONNECT_OPTIONS), cluster_token)
        self._stub = pb_grpc.BootstrapStub(self._channel)
        # One client serves one rank process: this is that process start's incarnation.
        self.incarnation = new_incarnation()
        self._lock = threading.Lock()  # guards _info, _lease_seconds and the heartbeat thread
        self._info: pb.RankInfo | None = None
        self._lease_seconds: float | None = None
        self._stop = threading.Event()  # ends the heartbeat thread
        self._closed = threading.Event()  # ends retry loops
        self._thread: threading.Thread | None = None

    # -- calls -----------------------------------------------------------------------------

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried with capped exponential backoff while the server is unreachable."""
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff_min
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE:
                    raise _error(e) from None
                if time.monotonic() + delay > deadline or self._closed.wait(delay):
                    raise BootstrapError(
                        e.code(), f"{what}: bootstrap server {self.target} unreachable ({e.details()})"
                    ) from None
                delay = min(delay * 2, self.backoff_max)

    def register(self, info: pb.RankInfo, load: pb.Load | None = None) -> pb.RankInfo:
        """Registers this client's rank and remembers it (heartbeats re-register it when needed).

        An empty ``info.incarnation`` is filled with ``self.incarnation``. Returns the registered
        RankInfo (a copy). Raises IncompatibleRankError if the registry refuses the rank.
        """
        registered = pb.RankInfo()
        registered.CopyFrom(info)
        if not registered.incarnation:
            registered.incarnation = self.incarnation
        request = pb.RegisterRequest(info=registered, load=load or pb.Load())
        response = self._retrying("register", lambda: self._stub.Register(request, timeout=self.timeout))
        with self._lock:
            self._info, self._lease_seconds = registered, response.lease_seconds
        log.info("registered %s with %s", rank_label(registered), self.target)
        return registered

    @property
    def info(self) -> pb.RankInfo | None:
        """A copy of the registered RankInfo, or None before ``register``."""
        with self._lock:
            if self._info is None:
                return None
            info = pb.RankInfo()
            info.CopyFrom(self._info)
            return info

    def list(self, role: pb.Role = pb.ROLE_UNSPECIFIED) -> list[pb.Instance]:
        """Live instances (of ``role``, e.g. ``pb.ROLE_DECODE``; all by default), by instance id."""
        return list(self.list_response(role).instances)

    def list_response(self, role: pb.Role = pb.ROLE_UNSPECIFIED) -> pb.ListResponse:
        """The whole List answer: live instances, the server's id (new after a restart) and its lease."""
        request = pb.ListRequest(role=role)
        return self._retrying("list", lambda: self._stub.List(request, timeout=self.timeout))

    def lookup(self, instance_id: str, dp_rank: int) -> pb.RankEntry | None:
        """One live rank with its load hints, or None if it is not registered."""
        request = pb.LookupRequest(instance_id=instance_id, dp_rank=dp_rank)
        try:
            return self._retrying("lookup", lambda: self._stub.Lookup(request, timeout=self.timeout)).rank
        except BootstrapError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def health(self) -> pb.HealthResponse:
        """The server's health (one attempt, no retry)."""
        try:
            return self._stub.Health(pb.HealthRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def deregister(self, timeout: float = 1.0) -> bool:
        """Stops heartbeats and removes this client's rank; True if the server removed it.

        One attempt, bounded by ``timeout``: a process shutting down must not wait for a registry
        that is gone (the lease expires by itself).
        """
        self.stop_heartbeat()
        with self._lock:
            info, self._info = self._info, None
        if info is None:
            return False
        request = pb.DeregisterRequest(
            instance_id=info.instance_id, dp_rank=info.dp_rank, incarnation=info.incarnation
        )
        try:
            response = self._stub.Deregister(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        log.info("deregistered %s", rank_label(info))
        return response.removed

    # -- heartbeats ------------------------------------------------------------------------

    def heartbeat(self, load: pb.Load | None = None) -> None:
        """One heartbeat (no retry). Re-registers if the server does not know this rank (its
        lease expired, or the server restarted). Raises BootstrapError if that fails."""
        with self._lock:
            info = self._info
        if info is None:
            raise RuntimeError("heartbeat before register")
        load = load or pb.Load()
        request = pb.HeartbeatRequest(
            instance_id=info.instance_id, dp_rank=info.dp_rank, incarnation=info.incarnation, load=load
        )
        try:
            self._stub.Heartbeat(request, timeout=self.timeout)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise _error(e) from None
            log.warning("bootstrap server lost %s (%s); registering again", rank_label(info), e.details())
        try:
            self._stub.Register(pb.RegisterRequest(info=info, load=load), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def start_heartbeat(
        self, load_fn: Callable[[], pb.Load] | None = None, interval: float | None = None
    ) -> None:
        """Heartbeats every ``interval`` seconds (default: a third of the lease) on a daemon
        thread, reporting ``load_fn()``. Failures are logged and retried on the next beat."""
        with self._lock:
            if self._info is None:
                raise RuntimeError("start_heartbeat before register")
            if self._thread is not None:
                raise RuntimeError("heartbeat already running")
            assert self._lease_seconds is not None  # set with _info
            interval = interval if interval is not None else self._lease_seconds / 3
            if interval <= 0:
                raise ValueError(f"heartbeat interval must be positive, got {interval}")
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._beat, args=(load_fn, interval), name="bootstrap-heartbeat", daemon=True
            )
            self._thread.start()

    def _beat(self, load_fn: Callable[[], pb.Load] | None, interval: float) -> None:
        last_error = None
        while not self._stop.wait(interval):
            try:
                self.heartbeat(load_fn() if load_fn else None)
                if last_error is not None:
                    log.info("bootstrap server %s reachable again", self.target)
                last_error = None
            except Exception as e:
                # Log each new kind of failure once, not once per beat.
                if str(e) != last_error:
                    log.warning("heartbeat to %s failed: %s", self.target, e)
                last_error = str(e)

    def stop_heartbeat(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def close(self) -> None:
        """Stops heartbeats and closes the channel (does not deregister)."""
        self._closed.set()
        self.stop_heartbeat()
        self._channel.close()

    def __enter__(self) -> BootstrapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
