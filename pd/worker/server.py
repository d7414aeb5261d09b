"""The gRPC face of a worker rank: server lifecycle, registration, and the RPCs every role serves.

A worker is an adapter: its RPC handlers post typed commands to the engine thread and wait on the room's
event queue; the engine's events come back through ``_deliver`` (on the event loop), which routes each to
the queue of the room it names. Nothing here touches the scheduler, the pages or the model.

Threads: the asyncio event loop (gRPC server, handlers, event routing), the engine thread
(``pd.worker.loop``), the transfer manager's threads (they only post ``TransferEnded``), and the bootstrap
heartbeat thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from pd.bootstrap.client import BootstrapClient, new_incarnation
from pd.bootstrap.compat import model_fingerprint
from pd.config import dtype_name
from pd.engine.messages import AbortRoom, Command, DecodeRoom, Event, Failure, RoomFailed, Tokens
from pd.engine.role import RoleEngine
from pd.rpc import PROTOCOL_VERSION
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc.auth import aio_server_interceptors
from pd.rpc.channel import SERVER_OPTIONS
from pd.rpc.sampling import prompt_to_proto, top_to_proto
from pd.rpc.tls import bind
from pd.transfer.aux import AUX_RECORD_NBYTES
from pd.transfer.receiver import KVReceiver
from pd.types import SamplingParams
from pd.worker.builder import Rank
from pd.worker.loop import EngineThread
from pd.worker.metrics import RANK_LABELS
from pd.worker.parallel import destroy_process_groups

log = logging.getLogger(__name__)

ROLE_PROTO = {"prefill": bpb.ROLE_PREFILL, "decode": bpb.ROLE_DECODE, "colocated": bpb.ROLE_COLOCATED}
STATUS = {
    Failure.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Failure.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Failure.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Failure.ABORTED: grpc.StatusCode.ABORTED,
    Failure.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Failure.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Failure.FAILED: grpc.StatusCode.INTERNAL,
}
_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    *SERVER_OPTIONS,  # the proxy's keepalive pings are welcome
]


class RankServer:
    """Serves one built ``Rank``; role subclasses add their request RPCs and servicers."""

    def __init__(self, rank: Rank) -> None:
        self.rank, self.cfg = rank, rank.cfg
        self.engine = rank.role_engine
        par = self.cfg.parallel
        self.thread = EngineThread(
            self.engine,
            rank.commands,
            self._post,
            f"{self.cfg.role}-engine",
            rank.lockstep,
            rank.engine.runner.bind_thread,
        )
        self.endpoint = ""
        self.instance_id = self.cfg.instance_id or ""
        self.incarnation = new_incarnation()
        self.bootstrap: BootstrapClient | None = None
        self._rooms: dict[int, asyncio.Queue[Event]] = {}  # open RPCs by room (event loop only)
        self._stopping: asyncio.Event | None = None
        self.draining = False  # stopping: no new room is taken; the ones held run to their end (serve)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._labels = {"role": self.cfg.role, "instance": "", "rank": str(par.rank)}

    # ---- rooms: commands out, events back ----

    async def open_room(self, room: int, context: grpc.aio.ServicerContext) -> asyncio.Queue[Event]:
        """The event queue of a new RPC for ``room``. Refuses the call (``context.abort`` raises) when the rank
        is draining (UNAVAILABLE: the proxy tries another rank) or an RPC for the room is open already."""
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this rank is shutting down: it takes no new rooms"
            )
        if room in self._rooms:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"room {room:x} is already open here")
        q = self._rooms[room] = asyncio.Queue()
        return q

    def close_room(self, room: int) -> None:
        self._rooms.pop(room, None)

    def submit(self, cmd: Command) -> None:
        self.thread.submit(cmd)

    async def compile_grammar(self, sampling: SamplingParams, context: grpc.aio.ServicerContext) -> None:
        """Compiles the request's grammar, if it has one, in a thread: the engine thread then finds it in
        the backend's cache instead of compiling between two steps. A spec the backend refuses ends the
        call with INVALID_ARGUMENT (the proxy checked it already: this is the rank's own word)."""
        if sampling.grammar is None:
            return
        try:
            await asyncio.to_thread(self.rank.engine.grammar.check, sampling.grammar)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _post(self, events: list[Event]) -> None:
        """Engine thread: hands the events to the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            q = self._rooms.get(event.room)
            if q is not None:  # else its RPC is gone (cancelled): nobody waits for it
                q.put_nowait(event)

    async def stream(
        self, cmd: DecodeRoom, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.GenerateChunk]:
        """Submits a decode (or colocated) room and yields its tokens, each choice's as they come; the room
        is aborted if the caller goes away before the last chunk of its last choice."""
        await self.compile_grammar(cmd.sampling, context)
        events = await self.open_room(cmd.room, context)
        self.submit(cmd)
        unfinished, finished = cmd.sampling.n, False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, RoomFailed):
                    finished = True
                    await context.abort(STATUS[event.failure], event.message)
                assert isinstance(event, Tokens)
                unfinished -= event.finish_reason is not None
                finished = unfinished == 0
                yield wpb.GenerateChunk(
                    token_ids=event.token_ids,
                    text=event.text,
                    finish_reason=event.finish_reason or "",
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    logprobs=event.logprobs,
                    phases=wpb.DecodePhases(**dataclasses.asdict(event.phases)) if event.phases else None,
                    top_logprobs=[top_to_proto(t) for t in event.top_logprobs],
                    prompt_logprobs=prompt_to_proto(event.prompt_logprobs),
                    index=event.index,
                )
        finally:
            self.close_room(cmd.room)
            if not finished:  # the caller went away
                self.submit(AbortRoom(cmd.room, "the Generate stream was cancelled"))

    # ---- RPCs every role serves ----

    async def ModelInfo(
        self, request: wpb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ModelInfoReply:
        f, engine = self.rank.tokenizer_files, self.rank.engine
        return wpb.ModelInfoReply(
            model_name=self.cfg.served_model_name,
            max_context_len=engine.context_len,
            vocab_size=engine.model_cfg.vocab_size,
            tokenizer_json=f.tokenizer_json,
            tokenizer_config_json=json.dumps(f.tokenizer_config),
            generation_config_json=json.dumps(f.generation_config),
            chat_template=f.chat_template or "",
        )

    async def Health(
        self, request: wpb.WorkerHealthRequest, context: grpc.aio.ServicerContext
    ) -> wpb.WorkerHealthReply:
        if not self.thread.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine thread is dead: {self.thread.error!r}")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this rank is shutting down")
        load, allocator = self.engine.load(), self.rank.engine.allocator
        return wpb.WorkerHealthReply(
            role=self.cfg.role,
            running=load.running,
            waiting=load.waiting,
            kv_pages_used=allocator.num_used,
            kv_pages_total=allocator.capacity,
        )

    async def Abort(self, request: wpb.CancelRequest, context: grpc.aio.ServicerContext) -> wpb.CancelReply:
        """Ends a room wherever it is; ``found``: an RPC for it was open on this rank."""
        self.submit(AbortRoom(request.room, request.reason or "aborted"))
        return wpb.CancelReply(found=request.room in self._rooms)

    async def Metrics(
        self, request: wpb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> wpb.MetricsReply:
        self._read_expert_counters()
        return wpb.MetricsReply(text=self.rank.metrics.render())

    def _read_expert_counters(self) -> None:
        """Copies the on-device per-expert counters into the gauges (one device read per scrape)."""
        runner = self.rank.engine.runner
        if not runner.model_cfg.n_routed_experts:
            return
        counts = runner.model.expert_token_counts().tolist()
        for expert, n in zip(runner.placement.local_experts(self.cfg.parallel.rank), counts):
            self.rank.metrics.expert_tokens.set(n, **self._labels, expert=str(expert))

    def load(self) -> bpb.Load:
        load, allocator = self.engine.load(), self.rank.engine.allocator
        cache = self.rank.engine.scheduler.cache
        return bpb.Load(
            running_requests=load.running,
            waiting_requests=load.waiting,
            free_pages=allocator.num_free + (cache.num_idle_pages() if cache else 0),  # cached: evictable
            total_pages=allocator.capacity,
        )

    # ---- registration ----

    def rank_info(self) -> bpb.RankInfo:
        r = self.rank
        pool, te, aux = r.engine.runner.pool, r.transfer_engine, r.aux
        layout, spec = pool.layout, self.cfg.engine.speculative
        return bpb.RankInfo(
            protocol_version=PROTOCOL_VERSION,
            model_fingerprint=model_fingerprint(r.hf_config),
            model_name=self.cfg.served_model_name,
            max_context_len=r.engine.context_len,
            role=ROLE_PROTO[self.cfg.role],
            instance_id=self.instance_id,
            dp_rank=self.cfg.parallel.rank,
            dp_size=self.cfg.parallel.size,
            grpc_endpoint=self.endpoint,
            transfer_session=te.session_id if te else "",
            transfer_protocol=self.cfg.transfer.protocol if te else "",
            kv_base_addr=pool.data_ptr,
            kv_nbytes=pool.nbytes,
            num_pages=layout.num_pages,
            page_size=layout.page_size,
            page_nbytes_per_layer=layout.page_nbytes_per_layer,
            num_layers=layout.num_layers,
            latent_dim=layout.latent_dim,
            kv_dtype=dtype_name(layout.dtype),
            kv_order=layout.order.value,
            aux_base_addr=aux.data_ptr if aux else 0,
            aux_nbytes=aux.nbytes if aux else 0,
            aux_slot_nbytes=AUX_RECORD_NBYTES if aux else 0,
            incarnation=self.incarnation,
            kv_checksum=self.cfg.transfer.kv_checksum if te else False,
            speculative_algorithm=spec.algorithm or "",
            num_speculative_tokens=spec.num_tokens,
        )

    def _bind_gauges(self) -> None:
        """Binds the per-rank gauges once the instance id (which may depend on the port) is known."""
        self._labels["instance"] = self.instance_id
        m, engine, allocator, transfer = (
            self.rank.metrics,
            self.engine,
            self.rank.engine.allocator,
            self.rank.transfer,
        )
        m.pages_used.set_function(lambda: allocator.num_used, **self._labels)
        m.pages_capacity.set_function(lambda: allocator.capacity, **self._labels)
        cache = self.rank.engine.scheduler.cache
        m.pages_cached.set_function(lambda: cache.num_idle_pages() if cache else 0, **self._labels)
        m.rooms.set_function(lambda: engine.rooms_open, **self._labels)
        m.transfer_rooms.set_function(lambda: transfer.num_rooms if transfer else 0, **self._labels)
        for name in engine.queue_lengths():
            m.queue.set_function(
                functools.partial(_queue_length, engine, name), role=self.cfg.role, queue=name
            )
        assert set(self._labels) == set(RANK_LABELS)

    # ---- lifecycle ----

    def add_servicers(self, server: grpc.aio.Server) -> None:
        """Adds the role's servicers (and the transfer manager's hand-shake service)."""
        if self.rank.transfer is not None:
            self.rank.transfer.add_to_server(server)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serves until ``stop()``: gRPC server up, engine thread running, registered."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        cfg = self.cfg
        server = grpc.aio.server(
            migration_thread_pool=ThreadPoolExecutor(16, thread_name_prefix=f"{cfg.role}-rpc"),
            interceptors=aio_server_interceptors(cfg.cluster_token),
            options=_GRPC_OPTIONS,
        )
        self.add_servicers(server)
        port = bind(server, f"{cfg.host}:{cfg.port}", cfg.tls)
        if port == 0:
            raise OSError(f"rank {cfg.parallel.rank} could not bind its gRPC port {cfg.host}:{cfg.port}")
        self.endpoint = f"{cfg.host}:{port}"
        self.instance_id = cfg.instance_id or f"{cfg.role}-{cfg.host}-{port}"
        if cfg.parallel.size > 1 and not cfg.instance_id:
            raise ValueError("ranks of a multi-rank instance need a common instance_id")
        self._bind_gauges()
        if isinstance(self.rank.transfer, KVReceiver):
            self.rank.transfer.endpoint = self.endpoint
        await server.start()
        self.thread.start()
        self.bootstrap = BootstrapClient(cfg.bootstrap, cluster_token=cfg.cluster_token, tls=cfg.tls)
        await asyncio.to_thread(self.bootstrap.register, self.rank_info(), self.load())
        self.bootstrap.start_heartbeat(self.load)
        par = cfg.parallel
        log.info(
            "%s rank %d/%d of %s serving %s on %s (pid %d)",
            cfg.role, par.rank, par.size, self.instance_id, cfg.served_model_name, self.endpoint, os.getpid(),
        )  # fmt: skip
        if ready is not None:
            ready.set()
        try:
            await self._stopping.wait()
            self.draining = True
            await asyncio.to_thread(self._deregister)  # the proxies stop picking this rank
            if held := self.engine.rooms_open:
                log.info("draining %d rooms, for %.0f s at most", held, cfg.drain_timeout_s)
            await asyncio.to_thread(self.thread.finish, cfg.drain_timeout_s)
            if held := self.engine.rooms_open:
                log.warning("stopping with %d rooms still held (drain timeout, or a second signal)", held)
        finally:
            self.draining = True
            await asyncio.to_thread(self._deregister)
            await server.stop(grace=1.0)  # the last replies go out
            self.thread.stop(timeout=par.collective_timeout_s)
            if self.rank.transfer is not None:
                self.rank.transfer.close()
            if self.rank.transfer_engine is not None:
                self.rank.transfer_engine.close()
            self.rank.engine.runner.close()  # CUDA graphs go before the process group
            destroy_process_groups()

    def _deregister(self) -> None:
        if self.bootstrap is not None:
            self.bootstrap.stop_heartbeat()
            try:
                self.bootstrap.deregister()
            except Exception as e:  # best effort: the lease expires anyway
                log.info("deregister failed: %s", e)
            self.bootstrap.close()
            self.bootstrap = None

    def stop(self) -> None:
        """Asks ``serve`` to return (thread-safe): the first call drains (new rooms are refused, the held ones
        run to their end, for ``drain_timeout_s`` at most), a second one stops at once."""
        if self._loop is None or self._stopping is None:
            return
        if self._stopping.is_set():
            self.thread.stop(timeout=0)  # ends the drain: finish() returns
        self._loop.call_soon_threadsafe(self._stopping.set)


def _queue_length(engine: RoleEngine, name: str) -> int:
    return engine.queue_lengths()[name]
