"""KV integrity (``--kv-checksum``, pd/transfer/checksum.py).

- The checksum against an independent oracle (a Python loop over the bytes), and what it must detect:
  any single flipped bit, and two 4-byte words swapped (in one row of the grid and in one column).
- A corrupted page end to end without processes: the tiny model's prefill and decode engines joined by
  the real KVSender and KVReceiver (real gRPC; the in-process copy engine of test_transfer_managers) with
  checksums on, and a hook that flips one byte of one room's destination pages after the writes: that
  request fails with an error naming the layer and page, the others decode the reference tokens, every
  page is freed (exactly once: the allocator raises otherwise), and the failure counter reads 1.
- The P/D compatibility check refuses a prefill and a decode that disagree on ``kv_checksum``.

Every end-to-end deployment of the suite runs with ``--kv-checksum`` (tests/support/cluster.py).
"""

from __future__ import annotations

import math
import queue
import time

import numpy as np
import pytest
import torch

from pd.bootstrap.compat import mismatches
from pd.engine.decode import DecodeEngine
from pd.engine.messages import Command, DecodeRoom, PrefillRoom, RoomFailed, Tokens
from pd.engine.prefill import PrefillEngine
from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.rpc import bootstrap_pb2 as bpb
from pd.transfer.aux import AuxBuffer, AuxRecord, SlotAllocator
from pd.transfer.checksum import (
    ChecksumMismatch,
    PageChecksums,
    pack,
    unit_checksums,
    unpack,
)
from pd.transfer.receiver import KVReceiver
from pd.transfer.rpc import start_server
from pd.transfer.sender import KVSender
from pd.transfer.state import TransferState
from pd.worker.loop import CommandQueue
from pd.worker.metrics import WorkerMetrics
from tests.support.polling import wait_until
from tests.test_bootstrap import rank_info
from tests.test_role_engines import GREEDY, PROMPTS, idle, make_engine
from tests.test_transfer_managers import CopyEngine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def oracle(data: bytes) -> tuple[int, int, int]:
    """The module docstring's definition, word by word: (S0, S1, S2) of one unit."""
    if len(data) % 2:
        data += b"\0"
    n = len(data) // 2
    cols = 1 << (math.isqrt(n).bit_length() - 1)  # the largest power of two <= sqrt(n)
    s0 = s1 = s2 = 0
    for i in range(n):
        x = int.from_bytes(data[2 * i : 2 * i + 2], "little", signed=True)
        s0 += x
        s1 += x * (i % cols + 1)
        s2 += x * (i // cols + 1)
    return s0, s1, s2


def checksum(data: bytes, device: str = "cpu") -> tuple[int, ...]:
    units = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, -1).to(device)
    return tuple(int(v) for v in unit_checksums(units)[0].cpu())


# Sizes (bytes): one word, odd, a square grid, rows of a page of the tiny model, a partial last row.
SIZES = [2, 7, 2 * 4096, 4 * 24 * 2, 2 * (65536 + 123) + 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nbytes", SIZES)
def test_checksum_equals_the_oracle(nbytes, device):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    assert checksum(data, device) == oracle(data)
    extreme = bytes([0x00, 0x80] * (nbytes // 2)) + bytes([0xFF] * (nbytes % 2))  # -32768 words
    assert checksum(extreme, device) == oracle(extreme)


def test_checksum_of_a_batch_equals_each_unit():
    rng = np.random.default_rng(0)
    units = rng.integers(0, 256, (5, 4 * 1000 + 6), dtype=np.uint8)
    got = unit_checksums(torch.from_numpy(units))
    assert got.dtype == torch.int64 and got.shape == (5, 3)
    assert [tuple(int(v) for v in row) for row in got] == [oracle(u.tobytes()) for u in units]


def test_every_single_bit_flip_is_detected():
    data = bytearray(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    base = checksum(bytes(data))
    for byte in range(len(data)):
        for bit in range(8):
            data[byte] ^= 1 << bit
            assert checksum(bytes(data)) != base, (byte, bit)
            data[byte] ^= 1 << bit


ROW = 2 * 256  # bytes per grid row of the 128 KiB unit below (65536 words: 256 columns)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0, 4),  # neighbours
        (8, 100),  # within one row of the grid
        (100, 100 + 2 * ROW),  # one column, two rows apart
        (2, 3 * ROW + 6),  # different rows and columns
    ],
)
def test_a_swap_of_two_4_byte_words_is_detected(a, b):
    data = bytearray(np.random.default_rng(2).integers(0, 256, 256 * ROW, dtype=np.uint8).tobytes())
    swapped = bytearray(data)
    swapped[a : a + 4], swapped[b : b + 4] = data[b : b + 4], data[a : a + 4]
    assert swapped != data
    assert checksum(bytes(swapped)) != checksum(bytes(data))
    assert checksum(bytes(swapped)) == oracle(bytes(swapped))


@pytest.mark.parametrize("order", list(KVOrder))
def test_page_checksums_cover_each_page_of_each_layer(order):
    layout = KVLayout(3, 9, 4, 24, torch.bfloat16, order)
    pool = KVPool(layout, "cpu")
    pool.buffer.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, layout.shape, dtype=torch.int16))
    pages = [5, 2, 7]
    sums = PageChecksums(pool).compute(pages)
    assert sums.shape == (3, 3, 3)
    for layer in range(3):
        for i, page in enumerate(pages):
            data = pool.layer(layer)[page].contiguous().view(torch.uint8).numpy().tobytes()
            assert tuple(sums[layer, i]) == oracle(data)
    wire = pack(sums)
    assert len(wire) == 3 * 3 * 3 * 8 and (unpack(wire, 3, 3) == sums).all()
    with pytest.raises(ChecksumMismatch, match="hold 8 bytes, expected 216"):
        unpack(wire[:8], 3, 3)

    PageChecksums(pool).verify(pages, wire)
    pool.layer(2)[7].view(torch.uint8).view(-1)[11] ^= 0x04
    with pytest.raises(
        ChecksumMismatch, match=r"1 of 9 .*layer 2 page 2 \(destination page 7, tokens 8-11\)"
    ):
        PageChecksums(pool).verify(pages, wire)


# ---- a corrupted page, end to end without processes ----


class FlipByte:
    """``KVReceiver.before_verify`` hook: flips one byte of ``room``'s destination pages (``layer``, the
    room's page ``index``) after its writes landed and before they are verified."""

    def __init__(self, room: int, layer: int, index: int) -> None:
        self.room, self.layer, self.index = room, layer, index
        self.flipped: list[int] = []

    def __call__(self, room: int, pool: KVPool, pages: tuple[int, ...]) -> None:
        if room == self.room:
            pool.layer(self.layer)[pages[self.index]].view(torch.uint8).view(-1)[3] ^= 0x20
            self.flipped.append(pages[self.index])


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    return [c.output_ids for c in make_engine(str(tiny_model_dir)).generate(PROMPTS, GREEDY)]


@pytest.mark.timeout(120)
def test_a_corrupted_page_fails_only_its_request(tiny_model_dir, reference):
    p, d = make_engine(str(tiny_model_dir)), make_engine(str(tiny_model_dir))
    p_cmds, d_cmds, metrics = CommandQueue(), CommandQueue(), WorkerMetrics("decode")
    copy = CopyEngine("fake-decode:1", 0)
    hook = FlipByte(room=1, layer=1, index=0)
    sender = KVSender(copy, p.runner.pool, AuxBuffer(4), p_cmds.sender_final, kv_checksum=True)
    receiver = KVReceiver(
        copy,
        d.runner.pool,
        AuxBuffer(8),
        d_cmds.receiver_final,
        kv_checksum=True,
        on_checksum_failure=metrics.checksum_failed,
        before_verify=hook,
    )
    servers = [start_server([sender.add_to_server]), start_server([receiver.add_to_server])]
    receiver.endpoint = f"127.0.0.1:{servers[1][1]}"
    prefill = PrefillEngine(p, sender)
    decode = DecodeEngine(d, receiver, SlotAllocator(8), headroom_tokens=8, max_pending=16, metrics=metrics)
    try:
        for room, prompt in enumerate(PROMPTS):
            prefill.handle(PrefillRoom(room, tuple(prompt), GREEDY))
            decode.handle(DecodeRoom(room, tuple(prompt), GREEDY, f"127.0.0.1:{servers[0][1]}"))
        tokens: dict[int, list[int]] = {room: [] for room in range(len(PROMPTS))}
        failed: dict[int, RoomFailed] = {}
        finished: set[int] = set()
        deadline = time.monotonic() + 60
        while len(finished) + len(failed) < len(PROMPTS) or prefill.rooms_open:
            assert time.monotonic() < deadline, (tokens, failed)
            events = []
            for engine, cmds in ((prefill, p_cmds), (decode, d_cmds)):  # what each engine thread does
                for cmd in drain(cmds):
                    events += engine.handle(cmd)
                if engine.has_work():
                    events += engine.step()
            if not events:
                time.sleep(0.01)
            for e in events:
                if isinstance(e, Tokens) and e.room in tokens:
                    tokens[e.room] += e.token_ids
                    if e.finish_reason:
                        finished.add(e.room)
                elif isinstance(e, RoomFailed) and e.room in tokens:
                    failed[e.room] = e
        assert hook.flipped, "the hook ran for room 1"
        assert set(failed) == {1} and finished == {0, 2}
        message = failed[1].message
        assert "KV checksum mismatch" in message and "layer 1 page 0" in message, message
        assert f"destination page {hook.flipped[0]}" in message
        assert [tokens[0], tokens[2]] == [reference[0], reference[2]]
        assert metrics.kv_checksum_failures.value(role="decode") == 1
        assert metrics.transfer_failures.value(role="decode") == 1
        wait_until(lambda: sender.num_rooms == 0 and receiver.num_rooms == 0, what="transfer rooms released")
        assert idle(p, d) and decode.rooms_open == 0 and prefill.rooms_open == 0
    finally:
        sender.close()
        receiver.close()
        for server, _ in servers:
            server.stop(0)


def drain(cmds: CommandQueue) -> list[Command]:
    out = []
    while True:
        try:
            cmd = cmds.get(0)
        except queue.Empty:
            return out
        if cmd is not None:
            out.append(cmd)


# ---- one side without checksums ----


def test_a_receiver_that_verifies_fails_rooms_sent_without_checksums():
    layout = KVLayout(2, 9, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
    src_pool, dst_pool = KVPool(layout, "cpu"), KVPool(layout, "cpu")
    finals: list = []
    failures: list = []
    copy = CopyEngine("fake-decode:1", 0)
    sender = KVSender(copy, src_pool, AuxBuffer(2), lambda *a: None)  # kv_checksum off
    receiver = KVReceiver(
        copy,
        dst_pool,
        AuxBuffer(2),
        lambda r, s, a, why: finals.append((r, s, a, why)),
        kv_checksum=True,
        on_checksum_failure=lambda room, why: failures.append(room),
    )
    servers = [start_server([sender.add_to_server]), start_server([receiver.add_to_server])]
    receiver.endpoint = f"127.0.0.1:{servers[1][1]}"
    try:
        sender.add_room(1, [1, 2])
        receiver.add_room(1, f"127.0.0.1:{servers[0][1]}", [3, 4], 0)
        sender.send(1, [1, 2], last=True, aux=AuxRecord(1, 5, -0.25, 8))
        wait_until(lambda: finals, what="the room's end")
        [(room, state, aux, why)] = finals
        assert (room, state, aux) == (1, TransferState.FAILED, None)
        assert "prefill sent no KV checksums" in why and failures == [1]
    finally:
        sender.close()
        receiver.close()
        for server, _ in servers:
            server.stop(0)


def test_prefill_and_decode_must_agree_on_kv_checksum():
    prefill = rank_info("p0", 0, bpb.ROLE_PREFILL, kv_checksum=True)
    decode = rank_info("d0", 0, bpb.ROLE_DECODE)
    assert mismatches(prefill, decode) == ["kv_checksum: True (prefill p0/0) vs False (decode d0/0)"]
    assert mismatches(prefill, rank_info("d0", 0, bpb.ROLE_DECODE, kv_checksum=True)) == []
    colocated = rank_info("c0", 0, bpb.ROLE_COLOCATED)  # moves no KV: no opinion needed
    assert mismatches(prefill, colocated) == []


@pytest.mark.parametrize(("argv", "on"), [([], False), (["--kv-checksum"], True)])
def test_the_flag_reaches_both_instances(argv, on):
    from pd.launch import serve, worker

    args = serve.parse(argv)
    cmds = dict(serve.commands(args, "m", 1234))
    assert ("--kv-checksum" in cmds["prefill"], "--kv-checksum" in cmds["decode"]) == (on, on)
    wargs = worker.parse("decode", ["--bootstrap", "h:1", "--model", "m", *argv])
    assert worker.transfer_config(wargs).kv_checksum is on
