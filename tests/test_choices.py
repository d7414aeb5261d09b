"""n > 1 choices in the engines (no processes): one prefill, n sequences sharing the prompt's pages.

Oracles: choice i of a request seeded s samples exactly what a request of one choice seeded
``choice_seed(s, i)`` samples alone (the counter-based sampler is batch-independent, and each choice's KV is
its prompt's); greedy choices equal the one-choice greedy output (itself equal to transformers,
tests/test_model.py); the page allocator's reference counts (it raises on a double free, and every test ends
with the pool idle). The engines here run without the prefix cache, so that the reference counts are the
choices' alone (the cache adds one to each full prompt page it keeps: tests/test_prefix_cache*.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pd.engine.colocated import ColocatedEngine
from pd.engine.decode import DecodeEngine
from pd.engine.engine import Engine
from pd.engine.messages import AbortRoom, DecodeRoom, Failure, PrefillRoom, Tokens, TransferEnded
from pd.engine.prefill import PrefillEngine
from pd.kv_cache import KVLayout, KVOrder, KVPool, PageAllocator
from pd.sampling import choice_seed
from pd.transfer.aux import AuxRecord, SlotAllocator, pack_aux, unpack_aux
from pd.transfer.state import TransferState
from pd.types import FinishReason, SamplingParams
from tests.test_role_engines import Loopback, idle, make_engine, run_prefill

SEED = 1234
SAMPLED = SamplingParams(temperature=1.0, seed=SEED, max_tokens=8, ignore_eos=True, n=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3)
MID_PAGE = list(range(1, 14))  # 13 tokens, pages of 4: two chunks of 8, ends mid-page
PAGE_END = [33, 21, 56, 80, 14, 6, 70, 9]  # 8 tokens: ends on a page boundary


def alone(engine: Engine, prompt: list[int], sp: SamplingParams) -> list[list[int]]:
    """Each choice of ``sp`` as a request of its own, with its choice's seed."""
    one = [dataclasses.replace(sp, n=1, seed=choice_seed(sp.seed or 0, i)) for i in range(sp.n)]
    return [c.output_ids for c in engine.generate([prompt] * sp.n, one)]


def record_copies(engine: Engine) -> list[tuple[int, int]]:
    """Every copy-on-write page copy the engine's steps make, as the runner is handed them."""
    copies: list[tuple[int, int]] = []
    run = engine.runner.run

    def recording(batch, logits=None, kv_stored=None):
        copies.extend(batch.copies)
        return run(batch, logits, kv_stored)

    engine.runner.run = recording  # type: ignore[method-assign]
    return copies


def test_allocator_frees_a_shared_page_once_its_last_reference_goes() -> None:
    alloc = PageAllocator(8)
    pages = alloc.alloc(3)
    alloc.incref(pages[:2])
    alloc.incref(pages[:2])  # three holders of two pages, one of the third
    assert [alloc.refcount(p) for p in pages] == [3, 3, 1]
    for holder in range(3):
        alloc.free(pages[:2] if holder else pages)
        assert alloc.num_used == (2 if holder < 2 else 0)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[:1])
    with pytest.raises(ValueError, match="incref of free page"):
        alloc.incref(pages[:1])
    assert alloc.num_free == alloc.capacity


@pytest.mark.parametrize("order", list(KVOrder))
def test_copy_page_copies_every_layer_of_one_page(order) -> None:
    pool = KVPool(KVLayout(3, 6, 4, 5, torch.float32, order), "cpu")
    pool.buffer.copy_(torch.randn(pool.layout.shape))
    before = [pool.layer(layer).clone() for layer in range(3)]
    pool.copy_page(2, 4)
    for layer in range(3):
        expected = before[layer].clone()
        expected[4] = before[layer][2]
        assert torch.equal(pool.layer(layer), expected)


@pytest.mark.parametrize("prompt", [MID_PAGE, PAGE_END], ids=["mid_page", "page_end"])
def test_colocated_choices_equal_their_seeds_alone_and_share_pages(tiny_model_dir, prompt) -> None:
    engine = make_engine(str(tiny_model_dir), prefix_cache=False)
    copies = record_copies(engine)
    req = engine.add_request(prompt, SAMPLED)
    while not req.forks:
        engine.step()  # the prompt's chunks; the last one samples the first tokens and forks
    prompt_pages = engine.runner.pool.layout.pages_for(len(prompt))
    assert len(req.forks) == 2 and [f.index for f in req.forks] == [1, 2]
    assert all(f.pages == req.pages[:prompt_pages] for f in req.forks), "every prompt page shared"
    assert [engine.allocator.refcount(p) for p in req.pages] == [3] * prompt_pages
    assert engine.allocator.num_used == prompt_pages, "no page copied at the fork"
    while engine.has_work():
        engine.step()
    outputs = [r.output_ids for r in (req, *req.forks)]
    assert idle(engine) and engine.logits.slots_in_use == 0
    assert outputs == alone(engine, prompt, SAMPLED)
    # The sequence that writes first into a shared partial page copies it; the last holder writes in place.
    assert len(copies) == (2 if len(prompt) % 4 else 0)
    assert len({tuple(o) for o in outputs}) == 3, "choices at temperature 1 differ"
    if prompt is MID_PAGE:  # so each choice writes other KV into its copy of the partial page
        assert len({o[0] for o in outputs}) == 3
    assert engine.generate([prompt], SAMPLED)[1].output_ids == outputs[1], "reproducible"


def test_greedy_choices_are_the_greedy_output(tiny_model_dir) -> None:
    engine = make_engine(str(tiny_model_dir), prefix_cache=False)
    greedy = engine.generate([MID_PAGE], dataclasses.replace(GREEDY, n=1))[0].output_ids
    completions = engine.generate([MID_PAGE, PAGE_END], GREEDY)
    assert [(c.rid, c.index) for c in completions] == [(0 + 1, i) for i in range(3)] + [
        (2, i) for i in range(3)
    ]
    assert [c.output_ids for c in completions[:3]] == [greedy] * 3
    assert len({tuple(c.output_ids) for c in completions[3:]}) == 1
    assert idle(engine)


def test_penalties_keep_a_state_per_choice(tiny_model_dir) -> None:
    engine = make_engine(str(tiny_model_dir), prefix_cache=False)
    sp = dataclasses.replace(SAMPLED, frequency_penalty=1.5, repetition_penalty=1.3)
    outputs = [c.output_ids for c in engine.generate([MID_PAGE], sp)]
    assert outputs == alone(engine, MID_PAGE, sp)
    assert idle(engine) and engine.logits.slots_in_use == 0


def test_a_choice_that_ends_early_frees_only_its_references(tiny_model_dir) -> None:
    engine = make_engine(str(tiny_model_dir), prefix_cache=False)
    expected = [c.output_ids for c in engine.generate([MID_PAGE], SAMPLED)]
    req = engine.add_request(MID_PAGE, SAMPLED)
    while not req.forks:
        engine.step()
    engine.step()  # one decode step: each choice copied or kept the partial page
    shared = req.forks[1].pages[0]
    assert engine.allocator.refcount(shared) == 3
    engine.scheduler.finish(req.forks[0], FinishReason.ABORT)  # as a stop string would end it
    assert engine.allocator.refcount(shared) == 2 and req.forks[0].pages == []
    while engine.has_work():
        engine.step()
    assert req.output_ids == expected[0] and req.forks[1].output_ids == expected[2]
    assert idle(engine)


@pytest.fixture()
def pair(tiny_model_dir):
    p, d = (
        make_engine(str(tiny_model_dir), prefix_cache=False),
        make_engine(str(tiny_model_dir), prefix_cache=False),
    )
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link)
    decode = DecodeEngine(d, link, SlotAllocator(8), headroom_tokens=8, max_pending=16)
    return prefill, decode, link


def transfer(prefill: PrefillEngine, decode: DecodeEngine, link: Loopback, room: int) -> list[Tokens]:
    link.copy(room)
    prefill.handle(TransferEnded(room, TransferState.DONE))
    # The aux record crosses as bytes.
    aux = unpack_aux(pack_aux(link.aux[room]), room)
    events = decode.handle(TransferEnded(room, TransferState.DONE, aux=aux))
    assert all(isinstance(e, Tokens) for e in events)
    return events  # type: ignore[return-value]


@pytest.mark.parametrize("sp", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_disaggregated_choices_equal_colocated_ones(tiny_model_dir, pair, sp) -> None:
    prefill, decode, link = pair
    expected = [
        c.output_ids for c in make_engine(str(tiny_model_dir), prefix_cache=False).generate([MID_PAGE], sp)
    ]
    prefill.handle(PrefillRoom(7, tuple(MID_PAGE), sp))
    decode.handle(DecodeRoom(7, tuple(MID_PAGE), sp, "prefill:1"))
    run_prefill(prefill)
    assert link.sent[7] == link.src[7] and len(link.src[7]) == 4, "the prompt's pages shipped once"
    assert len(link.aux[7].forks) == 2
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    ends: list[Tokens] = []
    for event in transfer(prefill, decode, link, 7):
        tokens[event.index] += event.token_ids
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens) and event.room == 7
            tokens[event.index] += event.token_ids
            if event.finish_reason:
                ends.append(event)
    assert [tokens[i] for i in range(3)] == expected
    assert sorted(e.index for e in ends) == [0, 1, 2] and all(
        e.completion_tokens == 8 - 2 * (sp is GREEDY) for e in ends
    )
    assert [e.phases is not None for e in ends] == [False, False, True], "phases on the room's last event"
    assert idle(prefill.engine, decode.engine) and decode.rooms_open == 0


def test_decode_abort_ends_every_choice_and_frees_every_page(pair) -> None:
    prefill, decode, link = pair
    prefill.handle(PrefillRoom(3, tuple(MID_PAGE), SAMPLED))
    decode.handle(DecodeRoom(3, tuple(MID_PAGE), SAMPLED, "prefill:1"))
    run_prefill(prefill)
    transfer(prefill, decode, link, 3)
    decode.step()
    decode.step()
    events = decode.handle(AbortRoom(3, "client gone"))
    assert sorted((e.index, e.finish_reason, e.completion_tokens) for e in events) == [
        (i, "abort", 3) for i in range(3)
    ]
    assert idle(decode.engine) and decode.rooms_open == 0 and not decode.has_work()


def test_decode_counts_choices_against_max_running(tiny_model_dir) -> None:
    d = make_engine(str(tiny_model_dir), max_running=4)
    link = Loopback(d, d)
    decode = DecodeEngine(d, link, SlotAllocator(4), headroom_tokens=4, max_pending=4)
    [refused] = decode.handle(DecodeRoom(1, (1, 2, 3), dataclasses.replace(SAMPLED, n=5), "p:1"))
    assert refused.failure is Failure.INVALID and "max_running" in refused.message
    decode.handle(DecodeRoom(2, (1, 2, 3), SAMPLED, "p:1"))  # 3 sequences
    decode.handle(DecodeRoom(3, (1, 2, 3), dataclasses.replace(SAMPLED, n=2), "p:1"))  # 2 more: waits
    assert list(link.dst) == [2] and decode.queue_lengths() == {"prealloc": 1, "transfer": 3, "running": 0}
    [*events] = decode.handle(AbortRoom(3, "client gone"))
    assert sorted(e.index for e in events) == [0, 1], "one end per choice of a room that never ran"
    decode.handle(AbortRoom(2, "client gone"))
    [*events] = decode.handle(TransferEnded(2, TransferState.ABORTED))
    assert sorted(e.index for e in events) == [0, 1, 2]
    assert idle(d)


def test_colocated_abort_before_and_after_the_fork(tiny_model_dir) -> None:
    c = make_engine(str(tiny_model_dir), prefix_cache=False)
    colocated = ColocatedEngine(c)
    colocated.handle(DecodeRoom(1, tuple(MID_PAGE), SAMPLED))
    colocated.handle(DecodeRoom(2, tuple(MID_PAGE), SAMPLED))
    colocated.step()  # first chunks: nothing sampled yet
    early = colocated.handle(AbortRoom(1, "client gone"))
    assert sorted(e.index for e in early) == [0, 1, 2]
    while not any(e.index == 2 for e in colocated.step()):
        pass
    late = colocated.handle(AbortRoom(2, "client gone"))
    assert sorted(e.index for e in late) == [0, 1, 2] and all(e.finish_reason == "abort" for e in late)
    assert idle(c) and colocated.rooms_open == 0


def test_aux_record_carries_every_choices_first_token() -> None:
    record = AuxRecord(9, 4, -0.5, 11, tuple((t, -t / 4) for t in range(15)))
    assert unpack_aux(pack_aux(record), 9) == record
    with pytest.raises(ValueError, match="at most 15"):
        pack_aux(dataclasses.replace(record, forks=(*record.forks, (1, 0.0))))
