"""KVSender and KVReceiver racing each other: many rooms, aborts from both sides at random points.

Real gRPC between the two managers; the transfer engine is replaced by an in-process copy
(``ctypes.memmove`` between the two pools, with random delays) that logs when each write ended,
so the page-safety rules can be checked against the log:

- each side releases each room exactly once;
- the prefill side releases a room only after every write that read its source pages ended;
- the decode side releases a room only after every write into its destination pages ended
  (the abort grace period is set far beyond the test, so only confirmations can release);
- rooms done on both sides hold the source bytes.

The tests with real processes and the real Mooncake engine are in test_transfer.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.transfer.aux import AuxBuffer, AuxRecord
from pd.transfer.engine import TransferError
from pd.transfer.receiver import KVReceiver
from pd.transfer.rpc import start_server
from pd.transfer.sender import KVSender
from pd.transfer.state import TransferState, TransferTimeouts
from tests.support.polling import wait_until

ROOMS = 40
PAGES_PER_ROOM = 4


class CopyEngine:
    """Stands in for TransferEngine inside one process; logs (end time, source and destination ranges)."""

    def __init__(self, session_id: str, seed: int) -> None:
        self.session_id = session_id
        self.log: list[tuple[float, list[tuple[int, int, int]]]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        pass

    def write(self, peer_session: str, pieces, deadline: float | None = None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise TransferError("deadline passed")
        with self._lock:
            delay = self._rng.uniform(0, 0.02)
        time.sleep(delay)
        for src, dst, n in pieces:
            ctypes.memmove(dst, src, n)
        with self._lock:
            self.log.append((time.monotonic(), list(pieces)))


def pages_touched(pool: KVPool, addr: int, nbytes: int) -> set[int]:
    """Page ids a byte range of a layer-major pool covers (none if the range is outside the pool)."""
    if not pool.data_ptr <= addr < pool.data_ptr + pool.nbytes:
        return set()  # e.g. the aux record
    unit = pool.layout.page_nbytes_per_layer
    first = (addr - pool.data_ptr) // unit
    last = (addr - pool.data_ptr + nbytes - 1) // unit
    return {i % pool.layout.num_pages for i in range(first, last + 1)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed, writers", [(1, 1), (2, 1), (3, 3)])
def test_random_aborts_release_each_room_once_and_never_early(seed, writers):
    rng = random.Random(seed)
    layout = KVLayout(2, ROOMS * PAGES_PER_ROOM + 1, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
    src_pool, dst_pool = KVPool(layout, "cpu"), KVPool(layout, "cpu")
    src_pool.buffer.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, layout.shape, dtype=torch.int16))
    timeouts = TransferTimeouts(
        bootstrapping_s=30, waiting_for_input_s=30, transferring_s=30, abort_grace_s=600
    )
    released: dict[str, dict[int, list[tuple[float, TransferState]]]] = {"prefill": {}, "decode": {}}
    lock = threading.Lock()

    def on_final(side: str, room: int, state: TransferState) -> None:
        with lock:
            released[side].setdefault(room, []).append((time.monotonic(), state))

    engine = CopyEngine("fake-decode:1", seed)
    sender = KVSender(
        engine,
        src_pool,
        AuxBuffer(4),
        lambda r, s, why: on_final("prefill", r, s),
        timeouts,
        writers_per_peer=writers,  # several rooms in flight to the one decode peer at once
    )
    receiver = KVReceiver(
        engine, dst_pool, AuxBuffer(ROOMS), lambda r, s, a, why: on_final("decode", r, s), None, timeouts
    )
    prefill_server, prefill_port = start_server([sender.add_to_server])
    decode_server, decode_port = start_server([receiver.add_to_server])
    receiver.endpoint = f"127.0.0.1:{decode_port}"

    def pages(room: int) -> list[int]:
        return [1 + room * PAGES_PER_ROOM + i for i in range(PAGES_PER_ROOM)]

    def dst_pages(room: int) -> list[int]:
        return list(reversed(pages(room)))  # a different order: exercises the page mapping

    plans = {
        room: (rng.choice(["none", "decode", "prefill"]), rng.randrange(4), rng.random() < 0.5)
        for room in range(ROOMS)
    }

    def run_room(room: int) -> None:
        who, at, decode_first = plans[room]
        local = random.Random(seed * 1000 + room)

        def maybe_abort(step: int) -> None:
            if step == at and who == "decode":
                receiver.abort(room, "test")
            if step == at and who == "prefill":
                sender.abort(room, "test")

        steps = [lambda: receiver.add_room(room, f"127.0.0.1:{prefill_port}", dst_pages(room), room)]
        steps.insert(0 if not decode_first else 1, lambda: sender.add_room(room, pages(room)))
        for step in steps:
            step()
            time.sleep(local.uniform(0, 0.01))
        p = pages(room)
        for i, chunk in enumerate((p[:1], p[1:3], p[3:])):
            maybe_abort(i)
            time.sleep(local.uniform(0, 0.02))
            last = i == 2
            sender.send(
                room, chunk, last=last, aux=AuxRecord(room, room, -1.0, 4 * PAGES_PER_ROOM) if last else None
            )
        maybe_abort(3)

    threads = [threading.Thread(target=run_room, args=(room,)) for room in range(ROOMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with lock:
            if len(released["prefill"]) == ROOMS and len(released["decode"]) == ROOMS:
                break
        time.sleep(0.05)
    time.sleep(0.3)  # a second (wrong) release would have arrived by now
    sender.close()
    receiver.close()
    prefill_server.stop(0)
    decode_server.stop(0)

    for side in ("prefill", "decode"):
        assert sorted(released[side]) == list(range(ROOMS)), f"{side} did not release every room"
        assert all(len(v) == 1 for v in released[side].values()), f"{side} released a room twice"
    for room in range(ROOMS):
        t_prefill, prefill_state = released["prefill"][room][0]
        t_decode, decode_state = released["decode"][room][0]
        for t_end, pieces in engine.log:
            for src, dst, n in pieces:
                if set(pages(room)) & pages_touched(src_pool, src, n):
                    assert t_end <= t_prefill, f"room {room}: a write read source pages after their release"
                if set(pages(room)) & pages_touched(dst_pool, dst, n):
                    assert t_end <= t_decode, (
                        f"room {room}: a write landed in destination pages after their release"
                    )
        if prefill_state is TransferState.DONE and decode_state is TransferState.DONE:
            for s, d in zip(pages(room), dst_pages(room)):
                for layer in range(layout.num_layers):
                    assert torch.equal(
                        src_pool.layer(layer)[s].view(torch.int16), dst_pool.layer(layer)[d].view(torch.int16)
                    )
        if plans[room][0] == "none":
            assert prefill_state is decode_state is TransferState.DONE, (room, prefill_state, decode_state)


class GateEvent:
    """Stands in for a torch.cuda.Event: synchronize() blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waited = threading.Event()

    def synchronize(self) -> None:
        self.waited.set()
        assert self.gate.wait(timeout=30)


@dataclass
class Linked:
    """A KVSender and a KVReceiver over real gRPC sharing one CopyEngine (``linked``); ``finals`` holds each
    side's final reports, ``prefill`` is the sender's endpoint (what ``add_room`` on the receiver takes)."""

    sender: KVSender
    receiver: KVReceiver
    prefill: str
    engine: CopyEngine
    finals: dict[str, list]


@contextlib.contextmanager
def linked(
    src_pool: KVPool,
    dst_pool: KVPool,
    decode_entry=lambda r, s, a, why: (r, s, why),
    aux_slots: tuple[int, int] = (2, 2),
    **kw,
):
    """Starts a linked pair; ``decode_entry(room, state, aux, reason)`` is what the receiver's final report
    files; ``kw``: ``kv_checksum`` (both sides), ``sender_staging``, ``receiver_staging``, ``engine`` (a
    CopyEngine of the test's own). Closes both and stops their servers on exit."""
    finals: dict[str, list] = {"prefill": [], "decode": []}
    engine = kw.get("engine") or CopyEngine("fake-decode:1", 0)
    checksum = kw.get("kv_checksum", False)
    sender = KVSender(
        engine,
        src_pool,
        AuxBuffer(aux_slots[0]),
        lambda r, s, why: finals["prefill"].append((r, s)),
        kv_checksum=checksum,
        staging=kw.get("sender_staging"),
    )
    receiver = KVReceiver(
        engine,
        dst_pool,
        AuxBuffer(aux_slots[1]),
        lambda r, s, a, why: finals["decode"].append(decode_entry(r, s, a, why)),
        kv_checksum=checksum,
        staging=kw.get("receiver_staging"),
    )
    servers = [start_server([sender.add_to_server]), start_server([receiver.add_to_server])]
    receiver.endpoint = f"127.0.0.1:{servers[1][1]}"
    try:
        yield Linked(sender, receiver, f"127.0.0.1:{servers[0][1]}", engine, finals)
    finally:
        sender.close()
        receiver.close()
        for server, _ in servers:
            server.stop(0)


@pytest.fixture
def pair():
    """A sender and a receiver over real gRPC, sharing a CopyEngine; yields them and the finals."""
    layout = KVLayout(2, 9, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
    src_pool, dst_pool = KVPool(layout, "cpu"), KVPool(layout, "cpu")
    src_pool.buffer.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, layout.shape, dtype=torch.int16))
    with linked(src_pool, dst_pool, decode_entry=lambda r, s, a, why: (r, s, a)) as p:
        yield p.sender, p.receiver, p.prefill, p.engine, p.finals


def test_writes_wait_for_the_ready_event_and_send_does_not_block(pair):
    sender, receiver, prefill_endpoint, engine, finals = pair
    sender.add_room(1, [1, 2])
    receiver.add_room(1, prefill_endpoint, [3, 4], 0)
    wait_until(lambda: sender.state(1) is TransferState.WAITING_FOR_INPUT, interval=0.01)
    event = GateEvent()
    # returns although the gate is shut: only the writer thread waits on the event
    sender.send(1, [1, 2], last=True, aux=AuxRecord(1, 5, -0.25, 8), ready_event=event)
    assert event.waited.wait(timeout=10)
    time.sleep(0.1)
    assert engine.log == [] and sender.state(1) is TransferState.TRANSFERRING  # nothing read before the event
    event.gate.set()
    wait_until(lambda: finals["decode"] and finals["prefill"], interval=0.01)
    assert finals["prefill"] == [(1, TransferState.DONE)]
    assert finals["decode"] == [(1, TransferState.DONE, AuxRecord(1, 5, -0.25, 8))]


def test_send_rejects_scheduler_mistakes(pair):
    sender, _, _, _, finals = pair
    sender.add_room(1, [1, 2, 3])
    with pytest.raises(ValueError, match="already added"):
        sender.add_room(1, [4])
    with pytest.raises(ValueError, match="out of range"):
        sender.add_room(2, [9])
    with pytest.raises(ValueError, match="repeat"):
        sender.add_room(3, [4, 4])
    with pytest.raises(ValueError, match="not its pages"):
        sender.send(1, [4])
    sender.send(1, [1])
    with pytest.raises(ValueError, match="already sent"):
        sender.send(1, [1])
    with pytest.raises(ValueError, match=r"leaves pages \[3\] unsent"):
        sender.send(1, [2], last=True, aux=AuxRecord(1, 0, 0.0, 12))
    with pytest.raises(ValueError, match="aux record"):
        sender.send(1, [2, 3], last=True)
    sender.send(99, [1])  # unknown (e.g. already released) room: ignored
    sender.abort(1, "test")
    sender.send(1, [2, 3], last=True, aux=AuxRecord(1, 0, 0.0, 12))  # final room: ignored
    wait_until(lambda: finals["prefill"], interval=0.01)
    assert finals["prefill"] == [(1, TransferState.ABORTED)]


def test_idle_writer_threads_end():
    """A writer thread per decode peer would pile up as decode ranks restart (each start is a new
    session): one without work ends after ``writer_idle_s``, and a new one starts when needed."""
    layout = KVLayout(2, 9, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
    sender = KVSender(
        CopyEngine("127.0.0.1:1", 0),
        KVPool(layout, "cpu"),
        AuxBuffer(4, "cpu"),
        on_final=lambda *a: None,
        writer_idle_s=0.1,
        writers_per_peer=2,
    )

    def writers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("kv-sender-writer-")]

    try:
        for session in ("127.0.0.1:7001", "127.0.0.1:7002"):
            with sender._lock:
                for room in (4, 5, 6):  # rooms 4 and 6 share a writer: two per peer
                    sender._writer(session, room)
        assert sorted(writers()) == [
            f"kv-sender-writer-127.0.0.1:{port}-{w}" for port in (7001, 7002) for w in (0, 1)
        ]
        deadline = time.monotonic() + 10
        while writers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writers() == [] and sender._writers == {}
        with sender._lock:
            sender._writer("127.0.0.1:7001", 9)
        assert writers() == ["kv-sender-writer-127.0.0.1:7001-1"]
    finally:
        sender.close()
