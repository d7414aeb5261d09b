"""Decode-side prefix reuse on the tiny model without processes: a prefill and a decode engine joined by the
in-process page copy of tests/test_role_engines.py, which copies only the pages after the ones decode said
it holds (``skip_pages``). Oracles: transformers' greedy tokens for each turn of a conversation (the second
turn's prompt is the first's prompt and answer plus new tokens, so decode reads the cached pages' KV it
computed itself), the pages the copy wrote, the metrics, and the page allocator (a double free raises; what
is left at the end is the caches' alone, and evicting it empties both pools)."""

from __future__ import annotations

import random

import pytest

from pd.engine.decode import DecodeEngine
from pd.engine.messages import AbortRoom, DecodeRoom, PrefillRoom, TransferEnded
from pd.engine.prefill import PrefillEngine
from pd.transfer.aux import SlotAllocator
from pd.transfer.state import TransferState
from pd.types import SamplingParams
from tests.support.oracle import hf_greedy
from tests.test_prefix_cache_engines import N, drop_cache, finish, start
from tests.test_role_engines import Loopback, idle, make_engine

PS = 4  # make_engine's page size
_rng = random.Random(11)
TURN1 = [_rng.randrange(3, 1000) for _ in range(10)]
NEW = [_rng.randrange(3, 1000) for _ in range(5)]


def make_pair(model: str, decode_cache: bool = True):
    p, d = make_engine(model), make_engine(model, prefix_cache=decode_cache)
    link = Loopback(p, d)
    return PrefillEngine(p, link), DecodeEngine(d, link, SlotAllocator(8), 8, 16), link


def drop_caches(pair) -> None:
    prefill, decode, _ = pair
    assert idle(prefill.engine, decode.engine)
    for engine in (prefill.engine, decode.engine):
        if engine.scheduler.cache is not None:
            drop_cache(engine)
        assert engine.allocator.num_used == 0


def test_second_turn_reuses_the_pages_decode_computed(tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    pair = make_pair(str(tiny_model_dir))
    _, decode, link = pair
    start(pair, 1, TURN1)
    assert link.skip[1] == 0, "nothing cached on decode yet"
    out1 = finish(pair, 1)
    assert out1 == hf_greedy(hf, TURN1, N)
    # Turn 1 computed its prompt and 5 of its 6 output tokens here (the last has no KV): 3 full pages.
    cache = decode.engine.scheduler.cache
    assert cache is not None and cache.num_pages == (len(TURN1) + N - 1) // PS == 3

    turn2 = TURN1 + out1 + NEW  # 21 tokens
    start(pair, 2, turn2)
    assert link.skip[2] == 3
    assert all(p in cache for p in link.dst[2][:3]), "the skipped pages are decode's cached ones"
    out2 = finish(pair, 2)
    assert link.written[2] == link.dst[2][3:], "only the pages decode lacked were written"
    assert out2 == hf_greedy(hf, turn2, N)

    m = decode.metrics
    assert m.prefix_query_tokens.value(role="decode") == len(TURN1) + len(turn2)
    assert m.prefix_hit_tokens.value(role="decode") == 3 * PS
    assert cache.num_pages == (len(turn2) + N - 1) // PS  # turn 2's pages joined the tree
    drop_caches(pair)


@pytest.mark.parametrize("stage", ["transfer", "transfer_failed", "done_after_abort", "running"])
def test_every_end_frees_matched_and_reserved_pages_once(tiny_model_dir, stage):
    pair = make_pair(str(tiny_model_dir))
    prefill, decode, link = pair
    start(pair, 1, TURN1)
    out1 = finish(pair, 1)
    cache = decode.engine.scheduler.cache
    assert cache is not None
    cached = set(cache._nodes)
    start(pair, 2, TURN1 + out1 + NEW)
    assert link.skip[2] == 3 and decode.engine.pages_held > 3
    if stage == "running":
        link.copy(2)
        decode.handle(TransferEnded(2, TransferState.DONE, aux=link.aux[2]))
        decode.step()
        [event] = decode.handle(AbortRoom(2, "client gone"))
        assert event.finish_reason == "abort"
    elif stage == "transfer_failed":
        decode.handle(TransferEnded(2, TransferState.FAILED, "prefill went away"))
    else:
        assert decode.handle(AbortRoom(2, "client gone")) == [] and link.aborted == [2]
        assert decode.engine.pages_held > 0, "the prefill rank may still write the pages"
        done = stage == "done_after_abort"
        state = TransferState.DONE if done else TransferState.ABORTED
        [event] = decode.handle(TransferEnded(2, state, aux=link.aux[2] if done else None))
        assert event.finish_reason == "abort"
    prefill.handle(TransferEnded(2, TransferState.ABORTED))
    assert decode.engine.pages_held == 0 and decode.rooms_open == 0
    if stage == "running":  # computed KV: cached, the new pages included
        assert cached < set(cache._nodes)
    else:  # the pages of a transfer that did not end DONE are never cached
        assert set(cache._nodes) == cached
    drop_caches(pair)


def test_no_prefix_cache_keeps_decode_from_caching(tiny_model_dir, hf_model):
    hf = hf_model(tiny_model_dir)
    pair = make_pair(str(tiny_model_dir), decode_cache=False)
    _, decode, link = pair
    start(pair, 1, TURN1)
    out1 = finish(pair, 1)
    turn2 = TURN1 + out1 + NEW
    start(pair, 2, turn2)
    assert link.skip[2] == 0
    assert finish(pair, 2) == hf_greedy(hf, turn2, N)
    assert link.written[2] == link.dst[2], "every page written"
    assert decode.engine.scheduler.cache is None and decode.engine.allocator.num_used == 0
    assert decode.metrics.prefix_query_tokens.value(role="decode") == 0
    drop_caches(pair)


def test_decode_evicts_its_cache_to_reserve_a_room(tiny_model_dir):
    """A decode pool whose free pages are all cached: a new room's reservation evicts them."""
    p, d = make_engine(str(tiny_model_dir)), make_engine(str(tiny_model_dir), num_pages=9)
    link = Loopback(p, d)
    pair = (PrefillEngine(p, link), DecodeEngine(d, link, SlotAllocator(8), 8, 16), link)
    start(pair, 1, TURN1)
    finish(pair, 1)
    cache = d.scheduler.cache
    assert cache is not None and cache.num_pages == 3 and d.allocator.num_free == 5
    other = [_rng.randrange(3, 1000) for _ in range(17)]  # 5 pages + 8 headroom tokens: 7 pages
    start(pair, 2, other)
    assert link.skip[2] == 0 and len(link.dst[2]) == 5 and cache.num_pages < 3
    finish(pair, 2)
    drop_caches(pair)


def test_each_choice_caches_its_own_pages(tiny_model_dir, hf_model):
    """A room of 3 sampled choices (they share the prompt's pages; each copies the partial last one before
    writing into it) caches each choice's computed pages; a second turn built on choice 2's answer finds
    its pages and its greedy tokens are transformers'."""
    hf = hf_model(tiny_model_dir)
    pair = make_pair(str(tiny_model_dir))
    prefill, decode, link = pair
    sampled = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=N, ignore_eos=True)
    assert prefill.handle(PrefillRoom(1, tuple(TURN1), sampled)) == []
    assert decode.handle(DecodeRoom(1, tuple(TURN1), sampled, "prefill:1")) == []
    while prefill.has_work():
        prefill.step()
    link.copy(1)
    prefill.handle(TransferEnded(1, TransferState.DONE))
    outs: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for event in decode.handle(TransferEnded(1, TransferState.DONE, aux=link.aux[1])):
        outs[event.index] += event.token_ids
    while decode.has_work():
        for event in decode.step():
            outs[event.index] += event.token_ids
    assert len({tuple(o) for o in outs.values()}) > 1, "the choices differ (else the test shows nothing)"
    cache = decode.engine.scheduler.cache
    assert cache is not None
    # Two full pages of prompt shared, then each choice's own third page (tokens 8..11, of 15 computed).
    assert cache.num_pages == 2 + len({tuple((TURN1 + o)[8:12]) for o in outs.values()})
    turn2 = TURN1 + outs[2] + NEW
    start(pair, 2, turn2)
    assert link.skip[2] == 3
    assert finish(pair, 2) == hf_greedy(hf, turn2, N)
    drop_caches(pair)
