"""Typed messages in and out of a role engine (one for every hop between the RPC side and the engine).

Commands go from the worker's event loop to the engine thread (``EngineThread.submit``); events come
back from the engine's ``handle`` and ``step`` and are routed to the RPC that waits for the room.
Plain dataclasses: nothing here touches tensors, threads or gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pd.transfer.aux import AuxRecord
from pd.transfer.state import TransferState
from pd.types import SamplingParams, TopLogprobs

# ---- commands (event loop -> engine thread) ----


@dataclass(frozen=True)
class PrefillRoom:
    """A prefill rank is asked to compute ``room``'s prompt and ship its KV (and first token)."""

    room: int
    token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class DecodeRoom:
    """A decode (or colocated) rank is asked to generate ``room``'s tokens. ``prefill_endpoint``: the
    prefill rank that computes the prompt's KV; empty on a colocated rank, which computes it itself."""

    room: int
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    prefill_endpoint: str = ""


@dataclass(frozen=True)
class AbortRoom:
    room: int
    reason: str


@dataclass(frozen=True)
class TransferEnded:
    """The transfer layer released ``room``: its pages are no longer read or written by a transfer.
    ``aux`` is the checked first-token record on a decode rank whose transfer is DONE, else None."""

    room: int
    state: TransferState
    reason: str = ""
    aux: AuxRecord | None = None


Command = PrefillRoom | DecodeRoom | AbortRoom | TransferEnded


# ---- events (engine thread -> event loop) ----


class Failure(str, enum.Enum):
    """Why a room ended without its result (the worker maps it to a gRPC status)."""

    INVALID = "invalid"  # bad request (too long, ids outside the vocabulary, ...)
    DUPLICATE = "duplicate"  # the room is already open here
    BUSY = "busy"  # a bounded queue is full
    ABORTED = "aborted"
    TIMEOUT = "timeout"  # a transfer state timed out
    UNAVAILABLE = "unavailable"  # the peer failed
    FAILED = "failed"  # the request failed while running (its output left its grammar); others go on


@dataclass(frozen=True)
class RoomFailed:
    room: int
    failure: Failure
    message: str


@dataclass(frozen=True)
class PrefillPhases:
    """Where a room's time went on its prefill rank (seconds on that rank's monotonic clock)."""

    queue_s: float  # arrival to the step that runs its first chunk
    compute_s: float  # that step's start to the end of its last chunk
    transfer_s: float  # the last chunk's end to the transfer's end
    transfer_bytes: int  # KV bytes of its pages, all layers


@dataclass(frozen=True)
class DecodePhases:
    """Where a room's time went on its decode rank (seconds); carried by its last ``Tokens``."""

    pages_wait_s: float  # arrival to its transfer's start
    transfer_s: float  # transfer start to the KV's arrival
    admit_s: float  # the KV's arrival to the first token's emission
    first_step_s: float  # first token's emission to the second's (0 with one token)
    tpot_s: float  # mean time between emitted tokens after the first (0 with one token)
    first_emit_unix: float  # wall clock of the first token's emission (compared with the proxy's)


@dataclass(frozen=True)
class Prefilled:
    """A prefill room's KV and first token reached the decode rank."""

    room: int
    prompt_tokens: int
    first_tokens: tuple[int, ...]  # one per choice (n), in choice order
    phases: PrefillPhases | None = None
    first_tops: tuple[TopLogprobs, ...] = ()  # one per choice: the first token's alternatives, if asked
    prompt_logprobs: tuple[tuple[float, TopLogprobs], ...] = ()  # prompt tokens 1.. (echo), if asked


@dataclass(frozen=True)
class Tokens:
    """New tokens of one choice of a decoding room (one step), the text they completed, and whether that
    choice ended (the room ends once each of its n choices has)."""

    room: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str | None  # a ``FinishReason`` value once the room ended, "abort" included
    prompt_tokens: int
    completion_tokens: int  # of this choice
    phases: DecodePhases | None = None  # on a disaggregated room's last event (its last choice's end)
    top_logprobs: tuple[TopLogprobs, ...] = ()  # per token, if asked
    prompt_logprobs: tuple[tuple[float, TopLogprobs], ...] = ()  # a colocated room's first event (echo)
    index: int = 0  # the choice (n > 1)


Event = RoomFailed | Prefilled | Tokens


def transfer_failed(room: int, state: TransferState, reason: str) -> RoomFailed:
    """The failure of a room whose transfer ended in ``state`` (not DONE): timeouts are TIMEOUT."""
    if state is TransferState.ABORTED:
        return RoomFailed(room, Failure.ABORTED, f"KV transfer aborted: {reason}")
    if "timed out" in reason or "timeout" in reason:
        return RoomFailed(room, Failure.TIMEOUT, f"KV transfer timed out: {reason}")
    return RoomFailed(room, Failure.UNAVAILABLE, f"KV transfer failed: {reason}")
