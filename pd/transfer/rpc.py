"""gRPC plumbing of the transfer hand-shake: one place that builds servers, client channels,
and the KVLayout <-> protobuf conversion.

Servers are plain synchronous ``grpc.server``s; ``start_server`` takes ``interceptors`` so a
cluster-token check can be added in one place. Clients use short per-call deadlines.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
import torch

from pd.kv_cache import KVLayout, KVOrder
from pd.rpc import transfer_pb2 as pb
from pd.rpc import transfer_pb2_grpc as pb_grpc
from pd.rpc.auth import with_token
from pd.rpc.channel import RECONNECT_OPTIONS
from pd.rpc.tls import TLSConfig, bind, open_channel


def start_server(
    add_services: Sequence[Callable[[grpc.Server], None]],
    address: str = "127.0.0.1:0",
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_workers: int = 8,
    tls: TLSConfig | None = None,
) -> tuple[grpc.Server, int]:
    """Starts a gRPC server with the given services (e.g. ``KVSender.add_to_server``); returns it and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=list(interceptors))
    for add in add_services:
        add(server)
    port = bind(server, address, tls)
    if port == 0:
        raise RuntimeError(f"cannot bind a gRPC server to {address}")
    server.start()
    return server, port


class Channels:
    """Client channels by endpoint, opened on first use and kept; thread-safe. Every call carries
    ``cluster_token`` when one is set (``pd.rpc.auth``); a restarted peer is reconnected quickly."""

    def __init__(self, cluster_token: str | None = None, tls: TLSConfig | None = None) -> None:
        self._token = cluster_token
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                raw = open_channel(endpoint, self._tls, RECONNECT_OPTIONS)
                channel = self._channels[endpoint] = with_token(raw, self._token)
            return channel

    def prefill(self, endpoint: str) -> pb_grpc.PrefillTransferStub:
        return pb_grpc.PrefillTransferStub(self.get(endpoint))

    def decode(self, endpoint: str) -> pb_grpc.DecodeTransferStub:
        return pb_grpc.DecodeTransferStub(self.get(endpoint))

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


def layout_to_proto(layout: KVLayout) -> pb.KVLayoutSpec:
    return pb.KVLayoutSpec(
        num_layers=layout.num_layers,
        num_pages=layout.num_pages,
        page_size=layout.page_size,
        latent_dim=layout.latent_dim,
        dtype=str(layout.dtype).removeprefix("torch."),
        order=layout.order.value,
    )


def layout_from_proto(spec: pb.KVLayoutSpec) -> KVLayout:
    """Parses a peer's layout; raises ValueError naming the bad field (never evaluates peer input)."""
    dtype = getattr(torch, spec.dtype, None) if spec.dtype.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"KV layout dtype {spec.dtype!r} is not a torch dtype")
    try:
        order = KVOrder(spec.order)
    except ValueError:
        raise ValueError(
            f"KV layout order {spec.order!r} is not one of {[o.value for o in KVOrder]}"
        ) from None
    return KVLayout(
        num_layers=spec.num_layers,
        num_pages=spec.num_pages,
        page_size=spec.page_size,
        latent_dim=spec.latent_dim,
        dtype=dtype,
        order=order,
    )


def rpc_error(e: grpc.RpcError) -> str:
    """A one-line description of a failed call."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'RPC error'}: {details}"
