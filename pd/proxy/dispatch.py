"""Dispatch: one admitted ``Job`` through a prefill rank and a decode rank.

Owns the choice of ranks (``Router.pick``: the least busy), the room id, ``Prefill`` on P and
``Generate`` on D sent concurrently, one retry on another instance of a side that failed before the first
token, the ``Abort`` of every attempt that did not run to its finish on both of its sides, and the metrics of the
request path (TTFT, TPOT, latency, tokens, retries, aborts). No HTTP here: ``Dispatcher.run(job)`` is an
async generator of ``Chunk``s that raises ``APIError`` when P or D fails; closing it (or cancelling the
task that awaits it) before the last chunk aborts the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass

import grpc

from pd.metrics import Registry
from pd.proxy.admission import Job
from pd.proxy.protocol import APIError
from pd.proxy.router import NoWorkers, Rank, Route, Router
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.rpc.sampling import prompt_from_proto, sampling_to_proto, top_from_proto
from pd.types import TopLogprobs

log = logging.getLogger(__name__)

# Worker status codes, as the client sees them.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Failures before the first token worth one more try on another instance (see Dispatcher.run).
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
ABORT_TIMEOUT_S = 2.0
PREFILL_REPLY_GRACE_S = 0.05  # how long the last chunk waits for a prefill reply still on its way


# The phases of a request's latency, in the order they happen (``pd_request_phase_seconds{phase}``):
# the user-visible TTFT is the sum of the first six; ``decode_pages_wait`` runs alongside the prefill.
PHASES = (
    "proxy",  # arrival at the proxy to the RPCs sent: body, tokenization, admission queue, routing
    "prefill_queue",  # the prefill rank's queue
    "prefill_compute",  # its chunks, to the first token sampled
    "kv_transfer",  # the KV tail and the first token on the wire, to the prefill side's end
    "decode_admit",  # the KV's arrival on the decode rank to the first token's emission
    "delivery",  # the first token's emission to the proxy receiving it (wall clocks of both processes)
    "first_decode_step",  # the first token's emission to the second's
    "tpot",  # mean time between tokens after the first, on the decode rank
    "decode_pages_wait",  # the decode rank's wait for KV pages and a running slot before the transfer
)
TTFT_PHASES = PHASES[:6]


@dataclass(frozen=True)
class RoomTimes:
    """What the ranks measured of one room: the prefill reply's and the last decode chunk's phases, and when
    the proxy received the first token chunk (wall clock, to compare with the decode rank's)."""

    prefill: wpb.PrefillPhases | None
    decode: wpb.DecodePhases | None
    first_received_unix: float


@dataclass(frozen=True)
class Chunk:
    """Tokens of one choice (``index``) streamed by the decode rank; a choice's last chunk carries its
    ``finish_reason``, and the request's last chunk (``done``: every choice has finished; for a disaggregated
    room) ``phases``: seconds per ``PHASES`` entry plus ``ttft`` and ``kv_bytes``."""

    room: int  # the room that produced it (one per request once the first chunk came)
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    times: RoomTimes | None = None
    phases: dict[str, float] | None = None
    logprobs: tuple[float, ...] = ()  # one per token
    top: tuple[TopLogprobs, ...] = ()  # one per token, when asked
    prompt: tuple[tuple[float, TopLogprobs], ...] = ()  # each choice's first chunk's, when asked (echo)
    index: int = 0  # the choice (n > 1)
    done: bool = False  # the request's last chunk


class _AttemptFailed(Exception):
    """``rank`` (the attempt's prefill or decode rank) failed before the decode stream produced anything: the
    attempt is lost, and another rank may do better."""

    def __init__(self, rank: Rank, error: APIError, code: grpc.StatusCode | None) -> None:
        super().__init__(error.message)
        self.rank, self.error, self.code = rank, error, code

    @property
    def side(self) -> str:
        return _side(self.rank)


def _side(rank: Rank) -> str:
    """The side of an attempt a retry replaces: "prefill", or "decode" for a decode or colocated rank."""
    return "prefill" if rank.role == bpb.ROLE_PREFILL else "decode"


class Dispatcher:
    def __init__(
        self, router: Router, metrics: Registry, request_timeout_s: float, retry_prefill: bool
    ) -> None:
        self.router = router
        self.timeout_s, self.retry_prefill = request_timeout_s, retry_prefill
        self._background: set[asyncio.Task] = set()
        m = metrics
        self.m_ttft = m.histogram("pd_proxy_ttft_seconds", "Time to first token seen by the proxy.")
        self.m_tpot = m.histogram(
            "pd_proxy_tpot_seconds", "Mean time per output token after the first, per request."
        )
        self.m_e2e = m.histogram("pd_proxy_e2e_seconds", "Request latency end to end.")
        self.m_aborts = m.counter(
            "pd_proxy_aborts_total", "Rooms aborted (client gone or failure).", ["reason"]
        )
        self.m_tokens = m.counter("pd_proxy_tokens_total", "Tokens, by kind.", ["kind"])
        self.m_retries = {
            side: m.counter(
                f"pd_proxy_{side}_retries_total",
                f"Requests moved to another {side} instance after a failure.",
            )
            for side in ("prefill", "decode")
        }
        self.m_phase = m.histogram(
            "pd_request_phase_seconds", "Where each request's latency went, by phase (see PHASES).", ["phase"]
        )
        self.m_kv_rate = m.histogram(
            "pd_kv_transfer_gbytes_per_second",
            "KV bytes of a room over its transfer phase, GB/s.",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300),
        )
        self.m_ttft_gap = m.histogram(
            "pd_request_ttft_unaccounted_seconds",
            "TTFT minus the sum of its phases (hand-offs the phases do not cover; negative ones count as 0).",
        )

    async def run(self, job: Job) -> AsyncGenerator[Chunk, None]:
        """D's chunks for ``job``; raises APIError if no rank is there (503) or P or D fails.

        A rank that fails with UNAVAILABLE (dead, hung past the keepalive, shutting down, or its transfer
        failed) or refuses with RESOURCE_EXHAUSTED (its queue is full) before the first token is replaced
        once per side by a rank of another instance of its role, in a new room: a prefill rank when
        ``retry_prefill`` is set, a decode (or colocated) rank always (nothing was streamed yet).
        """
        try:
            route = self.router.pick(job.model.name, job.prompt_ids)
        except NoWorkers as e:
            raise APIError(503, str(e)) from None
        retried: set[str] = set() if self.retry_prefill else {"prefill"}
        first_at, sent = None, time.monotonic()
        tokens: dict[int, int] = {}  # per choice
        try:
            while True:
                room = secrets.randbits(63)
                try:
                    async with contextlib.aclosing(self._attempt(job, room, route)) as chunks:
                        async for chunk in chunks:
                            now = time.monotonic()
                            if first_at is None and chunk.token_ids:
                                first_at = now
                                self.m_ttft.observe(now - job.arrived)
                            tokens[chunk.index] = tokens.get(chunk.index, 0) + len(chunk.token_ids)
                            if chunk.done:
                                self._finished(job, now, first_at, tokens)
                                if chunk.times is not None and first_at is not None:
                                    phases = self._phases(
                                        room, sent - job.arrived, first_at - job.arrived, chunk.times
                                    )
                                    chunk = dataclasses.replace(chunk, phases=phases)
                            yield chunk
                    return
                except _AttemptFailed as e:
                    if e.side in retried or e.code not in _RETRY:
                        raise e.error from None
                    try:
                        other = self.router.pick_instead(e.rank, job.model.name, job.prompt_ids)
                    except NoWorkers:
                        raise e.error from None
                    retried.add(e.side)
                    self.m_retries[e.side].inc()
                    log.warning("room %x: %s; retrying on %s", room, e.error.message, other.label)
                    self.router.release(e.rank)
                    route = Route(route.decode, other) if e.side == "prefill" else Route(other, route.prefill)
        finally:
            self.router.release(*route.ranks)

    def _phases(self, room: int, proxy_s: float, ttft: float, times: RoomTimes) -> dict[str, float] | None:
        """The request's phases (``PHASES``) from the ranks' measurements, observed into the histograms and
        logged at debug level keyed by the room; None when a side's measurements are missing."""
        p, d = times.prefill, times.decode
        if p is None or d is None:
            return None
        emitted_unix = d.first_emit_unix
        phases = {
            "proxy": proxy_s,
            "prefill_queue": p.queue_s,
            "prefill_compute": p.compute_s,
            "kv_transfer": p.transfer_s,
            "decode_admit": d.admit_s,
            "delivery": max(0.0, times.first_received_unix - emitted_unix),
            "first_decode_step": d.first_step_s,
            "tpot": d.tpot_s,
            "decode_pages_wait": d.pages_wait_s,
        }
        for phase, seconds in phases.items():
            self.m_phase.observe(seconds, phase=phase)
        if p.transfer_s > 0:
            self.m_kv_rate.observe(p.transfer_bytes / p.transfer_s / 1e9)
        gap = ttft - sum(phases[k] for k in TTFT_PHASES)
        self.m_ttft_gap.observe(max(0.0, gap))
        log.debug(
            "room %x phases: %s; ttft %.4f s, unaccounted %.4f s, kv %d bytes",
            room,
            " ".join(f"{k}={v:.4f}" for k, v in phases.items()),
            ttft,
            gap,
            p.transfer_bytes,
        )
        return {**phases, "ttft": ttft, "kv_bytes": float(p.transfer_bytes)}

    def _finished(self, job: Job, now: float, first_at: float | None, tokens: dict[int, int]) -> None:
        """``tokens``: completion tokens per choice; the choices decode side by side, so the time per token
        is the longest choice's."""
        self.m_e2e.observe(now - job.arrived)
        steps = max(tokens.values(), default=0)
        if first_at is not None and steps > 1:
            self.m_tpot.observe((now - first_at) / (steps - 1))
        self.m_tokens.inc(len(job.prompt_ids), kind="prompt")
        self.m_tokens.inc(sum(tokens.values()), kind="completion")

    async def _attempt(self, job: Job, room: int, route: Route) -> AsyncGenerator[Chunk, None]:
        """One try of ``job`` in ``room`` on ``route``. Raises _AttemptFailed if a rank fails before D produced
        anything (after that the prefill's outcome no longer matters). Unless it ran to the last
        chunk, the room is aborted on both sides."""
        prefill_rank, decode_rank = route.prefill, route.decode
        sampling = sampling_to_proto(job.sampling)
        md, timeout = self.router.metadata, self.timeout_s
        generate = wpb.GenerateRequest(room=room, token_ids=job.prompt_ids, sampling=sampling)
        if prefill_rank is None:  # a colocated rank prefills itself
            prefill = asyncio.get_running_loop().create_future()
            prefill.set_result(None)
        else:
            request = wpb.PrefillRequest(
                room=room,
                token_ids=job.prompt_ids,
                sampling=sampling,
                decode_instance=decode_rank.instance_id,
                decode_rank=decode_rank.dp_rank,
            )
            prefill = asyncio.ensure_future(
                self.router.prefill_stub(prefill_rank).Prefill(request, timeout=timeout, metadata=md)
            )
            generate.prefill_instance = prefill_rank.instance_id
            generate.prefill_rank = prefill_rank.dp_rank
            generate.prefill_endpoint = prefill_rank.endpoint
        call = self.router.decode_stub(decode_rank).Generate(generate, timeout=timeout, metadata=md)
        finished = started = False
        unfinished = job.sampling.n  # choices without their last chunk yet
        first_seen: set[int] = set()  # choices whose first token came
        scored_prompt: list[tuple[float, TopLogprobs]] = []  # echo: each choice's first chunk carries it
        want_logprobs = job.sampling.top_logprobs > 0 or job.sampling.prompt_logprobs is not None
        first_received_unix = 0.0
        stream = call.__aiter__()
        next_chunk: asyncio.Future | None = None
        try:
            while True:
                next_chunk = asyncio.ensure_future(stream.__anext__())
                if not started and not prefill.done():
                    await asyncio.wait({next_chunk, prefill}, return_when=asyncio.FIRST_COMPLETED)
                prefill_error = prefill.exception() if not started and prefill.done() else None
                # Prefill failed and D has no token to show for it: this attempt is lost.
                if prefill_error is not None and (not next_chunk.done() or next_chunk.exception()):
                    assert prefill_rank is not None  # a colocated rank's prefill future does not fail
                    raise self._attempt_failed(prefill_rank, prefill_error)
                try:
                    reply = await next_chunk
                except StopAsyncIteration:
                    raise APIError(500, "the decode stream ended without a finish reason") from None
                except grpc.aio.AioRpcError as e:
                    if not started:
                        raise self._attempt_failed(decode_rank, e) from None
                    self._call_failed(decode_rank, e)
                    raise _api_error(e, "decode") from None
                started = True
                if not first_received_unix and reply.token_ids:
                    first_received_unix = time.time()
                # Finished once the last chunk of the last choice is handed over: a consumer that stops after
                # it (the SSE writer does) closes this generator at the yield, and that must not abort the room.
                unfinished -= bool(reply.finish_reason)
                finished = unfinished == 0
                times = None
                if finished and reply.HasField("phases"):
                    times = RoomTimes(await _prefill_phases(prefill), reply.phases, first_received_unix)
                top = [top_from_proto(t) for t in reply.top_logprobs]
                scored_prompt = scored_prompt or prompt_from_proto(reply.prompt_logprobs)
                first = bool(reply.token_ids) and reply.index not in first_seen
                if first and prefill_rank is not None and want_logprobs:
                    # The first token was sampled on the prefill rank: its alternatives and the prompt's
                    # logprobs come with the prefill reply.
                    pr = await _prefill_reply(prefill, timeout)
                    if pr is None:
                        raise APIError(502, "the prefill rank's logprobs were lost (its reply failed)")
                    if top:
                        top[0] = top_from_proto(pr.first_tops[reply.index])
                    scored_prompt = prompt_from_proto(pr.prompt_logprobs)
                if first:
                    first_seen.add(reply.index)
                yield Chunk(
                    room,
                    reply.text,
                    tuple(reply.token_ids),
                    reply.finish_reason or None,
                    times,
                    logprobs=tuple(reply.logprobs),
                    top=tuple(top),
                    prompt=tuple(scored_prompt) if first else (),
                    index=reply.index,
                    done=finished,
                )
                if finished:
                    return
        finally:
            if not finished:
                call.cancel()
                prefill.cancel()
                self._spawn(self._abort(room, route.ranks, "client went away or request failed"))
            for fut in (prefill, next_chunk):
                if fut is not None:
                    fut.cancel()
                    fut.add_done_callback(_consume_exception)

    def _attempt_failed(self, rank: Rank, exc: BaseException) -> _AttemptFailed:
        self._call_failed(rank, exc)
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        return _AttemptFailed(rank, _api_error(exc, _side(rank)), code)

    def _call_failed(self, rank: Rank, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.router.call_failed(rank)

    async def _abort(self, room: int, ranks: tuple[Rank, ...], reason: str) -> None:
        self.m_aborts.inc(reason="incomplete")
        req = wpb.CancelRequest(room=room, reason=reason)
        for rank in ranks:
            try:
                await self.router.stub(rank).Abort(
                    req, timeout=ABORT_TIMEOUT_S, metadata=self.router.metadata
                )
            except grpc.aio.AioRpcError as e:
                log.info("room %x: abort on %s failed: %s", room, rank.label, e.code().name)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for the Aborts still being sent (each is bounded by ABORT_TIMEOUT_S per rank)."""
        while self._background:
            await asyncio.wait(set(self._background))


def _api_error(exc: BaseException, side: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        status = _HTTP_STATUS.get(exc.code(), 500)
        return APIError(status, f"{side} failed: {exc.details() or exc.code().name}")
    return APIError(500, f"{side} failed: {exc!r}")


async def _prefill_reply(
    prefill: asyncio.Future, wait_s: float = PREFILL_REPLY_GRACE_S
) -> wpb.PrefillReply | None:
    """The prefill rank's reply; waits up to ``wait_s`` for a reply still on its way (it normally precedes
    the decode rank's first token), None without one (a failed call, or a colocated rank's)."""
    if not prefill.done():
        await asyncio.wait({prefill}, timeout=wait_s)
    if not prefill.done() or prefill.cancelled() or prefill.exception() is not None:
        return None
    return prefill.result()


async def _prefill_phases(prefill: asyncio.Future) -> wpb.PrefillPhases | None:
    """The prefill reply's phases, None without them."""
    reply = await _prefill_reply(prefill)
    return reply.phases if reply is not None and reply.HasField("phases") else None


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
