"""The decode worker: receives each room's KV from its prefill rank, then decodes and streams.

A room's life here: ``Generate`` -> pending until pages (prompt + headroom) and an aux slot are
free (bounded; RESOURCE_EXHAUSTED beyond) -> transfer: the KV receiver hand-shakes with the
prefill rank and waits for the KV and the first token -> running: continuous batching in the
engine, one chunk streamed per token -> finished or aborted: pages freed exactly once (by the
receiver's ``on_final`` for rooms still in transfer, by the engine for running ones).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass

import grpc

from pd.engine.engine import TokenOutput
from pd.engine.scheduler import QueueFull
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.sampling import sampling_from_proto
from pd.transfer.aux import AuxRecord, SlotAllocator
from pd.transfer.receiver import KVReceiver
from pd.transfer.state import TransferState
from pd.types import FinishReason, Req
from pd.worker.common import WorkerBase, WorkerConfig
from pd.worker.rooms import RoomError, failure_status

log = logging.getLogger(__name__)


class _Stage(str, enum.Enum):
    PENDING = "pending"  # waiting for pages and an aux slot
    TRANSFER = "transfer"  # KV on its way from the prefill rank
    RUNNING = "running"  # in the engine


@dataclass(eq=False)
class _Room:
    req: Req
    out: asyncio.Queue  # GenerateChunk or RoomError, consumed by the Generate handler
    prefill_endpoint: str
    arrived: float
    stage: _Stage = _Stage.PENDING
    pages: list[int] | None = None
    aux_slot: int | None = None
    aborted: str | None = None  # why, once an abort was asked for


class DecodeWorker(WorkerBase, wpb_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, cfg: WorkerConfig) -> None:
        super().__init__(cfg)
        self.receiver = self.slots = None
        if self.uses_transfer:
            self.receiver = KVReceiver(
                self.transfer_engine,
                self.pool,
                self.aux,
                on_final=self._on_final,
                timeouts=cfg.timeouts,
                cluster_token=cfg.cluster_token,
            )
            self.slots = SlotAllocator(self.aux.num_slots)
        self.rooms: dict[int, _Room] = {}  # engine thread only
        self.pending: deque[int] = deque()
        self.in_transfer = 0  # rooms in _Stage.TRANSFER
        self.m_queue.set_function(lambda: len(self.pending), role=self.role, queue="prealloc")
        self.m_queue.set_function(lambda: self.in_transfer, role=self.role, queue="transfer")
        self.m_queue.set_function(lambda: len(self.engine.scheduler.running), role=self.role, queue="running")

    def on_endpoint(self) -> None:
        if self.receiver is not None:
            self.receiver.endpoint = self.endpoint

    def add_servicers(self, server: grpc.aio.Server) -> None:
        wpb_grpc.add_DecodeWorkerServicer_to_server(self, server)
        if self.receiver is not None:
            self.receiver.add_to_server(server)

    def close_transfer(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        super().close_transfer()

    def transfer_rooms(self) -> int:
        return self.receiver.num_rooms if self.receiver is not None else 0

    def load(self) -> bpb.Load:
        return bpb.Load(
            running_requests=len(self.engine.scheduler.running),
            waiting_requests=len(self.pending),
            free_pages=self.engine.allocator.num_free,
            total_pages=self.engine.allocator.num_pages - 1,
        )

    # ---- RPCs (event loop) ----

    async def Generate(self, request: wpb.GenerateRequest, context):
        out: asyncio.Queue = asyncio.Queue()
        self.thread.submit(lambda: self._arrive(request, out))
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, RoomError):
                    finished = True
                    await context.abort(item.code, item.message)
                yield item
                if item.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away
                self.thread.submit(lambda: self._abort(request.room, "the Generate stream was cancelled"))

    # ---- engine thread ----

    def has_work(self) -> bool:
        return self.engine.has_work()

    def _arrive(self, request: wpb.GenerateRequest, out: asyncio.Queue) -> None:
        room = request.room
        try:
            if room in self.rooms:
                raise RoomError(
                    grpc.StatusCode.ALREADY_EXISTS, f"room {room:x} is already being decoded here"
                )
            if len(self.pending) >= self.cfg.max_pending:
                raise RoomError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{len(self.pending)} rooms already wait for KV pages here",
                )
            try:
                req = self.engine.make_request(
                    request.token_ids, sampling_from_proto(request.sampling), rid=room
                )
            except ValueError as e:
                raise RoomError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            if self._pages_wanted(req) > self.engine.allocator.num_pages - 1:
                raise RoomError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the prompt needs {self._pages_wanted(req)} KV pages; this rank has {self.engine.allocator.num_pages - 1}",
                )
            if not request.prefill_endpoint:
                raise RoomError(grpc.StatusCode.INVALID_ARGUMENT, "prefill_endpoint is required")
        except RoomError as e:
            self.m_requests.inc(role=self.role, outcome="refused")
            self.post(out.put_nowait, e)
            return
        self.rooms[room] = _Room(req, out, request.prefill_endpoint, time.monotonic())
        self.pending.append(room)
        self._start_transfers()

    def _pages_wanted(self, req: Req) -> int:
        tokens = min(len(req.prompt_ids) + self.cfg.decode_headroom_tokens, req.max_total_len())
        return self.pool.layout.pages_for(max(tokens, len(req.prompt_ids) + 1))

    def _start_transfers(self) -> None:
        """Moves pending rooms (FIFO) into transfer while pages and aux slots last, and while the rooms
        running or in transfer stay within ``max_running``: a decode batch never grows past it (the
        low-latency MoE buffers of a multi-rank instance hold that many tokens per rank)."""
        while self.pending:
            if len(self.engine.scheduler.running) + self.in_transfer >= self.engine.cfg.max_running:
                return
            room = self.rooms[self.pending[0]]
            pages = self.engine.allocator.alloc(self._pages_wanted(room.req))
            if pages is None:
                return
            slot = self.slots.alloc()
            if slot is None:
                self.engine.allocator.free(pages)
                return
            self.pending.popleft()
            room.pages, room.aux_slot, room.stage = pages, slot, _Stage.TRANSFER
            self.in_transfer += 1
            prompt_pages = self.pool.layout.pages_for(len(room.req.prompt_ids))
            self.receiver.add_room(room.req.rid, room.prefill_endpoint, pages[:prompt_pages], slot)

    def step(self) -> None:
        for out in self.engine.step():
            self._emit(out)
        self._start_transfers()  # finished requests may have freed pages

    def _emit(self, out: TokenOutput) -> None:
        room = self.rooms.get(out.req.rid)
        if room is None:
            return
        req = out.req
        chunk = wpb.GenerateChunk(
            token_ids=out.token_ids,
            text=out.text,
            finish_reason=out.finish_reason.value if out.finish_reason else "",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            logprobs=out.logprobs,
        )
        self.post(room.out.put_nowait, chunk)
        if out.finish_reason is not None:
            self.rooms.pop(req.rid)
            self.m_requests.inc(role=self.role, outcome=out.finish_reason.value)

    def _on_final(self, room: int, state: TransferState, aux: AuxRecord | None, reason: str) -> None:
        """The receiver's callback (its control thread): hand over to the engine thread."""
        self.thread.submit(lambda: self._transfer_final(room, state, aux, reason))

    def _transfer_final(self, room_id: int, state: TransferState, aux: AuxRecord | None, reason: str) -> None:
        room = self.rooms.get(room_id)
        if room is None or room.stage is not _Stage.TRANSFER:
            return
        self.in_transfer -= 1
        self.slots.free(room.aux_slot)
        self.m_transfer_seconds.observe(time.monotonic() - room.arrived, role=self.role)
        if state is TransferState.DONE and room.aborted is None:
            room.stage = _Stage.RUNNING
            room.req.pages = room.pages
            self._emit(self.engine.add_prefilled(room.req, aux.first_token, aux.first_logprob))
        else:
            self.engine.allocator.free(room.pages)
            self.rooms.pop(room_id)
            if state is TransferState.FAILED:
                self.m_transfer_failures.inc(role=self.role)
            if room.aborted is not None:
                self._end_aborted(room)
            else:
                self.m_requests.inc(role=self.role, outcome=state.value)
                self.post(room.out.put_nowait, RoomError(*failure_status(state, reason)))
        self._start_transfers()

    def _abort(self, room_id: int, reason: str) -> bool:
        room = self.rooms.get(room_id)
        if room is None:
            return False
        self.m_aborts.inc(role=self.role)
        room.aborted = reason
        if room.stage is _Stage.PENDING:
            self.pending.remove(room_id)
            self.rooms.pop(room_id)
            self._end_aborted(room)
        elif room.stage is _Stage.TRANSFER:
            self.receiver.abort(room_id, reason)  # _transfer_final frees the pages once no write can land
        else:
            self.engine.abort(room.req)
            self.rooms.pop(room_id)
            self._end_aborted(room)
            self._start_transfers()
        return True

    def _end_aborted(self, room: _Room) -> None:
        self.m_requests.inc(role=self.role, outcome="abort")
        chunk = wpb.GenerateChunk(
            finish_reason=FinishReason.ABORT.value,
            prompt_tokens=len(room.req.prompt_ids),
            completion_tokens=len(room.req.output_ids),
        )
        self.post(room.out.put_nowait, chunk)


class ColocatedWorker(DecodeWorker):
    """Prefill and decode in one engine: the reference engine behind the same proxy and API.

    A room is queued straight into the engine (prefill there, then decode); nothing is transferred.
    The proxy sends it ``Generate`` alone.
    """

    role = "colocated"
    uses_transfer = False

    def _arrive(self, request: wpb.GenerateRequest, out: asyncio.Queue) -> None:
        room = request.room
        try:
            if room in self.rooms:
                raise RoomError(grpc.StatusCode.ALREADY_EXISTS, f"room {room:x} is already being served here")
            try:
                req = self.engine.add_request(
                    request.token_ids, sampling_from_proto(request.sampling), rid=room
                )
            except QueueFull as e:
                raise RoomError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            except ValueError as e:
                raise RoomError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except RoomError as e:
            self.m_requests.inc(role=self.role, outcome="refused")
            self.post(out.put_nowait, e)
            return
        self.rooms[room] = _Room(req, out, "", time.monotonic(), stage=_Stage.RUNNING)
