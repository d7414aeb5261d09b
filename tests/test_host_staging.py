"""Host staging of KV pages (pd/transfer/staging.py), on CPU pools.

- Pages copied to the host pool and back land byte-exact where asked, for both pool orders, and nothing
  else changes.
- ``alloc`` waits for freed pages until its deadline; a staging smaller than one page is refused.
- Rooms through the real KVSender and KVReceiver (real gRPC, the in-process copy engine): staging on both
  sides, on one side only, a sender staging smaller than a job (written in parts) and a room too big for
  the receiver's staging (written straight into its pages) all deliver the source bytes; an aborted room
  gives its staging pages back once.
- The end-to-end deployments of tests/test_serve.py run one instance pair with ``--host-staging on``
  through the real Mooncake engine (TCP), checked token for token against transformers there.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.transfer.aux import AuxBuffer, AuxRecord
from pd.transfer.receiver import KVReceiver
from pd.transfer.staging import HostStaging
from pd.transfer.state import TransferState, TransferTimeouts
from tests.support.polling import wait_until
from tests.test_transfer_managers import CopyEngine, linked

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_pool(layout: KVLayout, seed: int, device: str = "cpu") -> KVPool:
    pool = KVPool(layout, device)
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, layout.shape, dtype=torch.int16, generator=g)
    pool.buffer.view(torch.int16).copy_(bits)
    return pool


def page_unit(layout: KVLayout) -> int:
    return layout.num_layers * layout.page_nbytes_per_layer


def same_page(a: KVPool, pa: int, b: KVPool, pb: int) -> bool:
    """Byte equality (random bit patterns hold NaNs, which compare unequal as numbers)."""
    bits = [
        (a.layer(i)[pa].view(torch.int16).cpu(), b.layer(i)[pb].view(torch.int16).cpu())
        for i in range(a.layout.num_layers)
    ]
    return all(torch.equal(x, y) for x, y in bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", list(KVOrder))
def test_pages_round_trip_through_the_host_pool_byte_exact(order, device):
    pool = random_pool(KVLayout(3, 17, 4, 16, torch.bfloat16, order), seed=1, device=device)
    before = pool.buffer.clone()
    staging = HostStaging(pool, 5 * page_unit(pool.layout) + 7)
    assert staging.capacity == 5 and staging.layout.num_pages == 6
    host = staging.alloc(4, deadline=time.monotonic() + 1)
    assert host is not None
    src, dst = [9, 3, 4, 12], [2, 14, 15, 6]
    staging.to_host(src, host)
    assert all(same_page(pool, s, staging.pool, h) for s, h in zip(src, host))
    staging.to_device(host, dst)
    original = KVPool(pool.layout, device)
    original.buffer.copy_(before)
    assert all(same_page(original, s, pool, d) for s, d in zip(src, dst))
    untouched = [p for p in range(17) if p not in dst]
    assert all(same_page(original, p, pool, p) for p in untouched)


def test_alloc_waits_for_freed_pages_until_its_deadline():
    pool = KVPool(KVLayout(2, 9, 4, 16, torch.bfloat16), "cpu")
    staging = HostStaging(pool, 2 * page_unit(pool.layout))
    held = staging.alloc(2, deadline=time.monotonic() + 1)
    assert held is not None and staging.num_free == 0
    assert staging.alloc(1, deadline=time.monotonic() + 0.05) is None
    threading.Timer(0.1, staging.free, args=(held,)).start()
    again = staging.alloc(2, deadline=time.monotonic() + 30)
    assert again is not None and sorted(again) == sorted(held)
    with pytest.raises(ValueError, match="exceed the host staging's 2"):
        staging.alloc(3, deadline=time.monotonic() + 1)
    with pytest.raises(ValueError, match="cannot hold one KV page"):
        HostStaging(pool, page_unit(pool.layout) - 1)


LAYOUT = KVLayout(2, 33, 4, 16, torch.bfloat16, KVOrder.LAYER_MAJOR)
ROOM_PAGES = 5


@pytest.mark.parametrize(
    ("sender_pages", "receiver_pages"),
    [
        (16, 16),  # both staged
        (16, 0),  # sender only
        (0, 16),  # receiver only
        (3, 16),  # the sender writes each 5-page job in parts of 3
        (16, 4),  # rooms too big for the receiver's staging go straight into its pages
    ],
)
def test_rooms_move_through_host_staging(sender_pages, receiver_pages):
    src_pool, dst_pool = random_pool(LAYOUT, seed=2), KVPool(LAYOUT, "cpu")
    s_staging = HostStaging(src_pool, sender_pages * page_unit(LAYOUT)) if sender_pages else None
    r_staging = HostStaging(dst_pool, receiver_pages * page_unit(LAYOUT)) if receiver_pages else None
    kw = dict(sender_staging=s_staging, receiver_staging=r_staging)
    with linked(src_pool, dst_pool, aux_slots=(2, 4), **kw) as link:
        sender, receiver, finals = link.sender, link.receiver, link.finals
        rooms = {1: (list(range(1, 6)), [20, 21, 22, 30, 31]), 2: (list(range(8, 13)), [3, 4, 5, 6, 7])}
        for room, (src, dst) in rooms.items():
            assert receiver.can_add(len(dst))
            sender.add_room(room, src)
            receiver.add_room(room, link.prefill, dst, room - 1)
            if room == 1 and r_staging is not None:  # staged when it fits, else written straight
                staged = ROOM_PAGES if r_staging.capacity >= ROOM_PAGES else 0
                assert r_staging.num_free == r_staging.capacity - staged
            sender.send(room, src[:2])  # a first chunk, then the rest with the aux record
            sender.send(room, src[2:], last=True, aux=AuxRecord(room, 7, -0.5, 4 * ROOM_PAGES - 1))
        wait_until(lambda: len(finals["decode"]) == 2 and len(finals["prefill"]) == 2, interval=0.01)
        assert sorted(finals["decode"]) == [(1, TransferState.DONE, ""), (2, TransferState.DONE, "")]
        for src, dst in rooms.values():
            assert all(same_page(src_pool, s, dst_pool, d) for s, d in zip(src, dst))
        for staging in (s_staging, r_staging):
            assert staging is None or staging.num_free == staging.capacity


def test_an_aborted_room_gives_its_staging_pages_back_once():
    dst_pool = KVPool(LAYOUT, "cpu")
    staging = HostStaging(dst_pool, 8 * page_unit(LAYOUT))
    finals: list = []
    receiver = KVReceiver(
        CopyEngine("fake-decode:1", 0),
        dst_pool,
        AuxBuffer(2),
        lambda r, s, a, why: finals.append((r, s)),
        staging=staging,
        timeouts=TransferTimeouts(abort_grace_s=0.2),
        retry_interval_s=0.05,
    )
    try:
        receiver.endpoint = "127.0.0.1:1"
        receiver.add_room(1, "127.0.0.1:1", [1, 2, 3, 4, 5], 0)  # no prefill there: hand-shakes fail
        assert staging.num_free == 3 and not receiver.can_add(4) and receiver.can_add(3)
        with pytest.raises(RuntimeError, match="no 4 host staging pages free"):
            receiver.add_room(2, "127.0.0.1:1", [6, 7, 8, 9], 1)
        receiver.abort(1, "client went away")
        wait_until(lambda: finals == [(1, TransferState.ABORTED)], interval=0.01)
        assert staging.num_free == staging.capacity  # freed once: a second free would raise
    finally:
        receiver.close()
