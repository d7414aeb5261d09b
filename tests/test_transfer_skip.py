"""A room whose leading pages decode holds already (``skip_pages``, decode's prefix cache) through the real
KVSender and KVReceiver (real gRPC, the in-process copy engine of tests/test_transfer_managers.py), with and
without host staging and with KV checksums on: exactly the pages after the skipped ones are written, byte
for byte the source's; the skipped destination pages keep their bytes; the checksums cover what is written
(the room is DONE); the receiver stages only the written pages; nothing else in the pool changes."""

from __future__ import annotations

import pytest

from pd.kv_cache import KVPool
from pd.transfer.aux import AuxBuffer, AuxRecord
from pd.transfer.receiver import KVReceiver
from pd.transfer.staging import HostStaging
from pd.transfer.state import TransferState
from tests.support.polling import wait_until
from tests.test_host_staging import LAYOUT, page_unit, random_pool, same_page
from tests.test_transfer_managers import CopyEngine, linked, pages_touched

SRC = [1, 2, 3, 4, 5]
DST = [20, 21, 22, 30, 31]


@pytest.mark.parametrize("skip", [0, 2, 4])  # 4: every page but the last is held by decode
@pytest.mark.parametrize("staging", ["none", "receiver", "both"])
def test_skipped_pages_are_not_written(skip, staging):
    src_pool, dst_pool = random_pool(LAYOUT, seed=2), random_pool(LAYOUT, seed=3)
    before = KVPool(LAYOUT, "cpu")
    before.buffer.copy_(dst_pool.buffer)
    r_staging = HostStaging(dst_pool, 8 * page_unit(LAYOUT)) if staging != "none" else None
    s_staging = HostStaging(src_pool, 3 * page_unit(LAYOUT)) if staging == "both" else None
    kw = dict(kv_checksum=True, receiver_staging=r_staging, sender_staging=s_staging)
    with linked(src_pool, dst_pool, aux_slots=(2, 4), **kw) as link:
        sender, receiver, engine, finals = link.sender, link.receiver, link.engine, link.finals
        sender.add_room(1, SRC)
        receiver.add_room(1, link.prefill, DST, 0, skip)
        if r_staging is not None:
            assert r_staging.num_free == r_staging.capacity - (len(DST) - skip), "only written pages staged"
        sender.send(1, SRC[:3])  # a first chunk (all of it skipped when skip >= 3), then the rest
        sender.send(1, SRC[3:], last=True, aux=AuxRecord(1, 7, -0.5, 4 * len(SRC) - 1))
        wait_until(lambda: finals["decode"] and finals["prefill"], interval=0.01)
        assert finals["decode"] == [(1, TransferState.DONE, "")] and finals["prefill"] == [
            (1, TransferState.DONE)
        ]
        assert all(same_page(src_pool, s, dst_pool, d) for s, d in zip(SRC[skip:], DST[skip:]))
        untouched = [p for p in range(LAYOUT.num_pages) if p not in DST[skip:]]
        assert all(same_page(before, p, dst_pool, p) for p in untouched), "skipped pages keep their bytes"
        written = set()
        for _, pieces in engine.log:
            for _, dst, n in pieces:
                written |= pages_touched(dst_pool, dst, n)
        if r_staging is None:  # straight into the pool: the copy engine touched exactly the written pages
            assert written == set(DST[skip:])
        for s in (s_staging, r_staging):
            assert s is None or s.num_free == s.capacity


def test_a_room_cannot_skip_its_last_page():
    receiver = KVReceiver(CopyEngine("fake-decode:1", 0), KVPool(LAYOUT, "cpu"), AuxBuffer(2), print)
    try:
        receiver.endpoint = "127.0.0.1:1"
        with pytest.raises(ValueError, match="skip_pages 2 of 2 pages"):
            receiver.add_room(1, "127.0.0.1:1", [1, 2], 0, 2)
    finally:
        receiver.close()


def test_source_count_mismatch_fails_the_room():
    """A hand-shake whose skipped and destination pages do not add up to the room's pages fails it (an
    older prefill rank, which ignores skip_pages, fails such a room the same way instead of writing)."""
    src_pool, dst_pool = random_pool(LAYOUT, seed=2), KVPool(LAYOUT, "cpu")
    with linked(src_pool, dst_pool) as link:
        sender, receiver, engine, finals = link.sender, link.receiver, link.engine, link.finals
        sender.add_room(1, SRC[:3])  # prefill holds 3 pages; decode asks for 5 with 2 skipped
        receiver.add_room(1, link.prefill, DST, 0, 2)
        wait_until(lambda: finals["decode"] and finals["prefill"], interval=0.01)
        assert finals["prefill"] == [(1, TransferState.FAILED)]
        assert finals["decode"][0][:2] == (1, TransferState.FAILED) and engine.log == []
