"""Aux records: the first token of a request, written by prefill next to its KV pages.

One record per room slot, fixed size, little-endian::

    offset  size  field
    0       8     room            u64
    8       8     first_token     i64  (choice 0's)
    16      4     first_logprob   f32
    20      4     prompt_len      u32
    24      4     num_forks       u32  (n - 1: choices 1.. of a request of n choices)
    28      60    fork_tokens     i32[MAX_FORKS]  (their first tokens; unused entries 0)
    88      60    fork_logprobs   f32[MAX_FORKS]
    148     4     num_drafts      u32  (speculative decoding: the first drafts of choice 0, else 0)
    152     12    draft_tokens    i32[MAX_SPECULATIVE_TOKENS]  (unused entries 0)
    164     4     magic           u32  (AUX_MAGIC: format and version)
    168     4     crc32           u32  (of bytes 0..167)

The decode side never trusts a slot blindly: a zeroed or never-written slot fails the magic, a
half-written one fails the checksum, and a stale record of an earlier room fails the room check.
So a slot needs no clearing between rooms (clearing a GPU slot would be one more sync).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from pd.speculative import MAX_SPECULATIVE_TOKENS
from pd.types import MAX_CHOICES

AUX_MAGIC = 0x33585541  # b"AUX3" little-endian
MAX_FORKS = MAX_CHOICES - 1
MAX_DRAFTS = MAX_SPECULATIVE_TOKENS
# The fields before the checksum.
_BODY = struct.Struct(f"<QqfII{MAX_FORKS}i{MAX_FORKS}fI{MAX_DRAFTS}iI")
_CRC = struct.Struct("<I")
AUX_RECORD_NBYTES = _BODY.size + _CRC.size  # 172


class AuxError(ValueError):
    """A slot that holds no valid record for the room asked for."""


@dataclass(frozen=True)
class AuxRecord:
    room: int
    first_token: int
    first_logprob: float
    prompt_len: int
    forks: tuple[tuple[int, float], ...] = ()  # (first token, its logprob) of choices 1.. (n > 1)
    drafts: tuple[int, ...] = ()  # speculative decoding: choice 0's first drafts (MTP, after the first token)


def pack_aux(record: AuxRecord) -> bytes:
    """The record's ``AUX_RECORD_NBYTES`` bytes, checksum included."""
    if not 0 <= record.room < 2**64:
        raise ValueError(f"aux room {record.room} is not a u64")
    if not 0 <= record.prompt_len < 2**32:
        raise ValueError(f"aux prompt_len {record.prompt_len} is not a u32")
    if len(record.forks) > MAX_FORKS:
        raise ValueError(f"aux record holds at most {MAX_FORKS} forks, got {len(record.forks)}")
    if len(record.drafts) > MAX_DRAFTS:
        raise ValueError(f"aux record holds at most {MAX_DRAFTS} drafts, got {len(record.drafts)}")
    pad = [(0, 0.0)] * (MAX_FORKS - len(record.forks))
    tokens, logprobs = zip(*record.forks, *pad)
    body = _BODY.pack(
        record.room,
        record.first_token,
        record.first_logprob,
        record.prompt_len,
        len(record.forks),
        *tokens,
        *logprobs,
        len(record.drafts),
        *record.drafts,
        *[0] * (MAX_DRAFTS - len(record.drafts)),
        AUX_MAGIC,
    )
    return body + _CRC.pack(zlib.crc32(body))


def unpack_aux(data: bytes, room: int) -> AuxRecord:
    """Parses and checks a slot's bytes; raises ``AuxError`` unless it is a whole record of ``room``."""
    if len(data) != AUX_RECORD_NBYTES:
        raise AuxError(f"aux slot holds {len(data)} bytes, expected {AUX_RECORD_NBYTES}")
    got_room, token, logprob, prompt_len, num_forks, *rest = _BODY.unpack(data[: _BODY.size])
    magic, (crc,) = rest[-1], _CRC.unpack(data[_BODY.size :])
    if magic != AUX_MAGIC:
        raise AuxError(
            f"aux slot for room {room} has magic {magic:#010x}, expected {AUX_MAGIC:#010x} (never written?)"
        )
    if zlib.crc32(data[: _BODY.size]) != crc:
        raise AuxError(f"aux slot for room {room} fails its checksum (half-written?)")
    if got_room != room:
        raise AuxError(f"aux slot holds room {got_room}, expected room {room} (stale record)")
    if num_forks > MAX_FORKS:
        raise AuxError(f"aux slot for room {room} claims {num_forks} forks (at most {MAX_FORKS})")
    forks = tuple(zip(rest[:num_forks], rest[MAX_FORKS : MAX_FORKS + num_forks]))
    num_drafts = rest[2 * MAX_FORKS]
    if num_drafts > MAX_DRAFTS:
        raise AuxError(f"aux slot for room {room} claims {num_drafts} drafts (at most {MAX_DRAFTS})")
    drafts = tuple(rest[2 * MAX_FORKS + 1 : 2 * MAX_FORKS + 1 + num_drafts])
    return AuxRecord(got_room, token, logprob, prompt_len, forks, drafts)


class AuxBuffer:
    """``num_slots`` aux records: one uint8 tensor ``[num_slots, AUX_RECORD_NBYTES]`` on ``device``.

    Lifetime: allocated once at start-up and registered with the transfer engine next to the KV
    pool; a slot belongs to one room from ``add_room`` until that room's ``on_final``. On the
    decode side the prefill rank writes the slot remotely; on the prefill side a slot is the
    staging source of that write.
    """

    def __init__(self, num_slots: int, device: torch.device | str = "cpu") -> None:
        if num_slots <= 0:
            raise ValueError(f"AuxBuffer needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.buffer = torch.zeros((num_slots, AUX_RECORD_NBYTES), dtype=torch.uint8, device=device)

    @property
    def data_ptr(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.num_slots * AUX_RECORD_NBYTES

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` from the start of the buffer."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"aux slot {slot} out of range [0, {self.num_slots})")
        return slot * AUX_RECORD_NBYTES

    def write(self, slot: int, record: AuxRecord) -> None:
        """Packs ``record`` into ``slot``; returns once the bytes are in place (synchronous on GPU too)."""
        self.slot_offset(slot)
        src = torch.frombuffer(bytearray(pack_aux(record)), dtype=torch.uint8)
        self.buffer[slot].copy_(src)
        if self.buffer.is_cuda:
            torch.cuda.current_stream(self.buffer.device).synchronize()

    def read(self, slot: int, room: int) -> AuxRecord:
        """The checked record of ``room`` in ``slot``; raises ``AuxError`` if there is none."""
        self.slot_offset(slot)
        return unpack_aux(bytes(self.buffer[slot].cpu().numpy().tobytes()), room)


class SlotAllocator:
    """Hands out slot ids ``0 .. num_slots-1``; freeing a free slot raises."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"SlotAllocator needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or None if all are taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"aux slot {slot} is not allocated (double free?)")
        self._used.remove(slot)
        self._free.append(slot)
