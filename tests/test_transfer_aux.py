"""Aux records: round trip, and every kind of bad slot is detected."""

from __future__ import annotations

import struct

import pytest
import torch

from pd.transfer.aux import (
    AUX_RECORD_NBYTES,
    AuxBuffer,
    AuxError,
    AuxRecord,
    SlotAllocator,
    pack_aux,
    unpack_aux,
)

RECORD = AuxRecord(
    room=2**63 - 5, first_token=-3, first_logprob=-1.25, prompt_len=70_000, forks=((7, -0.5), (9, -2.0))
)


def test_round_trip_and_layout():
    data = pack_aux(RECORD)
    assert len(data) == AUX_RECORD_NBYTES == 172
    assert struct.unpack_from("<Qqf I I", data) == (RECORD.room, -3, -1.25, 70_000, 2)  # documented offsets
    assert struct.unpack_from("<2i", data, 28) == (7, 9) and struct.unpack_from("<2f", data, 88) == (
        -0.5,
        -2.0,
    )
    assert unpack_aux(data, RECORD.room) == RECORD
    assert unpack_aux(pack_aux(AuxRecord(1, 5, 0.0, 3)), 1).forks == ()
    spec = AuxRecord(4, 5, 0.0, 3, drafts=(11, 12, 13))
    data = pack_aux(spec)
    assert struct.unpack_from("<I3iI", data, 148) == (3, 11, 12, 13, 0x33585541)  # documented offsets
    assert unpack_aux(data, 4) == spec
    with pytest.raises(ValueError, match="at most 3 drafts"):
        pack_aux(AuxRecord(4, 5, 0.0, 3, drafts=(1, 2, 3, 4)))


def test_zeroed_slot_fails_the_magic():
    with pytest.raises(AuxError, match="magic"):
        unpack_aux(bytes(AUX_RECORD_NBYTES), RECORD.room)


@pytest.mark.parametrize("byte", range(AUX_RECORD_NBYTES))
def test_any_corrupt_byte_is_detected(byte):
    data = bytearray(pack_aux(RECORD))
    data[byte] ^= 0x40
    with pytest.raises(AuxError):
        unpack_aux(bytes(data), RECORD.room)


def test_half_written_slot_fails_the_checksum():
    old = pack_aux(AuxRecord(RECORD.room, 11, -2.0, 5))
    new = pack_aux(RECORD)
    half = AUX_RECORD_NBYTES // 2
    torn = new[:half] + old[half:]  # the first half of a new record over an old one of the same room
    with pytest.raises(AuxError, match="checksum"):
        unpack_aux(torn, RECORD.room)


def test_stale_record_of_another_room_is_detected():
    with pytest.raises(AuxError, match="stale"):
        unpack_aux(pack_aux(RECORD), RECORD.room + 1)


def test_bad_values_and_sizes():
    with pytest.raises(ValueError, match="u64"):
        pack_aux(AuxRecord(-1, 0, 0.0, 1))
    with pytest.raises(ValueError, match="u32"):
        pack_aux(AuxRecord(1, 0, 0.0, 2**32))
    with pytest.raises(AuxError, match="155 bytes"):
        unpack_aux(pack_aux(RECORD)[:155], RECORD.room)


def test_aux_buffer_slots():
    buf = AuxBuffer(4)
    assert buf.buffer.shape == (4, AUX_RECORD_NBYTES) and buf.buffer.dtype == torch.uint8
    buf.write(2, RECORD)
    assert buf.read(2, RECORD.room) == RECORD
    assert buf.slot_offset(2) == 2 * AUX_RECORD_NBYTES
    with pytest.raises(AuxError, match="magic"):
        buf.read(1, RECORD.room)  # never written
    with pytest.raises(ValueError, match="out of range"):
        buf.write(4, RECORD)


def test_slot_allocator():
    slots = SlotAllocator(2)
    a, b = slots.alloc(), slots.alloc()
    assert {a, b} == {0, 1} and slots.alloc() is None
    slots.free(a)
    with pytest.raises(ValueError, match="double free"):
        slots.free(a)
    assert slots.alloc() == a
