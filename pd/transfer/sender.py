"""Prefill side of the KV transfer: ``KVSender`` owns every room of one prefill rank.

Flow of a room (DESIGN.md §2): the scheduler calls ``add_room`` when the request arrives; the
decode rank's ``Handshake`` says where to write (either may come first; a hand-shake whose
request never arrives expires in BOOTSTRAPPING). After each prefill chunk the scheduler calls
``send`` with the pages that chunk completed; on the last chunk also the remaining pages
(including a partial last page) and the aux record; with layer granularity it hands a chunk's pages over
before the forward, with a ``LayerReady``, and each layer is written as it is stored (``pd.transfer.layers``).
Writes merge page runs that are contiguous on both sides (``pd.kv_cache.transfer_pieces``). After the last
pages the aux record is written, then ``TransferDone`` tells the decode rank. With ``kv_checksum`` the
writer thread checksums each job's pages just before writing them (``pd.transfer.checksum``) and
``TransferDone`` carries the room's checksums.

Threads: the scheduler's calls only validate and enqueue; they never block on the network. Writer
threads per decode peer do that peer's writes and notices (``pd.transfer.writes``), each room's in order
on one of them, so a dead or hung peer holds up only its own rooms. A control thread enforces the state
timeouts and runs ``on_final``. gRPC handlers run in the server's threads.

Pages: ``on_final(room, state, reason)`` runs exactly once per room passed to ``add_room``, from the
control thread, once the room is final AND no write of it is in flight; only then may the scheduler free the room's
source pages. A write already inside the engine when the room failed is waited for (it returns
within the engine's own bounds, see ``pd.transfer.engine``); queued writes of a final room are
dropped. When a room fails or is aborted here after the hand-shake, the decode rank is told
(``TransferFailed`` / ``Abort``) only after those writes drained, so it may reuse its pages at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from pd.kv_cache import KVPool
from pd.rpc import transfer_pb2 as pb
from pd.rpc import transfer_pb2_grpc as pb_grpc
from pd.rpc.tls import TLSConfig
from pd.transfer.aux import AuxBuffer, AuxRecord
from pd.transfer.checksum import PageChecksums, pack
from pd.transfer.engine import TransferEngine, TransferError
from pd.transfer.rpc import Channels, rpc_error
from pd.transfer.staging import HostStaging
from pd.transfer.state import RoomStateMachine, TransferState, TransferTimeouts, drain_queue
from pd.transfer.writes import Peer, PeerWrites, peer_from_handshake

logger = logging.getLogger(__name__)

SenderFinal = Callable[[int, TransferState, str], None]


@dataclass(eq=False)
class _Room:
    machine: RoomStateMachine
    src_pages: tuple[int, ...] | None = None
    index: dict[int, int] = field(default_factory=dict)  # source page id -> position
    peer: Peer | None = None
    sent: set[int] = field(default_factory=set)  # source pages handed to send()
    ready: list[int] = field(default_factory=list)  # positions computed but not yet queued
    last: bool = False
    aux: AuxRecord | None = None
    event: Any = None  # the latest ready_event
    inflight: int = 0  # queued or running writes
    done_queued: bool = False
    notice: str = ""  # "failed" or "abort": tell decode once drained
    released: bool = False
    sums: np.ndarray | None = None  # kv_checksum: int64 [layers, pages, 3] of the pages written so far


@dataclass(frozen=True)
class _Job:
    room: int
    kind: str  # "kv": pages; "done": aux record + TransferDone; "notice": TransferFailed/Abort
    peer: Peer
    src_pages: tuple[int, ...] = ()
    dst_pages: tuple[int, ...] = ()
    event: Any = None
    notice: str = ""  # for "notice" jobs: "failed" or "abort"
    reason: str = ""


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class KVSender:
    """All rooms of one prefill rank.

    ``pool`` and ``aux`` are registered with ``engine`` here. ``aux`` is the staging area of the aux records
    (one slot per concurrent final write, i.e. per decode peer at most). ``on_final(room, state, reason)``
    (reason: why a room failed or was aborted, else empty) must be quick and thread-safe (e.g. a queue put).
    ``rpc_timeout_s`` bounds each notice to decode; ``abort_wait_s`` bounds how long an ``Abort`` from decode
    waits for the room's in-flight writes before answering. ``cluster_token``: sent with every call to
    decode ranks (``pd.rpc.auth``); ``tls``: mutual TLS on those calls (``pd.rpc.tls``). A writer thread ends
    after ``writer_idle_s`` without work (a new one starts when needed). ``kv_checksum``: checksum every page
    written and send the checksums with ``TransferDone``. ``writers_per_peer``: writer threads per decode
    peer (rooms spread over them by id, each room's writes and notices in order on one). ``staging``: host
    staging the writes go through (``pd.transfer.staging``), else None: straight from ``pool``.
    """

    def __init__(
        self,
        engine: TransferEngine,
        pool: KVPool,
        aux: AuxBuffer,
        on_final: SenderFinal,
        timeouts: TransferTimeouts | None = None,
        rpc_timeout_s: float = 2.0,
        abort_wait_s: float = 1.0,
        tick_s: float = 0.05,
        cluster_token: str | None = None,
        writer_idle_s: float = 60.0,
        tls: TLSConfig | None = None,
        kv_checksum: bool = False,
        writers_per_peer: int = 1,
        staging: HostStaging | None = None,
    ) -> None:
        if not 0 < writers_per_peer <= aux.num_slots:
            raise ValueError(
                f"writers_per_peer={writers_per_peer} must be in [1, {aux.num_slots}] (the aux staging slots)"
            )
        self.writers_per_peer, self.pool = writers_per_peer, pool
        self.on_final, self.timeouts = on_final, timeouts or TransferTimeouts()
        self.abort_wait_s, self.tick_s, self.writer_idle_s = abort_wait_s, tick_s, writer_idle_s
        self._channels = Channels(cluster_token, tls)
        checksums = PageChecksums(pool) if kv_checksum else None
        self._writes = PeerWrites(engine, pool, aux, self._channels, rpc_timeout_s, checksums, staging)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._rooms: dict[int, _Room] = {}
        self._tombstones: dict[int, tuple[float, TransferState]] = {}  # finished rooms, for late messages
        self._writers: dict[tuple[str, int], queue.SimpleQueue] = {}  # (peer session, writer) -> its jobs
        self._threads: list[threading.Thread] = []
        self._finals: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._start_thread(self._control_loop, "kv-sender-control")

    # ---- scheduler API (never blocks on the network) ----

    def add_room(self, room: int, src_pages: Sequence[int]) -> None:
        """Announces a request's source pages, in token order (ids into ``pool``)."""
        pages = self.pool.layout.check_pages(src_pages, "source")
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                r = self._rooms[room] = _Room(RoomStateMachine(room, "prefill", self.timeouts))
                r.src_pages, r.index = pages, {p: i for i, p in enumerate(pages)}
                if room in self._tombstones:
                    r.machine.to(
                        TransferState.ABORTED,
                        f"room ended ({self._tombstones[room][1].value}) before add_room",
                    )
                    self._settle(r)
                return
            if r.src_pages is not None:
                raise ValueError(f"room {room} was already added")
            r.src_pages, r.index = pages, {p: i for i, p in enumerate(pages)}
            self._pair(r)

    def send(
        self,
        room: int,
        pages: Sequence[int],
        last: bool = False,
        aux: AuxRecord | None = None,
        ready_event: Any = None,
    ) -> None:
        """Queues the write of ``pages`` (source ids of ``room`` fully computed by this chunk).

        On the last chunk (``last=True``) ``pages`` must complete the room and ``aux`` is its
        record. ``ready_event``: a ``torch.cuda.Event`` recorded after the forward that filled
        the pages (the writer synchronises on it before reading them), or a ``LayerReady`` handed
        over before that forward (each layer is written once it is stored: ``pd.transfer.layers``;
        pages of earlier sends not written yet go with it). The pages' bytes must stay
        as they are until ``on_final`` (a write may read them any time before). A room that is
        already final (aborted, failed) or released ignores the call.
        """
        with self._lock:
            r = self._rooms.get(room)
            if r is None or r.machine.is_final:
                logger.debug("prefill room %d: send ignored (room %s)", room, "final" if r else "unknown")
                return
            if r.src_pages is None:
                raise ValueError(f"send for room {room} before add_room")
            if r.last:
                raise ValueError(f"send for room {room} after its last chunk")
            pages = tuple(int(p) for p in pages)
            bad = [p for p in pages if p not in r.index or p in r.sent]
            if bad or len(set(pages)) != len(pages):
                raise ValueError(f"room {room}: pages {bad or pages} are not its pages or were already sent")
            if last:
                missing = set(r.src_pages) - r.sent - set(pages)
                if missing:
                    raise ValueError(f"room {room}: last chunk leaves pages {sorted(missing)} unsent")
                if aux is None or aux.room != room:
                    raise ValueError(f"room {room}: the last chunk needs the room's aux record, got {aux}")
            r.sent.update(pages)
            r.ready.extend(r.index[p] for p in pages)
            r.event = ready_event if ready_event is not None else r.event
            r.last, r.aux = last, aux
            if r.machine.state is TransferState.TRANSFERRING:
                r.machine.touch()
            self._advance(r)

    def abort(self, room: int, reason: str) -> None:
        """Ends ``room`` here and tells decode (after in-flight writes drained); harmless if unknown or final."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                self._tombstone(room, TransferState.ABORTED)
                return
            if not r.machine.is_final:
                r.machine.to(TransferState.ABORTED, reason)
                r.notice = "abort"
                self._settle(r)

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
        """Serves ``PrefillTransfer`` (Handshake, Abort) on ``server`` for this sender."""
        pb_grpc.add_PrefillTransferServicer_to_server(_PrefillServicer(self), server)

    def close(self) -> None:
        """Stops the threads; open rooms are abandoned (no on_final)."""
        self._stop.set()
        with self._lock:
            for q in self._writers.values():
                q.put(None)
        for t in self._threads:
            t.join(timeout=5.0)
        self._channels.close()

    # ---- state changes (lock held) ----

    def _pair(self, r: _Room) -> None:
        if r.machine.state is not TransferState.BOOTSTRAPPING or r.src_pages is None or r.peer is None:
            return
        skip, dst = r.peer.skip_pages, len(r.peer.dst_pages)
        if skip + dst != len(r.src_pages) or skip >= len(r.src_pages):
            self._fail(
                r, f"decode skips {skip} and gives {dst} destination pages for {len(r.src_pages)} pages"
            )
            return
        r.machine.to(TransferState.WAITING_FOR_INPUT)
        self._advance(r)

    def _advance(self, r: _Room) -> None:
        """Queues what is ready once the room is paired."""
        if r.machine.state not in (TransferState.WAITING_FOR_INPUT, TransferState.TRANSFERRING):
            return
        assert r.src_pages is not None and r.peer is not None
        skip = r.peer.skip_pages  # pages decode holds already: never written
        r.ready = [i for i in r.ready if i >= skip]
        if not r.ready and not (r.last and not r.done_queued):
            return
        if r.machine.state is TransferState.WAITING_FOR_INPUT:
            r.machine.to(TransferState.TRANSFERRING)
        writer = self._writer(r.peer.session, r.machine.room)
        if r.ready:
            src = tuple(r.src_pages[i] for i in r.ready)
            dst = tuple(r.peer.dst_pages[i - skip] for i in r.ready)
            writer.put(_Job(r.machine.room, "kv", r.peer, src, dst, r.event))
            r.ready, r.inflight = [], r.inflight + 1
        if r.last and not r.done_queued:
            writer.put(_Job(r.machine.room, "done", r.peer))
            r.done_queued, r.inflight = True, r.inflight + 1

    def _fail(self, r: _Room, reason: str) -> None:
        if not r.machine.is_final:
            r.machine.to(TransferState.FAILED, reason)
            r.notice = "failed"
        self._settle(r)

    def _settle(self, r: _Room) -> None:
        """Releases a final room with nothing in flight: exactly once, by construction (``released``)."""
        if not r.machine.is_final or r.inflight or r.released:
            return
        r.released = True
        room = r.machine.room
        del self._rooms[room]
        self._tombstone(room, r.machine.state)
        if r.notice and r.peer is not None:
            self._writer(r.peer.session, room).put(
                _Job(room, "notice", r.peer, notice=r.notice, reason=r.machine.reason)
            )
        if r.src_pages is not None:  # a hand-shake whose request never came holds no pages: no on_final
            self._finals.put((room, r.machine.state, r.machine.reason))
        self._drained.notify_all()

    def _tombstone(self, room: int, state: TransferState) -> None:
        """Remembers an ended room for a while, so a late hand-shake or request cannot revive it."""
        ttl = self.timeouts.bootstrapping_s + self.timeouts.waiting_for_input_s
        self._tombstones.pop(room, None)  # re-insert at the end: the dict stays in expiry order
        self._tombstones[room] = (time.monotonic() + ttl, state)

    def _writer(self, session: str, room: int) -> queue.SimpleQueue:
        """The queue of the writer thread that carries ``room``'s writes to ``session`` (one per room, so they
        stay in order; ``writers_per_peer`` of them per peer)."""
        key = (session, room % self.writers_per_peer)
        q = self._writers.get(key)
        if q is None:
            q = self._writers[key] = queue.SimpleQueue()
            self._start_thread(lambda: self._writer_loop(key, q), f"kv-sender-writer-{session}-{key[1]}")
        return q

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    # ---- hand-shake and abort from decode (gRPC threads) ----

    def _handshake(self, req: pb.HandshakeRequest, time_remaining: float | None) -> None:
        if time_remaining is not None and time_remaining <= 0:
            raise _Refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"hand-shake of room {req.room} arrived after its deadline"
            )
        try:
            peer = peer_from_handshake(req, self.pool.layout)
        except ValueError as e:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"room {req.room}: {e}") from None
        with self._lock:
            if req.room in self._tombstones:
                state = self._tombstones[req.room][1]
                raise _Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION, f"room {req.room} already ended ({state.value})"
                )
            r = self._rooms.get(req.room)
            if r is None:
                r = self._rooms[req.room] = _Room(RoomStateMachine(req.room, "prefill", self.timeouts))
                r.peer = peer
                return
            if r.machine.is_final:
                raise _Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION, f"room {req.room} is {r.machine.state.value}"
                )
            if r.peer is not None:
                if r.peer.same_target(peer):
                    return  # a retried hand-shake
                raise _Refusal(grpc.StatusCode.ALREADY_EXISTS, f"room {req.room} has another destination")
            r.peer = peer
            self._pair(r)

    def _decode_abort(self, room: int, reason: str, wait_s: float) -> tuple[bool, bool]:
        """Ends a room on decode's request; waits up to ``wait_s`` for its writes. Returns (known, drained)."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None:
                known = room in self._tombstones
                if not known:
                    self._tombstone(room, TransferState.ABORTED)
                return known, True
            if not r.machine.is_final:
                r.machine.to(TransferState.ABORTED, f"aborted by decode: {reason}")
                r.notice = ""
            self._settle(r)
            end = time.monotonic() + wait_s
            while not r.released and time.monotonic() < end:
                self._drained.wait(end - time.monotonic())
            if not r.released:
                r.notice = "abort"  # decode gets an Abort notice when the writes have drained
            return True, r.released

    # ---- threads ----

    def _writer_loop(self, key: tuple[str, int], jobs: queue.SimpleQueue) -> None:
        while True:
            try:
                job = jobs.get(timeout=self.writer_idle_s)
            except queue.Empty:  # decode ranks come and go (restarts): an idle peer's thread ends
                with self._lock:  # jobs are queued under this lock: none can slip in meanwhile
                    if jobs.empty() and self._writers.get(key) is jobs:
                        del self._writers[key]
                        return
                continue
            if job is None:
                return
            try:
                self._run_job(job)
            except Exception:  # a bug must not kill the peer's writer
                logger.exception("prefill room %d: %s job crashed", job.room, job.kind)

    def _run_job(self, job: _Job) -> None:
        if job.kind == "notice":
            self._writes.notice(job.peer, job.room, job.notice, job.reason)
            return
        with self._lock:
            r = self._rooms[job.room]  # present: its inflight count keeps it
            skip = r.machine.is_final
            aux_record = r.aux
            sums = pack(r.sums) if job.kind == "done" and r.sums is not None else b""
        error = None
        if not skip:
            try:
                if job.kind == "kv":
                    job_sums = self._writes.pages(
                        job.peer, job.src_pages, job.dst_pages, job.event, lambda: r.machine.is_final
                    )  # cancelled: a layer-wise job waiting for its forward stops when the room ends
                    self._keep_sums(r, job, job_sums)
                else:
                    assert aux_record is not None
                    self._writes.finish(job.peer, job.room, aux_record, sums)
            except TransferError as e:
                error = str(e)
            except grpc.RpcError as e:
                error = f"TransferDone to {job.peer.endpoint} failed: {rpc_error(e)}"
            except Exception as e:  # e.g. a CUDA error while waiting for the pages
                logger.exception("prefill room %d: %s write failed", job.room, job.kind)
                error = f"{job.kind} write failed: {e!r}"
        with self._lock:
            r.inflight -= 1
            if error is not None:
                self._fail(r, error)
            elif not skip and not r.machine.is_final:
                if job.kind == "done":
                    r.machine.to(TransferState.DONE)
                else:
                    r.machine.touch()
            self._settle(r)

    def _keep_sums(self, r: _Room, job: _Job, sums: np.ndarray | None) -> None:
        """Files a written job's checksums at its pages' positions among the pages written (token order)."""
        if sums is None:
            return
        with self._lock:
            assert r.src_pages is not None
            skip = job.peer.skip_pages
            if r.sums is None:
                r.sums = np.zeros((sums.shape[0], len(r.src_pages) - skip, sums.shape[2]), dtype=np.int64)
            r.sums[:, [r.index[p] - skip for p in job.src_pages]] = sums

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            for room, state, reason in drain_queue(self._finals, self.tick_s):
                try:
                    self.on_final(room, state, reason)
                except Exception:
                    logger.exception("prefill room %d: on_final raised", room)
            now = time.monotonic()
            with self._lock:
                for r in list(self._rooms.values()):
                    if r.machine.fail_if_expired():
                        r.notice = "failed"
                        self._settle(r)
                while self._tombstones:
                    room, (expiry, _) = next(iter(self._tombstones.items()))
                    if expiry > now:
                        break
                    del self._tombstones[room]


class _PrefillServicer(pb_grpc.PrefillTransferServicer):
    def __init__(self, sender: KVSender) -> None:
        self._sender = sender

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:
        try:
            self._sender._handshake(request, context.time_remaining())
        except _Refusal as e:
            context.abort(e.code, str(e))
        return pb.HandshakeReply()

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        remaining = context.time_remaining()
        wait = (
            self._sender.abort_wait_s
            if remaining is None
            else min(self._sender.abort_wait_s, remaining - 0.2)
        )
        known, drained = self._sender._decode_abort(request.room, request.reason, max(0.0, wait))
        return pb.AbortReply(known=known, drained=drained)
