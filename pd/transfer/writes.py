"""The prefill side's writes to decode ranks: a room's KV pages, its aux record with ``TransferDone``, and the
notices of a failed or aborted room. No room state here: ``KVSender``'s writer threads call these, one room's
in order, and keep the bookkeeping."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from pd.kv_cache import TRANSFER_FIELDS, KVLayout, KVPool, transfer_pieces
from pd.rpc import transfer_pb2 as pb
from pd.transfer.aux import AUX_RECORD_NBYTES, AuxBuffer, AuxRecord, SlotAllocator
from pd.transfer.checksum import SUMS_PER_UNIT, PageChecksums
from pd.transfer.engine import TransferEngine, TransferError
from pd.transfer.layers import LayerReady, layer_groups
from pd.transfer.rpc import Channels, layout_from_proto, rpc_error
from pd.transfer.staging import HostStaging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """Where decode wants a room written (from its hand-shake)."""

    session: str
    endpoint: str
    dst_pages: tuple[int, ...]
    layout: KVLayout
    kv_base: int
    aux_addr: int
    write_deadline: float  # time.monotonic(); no write starts after it
    skip_pages: int = 0  # leading source pages not written (decode holds them); dst_pages follow them

    def same_target(self, other: Peer) -> bool:
        """The same destination (a repeated hand-shake), whatever its deadline."""
        return dataclasses.replace(other, write_deadline=self.write_deadline) == self


def peer_from_handshake(req: pb.HandshakeRequest, layout: KVLayout) -> Peer:
    """The destination a hand-shake names, checked against this rank's pool ``layout`` (the fields a
    transfer needs alike); raises ValueError for a hand-shake that cannot be served."""
    dst_layout = layout_from_proto(req.layout)
    for name in TRANSFER_FIELDS:
        if getattr(dst_layout, name) != getattr(layout, name):
            raise ValueError(
                f"decode KV layout {name} {getattr(dst_layout, name)} differs from prefill's {getattr(layout, name)}"
            )
    dst = dst_layout.check_pages(req.dst_pages, "destination")
    if not req.session or not req.endpoint:
        raise ValueError("hand-shake without a transfer session or gRPC endpoint")
    return Peer(
        session=req.session,
        endpoint=req.endpoint,
        dst_pages=dst,
        layout=dst_layout,
        kv_base=req.kv_base,
        aux_addr=req.aux_base + req.aux_slot * AUX_RECORD_NBYTES,
        write_deadline=time.monotonic() + req.deadline_ms / 1000,
        skip_pages=req.skip_pages,
    )


class PeerWrites:
    """Writes into decode ranks' registered memory through ``engine`` (which this registers ``pool`` and
    ``aux`` with) and their ``DecodeTransfer`` service through ``channels``. Thread-safe: several writer
    threads call it at once; ``aux`` holds one staging slot per final write in flight. With ``staging`` (host
    staging, ``pd.transfer.staging``) a job's pages are copied to pinned host pages first, in parts of at most
    the staging's capacity, and written from there."""

    def __init__(
        self,
        engine: TransferEngine,
        pool: KVPool,
        aux: AuxBuffer,
        channels: Channels,
        rpc_timeout_s: float,
        checksums: PageChecksums | None,
        staging: HostStaging | None = None,
    ) -> None:
        self.engine, self.pool, self.aux, self.channels = engine, pool, aux, channels
        self.rpc_timeout_s, self.checksums, self.staging = rpc_timeout_s, checksums, staging
        engine.register(pool.data_ptr, pool.nbytes)
        engine.register(aux.data_ptr, aux.nbytes)
        if staging is not None:
            engine.register(staging.pool.data_ptr, staging.pool.nbytes)
        self._slots = SlotAllocator(aux.num_slots)
        self._lock = threading.Lock()

    def pages(
        self,
        peer: Peer,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        ready_event: Any,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> np.ndarray | None:
        """Writes ``src_pages`` to ``dst_pages`` of ``peer`` once the forward that filled them has stored them;
        with checksums on, returns theirs (int64 ``[layers, pages, 3]``, each taken just before its write).

        ``ready_event``: a ``torch.cuda.Event`` recorded after that forward (waited for first), a
        ``LayerReady`` (each layer written as soon as it is stored, ``pd.transfer.layers``; ``cancelled()``
        true ends such a wait with ``TransferError``), or None (the bytes are there)."""
        layers = ready_event if isinstance(ready_event, LayerReady) else None
        if ready_event is not None and layers is None:
            ready_event.synchronize()
        num_layers = self.pool.layout.num_layers
        sums = None
        if self.checksums is not None:
            sums = np.zeros((num_layers, len(src_pages), SUMS_PER_UNIT), dtype=np.int64)
        staging = self.staging
        step = max(1, len(src_pages) if staging is None else staging.capacity)  # no pages: no write
        for i in range(0, len(src_pages), step):
            part, dst, host = src_pages[i : i + step], dst_pages[i : i + step], None
            try:
                if staging is not None:
                    host = staging.alloc(len(part), peer.write_deadline)
                    if host is None:
                        raise TransferError("no host staging pages came free before the write deadline")
                for span in layer_groups(layers, num_layers, peer.write_deadline, cancelled):
                    if self.checksums is not None and sums is not None:
                        sums[span.start : span.stop, i : i + len(part)] = self.checksums.compute(part, span)
                    if staging is None or host is None:  # host is None only without staging
                        self._write(peer, self.pool, part, dst, span)
                    else:
                        staging.to_host(part, host, span)
                        self._write(peer, staging.pool, host, dst, span)
            finally:
                if staging is not None and host is not None:
                    staging.free(host)
        return sums

    def _write(
        self, peer: Peer, pool: KVPool, src_pages: Sequence[int], dst_pages: Sequence[int], layers: range
    ) -> None:
        src_base, dst_base = pool.data_ptr, peer.kv_base
        pieces = [
            (src_base + s, dst_base + d, n)
            for s, d, n in transfer_pieces(pool.layout, peer.layout, src_pages, dst_pages, layers)
        ]
        self.engine.write(peer.session, pieces, deadline=peer.write_deadline)

    def finish(self, peer: Peer, room: int, record: AuxRecord, kv_checksums: bytes) -> None:
        """Writes the aux record (the first token), then tells decode with ``TransferDone``. Raises
        ``TransferError`` or ``grpc.RpcError``."""
        with self._lock:
            slot = self._slots.alloc()
        if slot is None:
            raise TransferError(f"no free aux staging slot (AuxBuffer has {self.aux.num_slots})")
        try:
            self.aux.write(slot, record)
            local = self.aux.data_ptr + self.aux.slot_offset(slot)
            self.engine.write(
                peer.session, [(local, peer.aux_addr, AUX_RECORD_NBYTES)], deadline=peer.write_deadline
            )
        finally:
            with self._lock:
                self._slots.free(slot)
        self.channels.decode(peer.endpoint).TransferDone(
            pb.TransferDoneRequest(room=room, kv_checksums=kv_checksums), timeout=self.rpc_timeout_s
        )

    def notice(self, peer: Peer, room: int, notice: str, reason: str) -> None:
        """Tells decode a room ``"abort"``-ed or ``"failed"`` here. Best effort, bounded by ``rpc_timeout_s``:
        decode falls back on its own timeouts."""
        stub = self.channels.decode(peer.endpoint)
        try:
            if notice == "abort":
                stub.Abort(pb.AbortRequest(room=room, reason=reason), timeout=self.rpc_timeout_s)
            else:
                stub.TransferFailed(
                    pb.TransferFailedRequest(room=room, reason=reason), timeout=self.rpc_timeout_s
                )
        except grpc.RpcError as e:
            logger.warning("prefill room %d: notice to %s failed: %s", room, peer.endpoint, rpc_error(e))
