"""pd.proxy.dispatch without HTTP and without processes: a scripted router whose stubs play prefill and
decode ranks, and a count of every Abort each side receives."""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import pytest

from pd.metrics import Registry, parse_samples

pytest.importorskip("pydantic")  # pd's dependency (the request models), missing from a bare GPU image
from pd.proxy.admission import Job
from pd.proxy.dispatch import Dispatcher
from pd.proxy.protocol import APIError, parse_request
from pd.proxy.router import ModelInfo, NoWorkers, Rank, Route
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.types import SamplingParams

P1 = Rank(bpb.ROLE_PREFILL, "p1", 0, "127.0.0.1:1", "m", 512)
P2 = Rank(bpb.ROLE_PREFILL, "p2", 0, "127.0.0.1:2", "m", 512)
D = Rank(bpb.ROLE_DECODE, "d1", 0, "127.0.0.1:3", "m", 512)
D2 = Rank(bpb.ROLE_DECODE, "d2", 0, "127.0.0.1:4", "m", 512)
PROMPT = [5, 6, 7]


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"scripted {code.name}"
    )


class FakeCluster:
    """A router and the ranks behind it. ``prefill[label]`` scripts each prefill rank: "ok", or the
    grpc.StatusCode it fails with; ``decode[label]`` each decode rank (D alone by default): "ok", or the code
    its Generate fails with at once. An "ok" decode rank streams ``chunks`` chunks of one token, then
    ``then``: "finish" (the last chunk carries finish_reason "length"), "stall" (waits until cancelled),
    or the grpc.StatusCode it fails with. As in pd, the decode stream of a room produces nothing until
    that room's prefill succeeded (a room whose prefill failed stalls until cancelled)."""

    metadata = ()

    def __init__(
        self,
        prefill: dict[str, object],
        chunks: int = 3,
        then: object = "finish",
        decode: dict[str, object] | None = None,
    ) -> None:
        self.prefill, self.chunks, self.then = prefill, chunks, then
        self.decode = {D.label: "ok"} if decode is None else decode
        self.outstanding: collections.Counter[str] = collections.Counter()
        self.prefills: list[tuple[str, int]] = []  # (rank, room) of every Prefill call
        self.generates: list[int] = []  # room of every Generate call
        self.generated_on: list[str] = []  # the decode rank of every Generate call
        self.aborts: list[tuple[str, int]] = []  # (rank, room) of every Abort call
        self.cancelled: list[int] = []  # rooms whose Generate call was cancelled
        self.failed: list[str] = []  # ranks reported by call_failed
        self.prefilled: dict[int, asyncio.Event] = collections.defaultdict(asyncio.Event)

    # ---- the Router interface that Dispatcher uses ----

    def pick(self, model: str, prompt_ids=()) -> Route:
        self.outstanding.update([P1.label, D.label])
        return Route(D, P1)

    def pick_instead(self, failed: Rank, model: str, prompt_ids=()) -> Rank:
        ranks, scripts = (
            ((P1, P2), self.prefill) if failed.role == bpb.ROLE_PREFILL else ((D, D2), self.decode)
        )
        others = [r for r in ranks if r.label in scripts and r.instance_id != failed.instance_id]
        if not others:
            raise NoWorkers("no other rank")
        self.outstanding.update([others[0].label])
        return others[0]

    def release(self, *ranks: Rank) -> None:
        self.outstanding.subtract(r.label for r in ranks)

    def call_failed(self, rank: Rank) -> None:
        self.failed.append(rank.label)

    def prefill_stub(self, rank: Rank):
        return _Stub(self, rank)

    decode_stub = stub = prefill_stub

    @property
    def busy(self) -> dict[str, int]:
        return {k: v for k, v in self.outstanding.items() if v}


class _Stub:
    def __init__(self, cluster: FakeCluster, rank: Rank) -> None:
        self.c, self.rank = cluster, rank

    async def Prefill(self, req: wpb.PrefillRequest, timeout, metadata) -> wpb.PrefillReply:
        self.c.prefills.append((self.rank.label, req.room))
        assert req.decode_instance in (D.instance_id, D2.instance_id) and list(req.token_ids) == PROMPT
        await asyncio.sleep(0.01)
        outcome = self.c.prefill[self.rank.label]
        if outcome != "ok":
            raise rpc_error(outcome)
        self.c.prefilled[req.room].set()
        return wpb.PrefillReply(prompt_tokens=len(req.token_ids), first_token_ids=[1])

    def Generate(self, req: wpb.GenerateRequest, timeout, metadata) -> _Call:
        self.c.generates.append(req.room)
        self.c.generated_on.append(self.rank.label)
        return _Call(self.c, req.room, self.c.decode[self.rank.label])

    async def Abort(self, req: wpb.CancelRequest, timeout, metadata) -> wpb.CancelReply:
        self.c.aborts.append((self.rank.label, req.room))
        return wpb.CancelReply(found=True)


class _Call:
    """A Generate call: an async iterator of GenerateChunks, with cancel()."""

    def __init__(self, cluster: FakeCluster, room: int, outcome: object) -> None:
        self.c, self.room, self.outcome = cluster, room, outcome

    def cancel(self) -> bool:
        self.c.cancelled.append(self.room)
        return True

    async def _chunks(self):
        if self.outcome != "ok":
            raise rpc_error(self.outcome)
        await self.c.prefilled[self.room].wait()
        for i in range(1, self.c.chunks + 1):
            await asyncio.sleep(0.001)
            last = i == self.c.chunks and self.c.then == "finish"
            yield wpb.GenerateChunk(
                token_ids=[100 + i], text=f"t{i} ", finish_reason="length" if last else ""
            )
        if self.c.then == "stall":
            await asyncio.Event().wait()
        elif self.c.then != "finish":
            raise rpc_error(self.c.then)

    def __aiter__(self):
        return self._chunks()


def make_job() -> Job:
    req = parse_request({"model": "m", "prompt": PROMPT, "max_tokens": 3}, chat=False)
    model = ModelInfo("m", 512, 1000, tokenizer=None)
    return Job(req, model, PROMPT, SamplingParams(max_tokens=3, seed=1), time.monotonic())


def metric(registry: Registry, name: str) -> float:
    return sum(v for (n, _), v in parse_samples(registry.render()).items() if n == name)


def run(cluster: FakeCluster, consume, retry: bool = True):
    """Runs ``consume(chunks)`` on one job's dispatch; returns its result (or exception), the registry."""

    async def main():
        registry = Registry()
        d = Dispatcher(cluster, registry, request_timeout_s=10.0, retry_prefill=retry)
        chunks = d.run(make_job())
        try:
            result = await asyncio.wait_for(consume(chunks), 5.0)
        except (APIError, asyncio.TimeoutError) as e:
            result = e
        finally:
            await chunks.aclose()
        await d.drain()
        return result, registry

    return asyncio.run(main())


async def read_all(chunks) -> list:
    return [c async for c in chunks]


async def read_until_finish(chunks) -> list:
    """Stops after the chunk with the finish reason, without asking for more (as the SSE writer does)."""
    got = []
    async for c in chunks:
        got.append(c)
        if c.finish_reason:
            break
    return got


@pytest.mark.parametrize("consume", [read_all, read_until_finish])
def test_clean_finish_sends_no_abort(consume):
    cluster = FakeCluster({P1.label: "ok"})
    got, registry = run(cluster, consume)
    assert [c.token_ids for c in got] == [(101,), (102,), (103,)] and got[-1].finish_reason == "length"
    assert {c.room for c in got} == set(cluster.generates) and len(cluster.generates) == 1
    assert cluster.aborts == [] and cluster.cancelled == []
    assert metric(registry, "pd_proxy_aborts_total") == 0
    assert metric(registry, "pd_proxy_tokens_total") == len(PROMPT) + 3
    assert cluster.busy == {}


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_failed_prefill_is_retried_once_on_another_instance(code):
    """Dead or hung (UNAVAILABLE), or its queue full (RESOURCE_EXHAUSTED)."""
    cluster = FakeCluster({P1.label: code, P2.label: "ok"})
    got, registry = run(cluster, read_all)
    assert got[-1].finish_reason == "length"
    (p1, room1), (p2, room2) = cluster.prefills
    assert (p1, p2) == (P1.label, P2.label) and room1 != room2 and cluster.generates == [room1, room2]
    assert got[0].room == room2
    # The failed attempt is aborted on both of its sides, the one that finished nowhere.
    assert sorted(cluster.aborts) == sorted([(P1.label, room1), (D.label, room1)])
    assert cluster.failed == ([P1.label] if code == grpc.StatusCode.UNAVAILABLE else [])  # to be probed
    assert metric(registry, "pd_proxy_prefill_retries_total") == 1
    assert metric(registry, "pd_proxy_aborts_total") == 1
    assert cluster.busy == {}


@pytest.mark.parametrize("retry", [True, False])
def test_prefill_failing_everywhere_gives_503_after_at_most_one_retry(retry):
    cluster = FakeCluster({P1.label: grpc.StatusCode.UNAVAILABLE, P2.label: grpc.StatusCode.UNAVAILABLE})
    err, registry = run(cluster, read_all, retry=retry)
    assert isinstance(err, APIError) and err.status == 503 and "prefill failed" in err.message
    assert [rank for rank, _ in cluster.prefills] == ([P1.label, P2.label] if retry else [P1.label])
    # Every attempt aborted on both of its sides, once.
    expected = [(rank, room) for rank, room in cluster.prefills] + [(D.label, r) for _, r in cluster.prefills]
    assert sorted(cluster.aborts) == sorted(expected)
    assert metric(registry, "pd_proxy_prefill_retries_total") == (1 if retry else 0)
    assert cluster.busy == {}


def test_prefill_refused_with_a_code_not_worth_retrying_is_not_retried():
    cluster = FakeCluster({P1.label: grpc.StatusCode.INVALID_ARGUMENT, P2.label: "ok"})
    err, _ = run(cluster, read_all)
    assert isinstance(err, APIError) and err.status == 400
    assert [rank for rank, _ in cluster.prefills] == [P1.label] and cluster.failed == []


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_decode_failing_before_the_first_token_is_retried_once_on_another_instance(code):
    """Dead, shutting down (UNAVAILABLE) or full (RESOURCE_EXHAUSTED): nothing was streamed, so the request
    runs again in a new room on another decode instance; the failed room is aborted on both sides."""
    cluster = FakeCluster({P1.label: "ok"}, decode={D.label: code, D2.label: "ok"})
    got, registry = run(cluster, read_all)
    assert [c.token_ids for c in got] == [(101,), (102,), (103,)] and got[-1].finish_reason == "length"
    room1, room2 = cluster.generates
    assert cluster.generated_on == [D.label, D2.label] and {c.room for c in got} == {room2}
    assert sorted(cluster.aborts) == sorted([(P1.label, room1), (D.label, room1)])
    assert cluster.failed == ([D.label] if code == grpc.StatusCode.UNAVAILABLE else [])
    assert metric(registry, "pd_proxy_decode_retries_total") == 1
    assert metric(registry, "pd_proxy_prefill_retries_total") == 0
    assert cluster.busy == {}


def test_decode_failing_everywhere_gives_503_after_one_retry():
    code = grpc.StatusCode.UNAVAILABLE
    cluster = FakeCluster({P1.label: "ok"}, decode={D.label: code, D2.label: code})
    err, registry = run(cluster, read_all)
    assert isinstance(err, APIError) and err.status == 503 and "decode failed" in err.message
    assert cluster.generated_on == [D.label, D2.label]
    assert metric(registry, "pd_proxy_decode_retries_total") == 1
    assert cluster.busy == {}


@pytest.mark.parametrize("after", [0, 2])
def test_decode_failure_aborts_the_prefill_side(after):
    """D fails (before or after streaming some tokens; before, no other decode rank is there to retry on): the
    request fails, and the room is aborted on P (and on D), once."""
    cluster = FakeCluster({P1.label: "ok"}, chunks=after, then=grpc.StatusCode.UNAVAILABLE)
    got = []

    async def consume(chunks):
        async for c in chunks:
            got.append(c)

    err, registry = run(cluster, consume)
    assert isinstance(err, APIError) and err.status == 503 and "decode failed" in err.message
    assert len(got) == after
    (room,) = cluster.generates
    assert sorted(cluster.aborts) == [(D.label, room), (P1.label, room)]
    assert cluster.failed == [D.label]
    assert metric(registry, "pd_proxy_aborts_total") == 1
    assert cluster.busy == {}


async def close_mid_stream(chunks) -> list:
    got = [await chunks.__anext__() for _ in range(3)]
    await chunks.aclose()  # the client went away between two chunks (the SSE writer closes the stream)
    return got


async def cancel_mid_stream(chunks) -> list:
    got = [await chunks.__anext__() for _ in range(3)]
    task = asyncio.ensure_future(chunks.__anext__())  # the client went away while a chunk was awaited
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return got


@pytest.mark.parametrize("consume", [close_mid_stream, cancel_mid_stream])
def test_client_gone_mid_stream_aborts_each_side_exactly_once(consume):
    cluster = FakeCluster({P1.label: "ok"}, chunks=3, then="stall")
    got, registry = run(cluster, consume)
    assert len(got) == 3
    (room,) = cluster.generates
    assert sorted(cluster.aborts) == [(D.label, room), (P1.label, room)]
    assert cluster.cancelled == [room]
    assert metric(registry, "pd_proxy_aborts_total") == 1
    assert metric(registry, "pd_proxy_tokens_total") == 0  # counted for finished requests only
    assert cluster.busy == {}


def test_client_gone_before_the_first_token_aborts_each_side_once():
    cluster = FakeCluster({P1.label: "ok"})

    async def consume(chunks):
        task = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(0.001)  # Prefill and Generate are out, no token yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cluster, consume)
    (room,) = cluster.generates
    assert cluster.prefills == [(P1.label, room)]
    assert sorted(cluster.aborts) == [(D.label, room), (P1.label, room)]
    assert cluster.busy == {}


def test_no_rank_gives_503_and_holds_nothing():
    class Empty(FakeCluster):
        def pick(self, model, prompt_ids=()):
            raise NoWorkers("no prefill rank serving model 'm' is registered")

    cluster = Empty({})
    err, _ = run(cluster, read_all)
    assert isinstance(err, APIError) and err.status == 503 and "registered" in err.message
    assert cluster.generates == [] and cluster.aborts == [] and cluster.busy == {}


def test_time_per_token_of_several_choices_is_the_longest_choices():
    """n > 1: the choices decode side by side, one token each per step; the proxy's TPOT divides by the longest
    choice's tokens after its first, and the completion counter adds every choice's."""
    registry = Registry()
    d = Dispatcher(FakeCluster({}), registry, request_timeout_s=10.0, retry_prefill=False)
    job = make_job()
    d._finished(job, now=job.arrived + 10.0, first_at=job.arrived + 1.0, tokens={0: 10, 1: 10, 2: 7})
    assert metric(registry, "pd_proxy_tpot_seconds_sum") == pytest.approx(9.0 / 9)
    assert metric(registry, "pd_proxy_tokens_total") == len(job.prompt_ids) + 27
