"""The role engines without processes: a prefill and a decode engine on the tiny model, joined by an
in-process transfer that copies page bytes. Oracles: the colocated reference engine's greedy tokens
(itself equal to transformers, tests/test_model.py), and the page allocator (every page freed exactly
once: it raises on a double free; the pool is idle at the end of every test)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from pd.config import EngineConfig
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
from pd.transfer.aux import AuxRecord, SlotAllocator
from pd.transfer.engine import GRANULARITIES
from pd.transfer.layers import LayerReady
from pd.transfer.state import TransferState
from pd.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 2], [9, 4, 77], [33, 21, 56, 80, 14, 6, 70]]


def make_engine(model: str, **kw) -> Engine:
    cfg = EngineConfig(
        model_path=model, **{"page_size": 4, "chunk_size": 8, "max_running": 4, "num_pages": 64, **kw}
    )
    return Engine(cfg)


@dataclass
class Loopback:
    """Sender and receiver in one: ``send`` copies the page bytes into the decode pool at once; the test
    decides when each side's transfer ends (``finish``), as the transfer layer's threads would."""

    prefill: Engine
    decode: Engine
    src: dict[int, list[int]] = field(default_factory=dict)
    dst: dict[int, list[int]] = field(default_factory=dict)
    sent: dict[int, list[int]] = field(default_factory=dict)
    aux: dict[int, AuxRecord] = field(default_factory=dict)
    aborted: list[int] = field(default_factory=list)
    skip: dict[int, int] = field(default_factory=dict)  # leading pages decode holds: never copied
    written: dict[int, list[int]] = field(default_factory=dict)  # destination pages copied, per room
    layer_steps: list[LayerReady] = field(default_factory=list)  # granularity layer: each step's marks

    def can_add(self, num_pages: int) -> bool:  # PageReceiver
        return True

    # PageSender
    def add_room(self, room: int, pages: Sequence[int], *rest) -> None:
        if rest:  # PageReceiver.add_room(room, endpoint, dst_pages, slot, skip_pages)
            self.dst[room], self.skip[room] = list(rest[0]), rest[2]
        else:
            self.src[room], self.sent[room] = list(pages), []

    def send(self, room: int, pages: Sequence[int], last: bool = False, aux=None, ready_event=None) -> None:
        assert all(p in self.src[room] and p not in self.sent[room] for p in pages)
        if isinstance(ready_event, LayerReady) and pages:
            assert ready_event.order == [], "with layer granularity pages go to the sender before the forward"
            self.layer_steps.append(ready_event)
        self.sent[room] += list(pages)
        if last:
            assert self.sent[room] == self.src[room], "every page sent once, in order"
            self.aux[room] = aux

    def abort(self, room: int, reason: str) -> None:
        self.aborted.append(room)

    def copy(self, room: int) -> None:
        src, dst = self.prefill.runner.pool, self.decode.runner.pool
        for ready in self.layer_steps:  # every layer marked once, in order, by the forward (or after it)
            assert ready.order == list(range(src.layout.num_layers))
        skip = self.skip[room]
        pairs = list(zip(self.src[room][skip:], self.dst[room][skip:]))
        self.written[room] = [d for _, d in pairs]
        for layer in range(src.layout.num_layers):
            for s, d in pairs:
                dst.layer(layer)[d].copy_(src.layer(layer)[s])


def idle(*engines: Engine) -> bool:
    return all(e.pages_held == 0 and e.scheduler.num_unfinished == 0 for e in engines)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    ref = make_engine(str(tiny_model_dir))
    return [c.output_ids for c in ref.generate(PROMPTS, GREEDY)]


@pytest.fixture(params=[(g, "layer_major") for g in GRANULARITIES] + [("chunk", "page_major")], ids=str)
def pair(tiny_model_dir, request):
    """A prefill and a decode engine joined by a Loopback; the prefill engine ships pages per chunk or, with
    ``layer``, hands them over before each forward that marks its layers (``pd.transfer.layers``); both
    pools layer-major, or page-major (every layer of a page contiguous: the attention reads and writes strided
    layer views)."""
    granularity, kv_layout = request.param
    p, d = (make_engine(str(tiny_model_dir), kv_layout=kv_layout) for _ in range(2))
    assert p.runner.pool.layout.order.value == kv_layout
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link, granularity=granularity)
    decode = DecodeEngine(d, link, SlotAllocator(8), headroom_tokens=8, max_pending=16)
    return prefill, decode, link


def run_prefill(prefill: PrefillEngine) -> None:
    while prefill.has_work():
        assert prefill.step() == []


def test_disaggregated_greedy_equals_the_colocated_engine(pair, reference) -> None:
    prefill, decode, link = pair
    for room, prompt in enumerate(PROMPTS):
        assert prefill.handle(PrefillRoom(room, tuple(prompt), GREEDY)) == []
        assert decode.handle(DecodeRoom(room, tuple(prompt), GREEDY, "prefill:1")) == []
    assert sorted(link.dst) == [0, 1, 2], "decode reserved pages and started every transfer"
    run_prefill(prefill)
    assert prefill.engine.pages_held > 0, "pages stay with the prefill engine until the transfer ends"
    tokens: dict[int, list[int]] = {room: [] for room in range(len(PROMPTS))}
    for room in range(len(PROMPTS)):
        link.copy(room)
        [done] = prefill.handle(TransferEnded(room, TransferState.DONE))
        assert dataclasses.replace(done, phases=None) == Prefilled(
            room, len(PROMPTS[room]), (link.aux[room].first_token,), first_tops=((),)
        )
        # Its phases: the bytes of every page of the prompt, all layers; durations in order on this clock.
        layout = prefill.layout
        pages = layout.pages_for(len(PROMPTS[room]))
        assert done.phases.transfer_bytes == pages * layout.page_nbytes_per_layer * layout.num_layers
        assert min(done.phases.queue_s, done.phases.compute_s, done.phases.transfer_s) >= 0
        [first] = decode.handle(TransferEnded(room, TransferState.DONE, aux=link.aux[room]))
        tokens[room] += first.token_ids
    while decode.has_work():
        for event in decode.step():
            assert isinstance(event, Tokens)
            tokens[event.room] += event.token_ids
            # Only a room's last event carries its decode phases.
            assert (event.phases is not None) == (event.finish_reason is not None)
            if event.phases is not None and len(tokens[event.room]) > 2:
                assert event.phases.first_step_s > 0 and event.phases.tpot_s > 0
    assert [tokens[r] for r in range(len(PROMPTS))] == reference
    assert idle(prefill.engine, decode.engine) and decode.rooms_open == 0 and prefill.rooms_open == 0
    assert bool(link.layer_steps) == prefill.layer_sends


@pytest.mark.parametrize("stage", ["queued", "mid_prefill", "transferring", "transfer_failed", "done"])
def test_prefill_abort_at_every_stage_frees_pages_once(pair, stage) -> None:
    prefill, _, link = pair
    prompt = PROMPTS[0]  # 11 tokens: two chunks of 8
    assert prefill.handle(PrefillRoom(7, tuple(prompt), GREEDY)) == []
    if stage != "queued":
        prefill.step()  # first chunk: announced, 2 full pages sent
        assert link.sent[7] == link.src[7][:2]
    if stage in ("transferring", "transfer_failed", "done"):
        run_prefill(prefill)
    if stage == "done":
        assert prefill.handle(TransferEnded(7, TransferState.DONE))[0].room == 7
        assert prefill.handle(AbortRoom(7, "late")) == [] and link.aborted == []
    elif stage == "transfer_failed":
        [event] = prefill.handle(TransferEnded(7, TransferState.FAILED, "bootstrapping timed out"))
        assert event == RoomFailed(7, Failure.TIMEOUT, "KV transfer timed out: bootstrapping timed out")
    elif stage == "queued":
        [event] = prefill.handle(AbortRoom(7, "client gone"))
        assert isinstance(event, RoomFailed) and event.failure is Failure.ABORTED
        assert link.src == {}, "a queued room never reaches the sender"
    else:
        assert prefill.handle(AbortRoom(7, "client gone")) == []
        assert link.aborted == [7]
        assert prefill.engine.pages_held > 0, "the sender may still read the pages"
        [event] = prefill.handle(TransferEnded(7, TransferState.ABORTED, "client gone"))
        assert event.failure is Failure.ABORTED
    assert prefill.handle(TransferEnded(7, TransferState.ABORTED)) == [], "a second end is ignored"
    assert prefill.handle(AbortRoom(7, "again")) == []
    assert idle(prefill.engine) and not prefill.has_work()


@pytest.mark.parametrize("stage", ["pending", "transfer", "transfer_done_after_abort", "running"])
def test_decode_abort_at_every_stage_frees_pages_once(tiny_model_dir, stage) -> None:
    d = make_engine(str(tiny_model_dir), max_running=1)  # the second room stays pending
    link = Loopback(d, d)
    decode = DecodeEngine(d, link, SlotAllocator(4), headroom_tokens=4, max_pending=4)
    decode.handle(DecodeRoom(1, tuple(PROMPTS[1]), GREEDY, "p:1"))
    decode.handle(DecodeRoom(2, tuple(PROMPTS[2]), GREEDY, "p:1"))
    assert list(link.dst) == [1] and decode.queue_lengths() == {"prealloc": 1, "transfer": 1, "running": 0}
    aux = AuxRecord(1, 5, -0.5, len(PROMPTS[1]))
    if stage == "pending":
        [event] = decode.handle(AbortRoom(2, "client gone"))
        assert (event.room, event.finish_reason) == (2, "abort")
        assert decode.handle(AbortRoom(1, "client gone")) == [] and link.aborted == [1]
        decode.handle(TransferEnded(1, TransferState.ABORTED))
    elif stage in ("transfer", "transfer_done_after_abort"):
        assert decode.handle(AbortRoom(1, "client gone")) == [] and link.aborted == [1]
        assert d.pages_held > 0, "the prefill rank may still write the pages"
        state = TransferState.DONE if stage == "transfer_done_after_abort" else TransferState.ABORTED
        [event] = decode.handle(TransferEnded(1, state, aux=aux if state is TransferState.DONE else None))
        assert (event.room, event.finish_reason) == (1, "abort")
        assert list(link.dst) == [1, 2], "the freed pages let the pending room start"
        decode.handle(AbortRoom(2, "client gone"))
        decode.handle(TransferEnded(2, TransferState.ABORTED))
    else:
        [first] = decode.handle(TransferEnded(1, TransferState.DONE, aux=aux))
        assert first.token_ids == (5,) and first.finish_reason is None
        decode.step()
        [event] = decode.handle(AbortRoom(1, "client gone"))
        assert (event.room, event.finish_reason, event.completion_tokens) == (1, "abort", 2)
        decode.handle(AbortRoom(2, "client gone"))
        decode.handle(TransferEnded(2, TransferState.ABORTED))
    assert decode.handle(TransferEnded(1, TransferState.ABORTED)) == [], "a second end is ignored"
    assert idle(d) and decode.rooms_open == 0 and decode.queue_lengths()["transfer"] == 0


def test_decode_admits_rooms_first_come_first_served(tiny_model_dir) -> None:
    """A room that waits for pages is not overtaken by a later, smaller one."""
    d = make_engine(str(tiny_model_dir), num_pages=9)  # 8 usable pages of 4 tokens
    link = Loopback(d, d)
    decode = DecodeEngine(d, link, SlotAllocator(4), headroom_tokens=0, max_pending=2)
    big = tuple(range(1, 20))  # 19 tokens + 1: 5 pages
    decode.handle(DecodeRoom(1, big, GREEDY, "p:1"))
    [invalid] = decode.handle(DecodeRoom(5, (10**9,), GREEDY, "p:1"))
    assert invalid.failure is Failure.INVALID and "vocabulary" in invalid.message
    decode.handle(DecodeRoom(2, big, GREEDY, "p:1"))  # 5 more pages: waits
    decode.handle(DecodeRoom(3, (1, 2), GREEDY, "p:1"))  # 1 page would fit, but waits its turn
    assert list(link.dst) == [1] and list(decode.pending) == [2, 3]
    [busy] = decode.handle(DecodeRoom(4, (1, 2), GREEDY, "p:1"))
    assert busy.failure is Failure.BUSY
    [dup] = decode.handle(DecodeRoom(1, big, GREEDY, "p:1"))
    assert dup.failure is Failure.DUPLICATE
    decode.handle(TransferEnded(1, TransferState.FAILED, "peer gone"))
    assert list(link.dst) == [1, 2, 3], "then in arrival order"
    for room in (2, 3):
        decode.handle(AbortRoom(room, "end"))
        decode.handle(TransferEnded(room, TransferState.ABORTED))
    assert idle(d)


def test_prefill_refuses_duplicates_full_queues_and_bad_prompts(tiny_model_dir) -> None:
    p = make_engine(str(tiny_model_dir), max_waiting=1)
    prefill = PrefillEngine(p, Loopback(p, p))
    assert prefill.handle(PrefillRoom(1, (1, 2, 3), GREEDY)) == []
    [dup] = prefill.handle(PrefillRoom(1, (1, 2, 3), GREEDY))
    [busy] = prefill.handle(PrefillRoom(2, (1, 2, 3), GREEDY))
    [empty] = prefill.handle(PrefillRoom(3, (), GREEDY))
    assert (dup.failure, busy.failure, empty.failure) == (Failure.DUPLICATE, Failure.BUSY, Failure.INVALID)
    prefill.handle(AbortRoom(1, "end"))
    assert idle(p)


def test_colocated_engine_equals_reference_and_aborts_cleanly(tiny_model_dir, reference) -> None:
    c = make_engine(str(tiny_model_dir))
    colocated = ColocatedEngine(c)
    for room, prompt in enumerate(PROMPTS):
        assert colocated.handle(DecodeRoom(room, tuple(prompt), GREEDY)) == []
    colocated.handle(DecodeRoom(9, tuple(PROMPTS[0]), GREEDY))
    tokens: dict[int, list[int]] = {room: [] for room in range(len(PROMPTS))}
    steps = 0
    while colocated.has_work():
        for event in colocated.step():
            if event.room != 9:
                tokens[event.room] += event.token_ids
        steps += 1
        if steps == 3:
            [aborted] = colocated.handle(AbortRoom(9, "client gone"))
            assert aborted.finish_reason == "abort"
    assert [tokens[r] for r in range(len(PROMPTS))] == reference
    assert idle(c) and colocated.rooms_open == 0


def test_decode_phases_of_several_choices_count_steps_not_tokens():
    """n > 1: a room's time per token and first step are its longest choice's, not its tokens summed."""
    from pd.engine.decode import _phases, _Room
    from pd.types import Req

    req = Req(1, [5, 6, 7], SamplingParams(max_tokens=8, n=3), 0, 64)
    room = _Room(req, "prefill:1", arrived=0.0, transfer_started=1.0, kv_arrived=2.0)
    room.first_emit, room.second_emit, room.last_emit = 3.0, 3.5, 10.0
    room.emitted = {0: 8, 1: 8, 2: 6}
    phases = _phases(room)
    assert phases.tpot_s == pytest.approx(7.0 / 7)  # 8 tokens of the longest choice: 7 steps after the first
    assert (phases.pages_wait_s, phases.transfer_s, phases.admit_s, phases.first_step_s) == (
        1.0,
        1.0,
        1.0,
        0.5,
    )
