"""The prefix cache in the engines, on the tiny model without processes. Oracles: transformers' greedy tokens
(with the cache and without it), the tokens the runner is asked to compute (a hit skips its cached tokens),
the pages the sender is given (every page decode needs, cached ones included), and the page allocator (it
raises on a double free; what is left at the end is the cache's alone, and evicting it empties the pool)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pd.engine.colocated import ColocatedEngine
from pd.engine.decode import DecodeEngine
from pd.engine.engine import Engine
from pd.engine.messages import (
    AbortRoom,
    DecodeRoom,
    Failure,
    Prefilled,
    PrefillRoom,
    RoomFailed,
    Tokens,
    TransferEnded,
)
from pd.engine.prefill import PrefillEngine
from pd.transfer.aux import SlotAllocator
from pd.transfer.state import TransferState
from pd.types import BatchMode, SamplingParams
from tests.support.oracle import hf_greedy
from tests.test_role_engines import Loopback, idle, make_engine

PS = 4  # make_engine's page size; its chunk is 8 tokens
N = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
_rng = random.Random(7)
BASE = [_rng.randrange(3, 1000) for _ in range(19)]  # 4 full pages and 3 tokens
OTHER = [_rng.randrange(3, 1000) for _ in range(12)]
# (what it shows, prompt, tokens a hit covers once every earlier prompt is cached)
CASES = [
    ("first request", BASE, 0),
    ("exact repeat", BASE, 16),  # never the last token's page... which is partial here
    ("page-aligned repeat", BASE[:16], 12),  # ... and full here: its 4th page is computed again
    ("shared prefix", BASE[:12] + OTHER[:9], 12),
    ("prefix ending mid-page", BASE[:14] + OTHER[:7], 12),
]


@pytest.fixture(scope="module")
def expected(tiny_model_dir, hf_model) -> list[list[int]]:
    hf = hf_model(tiny_model_dir)
    return [hf_greedy(hf, prompt, N) for _, prompt, _ in CASES]


def count_computed(engine: Engine) -> Counter:
    """Prompt tokens the runner is asked to compute, per request id, from now on."""
    counts: Counter = Counter()
    run = engine.runner.run

    def counting(batch, logits=None, kv_stored=None):
        if batch.mode is BatchMode.EXTEND:
            for req, start, end in zip(batch.reqs, batch.starts, batch.ends):
                counts[req.rid] += end - start
        return run(batch, logits, kv_stored)

    engine.runner.run = counting  # type: ignore[method-assign]
    return counts


def drop_cache(engine: Engine) -> None:
    """Evicts every cached page; the pool must then be empty (no reference left anywhere)."""
    cache = engine.scheduler.cache
    assert cache is not None
    n = cache.num_pages
    assert cache.num_idle_pages() == n and engine.allocator.num_used == n
    assert cache.evict(n) == n and cache.num_pages == 0
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cache", "no-cache"])
def test_colocated_greedy_equals_transformers_and_hits_skip_compute(tiny_model_dir, expected, prefix_cache):
    engine = make_engine(str(tiny_model_dir), prefix_cache=prefix_cache)
    computed = count_computed(engine)
    for (what, prompt, hit), want in zip(CASES, expected):
        [done] = engine.generate([prompt], GREEDY)
        assert done.output_ids == want, what
        assert computed[done.rid] == len(prompt) - (hit if prefix_cache else 0), what
    # A seeded sampled request draws the same tokens over a cached prefix as computed in full.
    sampled = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=N, seed=5, ignore_eos=True)
    [hit] = engine.generate([BASE], sampled)
    [miss] = make_engine(str(tiny_model_dir), prefix_cache=False).generate([BASE], sampled)
    assert hit.output_ids == miss.output_ids
    assert computed[hit.rid] == len(BASE) - (16 if prefix_cache else 0)
    assert idle(engine)
    if prefix_cache:
        drop_cache(engine)
    assert engine.allocator.num_used == 0


def test_prompt_logprobs_are_computed_in_full_over_a_cached_prefix(tiny_model_dir):
    """Scoring the prompt needs every position's logits: such a request skips nothing."""
    scored = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    engine = make_engine(str(tiny_model_dir))
    computed = count_computed(engine)
    engine.generate([BASE], GREEDY)
    got = engine.add_request(BASE, scored)
    while engine.has_work():
        engine.step()
    plain = make_engine(str(tiny_model_dir), prefix_cache=False)
    ref = plain.add_request(BASE, scored)
    while plain.has_work():
        plain.step()
    assert computed[got.rid] == len(BASE) and len(got.prompt_logprobs) == len(BASE) - 1
    assert [lp for lp, _ in got.prompt_logprobs] == pytest.approx(
        [lp for lp, _ in ref.prompt_logprobs], abs=1e-4
    )
    assert got.output_ids == ref.output_ids
    drop_cache(engine)


@pytest.fixture()
def pair(tiny_model_dir):
    p, d = make_engine(str(tiny_model_dir)), make_engine(str(tiny_model_dir), prefix_cache=False)
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link)
    decode = DecodeEngine(d, link, SlotAllocator(8), headroom_tokens=8, max_pending=16)
    return prefill, decode, link


def start(pair, room: int, prompt: list[int]) -> None:
    """The room reaches both engines and is prefilled; decode's transfer has started."""
    prefill, decode, _ = pair
    assert prefill.handle(PrefillRoom(room, tuple(prompt), GREEDY)) == []
    assert decode.handle(DecodeRoom(room, tuple(prompt), GREEDY, "prefill:1")) == []
    while prefill.has_work():
        prefill.step()


def finish(pair, room: int) -> list[int]:
    """The transfer of a started room ends DONE; decode runs it to the end. Its tokens."""
    prefill, decode, link = pair
    link.copy(room)
    [done] = prefill.handle(TransferEnded(room, TransferState.DONE))
    assert isinstance(done, Prefilled)
    [first] = decode.handle(TransferEnded(room, TransferState.DONE, aux=link.aux[room]))
    tokens = list(first.token_ids)
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens)
            tokens += event.token_ids
    return tokens


def serve(pair, room: int, prompt: list[int]) -> list[int]:
    """One room through prefill, the loopback transfer and decode; its tokens."""
    prefill, _, link = pair
    start(pair, room, prompt)
    assert link.sent[room] == link.src[room], "every page decode needs was sent, cached ones included"
    assert len(link.src[room]) == prefill.layout.pages_for(len(prompt))
    return finish(pair, room)


def test_disaggregated_greedy_equals_transformers_over_cached_prefixes(pair, expected):
    prefill, decode, _ = pair
    computed = count_computed(prefill.engine)
    for room, ((what, prompt, hit), want) in enumerate(zip(CASES, expected)):
        assert serve(pair, room, prompt) == want, what
        assert computed[room] == len(prompt) - hit, what
    m = prefill.metrics
    assert m.prefix_query_tokens.value(role="prefill") == sum(len(p) for _, p, _ in CASES)
    assert m.prefix_hit_tokens.value(role="prefill") == sum(h for *_, h in CASES)
    assert idle(prefill.engine, decode.engine) and decode.engine.allocator.num_used == 0
    drop_cache(prefill.engine)


def test_eviction_under_a_small_pool_keeps_outputs_exact(tiny_model_dir, hf_model):
    """8 usable pages on the prefill rank: each room needs up to 7, so the cache keeps evicting; a 13-page
    colocated pool runs them all at once (eviction, then preemption)."""
    hf = hf_model(tiny_model_dir)
    rng = random.Random(3)
    stems = [BASE[:9], OTHER[:6], BASE[:4] + OTHER[:6]]
    prompts = [
        rng.choice(stems) + [rng.randrange(3, 1000) for _ in range(rng.randint(1, 16))] for _ in range(8)
    ]
    prompts += prompts[:3]  # repeats, after the pool turned over
    want = [hf_greedy(hf, p, N) for p in prompts]

    p = make_engine(str(tiny_model_dir), num_pages=9)
    d = make_engine(str(tiny_model_dir), prefix_cache=False)
    link = Loopback(p, d)
    pair = (PrefillEngine(p, link), DecodeEngine(d, link, SlotAllocator(8), 8, 16), link)
    evicted = watch_evictions(p)
    assert [serve(pair, room, prompt) for room, prompt in enumerate(prompts)] == want
    assert sum(evicted) > 0 and pair[0].metrics.prefix_hit_tokens.value(role="prefill") > 0
    assert idle(p, d)
    drop_cache(p)

    c = make_engine(str(tiny_model_dir), num_pages=14, max_running=4)
    evicted = watch_evictions(c)
    assert [r.output_ids for r in c.generate(prompts, GREEDY)] == want
    assert sum(evicted) > 0 and idle(c)
    drop_cache(c)


def watch_evictions(engine: Engine) -> list[int]:
    """Pages each ``evict`` call freed, from now on."""
    cache = engine.scheduler.cache
    assert cache is not None
    freed: list[int] = []
    evict = cache.evict

    def watching(n: int) -> int:
        freed.append(evict(n))
        return freed[-1]

    cache.evict = watching  # type: ignore[method-assign]
    return freed


@pytest.mark.parametrize("stage", ["queued", "mid_prefill", "transferring", "transfer_failed", "done"])
def test_prefill_abort_with_cached_pages_at_every_stage(pair, stage):
    prefill, _, link = pair
    cache = prefill.engine.scheduler.cache
    prompt = BASE + OTHER[:8]  # 27 tokens: 16 cached once BASE ran, then chunks of 8 and 3
    serve(pair, 1, BASE)
    cached = [p for p in link.src[1][:4]]
    assert all(p in cache for p in cached)
    assert prefill.handle(PrefillRoom(7, tuple(prompt), GREEDY)) == []
    if stage != "queued":
        prefill.step()  # first chunk [16, 24): announced, the 4 cached pages and 2 more sent
        assert link.src[7][:4] == cached and link.sent[7] == link.src[7][:6]
    if stage in ("transferring", "transfer_failed", "done"):
        while prefill.has_work():
            prefill.step()
    if stage == "done":
        assert prefill.handle(TransferEnded(7, TransferState.DONE))[0].room == 7
        assert prefill.handle(AbortRoom(7, "late")) == [] and link.aborted == []
    elif stage == "transfer_failed":
        [event] = prefill.handle(TransferEnded(7, TransferState.FAILED, "bootstrapping timed out"))
        assert event.failure is Failure.TIMEOUT
    elif stage == "queued":
        [event] = prefill.handle(AbortRoom(7, "client gone"))
        assert isinstance(event, RoomFailed) and event.failure is Failure.ABORTED
        assert 7 not in link.src
    else:
        assert prefill.handle(AbortRoom(7, "client gone")) == [] and link.aborted == [7]
        assert all(prefill.engine.allocator.refcount(p) == 2 for p in cached), "the sender may read them"
        [event] = prefill.handle(TransferEnded(7, TransferState.ABORTED, "client gone"))
        assert event.failure is Failure.ABORTED
    assert prefill.handle(TransferEnded(7, TransferState.ABORTED)) == []
    assert idle(prefill.engine) and not prefill.has_work()
    # A prompt computed to the end joined the cache (6 full pages); an aborted one left it as it was.
    assert cache.num_pages == (6 if stage in ("transferring", "transfer_failed", "done") else 4)
    drop_cache(prefill.engine)


def test_colocated_abort_with_cached_pages_mid_prefill_and_mid_decode(tiny_model_dir, expected):
    c = make_engine(str(tiny_model_dir))
    colocated = ColocatedEngine(c)
    c.generate([BASE], GREEDY)
    prompt = BASE + OTHER[:8]
    for room in (1, 2, 3):
        assert colocated.handle(DecodeRoom(room, tuple(prompt if room < 3 else BASE), GREEDY)) == []
    tokens: list[int] = []
    for steps in range(1, 100):
        for event in colocated.step():
            if event.room == 3:
                tokens += event.token_ids
        if steps == 1:  # rooms 1 and 2 hit 16 tokens: room 1 is mid-prefill now
            [aborted] = colocated.handle(AbortRoom(1, "client gone"))
            assert aborted.finish_reason == "abort"
        if steps == 4:  # room 2 decodes
            [aborted] = colocated.handle(AbortRoom(2, "client gone"))
            assert aborted.finish_reason == "abort" and aborted.completion_tokens >= 1
        if not colocated.has_work():
            break
    assert tokens == expected[1] and idle(c) and colocated.rooms_open == 0
    drop_cache(c)


def test_extend_graph_steps_equal_transformers_over_cached_prefixes(tiny_model_dir, expected):
    """Prompt steps through the extend graphs' static buffers (pd.engine.extend_graph, uncaptured on CPU):
    the absorbed attention's causal queries over cached prefixes, padding rows and tokens, several prompts
    in one step; hits and misses give transformers' tokens."""
    from pd.engine.extend_graph import ExtendGraphs

    engine = make_engine(str(tiny_model_dir))
    r = engine.runner
    graphs = ExtendGraphs(r.model, r.attn, r.pool, [24, 32], r.context_len, capture=False)
    steps: list[int] = []
    run = graphs.run
    graphs.run = lambda batch, t: (steps.append(len(batch.reqs)), run(batch, t))[1]  # type: ignore[method-assign]
    r.extend_graphs = graphs
    for (what, prompt, _), want in zip(CASES, expected):
        [done] = engine.generate([prompt], GREEDY)
        assert done.output_ids == want, what
    done = engine.generate([p for _, p, _ in CASES], GREEDY)
    assert [d.output_ids for d in done] == expected
    assert 1 in steps and max(steps) > 1 and idle(engine)
