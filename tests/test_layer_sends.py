"""Layer-by-layer KV sends (``--transfer-granularity layer``, pd/transfer/layers.py).

- The model calls ``kv_stored(layer)`` once per layer, in order, right after that layer's KV is in the pool
  and before the next layer's is (the tiny model; the pool is the oracle).
- Through the real KVSender and KVReceiver (real gRPC, an in-process copy engine that watches what it reads),
  direct and host-staged, both pool orders, with checksums: a simulated forward stores each layer of a
  multi-chunk room only after the sender has read the previous one (so the sends provably overlap the
  forward; a sender that waited for the whole chunk would stall it), no (layer, page) is read before it
  was stored, and the decode pool holds the bytes the forward wrote.
- A forward that raises lets the writers waiting for its layers go (the prefill engine fails its
  ``LayerReady``).
- A room aborted by either side, or whose forward fails, while its writer waits for a layer: each side
  releases it exactly once, and the host staging pages come back.
- The role engines (tests/test_role_engines.py), the Mooncake processes (tests/test_transfer.py) and
  pd-serve (tests/test_serve.py) run the same option end to end against their oracles.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pd.engine.messages import PrefillRoom
from pd.engine.prefill import PrefillEngine
from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.transfer.aux import AuxRecord
from pd.transfer.engine import TransferError
from pd.transfer.layers import LayerReady
from pd.transfer.staging import HostStaging
from pd.transfer.state import TransferState
from pd.types import SamplingParams
from tests.support.polling import wait_until
from tests.test_host_staging import page_unit, random_pool, same_page
from tests.test_role_engines import GREEDY, Loopback, make_engine
from tests.test_transfer_managers import CopyEngine, linked

CPU = torch.device("cpu")
WAIT_S = 10.0


def test_the_forward_marks_each_layer_right_after_storing_it(tiny_model_dir):
    engine = make_engine(str(tiny_model_dir))
    pool = engine.runner.pool
    req = engine.make_request(list(range(3, 14)), SamplingParams(temperature=0.0, max_tokens=1), rid=1)
    engine.scheduler.add(req)
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.reqs == [req]
    start, end, size = batch.starts[0], batch.ends[0], pool.layout.page_size
    slots = [(req.pages[t // size], t % size) for t in range(start, end)]  # the chunk's tokens
    num_main = engine.runner.model_cfg.num_hidden_layers
    seen: list[int] = []

    def filled(layer: int) -> list[bool]:
        return [bool(pool.layer(layer)[p, s].float().abs().sum() > 0) for p, s in slots]

    def stored(layer: int) -> None:
        seen.append(layer)
        assert all(filled(layer)), f"layer {layer} marked before its KV is in the pool"
        if layer + 1 < num_main:
            assert not any(filled(layer + 1)), f"layer {layer} marked after layer {layer + 1} stored"

    engine.runner.run(batch, engine.logits, kv_stored=stored)
    assert seen == list(range(num_main))


def test_a_failed_forward_fails_its_layer_waits(tiny_model_dir):
    """The prefill engine hands the pages over before the forward; when the forward raises, the writers
    waiting for its layers are let go at once (they would otherwise wait until the write deadline)."""
    p, d = make_engine(str(tiny_model_dir)), make_engine(str(tiny_model_dir))
    link = Loopback(p, d)
    prefill = PrefillEngine(p, link, granularity="layer")
    run = p.runner.run

    def broken(batch, logits=None, kv_stored=None):
        assert kv_stored is not None
        kv_stored(0)
        raise RuntimeError("boom")

    p.runner.run = broken  # type: ignore[method-assign]
    assert prefill.handle(PrefillRoom(3, tuple(range(5, 16)), GREEDY)) == []
    with pytest.raises(RuntimeError, match="boom"):
        prefill.step()
    [ready] = link.layer_steps
    ready.wait(0, time.monotonic() + WAIT_S, lambda: False)  # stored before the failure
    with pytest.raises(TransferError, match="never stored: the forward step failed: RuntimeError"):
        ready.wait(1, time.monotonic() + WAIT_S, lambda: False)
    p.runner.run = run  # type: ignore[method-assign]
    with pytest.raises(ValueError):
        PrefillEngine(p, link, granularity="token")


class Watch:
    """What a simulated forward stored and what the sender read, as (layer, source page) pairs, and reads of a
    pair not stored yet (``early``). Reads are seen where pd reads the source pool: the engine's pieces
    (direct writes) and the host staging's copies."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.stored: set[tuple[int, int]] = set()
        self.read: set[tuple[int, int]] = set()
        self.early: list[tuple[int, int]] = []
        self.cond = threading.Condition()

    def reading(self, pairs: set[tuple[int, int]]) -> None:
        with self.cond:
            self.early += sorted(pairs - self.stored)
            self.read |= pairs
            self.cond.notify_all()

    def pieces(self, pieces) -> set[tuple[int, int]]:
        """(layer, page) pairs of the pool that ``(src, dst, nbytes)`` pieces read."""
        layout, base = self.pool.layout, self.pool.data_ptr
        unit, pairs = layout.page_nbytes_per_layer, set()
        for src, _, n in pieces:
            if not base <= src < base + self.pool.nbytes:
                continue  # the aux record, or the host staging pool
            for u in range((src - base) // unit, (src - base + n) // unit):
                if layout.order is KVOrder.LAYER_MAJOR:
                    pairs.add((u // layout.num_pages, u % layout.num_pages))
                else:
                    pairs.add((u % layout.num_layers, u // layout.num_layers))
        return pairs

    def watch_staging(self, staging: HostStaging) -> None:
        copy = staging.to_host
        layers = staging.layout.num_layers

        def to_host(device_pages, host_pages, span=None) -> None:
            self.reading({(layer, p) for layer in (span or range(layers)) for p in device_pages})
            copy(device_pages, host_pages, span)

        staging.to_host = to_host  # type: ignore[method-assign]

    def forward(self, ready: LayerReady, pages: list[int], seed: int, layers: int | None = None) -> None:
        """Stores fresh bytes into ``pages``, layer by layer (the first ``layers``; default all), marking each;
        each layer after the first only once the sender read the one before (bounded: a sender that waits for
        the whole chunk fails the test here)."""
        g = torch.Generator().manual_seed(seed)
        for layer in range(ready.num_layers if layers is None else layers):
            if layer:
                before = {(layer - 1, p) for p in pages}
                with self.cond:
                    sent = self.cond.wait_for(lambda b=before: b <= self.read, timeout=WAIT_S)
                assert sent, f"layer {layer - 1} was not sent before layer {layer} was stored"
            view = self.pool.layer(layer)[pages]
            bits = torch.randint(-(2**15), 2**15, view.shape, dtype=torch.int16, generator=g)
            self.pool.layer(layer)[pages] = bits.view(self.pool.layout.dtype).to(self.pool.buffer.device)
            with self.cond:
                self.stored |= {(layer, p) for p in pages}
            ready.mark(layer)


class WatchedEngine(CopyEngine):
    def __init__(self, watch: Watch) -> None:
        super().__init__("fake-decode:1", 0)
        self.watch = watch

    def write(self, peer_session: str, pieces, deadline: float | None = None) -> None:
        self.watch.reading(self.watch.pieces(pieces))
        super().write(peer_session, pieces, deadline)


def staged_pair(layout: KVLayout, staging: str, watch: Watch, dst_pool: KVPool) -> dict:
    kw: dict = {"engine": WatchedEngine(watch)}
    if staging in ("sender", "both"):
        kw["sender_staging"] = HostStaging(watch.pool, 16 * page_unit(layout))
        watch.watch_staging(kw["sender_staging"])
    if staging == "both":
        kw["receiver_staging"] = HostStaging(dst_pool, 16 * page_unit(layout))
    return kw


NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", list(KVOrder))
@pytest.mark.parametrize(
    ("device", "staging"),
    [  # the copy engine reads host memory: a GPU pool's pages go through host staging
        ("cpu", "none"),
        ("cpu", "sender"),
        ("cpu", "both"),
        pytest.param("cuda", "sender", marks=[pytest.mark.gpu, NO_GPU]),
    ],
)
def test_layer_sends_overlap_the_forward_and_arrive_byte_exact(order, device, staging):
    """On a GPU the simulated forward's stores are asynchronous: each mark's CUDA event is what says the
    layer is there."""
    layout = KVLayout(3, 33, 4, 16, torch.bfloat16, order)
    src_pool, dst_pool = random_pool(layout, seed=2, device=device), KVPool(layout, "cpu")
    before = src_pool.buffer.clone()
    watch = Watch(src_pool)
    kw = staged_pair(layout, staging, watch, dst_pool)
    src, dst = [1, 2, 3, 4, 5, 6, 7], [20, 21, 22, 30, 31, 9, 10]
    chunks = [src[:2], src[2:5], src[5:]]  # three chunks; the last one ends mid-page in a real prompt
    with linked(src_pool, dst_pool, aux_slots=(2, 4), kv_checksum=True, **kw) as link:
        link.sender.add_room(1, src)
        link.receiver.add_room(1, link.prefill, dst, 0)
        wait_until(lambda: link.sender.state(1) is TransferState.WAITING_FOR_INPUT, WAIT_S, interval=0.01)
        for i, chunk in enumerate(chunks):
            ready = LayerReady(layout.num_layers, src_pool.buffer.device)
            link.sender.send(1, chunk, ready_event=ready)  # before the forward, as the prefill engine does
            watch.forward(ready, chunk, seed=10 + i)
            ready.finish()
        link.sender.send(1, [], last=True, aux=AuxRecord(1, 7, -0.5, 4 * len(src) - 1))
        wait_until(lambda: link.finals["prefill"] and link.finals["decode"], WAIT_S, interval=0.01)
        assert link.finals["prefill"] == [(1, TransferState.DONE)]
        assert link.finals["decode"] == [(1, TransferState.DONE, "")]
    assert watch.early == [], "a (layer, page) was read before the forward stored it"
    assert not torch.equal(before.view(torch.int16), src_pool.buffer.view(torch.int16))  # the forward wrote
    assert all(same_page(src_pool, s, dst_pool, d) for s, d in zip(src, dst))
    for staging_pool in (kw.get("sender_staging"), kw.get("receiver_staging")):
        assert staging_pool is None or staging_pool.num_free == staging_pool.capacity


@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["prefill_abort", "decode_abort", "forward_failed"])
@pytest.mark.parametrize("staging", ["none", "both"])
def test_a_room_ended_while_its_writer_waits_for_a_layer_is_released_once(end, staging):
    layout = KVLayout(3, 33, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
    src_pool, dst_pool = random_pool(layout, seed=3), KVPool(layout, "cpu")
    watch = Watch(src_pool)
    kw = staged_pair(layout, staging, watch, dst_pool)
    src, dst = [1, 2, 3, 4], [5, 6, 7, 8]
    with linked(src_pool, dst_pool, aux_slots=(2, 4), **kw) as link:
        link.sender.add_room(1, src)
        link.receiver.add_room(1, link.prefill, dst, 0)
        wait_until(lambda: link.sender.state(1) is TransferState.WAITING_FOR_INPUT, WAIT_S, interval=0.01)
        ready = LayerReady(layout.num_layers, CPU)
        link.sender.send(1, src, ready_event=ready)
        watch.forward(ready, src, seed=5, layers=2)  # layer 0 sent, layer 1 stored: the writer is mid-room
        if end == "prefill_abort":
            link.sender.abort(1, "client went away")
        elif end == "decode_abort":
            link.receiver.abort(1, "client went away")
        else:
            ready.fail("the forward step failed: RuntimeError('boom')")
        wait_until(lambda: link.finals["prefill"] and link.finals["decode"], WAIT_S, interval=0.01)
        ready.finish()  # the forward goes on (or not): nothing more is written for the room
        time.sleep(0.3)  # a second (wrong) release would have arrived by now
        state = TransferState.FAILED if end == "forward_failed" else TransferState.ABORTED
        assert link.finals["prefill"] == [(1, state)]
        assert [(r, s) for r, s, _ in link.finals["decode"]] == [(1, state)]
    assert watch.early == []
    for staging_pool in (kw.get("sender_staging"), kw.get("receiver_staging")):
        assert staging_pool is None or staging_pool.num_free == staging_pool.capacity


def test_layer_ready_wait_is_bounded():
    ready = LayerReady(2, CPU)
    with pytest.raises(TransferError, match="before the write deadline"):
        ready.wait(0, time.monotonic() + 0.1, lambda: False)
    with pytest.raises(TransferError, match="room ended"):
        ready.wait(0, time.monotonic() + 30, lambda: True)
    ready.mark(0)
    ready.wait(0, time.monotonic(), lambda: True)  # a stored layer needs no waiting
    with pytest.raises(ValueError, match="marked twice"):
        ready.mark(0)
    assert ready.ready_until(0) == 1
    ready.finish()
    assert ready.order == [0, 1] and ready.ready_until(0) == 2
