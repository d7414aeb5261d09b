"""The proxy's view of the cluster: registered ranks from the bootstrap server, gRPC stubs to them,
and the choice of a prefill rank and a decode rank for each request (least outstanding requests)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc

from pd.bootstrap.client import BootstrapClient, BootstrapError
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.auth import auth_metadata
from pd.tokenizer import Tokenizer, TokenizerFiles

log = logging.getLogger(__name__)

# ModelInfo carries tokenizer.json (several MB for real models): allow large replies.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True)
class Rank:
    """One registered rank that can take requests."""

    role: int  # bootstrap_pb2.ROLE_PREFILL / ROLE_DECODE
    instance_id: str
    dp_rank: int
    endpoint: str
    model_name: str
    max_context_len: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.instance_id, self.dp_rank)

    @property
    def label(self) -> str:
        return f"{self.instance_id}/{self.dp_rank}"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_context_len: int
    vocab_size: int
    tokenizer: Tokenizer


@dataclass(frozen=True)
class Route:
    """Where one request goes: a prefill rank and a decode rank, or one colocated rank (prefill None)."""

    decode: Rank  # streams the tokens: a decode rank, or a colocated one
    prefill: Rank | None

    @property
    def ranks(self) -> tuple[Rank, ...]:
        return (self.decode,) if self.prefill is None else (self.prefill, self.decode)


class NoWorkers(Exception):
    """No prefill or no decode rank serves the model right now."""


class Router:
    def __init__(self, bootstrap: str, cluster_token: str | None = None, refresh_s: float = 1.0) -> None:
        self.client = BootstrapClient(bootstrap, cluster_token=cluster_token, timeout=2.0, retry_for=0.0)
        self.token = cluster_token
        self.refresh_s = refresh_s
        self.ranks: dict[tuple[str, int], Rank] = {}
        self.outstanding: dict[tuple[str, int], int] = {}
        self.assigned: dict[tuple[str, int], int] = {}  # requests ever sent: breaks ties evenly
        self.last_refresh_ok: float | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._model_info: dict[str, ModelInfo] = {}
        self._task: asyncio.Task | None = None

    # ---- registry ----

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for ch in self._channels.values():
            await ch.close()
        self.client.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            instances = await asyncio.to_thread(self.client.list)
        except BootstrapError as e:
            log.warning("bootstrap server unreachable: %s", e)
            return
        ranks = {}
        for inst in instances:
            for entry in inst.ranks:
                info = entry.info
                rank = Rank(
                    info.role,
                    info.instance_id,
                    info.dp_rank,
                    info.grpc_endpoint,
                    info.model_name,
                    info.max_context_len,
                )
                ranks[rank.key] = rank
        gone = set(self.ranks) - set(ranks)
        if gone:
            log.info("ranks left the registry: %s", sorted(gone))
        self.ranks = ranks
        self.last_refresh_ok = time.monotonic()

    @property
    def bootstrap_reachable(self) -> bool:
        return (
            self.last_refresh_ok is not None
            and time.monotonic() - self.last_refresh_ok < 3 * self.refresh_s + 2
        )

    def ranks_of(self, role: int, model: str | None = None) -> list[Rank]:
        return [r for r in self.ranks.values() if r.role == role and (model is None or r.model_name == model)]

    def models(self) -> list[str]:
        """Models that can be served: with a colocated rank, or with a prefill and a decode rank."""
        prefill = {r.model_name for r in self.ranks_of(bpb.ROLE_PREFILL)}
        pairs = prefill & {r.model_name for r in self.ranks_of(bpb.ROLE_DECODE)}
        return sorted(pairs | {r.model_name for r in self.ranks_of(bpb.ROLE_COLOCATED)})

    def _least_busy(self, candidates: list[Rank]) -> Rank:
        # Fewest outstanding requests; ties: fewest requests so far, so sequential load spreads too.
        return min(
            candidates, key=lambda r: (self.outstanding.get(r.key, 0), self.assigned.get(r.key, 0), r.key)
        )

    def pick(self, model: str) -> Route:
        """A colocated rank serving ``model``, else a prefill and a decode rank, each the least busy;
        counts them busy until ``release``."""
        colocated = self.ranks_of(bpb.ROLE_COLOCATED, model)
        if colocated:
            route = Route(self._least_busy(colocated), None)
        else:
            chosen = []
            for role, name in ((bpb.ROLE_PREFILL, "prefill"), (bpb.ROLE_DECODE, "decode")):
                candidates = self.ranks_of(role, model)
                if not candidates:
                    raise NoWorkers(f"no {name} rank serving model {model!r} is registered")
                chosen.append(self._least_busy(candidates))
            route = Route(chosen[1], chosen[0])
        for r in route.ranks:
            self.outstanding[r.key] = self.outstanding.get(r.key, 0) + 1
            self.assigned[r.key] = self.assigned.get(r.key, 0) + 1
        return route

    def release(self, *ranks: Rank) -> None:
        for r in ranks:
            self.outstanding[r.key] = max(0, self.outstanding.get(r.key, 0) - 1)

    # ---- gRPC ----

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        return ch

    def prefill_stub(self, rank: Rank) -> wpb_grpc.PrefillWorkerStub:
        return wpb_grpc.PrefillWorkerStub(self.channel(rank.endpoint))

    def decode_stub(self, rank: Rank) -> wpb_grpc.DecodeWorkerStub:
        return wpb_grpc.DecodeWorkerStub(self.channel(rank.endpoint))

    def stub(self, rank: Rank) -> wpb_grpc.PrefillWorkerStub | wpb_grpc.DecodeWorkerStub:
        # Decode and colocated ranks both serve the DecodeWorker service.
        return self.prefill_stub(rank) if rank.role == bpb.ROLE_PREFILL else self.decode_stub(rank)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.token)

    async def model_info(self, model: str) -> ModelInfo:
        """Tokenizer and limits of ``model``, fetched once from one of its ranks."""
        info = self._model_info.get(model)
        if info is not None:
            return info
        ranks = [
            r
            for role in (bpb.ROLE_DECODE, bpb.ROLE_COLOCATED, bpb.ROLE_PREFILL)
            for r in self.ranks_of(role, model)
        ]
        if not ranks:
            raise NoWorkers(f"no rank serves model {model!r}")
        reply = await self.stub(ranks[0]).ModelInfo(
            wpb.ModelInfoRequest(), timeout=10.0, metadata=self.metadata
        )
        files = TokenizerFiles(
            tokenizer_json=reply.tokenizer_json,
            tokenizer_config=json.loads(reply.tokenizer_config_json or "{}"),
            generation_config=json.loads(reply.generation_config_json or "{}"),
            chat_template=reply.chat_template or None,
        )
        info = ModelInfo(
            reply.model_name, reply.max_context_len, reply.vocab_size, Tokenizer.from_files(files)
        )
        self._model_info[model] = info
        return info
