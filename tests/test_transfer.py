"""KV transfer between real processes: a prefill and a decode rank (tests/support/transfer_peer.py), each
with a CPU KV pool, the Mooncake engine over TCP on 127.0.0.1 and its gRPC hand-shake service.

Oracle: the decode pages hold exactly the prefill pages' bytes (sha256 per page over all
layers), pages outside the room stay zero, the aux record arrives as sent, and each side
releases each room exactly once (the peer process reports a second release as an error).
Faults are real: SIGKILL and SIGSTOP of the peer process. Waits are bounded well below the
library's own 30-60 s defaults, so a test fails if those were what ended a room.
"""

from __future__ import annotations

import hashlib
import signal

import pytest

from tests.support.net import free_port
from tests.support.polling import wait_until
from tests.support.transfer_peer import WAIT_S, Peer

pytest.importorskip("mooncake.engine")

ZERO_PAGE = hashlib.sha256(bytes(3 * 4 * 24 * 2)).hexdigest()  # 3 layers x 4 tokens x 24 values x bf16

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def peers(tmp_path):
    started: list[Peer] = []

    def start(role: str, **opts: object) -> Peer:
        peer = Peer(role, tmp_path, **opts)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


def start_pair(
    peers, order: str = "layer_major", prefill_timeouts: str = "3,3,3,1", decode_timeouts: str = "3,3,3,1"
):
    """A prefill and a decode peer; timeouts are "bootstrapping,waiting_for_input,transferring,grace" seconds."""
    return (
        peers("prefill", order=order, seed=7, timeouts=prefill_timeouts),
        peers("decode", order=order, timeouts=decode_timeouts),
    )


def assert_pages_equal(prefill: Peer, decode: Peer, src: list[int], dst: list[int]) -> None:
    assert decode.call("digests", pages=dst) == prefill.call("digests", pages=src)


def wait_pages_written(prefill: Peer, decode: Peer, src: list[int], dst: list[int]) -> None:
    """Waits (bounded) until a chunk's asynchronous write has landed: the transfer is now mid-way."""
    want = prefill.call("digests", pages=src)
    wait_until(lambda: decode.call("digests", pages=dst) == want, WAIT_S, f"pages {src} arriving in {dst}")


def mid_transfer(peers) -> tuple[Peer, Peer]:
    """A prefill and a decode peer with room 1 (pages 1-4 to 5-8) mid-way: the first chunk has landed."""
    prefill, decode = start_pair(peers)
    prefill.call("add_room", room=1, pages=[1, 2, 3, 4])
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=[5, 6, 7, 8], aux_slot=0)
    prefill.call("send", room=1, pages=[1, 2])
    wait_pages_written(prefill, decode, [1, 2], [5, 6])
    return prefill, decode


@pytest.mark.parametrize("order", ["layer_major", "page_major"])
def test_pages_and_aux_arrive_byte_exact(peers, order):
    prefill, decode = start_pair(peers, order)
    src = [2, 3, 4, 5, 6, 7]
    dst = [9, 3, 4, 12, 7, 8]  # non-contiguous: runs (2->9), (3,4->3,4), (5->12), (6,7->7,8)
    aux = [4242, -0.5, 5 * 4 + 3]  # prompt of 23 tokens: the last page is partial

    # Room 1: the request reaches prefill before decode's hand-shake; room 2: the other way round.
    prefill.call("add_room", room=1, pages=src)
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=dst, aux_slot=3)
    decode.call("add_room", room=2, prefill=prefill.endpoint, pages=[20, 21, 22, 23, 24, 25], aux_slot=5)
    # Room 2's hand-shake has arrived.
    wait_until(lambda: prefill.call("state", room=2) == "bootstrapping", WAIT_S, interval=0.02)
    prefill.call("add_room", room=2, pages=[10, 11, 12, 13, 14, 15])

    for room, pages in ((1, src), (2, [10, 11, 12, 13, 14, 15])):
        prefill.call("send", room=room, pages=pages[:2])
        prefill.call("send", room=room, pages=pages[2:4])
        prefill.call("send", room=room, pages=pages[4:], last=True, aux=[aux[0] + room, aux[1], aux[2]])

    for room in (1, 2):
        assert prefill.wait_final(room)["state"] == "done"
        event = decode.wait_final(room)
        assert event["state"] == "done"
        assert event["aux"] == [aux[0] + room, aux[1], aux[2]]
    assert_pages_equal(prefill, decode, src, dst)
    assert_pages_equal(prefill, decode, [10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25])
    untouched = [p for p in range(1, 32) if p not in [*dst, 20, 21, 22, 23, 24, 25]]
    assert decode.call("digests", pages=untouched) == [ZERO_PAGE] * len(untouched)
    prefill.check_released_once()
    decode.check_released_once()


def test_receiver_killed_mid_transfer(peers):
    prefill, decode = mid_transfer(peers)
    decode.signal(signal.SIGKILL)
    decode.proc.wait(timeout=10)
    prefill.call("send", room=1, pages=[3, 4], last=True, aux=[1, 0.0, 16])
    assert prefill.wait_final(1)["state"] == "failed"
    prefill.check_released_once()


def test_sender_killed_mid_transfer(peers):
    prefill, decode = mid_transfer(peers)
    prefill.signal(signal.SIGKILL)
    assert decode.wait_final(1)["state"] == "failed"
    decode.check_released_once()


def test_hung_receiver_is_bounded_by_our_timeout(peers):
    prefill, decode = mid_transfer(peers)
    decode.signal(signal.SIGSTOP)
    prefill.call("send", room=1, pages=[3, 4], last=True, aux=[1, 0.0, 16])
    assert prefill.wait_final(1)["state"] == "failed"  # engine progress timeout 2 s, not 30 s
    decode.signal(signal.SIGCONT)
    assert decode.wait_final(1)["state"] == "failed"
    prefill.check_released_once()
    decode.check_released_once()


def test_hung_sender_is_bounded_by_our_timeout(peers):
    prefill, decode = mid_transfer(peers)
    prefill.signal(signal.SIGSTOP)
    # waiting_for_input 3 s, then Abort to the hung prefill (1 s RPC deadline), then 1 s grace
    assert decode.wait_final(1)["state"] == "failed"
    decode.check_released_once()


def test_abort_from_decode_before_during_after(peers):
    prefill, decode = start_pair(peers)
    # before: decode aborts before prefill even has the request; the late request ends at once
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=[1, 2], aux_slot=0)
    decode.call("abort", room=1)
    assert decode.wait_final(1)["state"] == "aborted"
    prefill.call("add_room", room=1, pages=[1, 2])
    assert prefill.wait_final(1)["state"] == "aborted"
    # during: after the first chunk; prefill stops writing and confirms, later sends are ignored
    prefill.call("add_room", room=2, pages=[3, 4])
    decode.call("add_room", room=2, prefill=prefill.endpoint, pages=[3, 4], aux_slot=1)
    prefill.call("send", room=2, pages=[3])
    wait_pages_written(prefill, decode, [3], [3])
    decode.call("abort", room=2)
    assert decode.wait_final(2)["state"] == "aborted"
    assert prefill.wait_final(2)["state"] == "aborted"
    prefill.call("send", room=2, pages=[4], last=True, aux=[2, 0.0, 8])
    assert decode.call("digests", pages=[4]) == [ZERO_PAGE]
    # after: the room is done and released; aborting it is harmless
    prefill.call("add_room", room=3, pages=[5])
    decode.call("add_room", room=3, prefill=prefill.endpoint, pages=[5], aux_slot=2)
    prefill.call("send", room=3, pages=[5], last=True, aux=[3, 0.0, 4])
    assert decode.wait_final(3)["state"] == "done"
    assert prefill.wait_final(3)["state"] == "done"
    decode.call("abort", room=3)
    prefill.call("abort", room=3)
    # unknown rooms: harmless on both sides
    decode.call("abort", room=99)
    prefill.call("abort", room=98)
    prefill.check_released_once()
    decode.check_released_once()


def test_abort_from_prefill_before_during_after(peers):
    prefill, decode = start_pair(peers)
    # before: prefill aborts before the hand-shake; the hand-shake is refused
    prefill.call("add_room", room=1, pages=[1, 2])
    prefill.call("abort", room=1)
    assert prefill.wait_final(1)["state"] == "aborted"
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=[1, 2], aux_slot=0)
    assert decode.wait_final(1)["state"] == "failed"
    # during: after the first chunk; decode is told once the writes drained
    prefill.call("add_room", room=2, pages=[3, 4])
    decode.call("add_room", room=2, prefill=prefill.endpoint, pages=[3, 4], aux_slot=1)
    prefill.call("send", room=2, pages=[3])
    wait_pages_written(prefill, decode, [3], [3])
    prefill.call("abort", room=2)
    assert prefill.wait_final(2)["state"] == "aborted"
    assert decode.wait_final(2)["state"] == "aborted"
    # after: harmless
    prefill.call("add_room", room=3, pages=[5])
    decode.call("add_room", room=3, prefill=prefill.endpoint, pages=[5], aux_slot=2)
    prefill.call("send", room=3, pages=[5], last=True, aux=[3, 0.0, 4])
    assert prefill.wait_final(3)["state"] == "done"
    assert decode.wait_final(3)["state"] == "done"
    prefill.call("abort", room=3)
    prefill.check_released_once()
    decode.check_released_once()


@pytest.mark.parametrize("staging", [0, 16], ids=["direct", "host_staged"])
def test_layer_sends_arrive_byte_exact_and_an_abort_mid_forward_releases_once(peers, staging):
    """``--transfer-granularity layer`` over Mooncake TCP: each chunk's pages go to the sender before its
    (simulated) forward stores them layer by layer; decode must get the stored bytes, not the old ones. A room
    aborted while its writer waits for a layer is released once on both sides, staging pages included."""
    prefill = peers("prefill", seed=7, timeouts="3,3,3,1", staging_pages=staging)
    decode = peers("decode", timeouts="3,3,3,1", staging_pages=staging)
    src, dst = [2, 3, 4, 5, 6, 7], [9, 3, 4, 12, 7, 8]
    old = prefill.call("digests", pages=src)
    prefill.call("add_room", room=1, pages=src)
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=dst, aux_slot=3)
    wait_until(lambda: prefill.call("state", room=1) == "waiting_for_input", WAIT_S, interval=0.02)
    prefill.call("forward", room=1, pages=src[:2], seed=1)
    prefill.call("forward", room=1, pages=src[2:5], seed=2)
    prefill.call("forward", room=1, pages=src[5:], seed=3, aux=[4242, -0.5, 23])
    assert prefill.wait_final(1)["state"] == "done"
    assert decode.wait_final(1) == {"event": "final", "room": 1, "state": "done", "aux": [4242, -0.5, 23]}
    new = prefill.call("digests", pages=src)
    assert all(a != b for a, b in zip(old, new))  # the forwards rewrote every page
    assert_pages_equal(prefill, decode, src, dst)

    prefill.call("add_room", room=2, pages=[10, 11])
    decode.call("add_room", room=2, prefill=prefill.endpoint, pages=[20, 21], aux_slot=4)
    wait_until(lambda: prefill.call("state", room=2) == "waiting_for_input", WAIT_S, interval=0.02)
    prefill.call("forward", room=2, pages=[10, 11], seed=4, layers=1)  # layer 0 of 3 stored: mid-forward
    prefill.call("abort", room=2)
    assert prefill.wait_final(2)["state"] == "aborted"
    assert decode.wait_final(2)["state"] == "aborted"
    prefill.check_released_once()
    decode.check_released_once()
    assert prefill.call("staging_free") is decode.call("staging_free") is (True if staging else None)


def test_orphan_handshake_expires(peers):
    prefill, decode = start_pair(peers, decode_timeouts="3,60,3,1")  # only prefill's expiry can end it
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=[1, 2], aux_slot=0)
    # The hand-shake was accepted.
    wait_until(lambda: decode.call("state", room=1) == "waiting_for_input", WAIT_S, interval=0.02)
    assert prefill.call("state", room=1) == "bootstrapping"  # an orphan: no request for it
    # prefill's bootstrapping timeout fails it and tells decode, which releases at once
    assert decode.wait_final(1)["state"] == "failed"
    prefill.check_released_once()  # the orphan held no pages: nothing to release
    decode.check_released_once()


def test_unreachable_prefill_fails_after_bounded_retries(peers):
    decode = peers("decode")
    decode.call("add_room", room=1, prefill=f"127.0.0.1:{free_port()}", pages=[1], aux_slot=0)
    assert decode.call("state", room=1) == "bootstrapping"
    assert decode.wait_final(1)["state"] == "failed"
    decode.check_released_once()


def test_incompatible_layout_is_refused(peers):
    prefill = peers("prefill", page_size=4)
    decode = peers("decode", page_size=8)
    decode.call("add_room", room=1, prefill=prefill.endpoint, pages=[1, 2], aux_slot=0)
    assert decode.wait_final(1)["state"] == "failed"
    assert prefill.call("state", room=1) is None  # nothing was created on the prefill side
    decode.check_released_once()
