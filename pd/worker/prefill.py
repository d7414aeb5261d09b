"""The prefill worker: chunked prefill of each room's prompt, its KV shipped to the decode rank.

A room's life here: ``Prefill`` queues it (bounded; RESOURCE_EXHAUSTED beyond) -> admitted with
pages for its whole prompt, announced to the KV sender -> after every chunk the pages it completed
are sent -> the last chunk samples the first token, which goes out as the aux record with the last
pages -> the sender's ``on_final`` frees the pages (exactly once) and answers the RPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from pd.engine.scheduler import QueueFull
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.sampling import sampling_from_proto
from pd.transfer.aux import AuxRecord
from pd.transfer.sender import KVSender
from pd.transfer.state import TransferState
from pd.types import FinishReason, Req
from pd.worker.common import WorkerBase, WorkerConfig
from pd.worker.rooms import RoomError, failure_status, reject, resolve

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Room:
    req: Req
    reply: asyncio.Future  # resolved on the event loop with a PrefillReply or a RoomError
    arrived: float
    announced: bool = False  # given to the KV sender (it now decides when the pages are free)
    pages_sent: int = 0  # leading pages of req.pages handed to the sender
    pages: list[int] | None = None  # owned here once detached from the scheduler
    first_token: int = -1


class PrefillWorker(WorkerBase, wpb_grpc.PrefillWorkerServicer):
    role = "prefill"

    def __init__(self, cfg: WorkerConfig) -> None:
        super().__init__(cfg)
        self.sender = KVSender(
            self.transfer_engine,
            self.pool,
            self.aux,
            on_final=self._on_final,
            timeouts=cfg.timeouts,
            cluster_token=cfg.cluster_token,
        )
        self.rooms: dict[int, _Room] = {}  # engine thread only
        self.scheduler = self.engine.scheduler
        self.m_queue.set_function(lambda: len(self.scheduler.waiting), role=self.role, queue="waiting")
        self.m_queue.set_function(lambda: len(self.scheduler.prefilling), role=self.role, queue="prefilling")
        self.m_queue.set_function(
            lambda: sum(r.pages is not None for r in list(self.rooms.values())),
            role=self.role,
            queue="transferring",
        )

    def add_servicers(self, server: grpc.aio.Server) -> None:
        wpb_grpc.add_PrefillWorkerServicer_to_server(self, server)
        self.sender.add_to_server(server)

    def close_transfer(self) -> None:
        self.sender.close()
        super().close_transfer()

    def transfer_rooms(self) -> int:
        return self.sender.num_rooms

    def load(self) -> bpb.Load:
        free = self.engine.allocator.num_free
        return bpb.Load(
            running_requests=len(self.scheduler.prefilling),
            waiting_requests=len(self.scheduler.waiting),
            free_pages=free,
            total_pages=self.engine.allocator.num_pages - 1,
        )

    # ---- RPCs (event loop) ----

    async def Prefill(self, request: wpb.PrefillRequest, context) -> wpb.PrefillReply:
        reply = asyncio.get_running_loop().create_future()
        self.thread.submit(lambda: self._arrive(request, reply))
        try:
            return await reply
        except RoomError as e:
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            self.thread.submit(lambda: self._abort(request.room, "the Prefill call was cancelled"))
            raise

    # ---- engine thread ----

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def _arrive(self, request: wpb.PrefillRequest, reply: asyncio.Future) -> None:
        room = request.room
        try:
            if room in self.rooms:
                raise RoomError(
                    grpc.StatusCode.ALREADY_EXISTS, f"room {room:x} is already being prefilled here"
                )
            try:
                req = self.engine.make_request(
                    request.token_ids, sampling_from_proto(request.sampling), rid=room
                )
                self.scheduler.add(req)
            except QueueFull as e:
                raise RoomError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            except ValueError as e:
                raise RoomError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except RoomError as e:
            self.m_requests.inc(role=self.role, outcome="refused")
            self.post(reject, reply, e)
            return
        self.rooms[room] = _Room(req, reply, time.monotonic())
        log.debug("room %x: queued, %d prompt tokens", room, len(req.prompt_ids))

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if batch is None:
            self.engine.runner.run_idle()  # other ranks of the instance may be stepping
            return
        for req, start in zip(batch.reqs, batch.starts):
            room = self.rooms[req.rid]
            if start == 0 and not room.announced:
                self.sender.add_room(req.rid, req.pages)
                room.announced = True
        tokens, logprobs = self.engine.runner.run(batch)
        ready = None
        if self.pool.buffer.is_cuda:  # the sender waits for the forward before reading the pages
            ready = torch.cuda.Event()
            ready.record()
        page_size = self.pool.layout.page_size
        for req, end, token, logprob in zip(batch.reqs, batch.ends, tokens, logprobs):
            req.num_computed = end
            room = self.rooms[req.rid]
            if token is None:
                full = end // page_size  # pages whose every slot is computed
                if full > room.pages_sent:
                    self.sender.send(req.rid, req.pages[room.pages_sent : full], ready_event=ready)
                    room.pages_sent = full
                continue
            room.pages = self.scheduler.detach(req)
            room.first_token = token
            aux = AuxRecord(req.rid, token, float(logprob), len(req.prompt_ids))
            self.sender.send(req.rid, room.pages[room.pages_sent :], last=True, aux=aux, ready_event=ready)
            self.m_transfer_bytes.inc(
                len(room.pages) * self.pool.layout.page_nbytes_per_layer * self.pool.layout.num_layers,
                role=self.role,
            )

    def _on_final(self, room: int, state: TransferState, reason: str) -> None:
        """The sender's callback (its control thread): hand over to the engine thread."""
        self.thread.submit(lambda: self._final(room, state, reason))

    def _final(self, room_id: int, state: TransferState, reason: str) -> None:
        room = self.rooms.pop(room_id, None)
        if room is None:
            return
        pages = room.pages if room.pages is not None else self.scheduler.detach(room.req)
        if pages:
            self.engine.allocator.free(pages)
        self.m_transfer_seconds.observe(time.monotonic() - room.arrived, role=self.role)
        self.m_requests.inc(role=self.role, outcome=state.value)
        if state is TransferState.DONE:
            reply = wpb.PrefillReply(prompt_tokens=len(room.req.prompt_ids), first_token_id=room.first_token)
            self.post(resolve, room.reply, reply)
            return
        if state is TransferState.FAILED:
            self.m_transfer_failures.inc(role=self.role)
        self.post(reject, room.reply, RoomError(*failure_status(state, reason)))

    def _abort(self, room_id: int, reason: str) -> bool:
        room = self.rooms.get(room_id)
        if room is None:
            return False
        self.m_aborts.inc(role=self.role)
        if room.announced:
            if room.pages is None:
                room.pages = self.scheduler.detach(room.req)
            self.sender.abort(room_id, reason)  # _final frees the pages once no write reads them
            return True
        # Still waiting for admission: no pages, nothing sent.
        self.rooms.pop(room_id)
        self.scheduler.finish(room.req, FinishReason.ABORT)
        self.post(
            reject, room.reply, RoomError(grpc.StatusCode.ABORTED, f"room {room_id:x} aborted: {reason}")
        )
        return True
