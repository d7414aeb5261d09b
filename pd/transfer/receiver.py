"""Decode side of the KV transfer: ``KVReceiver`` owns every room of one decode rank.

Flow of a room: the scheduler reserves destination pages and an aux slot and calls
``add_room``; the receiver sends the hand-shake to the prefill rank (retried briefly while that
rank is unreachable, within the BOOTSTRAPPING timeout), waits for ``TransferDone``, then reads
and checks the aux record (magic, checksum, room id, prompt length against the page count). With
``kv_checksum`` it then recomputes the checksums of the destination pages (on the pool's device,
in the gRPC thread of ``TransferDone``, outside the lock) and compares them with the ones
``TransferDone`` carried (``pd.transfer.checksum``): a mismatch, or no checksums, fails the room.

Threads: ``add_room`` and ``abort`` only change state and start non-blocking gRPC calls
(futures). gRPC handlers and call-completion callbacks run in gRPC's threads. A control thread
enforces timeouts, retries hand-shakes and runs ``on_final``.

Pages: the destination pages (``pool``) and the aux slot belong to the room from ``add_room``
until ``on_final(room, state, aux, reason)``, which runs exactly once per room, from the control thread.
Their bytes are valid only after ``on_final`` with DONE; after any ``on_final`` the scheduler may
reuse them. The one-sided writes
of the prefill rank cannot be revoked, so a room that ends here in FAILED or ABORTED is only
released once the prefill side cannot write into it any more:

- at once if no hand-shake was sent, or when the prefill side said so: ``TransferDone``,
  ``TransferFailed`` or ``Abort`` from it (it sends those only after its writes drained), or a
  reply ``drained=true`` to our ``Abort``;
- otherwise (prefill dead, hung or unreachable) after ``abort_grace_s``. A SIGSTOPped prefill
  could resume later and finish a write that was already inside its engine, so the pages cannot
  be reused at once. The prefill starts no write after the hand-shake's deadline (our remaining
  patience), and a write inside its engine fails within the engine's transfer timeout, so the
  grace period must exceed that timeout: it is a bound, not a proof (a process stopped for
  longer than the grace period in the middle of a native write is not covered; nothing on our
  side can revoke a one-sided write).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from pd.kv_cache import KVPool
from pd.rpc import transfer_pb2 as pb
from pd.rpc import transfer_pb2_grpc as pb_grpc
from pd.rpc.tls import TLSConfig
from pd.transfer.aux import AuxBuffer, AuxError, AuxRecord
from pd.transfer.checksum import ChecksumMismatch, PageChecksums
from pd.transfer.engine import TransferEngine
from pd.transfer.rpc import Channels, layout_to_proto, rpc_error
from pd.transfer.staging import HostStaging
from pd.transfer.state import RoomStateMachine, TransferState, TransferTimeouts, drain_queue

logger = logging.getLogger(__name__)

ReceiverFinal = Callable[[int, TransferState, "AuxRecord | None", str], None]
# (room, pool, destination pages): called after a room's writes and before its checksums are verified.
VerifyHook = Callable[[int, KVPool, tuple[int, ...]], None]

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(eq=False)
class _Room:
    machine: RoomStateMachine
    prefill: str  # the prefill rank's gRPC endpoint
    dst_pages: tuple[int, ...]  # every page of the prompt, the skipped ones first
    aux_slot: int
    skip_pages: int = 0  # leading pages decode holds already: the prefill rank does not write them
    call: grpc.Future | None = None  # the hand-shake in flight
    next_try: float = float("inf")  # when to retry the hand-shake
    attempted: bool = False  # a hand-shake may have reached the prefill rank
    peer_drained: bool = False  # the prefill side will not write into the room any more
    abort_sent: bool = False
    release_at: float = float("inf")  # grace deadline for a final room whose peer did not confirm
    aux: AuxRecord | None = None
    released: bool = False
    host_pages: tuple[int, ...] | None = None  # host staging pages the prefill rank writes into
    landing: bool = False  # staged pages are being copied to the device, or checksums verified

    @property
    def written(self) -> tuple[int, ...]:
        """The destination pages the prefill rank writes (those after the skipped ones)."""
        return self.dst_pages[self.skip_pages :]


class KVReceiver:
    """All rooms of one decode rank.

    ``pool`` and ``aux`` are registered with ``engine`` here. ``endpoint`` is this rank's gRPC
    endpoint serving ``DecodeTransfer`` (it may be set after the server started, before the first
    ``add_room``). ``on_final(room, state, aux, reason)`` gets the checked aux record when ``state`` is
    DONE, else None; it must be quick and thread-safe. ``rpc_timeout_s`` bounds each call to the
    prefill rank, ``retry_interval_s`` spaces hand-shake retries. ``cluster_token``: sent with every
    call to prefill ranks (their servers check it; ``pd.rpc.auth``).
    ``tls``: mutual TLS on those calls (``pd.rpc.tls``).

    ``kv_checksum``: verify the pages of every room against the sender's checksums before DONE.
    ``on_checksum_failure(room, reason)`` runs (quick, thread-safe: e.g. a counter) for each room that
    verification failed. ``before_verify``: a test hook (e.g. one that corrupts a page), else None.

    ``staging``: host staging (``pd.transfer.staging``): a room that fits is written into host pages, which
    are copied to its destination pages after ``TransferDone`` (before checksums are verified); else None.
    """

    def __init__(
        self,
        engine: TransferEngine,
        pool: KVPool,
        aux: AuxBuffer,
        on_final: ReceiverFinal,
        endpoint: str | None = None,
        timeouts: TransferTimeouts | None = None,
        rpc_timeout_s: float = 1.0,
        retry_interval_s: float = 0.2,
        tick_s: float = 0.05,
        cluster_token: str | None = None,
        tls: TLSConfig | None = None,
        kv_checksum: bool = False,
        on_checksum_failure: Callable[[int, str], None] | None = None,
        before_verify: VerifyHook | None = None,
        staging: HostStaging | None = None,
    ) -> None:
        self.engine, self.pool, self.aux, self.staging = engine, pool, aux, staging
        self._checksums = PageChecksums(pool) if kv_checksum else None
        self.on_checksum_failure, self.before_verify = on_checksum_failure, before_verify
        self.on_final, self.endpoint, self.timeouts = on_final, endpoint, timeouts or TransferTimeouts()
        self.rpc_timeout_s, self.retry_interval_s, self.tick_s = rpc_timeout_s, retry_interval_s, tick_s
        engine.register(pool.data_ptr, pool.nbytes)
        engine.register(aux.data_ptr, aux.nbytes)
        if staging is not None:
            engine.register(staging.pool.data_ptr, staging.pool.nbytes)
        self._lock = threading.RLock()  # RLock: a gRPC future may run its callback in the calling thread
        self._rooms: dict[int, _Room] = {}
        self._finals: queue.SimpleQueue = queue.SimpleQueue()
        self._channels = Channels(cluster_token, tls)
        self._stop = threading.Event()
        self._control = threading.Thread(target=self._control_loop, name="kv-receiver-control", daemon=True)
        self._control.start()

    # ---- scheduler API (never blocks on the network) ----

    def can_add(self, num_pages: int) -> bool:
        """Whether a room of ``num_pages`` can be added now: its host staging pages are free (or it is too
        big to be staged, and is written straight into the device pages)."""
        s = self.staging
        return s is None or num_pages > s.capacity or s.num_free >= num_pages

    def add_room(
        self, room: int, prefill_endpoint: str, dst_pages: Sequence[int], aux_slot: int, skip_pages: int = 0
    ) -> None:
        """Starts receiving ``room`` from the prefill rank at ``prefill_endpoint`` into ``dst_pages`` (token order,
        one per prompt page). ``skip_pages``: how many leading pages already hold the prompt's KV (decode's
        prefix cache): the prefill rank writes only the rest (at least the last page). Call ``can_add`` with the
        number of pages written first: with host staging this raises RuntimeError if its pages are not free."""
        if self.endpoint is None:
            raise RuntimeError("KVReceiver.endpoint must be set before add_room")
        pages = self.pool.layout.check_pages(dst_pages, f"room {room}: destination")
        self.aux.slot_offset(aux_slot)  # range check
        if not 0 <= skip_pages < len(pages):
            raise ValueError(
                f"room {room}: skip_pages {skip_pages} of {len(pages)} pages (the last is written)"
            )
        with self._lock:
            if room in self._rooms:
                raise ValueError(f"room {room} was already added")
            machine = RoomStateMachine(room, "decode", self.timeouts)
            r = _Room(machine, prefill_endpoint, pages, aux_slot, skip_pages)
            n = len(r.written)
            if self.staging is not None and n <= self.staging.capacity:
                host = self.staging.try_alloc(n)
                if host is None:
                    raise RuntimeError(f"room {room}: no {n} host staging pages free (see can_add)")
                r.host_pages = tuple(host)
            self._rooms[room] = r
            self._handshake(r)

    def abort(self, room: int, reason: str) -> None:
        """Ends ``room``; the prefill rank is told. Harmless if the room is unknown or final."""
        with self._lock:
            r = self._rooms.get(room)
            if r is not None and not r.machine.is_final:
                self._end(r, TransferState.ABORTED, reason)

    @property
    def num_rooms(self) -> int:
        """Rooms not released yet (in any state)."""
        with self._lock:
            return len(self._rooms)

    def state(self, room: int) -> TransferState | None:
        """The room's state, or None once it was released (or never known)."""
        with self._lock:
            r = self._rooms.get(room)
            return r.machine.state if r else None

    def add_to_server(self, server: grpc.Server) -> None:
        """Serves ``DecodeTransfer`` (TransferDone, TransferFailed, Abort) on ``server`` for this receiver."""
        pb_grpc.add_DecodeTransferServicer_to_server(_DecodeServicer(self), server)

    def close(self) -> None:
        """Stops the control thread; open rooms are abandoned (no on_final)."""
        self._stop.set()
        self._control.join(timeout=5.0)
        self._channels.close()

    # ---- state changes (lock held) ----

    def _handshake(self, r: _Room) -> None:
        now = time.monotonic()
        patience = max(0.0, r.machine.deadline - now) + self.timeouts.waiting_for_input_s
        pool = self.pool if r.host_pages is None or self.staging is None else self.staging.pool
        request = pb.HandshakeRequest(
            room=r.machine.room,
            session=self.engine.session_id,
            endpoint=self.endpoint,
            dst_pages=r.written if r.host_pages is None else r.host_pages,
            aux_slot=r.aux_slot,
            layout=layout_to_proto(pool.layout),
            kv_base=pool.data_ptr,
            aux_base=self.aux.data_ptr,
            deadline_ms=int(patience * 1000),
            skip_pages=r.skip_pages,
        )
        r.attempted, r.next_try = True, float("inf")
        call = self._channels.prefill(r.prefill).Handshake.future(request, timeout=self.rpc_timeout_s)
        r.call = call
        call.add_done_callback(lambda f: self._handshake_done(r, f))

    def _handshake_done(self, r: _Room, call: grpc.Future) -> None:
        if call.cancelled():  # only on close()
            return
        with self._lock:
            if r.call is call:
                r.call = None
            error = call.exception()
            if r.machine.is_final:
                self._settle(r)
            elif error is None:
                if r.machine.state is TransferState.BOOTSTRAPPING:
                    r.machine.to(TransferState.WAITING_FOR_INPUT)
            elif (
                error.code() in _RETRY_CODES and time.monotonic() + self.retry_interval_s < r.machine.deadline
            ):
                logger.info(
                    "decode room %d: hand-shake to %s: %s; retrying",
                    r.machine.room,
                    r.prefill,
                    rpc_error(error),
                )
                r.next_try = time.monotonic() + self.retry_interval_s
            else:
                self._end(r, TransferState.FAILED, f"hand-shake to {r.prefill} failed: {rpc_error(error)}")

    def _end(self, r: _Room, state: TransferState, reason: str = "") -> None:
        r.machine.to(state, reason)
        r.release_at = time.monotonic() + self.timeouts.abort_grace_s
        self._settle(r)

    def _settle(self, r: _Room) -> None:
        """Releases a final room once the prefill side cannot write into it; exactly once (``released``)."""
        if not r.machine.is_final or r.released or r.call is not None or r.landing:
            return
        now = time.monotonic()
        if r.attempted and not r.peer_drained and now < r.release_at:
            if not r.abort_sent:
                r.abort_sent = True
                request = pb.AbortRequest(
                    room=r.machine.room, reason=r.machine.reason or r.machine.state.value
                )
                call = self._channels.prefill(r.prefill).Abort.future(request, timeout=self.rpc_timeout_s)
                call.add_done_callback(lambda f: self._abort_done(r, f))
            return
        if r.attempted and not r.peer_drained:
            logger.warning(
                "decode room %d: prefill never confirmed; releasing after the grace period", r.machine.room
            )
        r.released = True
        del self._rooms[r.machine.room]
        if r.host_pages is not None:
            assert self.staging is not None
            self.staging.free(r.host_pages)
        self._finals.put((r.machine.room, r.machine.state, r.aux, r.machine.reason))

    def _abort_done(self, r: _Room, call: grpc.Future) -> None:
        if call.cancelled():
            return
        with self._lock:
            error = call.exception()
            if error is None and call.result().drained:
                r.peer_drained = True
            elif error is not None:
                logger.warning(
                    "decode room %d: abort to %s failed: %s", r.machine.room, r.prefill, rpc_error(error)
                )
            self._settle(r)

    # ---- notices from the prefill rank (gRPC threads) ----

    def _transfer_done(self, room: int, kv_checksums: bytes = b"") -> bool:
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                return False
            r.peer_drained = True
            if not r.machine.is_final:
                if r.machine.state is TransferState.BOOTSTRAPPING:  # the hand-shake reply is still on its way
                    r.machine.to(TransferState.WAITING_FOR_INPUT)
                r.machine.to(TransferState.TRANSFERRING)
                try:
                    record = self.aux.read(r.aux_slot, room)
                    if self.pool.layout.pages_for(record.prompt_len) != len(r.dst_pages):
                        raise AuxError(
                            f"prompt length {record.prompt_len} needs {self.pool.layout.pages_for(record.prompt_len)} "
                            f"pages, the room has {len(r.dst_pages)}"
                        )
                except AuxError as e:
                    self._end(r, TransferState.FAILED, f"bad aux record: {e}")
                    return True
                if self._checksums is None and r.host_pages is None:
                    r.aux = record
                    self._end(r, TransferState.DONE)
            self._settle(r)
            if r.machine.is_final:
                return True
            r.landing = True  # the room's pages stay its own until landed (an abort meanwhile waits)
        problem = self._land(r, kv_checksums)
        with self._lock:
            r.landing = False
            if not r.machine.is_final:
                if problem:
                    self._end(r, TransferState.FAILED, problem)
                    if self.on_checksum_failure is not None:
                        self.on_checksum_failure(room, problem)
                else:
                    r.aux = record
                    self._end(r, TransferState.DONE)
            self._settle(r)
        return True

    def _land(self, r: _Room, kv_checksums: bytes) -> str:
        """Copies a staged room to its device pages, then verifies its checksums (each if on); empty if the
        pages hold the room's KV, else why not. Outside the lock: ``landing`` keeps the room's pages."""
        if r.host_pages is not None:
            assert self.staging is not None
            try:
                self.staging.to_device(r.host_pages, r.written)
            except Exception as e:  # e.g. a CUDA error: the room fails, the receiver goes on
                logger.exception("decode room %d: copying the staged KV to the device failed", r.machine.room)
                return f"copying the staged KV to the device failed: {e!r}"
        return self._verify(r, kv_checksums) if self._checksums is not None else ""

    def _verify(self, r: _Room, kv_checksums: bytes) -> str:
        """Empty if the room's destination pages hold what the sender checksummed, else why not."""
        assert self._checksums is not None
        if not kv_checksums:
            return "prefill sent no KV checksums (--kv-checksum must be on for prefill and decode alike)"
        try:
            if self.before_verify is not None:
                self.before_verify(r.machine.room, self.pool, r.written)
            self._checksums.verify(r.written, kv_checksums)
        except ChecksumMismatch as e:
            return str(e)
        except Exception as e:  # e.g. a CUDA error: the room fails, the receiver goes on
            logger.exception("decode room %d: KV checksum verification crashed", r.machine.room)
            return f"KV checksum verification failed: {e!r}"
        return ""

    def _peer_ended(self, room: int, state: TransferState, reason: str) -> bool:
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                return False
            r.peer_drained = True
            if not r.machine.is_final:
                self._end(r, state, reason)
            self._settle(r)
            return True

    # ---- control thread ----

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            for room, state, record, reason in drain_queue(self._finals, self.tick_s):
                try:
                    self.on_final(room, state, record, reason)
                except Exception:
                    logger.exception("decode room %d: on_final raised", room)
            now = time.monotonic()
            with self._lock:
                for r in list(self._rooms.values()):
                    if r.machine.fail_if_expired():
                        r.release_at = now + self.timeouts.abort_grace_s
                    if r.machine.is_final:
                        self._settle(r)
                    elif r.call is None and r.next_try <= now:
                        self._handshake(r)


class _DecodeServicer(pb_grpc.DecodeTransferServicer):
    def __init__(self, receiver: KVReceiver) -> None:
        self._receiver = receiver

    def TransferDone(self, request: pb.TransferDoneRequest, context: grpc.ServicerContext) -> pb.NoticeReply:
        return pb.NoticeReply(known=self._receiver._transfer_done(request.room, request.kv_checksums))

    def TransferFailed(
        self, request: pb.TransferFailedRequest, context: grpc.ServicerContext
    ) -> pb.NoticeReply:
        known = self._receiver._peer_ended(
            request.room, TransferState.FAILED, f"prefill failed: {request.reason}"
        )
        return pb.NoticeReply(known=known)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        known = self._receiver._peer_ended(
            request.room, TransferState.ABORTED, f"aborted by prefill: {request.reason}"
        )
        return pb.AbortReply(known=known, drained=True)
