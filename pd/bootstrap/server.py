"""The bootstrap registry server: ranks register, heartbeat a lease, and look each other up."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from pd.bootstrap.compat import mismatches, rank_label
from pd.rpc import PROTOCOL_VERSION
from pd.rpc import bootstrap_pb2 as pb
from pd.rpc import bootstrap_pb2_grpc as pb_grpc
from pd.rpc.auth import server_interceptors
from pd.rpc.tls import TLSConfig, bind

log = logging.getLogger(__name__)

MAX_DP_SIZE = 1024
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# RankInfo numbers: inclusive (min, max). dp_rank is checked against dp_size.
_INT_RANGES = {
    "max_context_len": (1, 1 << 24),
    "dp_size": (1, MAX_DP_SIZE),
    "kv_nbytes": (1, 1 << 48),
    "num_pages": (2, 1 << 32),
    "page_size": (1, 1 << 16),
    "page_nbytes_per_layer": (1, 1 << 32),
    "num_layers": (1, 1 << 12),
    "latent_dim": (1, 1 << 16),
    "aux_nbytes": (0, 1 << 40),
    "aux_slot_nbytes": (0, 1 << 32),
    "num_speculative_tokens": (0, 1 << 8),
}
# RankInfo strings: maximum length (all are required).
_STR_LENGTHS = {
    "instance_id": 128,
    "model_fingerprint": 64,
    "model_name": 256,
    "grpc_endpoint": 256,
    "transfer_session": 256,
    "transfer_protocol": 32,
    "kv_dtype": 32,
    "kv_order": 32,
    "incarnation": 64,
}
_SPECULATIVE_NAME_MAX = 32  # speculative_algorithm: optional ("" = off)
_LOAD_MAX = 1 << 40


def _instance_id_problems(instance_id: str) -> list[str]:
    max_len = _STR_LENGTHS["instance_id"]
    if _INSTANCE_ID.fullmatch(instance_id) and len(instance_id) <= max_len:
        return []
    return [
        f"instance_id {instance_id!r} must be 1-{max_len} characters of letters, digits, '.', '_', "
        "':', '-', starting with a letter or digit"
    ]


def _key_problems(instance_id: str, dp_rank: int) -> list[str]:
    problems = _instance_id_problems(instance_id)
    if not 0 <= dp_rank < MAX_DP_SIZE:
        problems.append(f"dp_rank must be in [0, {MAX_DP_SIZE}), got {dp_rank}")
    return problems


def _endpoint_problems(name: str, value: str) -> list[str]:
    host, _, port = value.rpartition(":")
    if host and port.isdigit() and 1 <= int(port) <= 65535:
        return []
    return [f"{name} must be 'host:port' with a port in [1, 65535], got {value!r}"]


def rank_info_problems(info: pb.RankInfo) -> list[str]:
    """Everything malformed in ``info`` (empty list if it is well formed)."""
    problems = []
    optional = ("transfer_session", "transfer_protocol") if info.role == pb.ROLE_COLOCATED else ()
    for name, max_len in _STR_LENGTHS.items():
        value = getattr(info, name)
        if (not value and name not in optional) or len(value) > max_len:
            problems.append(f"{name} must be 1-{max_len} characters, got {len(value)}")
    problems += _instance_id_problems(info.instance_id) if info.instance_id else []
    for name, (lo, hi) in _INT_RANGES.items():
        value = getattr(info, name)
        if not lo <= value <= hi:
            problems.append(f"{name} must be in [{lo}, {hi}], got {value}")
    if not 0 <= info.dp_rank < max(info.dp_size, 1):
        problems.append(f"dp_rank must be in [0, dp_size={info.dp_size}), got {info.dp_rank}")
    if info.role not in (pb.ROLE_PREFILL, pb.ROLE_DECODE, pb.ROLE_COLOCATED):
        problems.append(f"role must be ROLE_PREFILL, ROLE_DECODE or ROLE_COLOCATED, got {info.role}")
    if len(info.speculative_algorithm) > _SPECULATIVE_NAME_MAX:
        problems.append(f"speculative_algorithm must be at most {_SPECULATIVE_NAME_MAX} characters")
    elif bool(info.speculative_algorithm) != (info.num_speculative_tokens > 0):
        problems.append(
            f"speculative_algorithm {info.speculative_algorithm!r} and num_speculative_tokens "
            f"{info.num_speculative_tokens} disagree (both set, or neither)"
        )
    for name in ("grpc_endpoint", "transfer_session"):
        if getattr(info, name):  # an empty one is reported above
            problems += _endpoint_problems(name, getattr(info, name))
    if not problems:  # the ranges above keep these products small
        needed = info.num_layers * info.num_pages * info.page_nbytes_per_layer
        if info.kv_nbytes < needed:
            problems.append(
                f"kv_nbytes {info.kv_nbytes} is smaller than num_layers * num_pages * "
                f"page_nbytes_per_layer = {needed}"
            )
        if info.aux_slot_nbytes > info.aux_nbytes:
            problems.append(f"aux_slot_nbytes {info.aux_slot_nbytes} exceeds aux_nbytes {info.aux_nbytes}")
    return problems


def load_problems(load: pb.Load) -> list[str]:
    """Everything out of range in ``load`` (empty list if it is well formed)."""
    names = ("running_requests", "waiting_requests", "free_pages", "total_pages")
    return [
        f"load.{name} must be in [0, {_LOAD_MAX}], got {getattr(load, name)}"
        for name in names
        if not 0 <= getattr(load, name) <= _LOAD_MAX
    ]


class RegistryError(Exception):
    """A refused registry call: the gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _check(problems: list[str]) -> None:
    if problems:
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))


def _copy(message):
    """A copy of a protobuf message, so the registry never shares one with a caller."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


@dataclass
class _Rank:
    info: pb.RankInfo
    load: pb.Load
    deadline: float  # clock() time at which the lease expires


class Registry:
    """The registry's state and rules, without gRPC. Thread-safe.

    Ranks are keyed by ``(instance_id, dp_rank)``. Expired leases are dropped lazily at the start
    of every call, so there is no reaper thread. Every lease is ``lease_seconds`` from its last
    renewal, so keeping renewed ranks at the end keeps ``_ranks`` ordered by deadline and a purge
    looks only at the expired ones.
    """

    def __init__(self, lease_seconds: float, max_ranks: int, clock: Callable[[], float] = time.monotonic):
        self.server_id = secrets.token_hex(8)  # tells clients that a registry restarted (and is refilling)
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if max_ranks < 1:
            raise ValueError(f"max_ranks must be >= 1, got {max_ranks}")
        self.lease_seconds = lease_seconds
        self.max_ranks = max_ranks
        self._clock = clock
        self._lock = threading.Lock()
        self._ranks: OrderedDict[tuple[str, int], _Rank] = OrderedDict()

    def _purge(self) -> float:
        now = self._clock()
        while self._ranks:
            key, rank = next(iter(self._ranks.items()))
            if rank.deadline > now:
                break
            del self._ranks[key]
            log.info("lease expired: %s", rank_label(rank.info))
        return now

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._ranks)

    def register(self, info: pb.RankInfo, load: pb.Load) -> None:
        _check(rank_info_problems(info) + load_problems(load))
        key = (info.instance_id, info.dp_rank)
        with self._lock:
            now = self._purge()
            old = self._ranks.get(key)
            if old is None and len(self._ranks) >= self.max_ranks:
                raise RegistryError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"registry is full ({self.max_ranks} ranks)"
                )
            conflicts = self._conflicts(info, key)
            if conflicts:
                raise RegistryError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{rank_label(info)} is incompatible with the registered ranks: " + "; ".join(conflicts),
                )
            self._ranks[key] = _Rank(_copy(info), _copy(load), now + self.lease_seconds)
            self._ranks.move_to_end(key)
        if old is None:
            log.info("registered %s at %s", rank_label(info), info.grpc_endpoint)
        elif old.info.incarnation != info.incarnation:
            log.info(
                "%s restarted (incarnation %s replaces %s)",
                rank_label(info),
                info.incarnation,
                old.info.incarnation,
            )

    def _conflicts(self, info: pb.RankInfo, key: tuple[str, int]) -> list[str]:
        """Mismatches with the live ranks (other than ``key`` itself, which ``info`` replaces).

        Every live rank agrees with every other on the cluster fields (each was checked when it
        registered), so one peer, of the same instance if there is one, stands for all of them.
        """
        if info.protocol_version != PROTOCOL_VERSION:  # nothing else is comparable across versions
            return [
                f"protocol_version: {info.protocol_version} ({rank_label(info)}) "
                f"vs {PROTOCOL_VERSION} (bootstrap server)"
            ]
        others = [rank.info for k, rank in self._ranks.items() if k != key]
        same_instance = (peer for peer in others if peer.instance_id == info.instance_id)
        peer = next(same_instance, others[0] if others else None)
        return [] if peer is None else mismatches(info, peer)

    def heartbeat(self, instance_id: str, dp_rank: int, incarnation: str, load: pb.Load) -> None:
        _check(_key_problems(instance_id, dp_rank) + load_problems(load))
        with self._lock:
            now = self._purge()
            rank = self._ranks.get((instance_id, dp_rank))
            if rank is None:
                raise RegistryError(
                    grpc.StatusCode.NOT_FOUND,
                    f"rank {instance_id}/{dp_rank} is not registered (lease expired or bootstrap "
                    "server restarted); register again",
                )
            if rank.info.incarnation != incarnation:
                raise RegistryError(
                    grpc.StatusCode.NOT_FOUND,
                    f"rank {instance_id}/{dp_rank} incarnation {incarnation!r} was replaced by "
                    f"{rank.info.incarnation!r}",
                )
            rank.deadline = now + self.lease_seconds
            rank.load = _copy(load)
            self._ranks.move_to_end((instance_id, dp_rank))

    def list(self, role: int = pb.ROLE_UNSPECIFIED) -> list[pb.Instance]:
        """Live ranks of ``role`` (every role for ROLE_UNSPECIFIED), grouped by instance."""
        if role not in pb.Role.values():
            _check([f"role must be a Role value, got {role}"])
        with self._lock:
            self._purge()
            instances: dict[str, pb.Instance] = {}
            for (instance_id, _), rank in sorted(self._ranks.items()):
                if role not in (pb.ROLE_UNSPECIFIED, rank.info.role):
                    continue
                if instance_id not in instances:
                    instances[instance_id] = pb.Instance(
                        instance_id=instance_id, role=rank.info.role, dp_size=rank.info.dp_size
                    )
                instances[instance_id].ranks.append(pb.RankEntry(info=rank.info, load=rank.load))
            return list(instances.values())

    def lookup(self, instance_id: str, dp_rank: int) -> pb.RankEntry:
        _check(_key_problems(instance_id, dp_rank))
        with self._lock:
            self._purge()
            rank = self._ranks.get((instance_id, dp_rank))
            if rank is None:
                raise RegistryError(grpc.StatusCode.NOT_FOUND, f"no live rank {instance_id}/{dp_rank}")
            return pb.RankEntry(info=rank.info, load=rank.load)

    def deregister(self, instance_id: str, dp_rank: int, incarnation: str) -> bool:
        """Removes the rank if ``incarnation`` is the registered one; True if it was removed."""
        _check(_key_problems(instance_id, dp_rank))
        with self._lock:
            self._purge()
            rank = self._ranks.get((instance_id, dp_rank))
            if rank is None or rank.info.incarnation != incarnation:
                return False
            del self._ranks[(instance_id, dp_rank)]
        log.info("deregistered %s", rank_label(rank.info))
        return True


class _Servicer(pb_grpc.BootstrapServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    def _call(self, context: grpc.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RegistryError as e:
            context.abort(e.code, e.message)

    def Register(self, request, context):
        self._call(context, self.registry.register, request.info, request.load)
        return pb.RegisterResponse(lease_seconds=self.registry.lease_seconds)

    def Heartbeat(self, request, context):
        r = request
        self._call(context, self.registry.heartbeat, r.instance_id, r.dp_rank, r.incarnation, r.load)
        return pb.HeartbeatResponse(lease_seconds=self.registry.lease_seconds)

    def List(self, request, context):
        return pb.ListResponse(
            instances=self._call(context, self.registry.list, request.role),
            server_id=self.registry.server_id,
            lease_seconds=self.registry.lease_seconds,
        )

    def Lookup(self, request, context):
        rank = self._call(context, self.registry.lookup, request.instance_id, request.dp_rank)
        return pb.LookupResponse(rank=rank)

    def Deregister(self, request, context):
        r = request
        removed = self._call(context, self.registry.deregister, r.instance_id, r.dp_rank, r.incarnation)
        return pb.DeregisterResponse(removed=removed)

    def Health(self, request, context):
        return pb.HealthResponse(
            serving=True, protocol_version=PROTOCOL_VERSION, num_ranks=len(self.registry)
        )


@dataclass(frozen=True)
class BootstrapConfig:
    """How ``pd-bootstrap`` runs the registry (its flags take their defaults from here).

    ``port``: 0 picks a free one. ``lease_seconds``: a rank that sends no heartbeat for this long is
    dropped. ``max_ranks``: registrations beyond this many ranks are refused. ``cluster_token``: when
    set, every call must carry it (pd.rpc.auth).
    """

    host: str = "127.0.0.1"
    port: int = 8998
    lease_seconds: float = 5.0
    max_ranks: int = 4096
    cluster_token: str | None = None
    tls: TLSConfig | None = None  # mutual TLS on its port (pd.rpc.tls)
    max_workers: int = 8  # threads serving calls

    def __post_init__(self) -> None:
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {self.lease_seconds}")
        if self.max_ranks < 1:
            raise ValueError(f"max_ranks must be >= 1, got {self.max_ranks}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


class BootstrapServer:
    """The Bootstrap gRPC service on ``host:port`` (``port=0``: any free port, see ``.port``).

    ``cluster_token``: when set, every call must carry it (pd.rpc.auth). A sync thread-pool
    server, usable in-process (tests) and from ``pd-bootstrap`` (``from_config``).
    """

    def __init__(
        self,
        host: str = BootstrapConfig.host,
        port: int = 0,
        lease_seconds: float = BootstrapConfig.lease_seconds,
        cluster_token: str | None = None,
        max_ranks: int = BootstrapConfig.max_ranks,
        max_workers: int = BootstrapConfig.max_workers,
        tls: TLSConfig | None = None,
    ):
        self.host = host
        self.registry = Registry(lease_seconds, max_ranks)
        self._requested_port = port
        self._token = cluster_token
        self._tls = tls
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._port: int | None = None

    @classmethod
    def from_config(cls, cfg: BootstrapConfig) -> BootstrapServer:
        return cls(
            cfg.host, cfg.port, cfg.lease_seconds, cfg.cluster_token, cfg.max_ranks, cfg.max_workers, cfg.tls
        )

    @property
    def port(self) -> int:
        """The bound port (known after ``start()``)."""
        if self._port is None:
            raise RuntimeError("BootstrapServer.port is known only after start()")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> BootstrapServer:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="bootstrap"),
            interceptors=server_interceptors(self._token),
            # No SO_REUSEPORT: a second registry on the same port must fail, not share the port.
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1 << 20)],
        )
        pb_grpc.add_BootstrapServicer_to_server(_Servicer(self.registry), server)
        target = f"{self.host}:{self._requested_port}"
        try:
            port = bind(server, target, self._tls)
        except RuntimeError as e:  # recent grpcio raises instead of returning 0
            raise OSError(f"bootstrap server cannot bind {target}: {e}") from None
        if port == 0:
            raise OSError(f"bootstrap server cannot bind {target}")
        server.start()
        self._server, self._port = server, port
        log.info("bootstrap server listening on %s (lease %.3g s)", self.address, self.registry.lease_seconds)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stops serving; in-flight calls get ``grace`` seconds. Idempotent."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops or ``timeout`` passes; True if it stopped."""
        return self._server is None or self._server.wait_for_termination(timeout)

    def __enter__(self) -> BootstrapServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
