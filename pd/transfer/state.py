"""States of one room's KV transfer, their timeouts, and the per-room state machine.

A room is one request's KV transfer from a prefill rank to a decode rank. Both sides walk the
same states (DESIGN.md §2):

``BOOTSTRAPPING``
    Prefill: the room is known from one side only (the scheduler's ``add_room`` or decode's
    hand-shake), waiting for the other. Decode: the hand-shake is on its way (retried while the
    prefill rank is unreachable).
``WAITING_FOR_INPUT``
    Prefill: paired, waiting for the first computed pages. Decode: hand-shake accepted, waiting
    for the prefill rank's result (its queueing, the chunked prefill and the writes).
``TRANSFERRING``
    Prefill: writes under way. Decode: ``TransferDone`` arrived, the aux record is being checked.
``DONE``, ``FAILED`` (with a reason), ``ABORTED``
    Final. Nothing leaves a final state: a transition out of one raises ``InvalidTransition``.

Every non-final state has its own timeout (``TransferTimeouts``); the managers move an expired
room to ``FAILED``.
"""

from __future__ import annotations

import enum
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class TransferState(str, enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    WAITING_FOR_INPUT = "waiting_for_input"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.ABORTED)


_NEXT: dict[TransferState, frozenset[TransferState]] = {
    TransferState.BOOTSTRAPPING: frozenset(
        {TransferState.WAITING_FOR_INPUT, TransferState.FAILED, TransferState.ABORTED}
    ),
    TransferState.WAITING_FOR_INPUT: frozenset(
        {TransferState.TRANSFERRING, TransferState.FAILED, TransferState.ABORTED}
    ),
    TransferState.TRANSFERRING: frozenset({TransferState.DONE, TransferState.FAILED, TransferState.ABORTED}),
}


class InvalidTransition(RuntimeError):
    """A transition the state table does not allow (always a bug in the caller)."""


@dataclass(frozen=True)
class TransferTimeouts:
    """Seconds a room may stay in each non-final state, and the decode side's abort grace.

    ``transferring_s`` is a progress timeout on the prefill side: each ``send`` call and each
    finished write restarts it, so a long chunked prefill is not cut off while it advances.
    ``abort_grace_s``: after a failed or aborted room whose prefill peer did not confirm that its
    writes are drained (dead, hung or unreachable), the decode side waits this long before it
    releases the destination pages (see ``pd.transfer.receiver``).

    The defaults are the ones every deployment has run with: ``pd-prefill`` / ``pd-decode`` read
    them from here (``--bootstrapping-timeout`` 60 s, ``--waiting-timeout`` 300 s, ...). Until the
    launchers took their defaults from this class, the flags said 60 / 300 s while this class said
    30 / 120 s (which only in-process users such as the tests got).
    """

    bootstrapping_s: float = 60.0
    waiting_for_input_s: float = 300.0
    transferring_s: float = 30.0
    abort_grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("bootstrapping_s", "waiting_for_input_s", "transferring_s", "abort_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransferTimeouts.{name} must be positive, got {getattr(self, name)}")

    def for_state(self, state: TransferState) -> float:
        """Timeout of a non-final state."""
        if state is TransferState.BOOTSTRAPPING:
            return self.bootstrapping_s
        if state is TransferState.WAITING_FOR_INPUT:
            return self.waiting_for_input_s
        if state is TransferState.TRANSFERRING:
            return self.transferring_s
        raise ValueError(f"final state {state.value} has no timeout")


class RoomStateMachine:
    """State, reason and deadline of one room on one side (``side`` names it in the log).

    Not thread-safe by itself: the owning manager holds its lock around every call.
    """

    def __init__(
        self,
        room: int,
        side: str,
        timeouts: TransferTimeouts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.room = room
        self.side = side
        self.timeouts = timeouts
        self.clock = clock
        self.state = TransferState.BOOTSTRAPPING
        self.reason = ""
        self.deadline = clock() + timeouts.bootstrapping_s
        logger.debug("%s room %d: %s", side, room, self.state.value)

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def to(self, state: TransferState, reason: str = "") -> None:
        """Moves to ``state``; raises ``InvalidTransition`` if the table does not allow it."""
        if state not in _NEXT.get(self.state, frozenset()):
            raise InvalidTransition(
                f"{self.side} room {self.room}: no transition {self.state.value} -> {state.value}"
                + (f" (already final: {self.reason})" if self.is_final and self.reason else "")
            )
        old, self.state, self.reason = self.state, state, reason
        self.deadline = float("inf") if state.is_final else self.clock() + self.timeouts.for_state(state)
        log = logger.warning if state in (TransferState.FAILED, TransferState.ABORTED) else logger.debug
        log(
            "%s room %d: %s -> %s%s",
            self.side,
            self.room,
            old.value,
            state.value,
            f" ({reason})" if reason else "",
        )

    def touch(self) -> None:
        """Restarts the current state's timeout (progress was made)."""
        if not self.is_final:
            self.deadline = self.clock() + self.timeouts.for_state(self.state)

    def expired(self) -> bool:
        return not self.is_final and self.clock() >= self.deadline

    def fail_if_expired(self) -> bool:
        """Moves an expired room to FAILED with a reason naming the state; returns whether it did."""
        if not self.expired():
            return False
        state = self.state
        self.to(TransferState.FAILED, f"timed out in {state.value} after {self.timeouts.for_state(state):g}s")
        return True


def drain_queue(q: queue.SimpleQueue, timeout: float) -> list:
    """Everything in ``q``, waiting up to ``timeout`` seconds for the first item (managers' control loops)."""
    try:
        items = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
