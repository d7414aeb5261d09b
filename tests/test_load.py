"""Long load and abort runs (``pytest -m slow``): 500 concurrent streams with every process's memory
watched, 1,000 random client aborts, and a proxy that hangs with streams open, on a 1 prefill +
1 decode deployment of the tiny model. The short versions of the first two run in CI in
test_faults.py."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import pytest

from pd.rpc.channel import SERVER_KEEPALIVE_S
from tests.support.clients import burst, completion_body, random_aborts, random_prompt, request
from tests.support.cluster import RSS_SLACK, Cluster, rss_bytes, rss_growth, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    with Cluster(
        tiny_model_dir,
        d,
        worker_args=(
            "--chunk-size",
            "64",
            "--page-size",
            "4",
            "--transfer-timeout",
            "2",
            "--abort-grace",
            "3",
        ),
        proxies={"proxy": ("--keepalive", "2"), "other": ("--keepalive", "2")},
    ) as c:
        yield c


def test_500_concurrent_streams_all_succeed_and_memory_stays_bounded(cluster):
    """Three bursts of 500 streams at once (decode runs 64 at a time; the rest wait bounded queues):
    every one completes with the same tokens each time, and no process grows from the second burst
    to the third by more than RSS_SLACK."""
    rng = random.Random(500)
    ps = [random_prompt(rng, rng.choice([4, 40, 120, 300])) for _ in range(500)]
    samples, first = [], None
    for _ in range(3):
        outs = asyncio.run(burst(cluster.url, ps, 32))
        bad = [(o.status, o.error, o.exception) for o in outs if not (o.ok and len(o.tokens) == 32)]
        assert not bad, bad[:5]
        first = first or [o.tokens for o in outs]
        assert [o.tokens for o in outs] == first
        samples.append({name: rss_bytes(cluster.pid(name)) for name in cluster.procs})
        cluster.assert_idle(timeout=60)
    growth = rss_growth(samples[1:])
    print("\n500 streams x3: RSS MB", {n: round(v / 2**20) for n, v in samples[-1].items()}, "growth", growth)
    assert all(g < RSS_SLACK for g in growth.values()), growth


def test_1000_random_client_aborts_leak_nothing(cluster):
    """1,000 mixed requests (chat and completions, streaming or not, 1-150 prompt tokens, 1-64 new
    tokens), most abandoned at a random moment, 32 at a time: no page or room leaks, nothing stays in
    flight, the requests left alone end properly, and the server still answers correctly."""
    rng = random.Random(1000)
    probe = [random_prompt(rng, n) for n in (3, 60, 150)]
    before = asyncio.run(burst(cluster.url, probe, 16))
    aborted = asyncio.run(random_aborts(cluster.url, rng, 1000, concurrency=32))
    print(f"\n1000 requests, {aborted} abandoned")
    assert aborted > 500
    cluster.assert_idle(timeout=60)
    after = asyncio.run(burst(cluster.url, probe, 16))
    assert [o.tokens for o in after] == [o.tokens for o in before] and all(o.ok for o in after)


def test_hung_proxy_rooms_are_freed_by_the_workers_keepalive(cluster):
    """A proxy stopped (SIGSTOP) with streams open: the workers' own pings go unanswered, so they cancel
    its calls and free every room within 2 * SERVER_KEEPALIVE_S, seen through the other proxy."""
    rng = random.Random(7)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [
                asyncio.ensure_future(
                    request(client, cluster.urls["other"], completion_body(random_prompt(rng, 50), 2000))
                )
                for _ in range(8)
            ]
            await asyncio.sleep(2)
            cluster.signal("other", signal.SIGSTOP)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    stopped_at = time.monotonic()
    reading = wait_idle(cluster.url, timeout=2 * SERVER_KEEPALIVE_S + 30, ranks=cluster.num_ranks)
    print(f"\nproxy SIGSTOP: every rank idle {time.monotonic() - stopped_at:.1f}s after the stop")
    cluster.signal("other", signal.SIGCONT)
    assert all(v == 0 for (name, role, *_), v in reading.items() if role != "proxy"), reading
