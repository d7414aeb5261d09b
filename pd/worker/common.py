"""What prefill and decode workers share: configuration, the gRPC server, registration with the
bootstrap server, the transfer engine, and the ModelInfo / Health / Metrics RPCs.

Threads: the asyncio event loop (gRPC server, RPC handlers), the engine thread (scheduler, pages,
model; see ``pd.worker.loop``), the transfer manager's threads (their callbacks are handed to
the engine thread), and the bootstrap heartbeat thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pd.bootstrap.client import BootstrapClient, new_incarnation
from pd.bootstrap.compat import model_fingerprint
from pd.config import EngineConfig, ModelConfig, ParallelConfig, dtype_name, load_hf_config
from pd.engine.engine import Engine
from pd.engine.runner import ModelRunner
from pd.ep import EPConfig, default_ep_backend, make_ep_backend
from pd.metrics import Registry
from pd.rpc import PROTOCOL_VERSION
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc.auth import aio_server_interceptors
from pd.rpc.channel import SERVER_OPTIONS
from pd.tokenizer import Tokenizer, TokenizerFiles
from pd.transfer.aux import AUX_RECORD_NBYTES, AuxBuffer
from pd.transfer.engine import TransferConfig, TransferEngine
from pd.transfer.state import TransferTimeouts
from pd.worker.loop import EngineThread
from pd.worker.metrics import KV_PAGES_CAPACITY
from pd.worker.parallel import Lockstep, destroy_process_groups, init_process_groups
from pd.worker.rooms import resolve

log = logging.getLogger(__name__)

ROLES = {"prefill": bpb.ROLE_PREFILL, "decode": bpb.ROLE_DECODE, "colocated": bpb.ROLE_COLOCATED}
_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    *SERVER_OPTIONS,  # the proxy's keepalive pings are welcome
]


@dataclass(frozen=True)
class WorkerConfig:
    """One rank of a prefill or decode instance."""

    role: str
    engine: EngineConfig
    bootstrap: str  # "host:port" of the bootstrap server
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    instance_id: str | None = None  # None: "<role>-<host>-<port>"
    model_name: str | None = None  # None: the model directory's name
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    timeouts: TransferTimeouts = field(default_factory=TransferTimeouts)
    cluster_token: str | None = None
    aux_slots: int = 1024  # rooms that can be in transfer at once
    decode_headroom_tokens: int = 64  # decode: pages reserved beyond the prompt when a room arrives
    max_pending: int = 4096  # decode: rooms waiting for pages before new ones are refused

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.engine.model_path).resolve().name


def uses_low_latency_moe(role: str, par: ParallelConfig) -> bool:
    """Decode ranks of a multi-rank instance dispatch MoE tokens in low-latency mode (graph-safe)."""
    return role == "decode" and par.size > 1


def rank_engine_config(role: str, engine: EngineConfig, par: ParallelConfig) -> EngineConfig:
    """The engine config of one rank of a ``role`` instance: its own device; no decode graphs on prefill
    (it never decodes, and normal EP dispatch synchronises with the host, so it cannot be captured);
    on low-latency decode ranks, steps no larger than the low-latency buffers (M = max_running)."""
    cfg = dataclasses.replace(engine, device=par.rank_device(engine.device))
    if role == "prefill":
        cfg = dataclasses.replace(cfg, cuda_graph=False)
    if uses_low_latency_moe(role, par):
        cfg = dataclasses.replace(cfg, chunk_size=min(cfg.chunk_size, cfg.max_running))
    return cfg


class WorkerBase:
    """A worker rank: subclasses add the role's request RPCs and the engine thread's ``step``."""

    role = ""
    uses_transfer = True  # moves KV through the transfer engine (prefill, decode; not colocated)

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        path = cfg.engine.model_path
        self.tokenizer_files = TokenizerFiles.read(path)
        self.tokenizer = Tokenizer.from_files(self.tokenizer_files)
        self.hf_config = load_hf_config(path)
        par = cfg.parallel
        engine_cfg = rank_engine_config(self.role, cfg.engine, par)
        low_latency = uses_low_latency_moe(self.role, par)
        self.lockstep = None
        ep_group = None
        if par.size > 1:
            ep_group, control = init_process_groups(par, engine_cfg.device)
            self.lockstep = Lockstep(control)
        model_cfg = ModelConfig.from_hf(self.hf_config)
        device_type = engine_cfg.device.split(":")[0]
        # A colocated instance runs every MoE step in normal mode, like a prefill instance.
        ep_role = "decode" if self.role == "decode" else "prefill"
        ep_name = par.ep_backend or default_ep_backend(ep_role, device_type, par.size)
        ep_cfg = EPConfig(
            model_cfg.n_routed_experts,
            model_cfg.hidden_size,
            engine_cfg.max_running,
            engine_cfg.torch_dtype,
            par.rank,
            par.size,
            engine_cfg.device,
        )
        ep = make_ep_backend(ep_name, ep_cfg, ep_group)
        runner = ModelRunner(engine_cfg, model_cfg, ep, low_latency, par.expert_placement)
        self.engine = Engine(engine_cfg, self.tokenizer, runner)
        log.info("rank %d/%d: EP backend %s, low-latency MoE %s", par.rank, par.size, ep_name, low_latency)
        self.pool = self.engine.runner.pool
        self.transfer_engine = TransferEngine(cfg.transfer) if self.uses_transfer else None
        self.aux = AuxBuffer(cfg.aux_slots, self.pool.buffer.device) if self.uses_transfer else None
        self.thread = EngineThread(
            self.step, self.has_work, name=f"{self.role}-engine", lockstep=self.lockstep, device=runner.device
        )
        self.endpoint = ""
        self.instance_id = cfg.instance_id or ""
        self.incarnation = new_incarnation()
        self.bootstrap: BootstrapClient | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._init_metrics()

    # ---- subclass hooks (engine thread) ----

    def step(self) -> None:
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def add_servicers(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def load(self) -> bpb.Load:
        raise NotImplementedError

    def transfer_rooms(self) -> int:
        """Rooms the KV sender or receiver still tracks."""
        raise NotImplementedError

    # ---- metrics ----

    def _init_metrics(self) -> None:
        m = self.metrics = Registry()
        self.labels = {"role": self.role, "instance": "", "rank": str(self.cfg.parallel.rank)}
        self.m_pages_used = m.gauge(
            "pd_kv_pages_used", "KV cache pages in use.", ["role", "instance", "rank"]
        )
        self.m_pages_total = m.gauge(
            KV_PAGES_CAPACITY, "KV cache pages that can hold requests.", ["role", "instance", "rank"]
        )
        self.m_rooms = m.gauge(
            "pd_rooms_open", "Rooms (requests) this rank holds, in any stage.", ["role", "instance", "rank"]
        )
        self.m_transfer_rooms = m.gauge(
            "pd_transfer_rooms_open",
            "Rooms the KV transfer manager tracks (not yet released).",
            ["role", "instance", "rank"],
        )
        self.m_requests = m.counter("pd_requests_total", "Requests by outcome.", ["role", "outcome"])
        self.m_aborts = m.counter("pd_aborts_total", "Requests aborted.", ["role"])
        self.m_queue = m.gauge("pd_queue_length", "Requests per queue.", ["role", "queue"])
        self.m_transfer_failures = m.counter(
            "pd_transfer_failures_total", "KV transfers that failed.", ["role"]
        )
        self.m_transfer_bytes = m.counter(
            "pd_transfer_bytes_total", "KV bytes handed to the transfer.", ["role"]
        )
        self.m_expert_tokens = m.gauge(
            "pd_expert_tokens",
            "Cumulative (token, expert) pairs each expert received on this rank, summed over MoE layers.",
            ["role", "instance", "rank", "expert"],
        )
        self.m_transfer_seconds = m.histogram(
            "pd_transfer_seconds", "Time from a room's arrival to its KV transfer's end.", ["role"]
        )

    def _label_metrics(self) -> None:
        """Binds the page gauges once the instance id (which may depend on the port) is known."""
        self.labels["instance"] = self.instance_id
        self.m_pages_used.set_function(lambda: self.engine.allocator.num_used, **self.labels)
        self.m_pages_total.set_function(lambda: self.engine.allocator.num_pages - 1, **self.labels)
        self.m_rooms.set_function(lambda: len(self.rooms), **self.labels)
        self.m_transfer_rooms.set_function(self.transfer_rooms, **self.labels)

    # ---- shared RPCs ----

    async def ModelInfo(self, request: wpb.ModelInfoRequest, context) -> wpb.ModelInfoReply:
        f = self.tokenizer_files
        return wpb.ModelInfoReply(
            model_name=self.cfg.served_model_name,
            max_context_len=self.engine.context_len,
            vocab_size=self.engine.model_cfg.vocab_size,
            tokenizer_json=f.tokenizer_json,
            tokenizer_config_json=json.dumps(f.tokenizer_config),
            generation_config_json=json.dumps(f.generation_config),
            chat_template=f.chat_template or "",
        )

    async def Health(self, request: wpb.WorkerHealthRequest, context) -> wpb.WorkerHealthReply:
        if not self.thread.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine thread is dead: {self.thread.error!r}")
        load = self.load()
        return wpb.WorkerHealthReply(
            role=self.role,
            running=load.running_requests,
            waiting=load.waiting_requests,
            kv_pages_used=self.engine.allocator.num_used,
            kv_pages_total=self.engine.allocator.num_pages - 1,
        )

    async def Abort(self, request: wpb.CancelRequest, context) -> wpb.CancelReply:
        """Ends a room wherever it is; ``found`` says whether this rank knew it."""
        found = asyncio.get_running_loop().create_future()
        reason = request.reason or "aborted"
        self.thread.submit(lambda: self.post(resolve, found, self._abort(request.room, reason)))
        return wpb.CancelReply(found=await found)

    def _abort(self, room: int, reason: str) -> bool:
        """Engine thread: aborts ``room``; True if it was known here."""
        raise NotImplementedError

    async def Metrics(self, request: wpb.MetricsRequest, context) -> wpb.MetricsReply:
        self._read_expert_counters()
        return wpb.MetricsReply(text=self.metrics.render())

    def _read_expert_counters(self) -> None:
        """Copies the on-device per-expert counters into the gauges (one device read per scrape)."""
        runner = self.engine.runner
        if not runner.model_cfg.n_routed_experts:
            return
        counts = runner.model.expert_token_counts().tolist()
        for expert, n in zip(runner.placement.local_experts(self.cfg.parallel.rank), counts):
            self.m_expert_tokens.set(n, **self.labels, expert=str(expert))

    # ---- registration ----

    def rank_info(self) -> bpb.RankInfo:
        layout = self.pool.layout
        return bpb.RankInfo(
            protocol_version=PROTOCOL_VERSION,
            model_fingerprint=model_fingerprint(self.hf_config),
            model_name=self.cfg.served_model_name,
            max_context_len=self.engine.context_len,
            role=ROLES[self.role],
            instance_id=self.instance_id,
            dp_rank=self.cfg.parallel.rank,
            dp_size=self.cfg.parallel.size,
            grpc_endpoint=self.endpoint,
            transfer_session=self.transfer_engine.session_id if self.transfer_engine else "",
            transfer_protocol=self.cfg.transfer.protocol if self.transfer_engine else "",
            kv_base_addr=self.pool.data_ptr,
            kv_nbytes=self.pool.nbytes,
            num_pages=layout.num_pages,
            page_size=layout.page_size,
            page_nbytes_per_layer=layout.page_nbytes_per_layer,
            num_layers=layout.num_layers,
            latent_dim=layout.latent_dim,
            kv_dtype=dtype_name(layout.dtype),
            kv_order=layout.order.value,
            aux_base_addr=self.aux.data_ptr if self.aux else 0,
            aux_nbytes=self.aux.nbytes if self.aux else 0,
            aux_slot_nbytes=AUX_RECORD_NBYTES if self.aux else 0,
            incarnation=self.incarnation,
        )

    # ---- the event loop side ----

    def post(self, fn, *args) -> None:
        """Runs ``fn(*args)`` on the event loop (from any thread)."""
        self._loop.call_soon_threadsafe(fn, *args)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serves until ``stop()``: gRPC server up, registered, engine thread running."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = grpc.aio.server(
            migration_thread_pool=ThreadPoolExecutor(16, thread_name_prefix=f"{self.role}-rpc"),
            interceptors=aio_server_interceptors(self.cfg.cluster_token),
            options=_GRPC_OPTIONS,
        )
        self.add_servicers(server)
        port = server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if port == 0:
            raise OSError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        self.endpoint = f"{self.cfg.host}:{port}"
        self.instance_id = self.cfg.instance_id or f"{self.role}-{self.cfg.host}-{port}"
        if self.cfg.parallel.size > 1 and not self.cfg.instance_id:
            raise ValueError("ranks of a multi-rank instance need a common instance_id")
        self._label_metrics()
        self.on_endpoint()
        await server.start()
        self.thread.start()
        self.bootstrap = BootstrapClient(self.cfg.bootstrap, cluster_token=self.cfg.cluster_token)
        await asyncio.to_thread(self.bootstrap.register, self.rank_info(), self.load())
        self.bootstrap.start_heartbeat(self.load)
        log.info(
            "%s rank %d/%d of %s serving %s on %s (pid %d)",
            self.role,
            self.cfg.parallel.rank,
            self.cfg.parallel.size,
            self.instance_id,
            self.cfg.served_model_name,
            self.endpoint,
            os.getpid(),
        )
        if ready is not None:
            ready.set()
        try:
            await self._stopping.wait()
        finally:
            await asyncio.to_thread(self._deregister)
            await server.stop(grace=1.0)
            self.thread.stop(timeout=self.cfg.parallel.collective_timeout_s)
            self.close_transfer()
            self.engine.runner.close()  # CUDA graphs go before the process group
            destroy_process_groups()

    def on_endpoint(self) -> None:
        """Called once the gRPC endpoint is known, before serving starts."""

    def close_transfer(self) -> None:
        if self.transfer_engine is not None:
            self.transfer_engine.close()

    def _deregister(self) -> None:
        if self.bootstrap is not None:
            self.bootstrap.stop_heartbeat()
            try:
                self.bootstrap.deregister()
            except Exception as e:  # best effort: the lease expires anyway
                log.info("deregister failed: %s", e)
            self.bootstrap.close()

    def stop(self) -> None:
        """Asks ``serve`` to return (thread-safe)."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
