"""The proxy's view of the cluster: registered ranks from the bootstrap registry, gRPC stubs to them,
and the choice of a prefill rank (cache-aware, ``pd.proxy.prefix_routing``) and a decode rank (least
outstanding requests) for each request.

Failures: a rank whose call failed with UNAVAILABLE is probed (``Health``); if it does not answer,
it gets no new requests (unless no other rank is left) until it re-registers as a new incarnation
or two leases pass (by then a dead rank has left the registry). A restarted registry lists only the ranks that have re-registered
so far: for one lease after a new registry appears, ranks it does not list yet stay in the view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from pd.bootstrap.client import BootstrapClient, BootstrapError
from pd.proxy.prefix_routing import PrefixRecord, RoutingConfig, block_digests, choose
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.auth import auth_metadata
from pd.rpc.channel import RECONNECT_OPTIONS, keepalive_options
from pd.rpc.tls import TLSConfig, open_aio_channel
from pd.tokenizer import Tokenizer, TokenizerFiles

log = logging.getLogger(__name__)

# ModelInfo carries tokenizer.json (several MB for real models): allow large replies.
_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
PROBE_TIMEOUT_S = 1.0  # a rank that does not answer Health within this after a failed call is down


@dataclass(frozen=True)
class Rank:
    """One registered rank that can take requests."""

    role: int  # bootstrap_pb2.ROLE_PREFILL / ROLE_DECODE
    instance_id: str
    dp_rank: int
    endpoint: str
    model_name: str
    max_context_len: int
    incarnation: str = ""

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
    """``keepalive_s``: HTTP/2 ping interval on the worker channels (``pd.rpc.channel``): a call to a
    rank that stops answering fails within about twice that. ``routing``: how the rank that computes a
    prompt (prefill or colocated) is chosen, and the decode rank too (a conversation's next turn goes back
    to the decode rank whose prefix cache holds its earlier turns, balanced against load);
    ``decisions`` and ``decode_decisions`` count why each was."""

    def __init__(
        self,
        bootstrap: str,
        cluster_token: str | None = None,
        refresh_s: float = 1.0,
        keepalive_s: float = 5.0,
        tls: TLSConfig | None = None,
        routing: RoutingConfig | None = None,
    ) -> None:
        self.routing = routing = routing or RoutingConfig()
        self.prefixes = PrefixRecord(routing.max_blocks)
        self.decisions: dict[str, int] = {"cache": 0, "load": 0, "imbalance": 0}
        self.decode_decisions: dict[str, int] = dict.fromkeys(self.decisions, 0)
        self.client = BootstrapClient(
            bootstrap, cluster_token=cluster_token, timeout=2.0, retry_for=0.0, tls=tls
        )
        self.tls = tls
        self.token = cluster_token
        self.refresh_s = refresh_s
        self.channel_options = _MESSAGE_OPTIONS + RECONNECT_OPTIONS + keepalive_options(keepalive_s)
        self.ranks: dict[tuple[str, int], Rank] = {}
        self.outstanding: dict[tuple[str, int], int] = {}
        self.assigned: dict[tuple[str, int], int] = {}  # requests ever sent: breaks ties evenly
        self.down: dict[tuple[str, int], tuple[str, float]] = {}  # key -> (incarnation, until)
        self.last_refresh_ok: float | None = None
        self.lease_s = 5.0  # the registry's lease, as it last said
        self._server_id = ""
        self._refill_until = 0.0  # a restarted registry is refilling until then
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._used: dict[str, Rank] = {}  # endpoint -> the rank last sent a request over its channel
        self._closing: set[asyncio.Task] = set()
        self._model_info: dict[str, ModelInfo] = {}
        self._probes: dict[tuple[str, int], asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    # ---- registry ----

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._probes.values()):
            task.cancel()
        for ch in self._channels.values():
            await ch.close()
        self.client.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            reply = await asyncio.to_thread(self.client.list_response)
        except BootstrapError as e:
            log.warning("bootstrap server unreachable: %s", e)  # keep routing to the ranks we know
            return
        now = time.monotonic()
        self.lease_s = reply.lease_seconds or self.lease_s
        if reply.server_id != self._server_id:
            if self._server_id:
                log.warning("the bootstrap server restarted: keeping known ranks while it refills")
                self._refill_until = now + self.lease_s
            self._server_id = reply.server_id
        ranks = {}
        for inst in reply.instances:
            for entry in inst.ranks:
                info = entry.info
                rank = Rank(
                    info.role,
                    info.instance_id,
                    info.dp_rank,
                    info.grpc_endpoint,
                    info.model_name,
                    info.max_context_len,
                    info.incarnation,
                )
                ranks[rank.key] = rank
        if now < self._refill_until:
            ranks = {**self.ranks, **ranks}
        gone = set(self.ranks) - set(ranks)
        if gone:
            log.info("ranks left the registry: %s", sorted(gone))
        for key, (incarnation, until) in list(self.down.items()):
            current = ranks.get(key)
            if current is None or current.incarnation != incarnation or until <= now:
                del self.down[key]  # gone, restarted (a new incarnation) or given another chance
        self.ranks = ranks
        self._prune()
        self.last_refresh_ok = now

    def _prune(self) -> None:
        """Forgets counters and channels of ranks that left (restarts on new ports must not pile up)."""
        for key in [k for k in self.assigned if k not in self.ranks and not self.outstanding.get(k)]:
            del self.assigned[key]  # requests still out on a departed rank keep its counts until released
            self.outstanding.pop(key, None)
        self.prefixes.retain(set(self.ranks.values()))
        live = {r.endpoint for r in self.ranks.values()}
        busy = {r.endpoint for r in self._used.values() if self.outstanding.get(r.key)}
        for endpoint in [e for e in self._channels if e not in live and e not in busy]:
            self._used.pop(endpoint, None)
            task = asyncio.ensure_future(self._channels.pop(endpoint).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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

    def is_down(self, rank: Rank) -> bool:
        return rank.key in self.down

    # ---- choosing ranks ----

    def pick(self, model: str, prompt_ids: Sequence[int] = ()) -> Route:
        """A colocated rank serving ``model``, else a prefill and a decode rank, each by the routing policy
        for ``prompt_ids`` (decode ranks keep a prefix cache of the requests that ended there); counts them
        busy until ``release``."""
        prompt = self._prompt(prompt_ids)
        if self.ranks_of(bpb.ROLE_COLOCATED, model):
            route = Route(self._choose(bpb.ROLE_COLOCATED, model, (), prompt), None)
        else:
            prefill = self._choose(bpb.ROLE_PREFILL, model, (), prompt)
            route = Route(self._choose(bpb.ROLE_DECODE, model, (), prompt, self.decode_decisions), prefill)
        for r in route.ranks:
            self._take(r)
        return route

    def pick_instead(self, failed: Rank, model: str, prompt_ids: Sequence[int] = ()) -> Rank:
        """A rank of ``failed``'s role on another instance, for a retry; counted busy until ``release``."""
        tally = self.decode_decisions if failed.role == bpb.ROLE_DECODE else None
        rank = self._choose(failed.role, model, {failed.instance_id}, self._prompt(prompt_ids), tally)
        self._take(rank)
        return rank

    def _prompt(self, prompt_ids: Sequence[int]) -> tuple[list[bytes], int] | None:
        if self.routing.policy != "cache_aware" or not prompt_ids:
            return None
        return block_digests(prompt_ids), len(prompt_ids)

    def _choose(
        self,
        role: int,
        model: str,
        exclude_instances: Iterable[str],
        prompt: tuple[list[bytes], int] | None = None,
        tally: dict[str, int] | None = None,
    ) -> Rank:
        name = bpb.Role.Name(role).removeprefix("ROLE_").lower()
        registered = self.ranks_of(role, model)
        if not registered:
            raise NoWorkers(f"no {name} rank serving model {model!r} is registered")
        candidates = [r for r in registered if r.instance_id not in exclude_instances]
        if not candidates:
            raise NoWorkers(f"no other {name} rank serving model {model!r} is registered")
        # Ranks that failed a probe only when nothing else is left: a false alarm must not stop serving.
        candidates = [r for r in candidates if not self.is_down(r)] or candidates
        if prompt is None:  # fewest outstanding requests; ties: fewest so far, so sequential load spreads too
            return min(
                candidates, key=lambda r: (self.outstanding.get(r.key, 0), self.assigned.get(r.key, 0), r.key)
            )
        digests, length = prompt
        load = {r: (self.outstanding.get(r.key, 0), self.assigned.get(r.key, 0)) for r in candidates}
        rank, why = choose(self.routing, candidates, load, self.prefixes, digests, length)
        self.prefixes.add(rank, digests)
        (self.decisions if tally is None else tally)[why] += 1
        return rank

    def _take(self, rank: Rank) -> None:
        self._used[rank.endpoint] = rank
        self.outstanding[rank.key] = self.outstanding.get(rank.key, 0) + 1
        self.assigned[rank.key] = self.assigned.get(rank.key, 0) + 1

    def release(self, *ranks: Rank) -> None:
        for r in ranks:
            self.outstanding[r.key] = max(0, self.outstanding.get(r.key, 0) - 1)

    def call_failed(self, rank: Rank) -> None:
        """A call to ``rank`` failed with UNAVAILABLE: probe it; if it does not answer, route around it."""
        if rank.key in self._probes or self.is_down(rank):
            return
        task = asyncio.ensure_future(self._probe(rank))
        self._probes[rank.key] = task
        task.add_done_callback(lambda _: self._probes.pop(rank.key, None))

    async def _probe(self, rank: Rank) -> None:
        try:
            await self.stub(rank).Health(
                wpb.WorkerHealthRequest(), timeout=PROBE_TIMEOUT_S, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "%s failed its health probe (%s): no new requests go there", rank.label, e.code().name
            )
            self.down[rank.key] = (rank.incarnation, time.monotonic() + 2 * self.lease_s)

    # ---- gRPC ----

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = open_aio_channel(endpoint, self.tls, self.channel_options)
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
        """Tokenizer and limits of ``model``, fetched once from one of its ranks (the first that answers)."""
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
        ranks.sort(key=self.is_down)
        for i, rank in enumerate(ranks):
            try:
                reply = await self.stub(rank).ModelInfo(
                    wpb.ModelInfoRequest(), timeout=10.0, metadata=self.metadata
                )
                break
            except grpc.aio.AioRpcError:
                if i == len(ranks) - 1:
                    raise
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
