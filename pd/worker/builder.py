"""Builds one worker rank from its ``WorkerConfig``: process groups, EP backend, model runner, core
engine, transfer engine and manager, role engine, the engine thread, and the warm-up (before the rank
registers: it says it is ready only when every kernel path it serves has run once)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pd.config import EngineConfig, ModelConfig, ParallelConfig, load_hf_config
from pd.engine.colocated import ColocatedEngine
from pd.engine.decode import DecodeEngine
from pd.engine.engine import Engine
from pd.engine.prefill import PrefillEngine
from pd.engine.role import RoleEngine
from pd.engine.runner import ModelRunner
from pd.engine.warmup import warm_up
from pd.ep import EPConfig, default_ep_backend, make_ep_backend
from pd.model.moe import fp8_dispatch
from pd.rpc.tls import TLSConfig
from pd.tokenizer import Tokenizer, TokenizerFiles
from pd.transfer.aux import AuxBuffer, SlotAllocator
from pd.transfer.engine import TransferConfig, TransferEngine
from pd.transfer.receiver import KVReceiver
from pd.transfer.sender import KVSender
from pd.transfer.staging import make_staging
from pd.transfer.state import TransferTimeouts
from pd.worker.loop import CommandQueue
from pd.worker.metrics import WorkerMetrics
from pd.worker.parallel import Lockstep, init_process_groups

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerConfig:
    """One rank of a prefill, decode or colocated instance."""

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
    tls: TLSConfig | None = None  # mutual TLS on its gRPC port and channels (pd.rpc.tls)
    aux_slots: int = 1024  # rooms that can be in transfer at once
    decode_headroom_tokens: int = 64  # decode: pages reserved beyond the prompt when a room arrives
    max_pending: int = 4096  # decode: rooms waiting for pages before new ones are refused
    # On SIGTERM the rank deregisters, refuses new rooms and serves the ones it holds to their end, for this
    # many seconds at most (a second signal stops it at once); 0: it stops at once, failing them.
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.engine.model_path).resolve().name


def uses_low_latency_moe(role: str, par: ParallelConfig, engine: EngineConfig) -> bool:
    """Decode ranks of a multi-rank instance dispatch MoE tokens in low-latency mode (graph-safe), unless the
    engine runs piecewise graphs (the routed experts eager, in normal mode)."""
    return role == "decode" and par.size > 1 and not engine.piecewise_graphs


def rank_engine_config(role: str, engine: EngineConfig, par: ParallelConfig) -> EngineConfig:
    """The engine config of one rank of a ``role`` instance: its own device; no decode graphs on prefill (it
    never decodes; its short prompt steps run in graphs, piecewise on several ranks), no prompt-step graphs on
    decode (it never prefills); on low-latency decode ranks, steps no
    larger than the low-latency buffers (M = max_running)."""
    cfg = dataclasses.replace(engine, device=par.rank_device(engine.device))
    if role == "prefill":
        cfg = dataclasses.replace(cfg, decodes=False)
    if role == "decode":
        cfg = dataclasses.replace(cfg, graph_extend_tokens=0)
    if uses_low_latency_moe(role, par, engine):
        cfg = dataclasses.replace(cfg, chunk_size=min(cfg.chunk_size, cfg.max_running))
    return cfg


@dataclass
class Rank:
    """Everything one rank runs, built and warmed up. The transfer manager is the sender (prefill) or the
    receiver (decode), None on a colocated rank."""

    cfg: WorkerConfig
    hf_config: dict[str, Any]
    tokenizer_files: TokenizerFiles
    engine: Engine
    role_engine: RoleEngine
    commands: CommandQueue
    metrics: WorkerMetrics
    lockstep: Lockstep | None
    transfer_engine: TransferEngine | None
    aux: AuxBuffer | None
    transfer: KVSender | KVReceiver | None


def check_speculative(engine: EngineConfig, model: ModelConfig) -> None:
    """Refuses speculative settings this build cannot serve, before anything is built: a checkpoint without
    the MTP layer (named by ``num_nextn_predict_layers``)."""
    engine.speculative.check_model(model)


def build_rank(cfg: WorkerConfig) -> Rank:
    par, role = cfg.parallel, cfg.role
    files = TokenizerFiles.read(cfg.engine.model_path)
    hf_config = load_hf_config(cfg.engine.model_path)
    model_cfg = ModelConfig.from_hf(hf_config)
    check_speculative(cfg.engine, model_cfg)
    engine_cfg = rank_engine_config(role, cfg.engine, par)
    low_latency = uses_low_latency_moe(role, par, engine_cfg)
    lockstep, ep_group = None, None
    if par.size > 1:
        ep_group, control = init_process_groups(par, engine_cfg.device)
        lockstep = Lockstep(control)
    # A colocated instance runs every MoE step in normal mode, like a prefill instance.
    ep_name = par.ep_backend or default_ep_backend(
        "decode" if role == "decode" else "prefill", engine_cfg.device.split(":")[0], par.size
    )
    device = torch.device(engine_cfg.device)
    ep_cfg = EPConfig(
        model_cfg.n_routed_experts,
        model_cfg.hidden_size,
        engine_cfg.speculative.step_tokens(engine_cfg.max_running),
        engine_cfg.torch_dtype,
        par.rank,
        par.size,
        device,
        ll_fp8=low_latency and fp8_dispatch(model_cfg, engine_cfg.weight_quant(model_cfg), device),
    )
    ep = make_ep_backend(ep_name, ep_cfg, ep_group)
    runner = ModelRunner(engine_cfg, model_cfg, ep, low_latency, par.expert_placement)
    engine = Engine(engine_cfg, Tokenizer.from_files(files), runner)
    log.info(
        "rank %d/%d: EP backend %s, low-latency MoE %s (FP8 dispatch %s), weights %s",
        par.rank,
        par.size,
        ep_name,
        low_latency,
        ep_cfg.ll_fp8,
        f"block-FP8 {runner.quant.block}" if runner.quant else engine_cfg.torch_dtype,
    )
    seconds = warm_up(engine, extend=role != "decode", decode=role != "prefill")
    log.info("rank %d/%d: warm-up ran every %s kernel path in %.1f s", par.rank, par.size, role, seconds)

    metrics, commands = WorkerMetrics(role), CommandQueue()
    pool = runner.pool
    if role == "colocated":
        return Rank(
            cfg,
            hf_config,
            files,
            engine,
            ColocatedEngine(engine, metrics),
            commands,
            metrics,
            lockstep,
            None,
            None,
            None,
        )
    transfer_engine = TransferEngine(cfg.transfer)
    aux = AuxBuffer(cfg.aux_slots, pool.buffer.device)
    role_engine: RoleEngine
    transfer: KVSender | KVReceiver
    if role == "prefill":
        transfer = KVSender(
            transfer_engine,
            pool,
            aux,
            commands.sender_final,
            timeouts=cfg.timeouts,
            cluster_token=cfg.cluster_token,
            tls=cfg.tls,
            kv_checksum=cfg.transfer.kv_checksum,
            writers_per_peer=cfg.transfer.writers_per_peer,
            staging=make_staging(cfg.transfer, transfer_engine.transport, pool),
        )
        role_engine = PrefillEngine(engine, transfer, metrics, cfg.transfer.granularity)
    else:
        transfer = KVReceiver(
            transfer_engine,
            pool,
            aux,
            commands.receiver_final,
            timeouts=cfg.timeouts,
            cluster_token=cfg.cluster_token,
            tls=cfg.tls,
            kv_checksum=cfg.transfer.kv_checksum,
            on_checksum_failure=metrics.checksum_failed,
            staging=make_staging(cfg.transfer, transfer_engine.transport, pool),
        )
        slots = SlotAllocator(aux.num_slots)
        role_engine = DecodeEngine(
            engine, transfer, slots, cfg.decode_headroom_tokens, cfg.max_pending, metrics
        )
    return Rank(
        cfg,
        hf_config,
        files,
        engine,
        role_engine,
        commands,
        metrics,
        lockstep,
        transfer_engine,
        aux,
        transfer,
    )
