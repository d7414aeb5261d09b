"""The decode role: each room's KV arrives from its prefill rank, then the room decodes in the batch.

A room's life here (every step on the engine thread):

1. ``DecodeRoom`` -> PENDING, FIFO, until pages for the prompt plus headroom and an aux slot are free,
   and the rooms running or in transfer stay within ``max_running`` (bounded: BUSY beyond ``max_pending``).
2. TRANSFER: the prompt is matched against this rank's prefix cache (full pages of earlier requests'
   prompts and outputs, cached as they ended; never the prompt's last page), one reference per page found;
   the receiver is given the prompt's pages (those found first) and the slot, and how many leading pages
   it must not have written; it hand-shakes with the prefill rank, which writes the rest of the KV and
   the first token there.
3. ``TransferEnded`` DONE -> RUNNING: the scheduler admits the request with its pages
   (``Engine.add_prefilled``) and the first token is emitted; a request of n choices forks there into n
   sequences sharing the prompt's pages (each choice's first token came in the aux record). Each ``step``
   then decodes one token per running sequence. Any other end frees the pages at once (the receiver
   reports only once no write can land).
4. Finished (stop, length) or aborted: the scheduler offers each sequence's full pages of computed tokens
   to the prefix cache (with it on) and frees its page references exactly once; the room ends with its
   last choice. A room that ends before RUNNING caches nothing (its pages may hold partial writes).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pd.engine.engine import Engine, TokenOutput
from pd.engine.messages import (
    AbortRoom,
    Command,
    DecodePhases,
    DecodeRoom,
    Event,
    Failure,
    TransferEnded,
    transfer_failed,
)
from pd.engine.role import Load, aborted_event, output_event, refused, tokens_event
from pd.transfer.aux import SlotAllocator
from pd.transfer.state import TransferState
from pd.types import Req, Sampled
from pd.worker.metrics import WorkerMetrics


class PageReceiver(Protocol):
    """The transfer layer's decode side (``pd.transfer.receiver.KVReceiver``). It holds the page list and
    aux slot it is given until it reports the room's end (``TransferEnded``); it never frees a page."""

    def can_add(self, num_pages: int) -> bool: ...

    def add_room(
        self, room: int, prefill_endpoint: str, dst_pages: Sequence[int], aux_slot: int, skip_pages: int
    ) -> None: ...

    def abort(self, room: int, reason: str) -> None: ...


class Stage(str, enum.Enum):
    PENDING = "pending"  # waiting for pages and an aux slot
    TRANSFER = "transfer"  # KV on its way from the prefill rank
    RUNNING = "running"  # in the scheduler's running batch


@dataclass(eq=False)
class _Room:
    req: Req
    prefill_endpoint: str
    arrived: float
    stage: Stage = Stage.PENDING
    pages: list[int] | None = None  # reserved for the transfer; the scheduler's once RUNNING
    aux_slot: int | None = None
    aborted: str | None = None  # why, once an abort was asked for during the transfer
    unfinished: int = 0  # choices still decoding, once RUNNING
    # Monotonic times of its transfer's start, the KV's arrival and its emissions (per-phase latency).
    transfer_started: float = 0.0
    kv_arrived: float = 0.0
    first_emit: float = 0.0
    first_emit_unix: float = 0.0
    second_emit: float = 0.0
    last_emit: float = 0.0
    emitted: dict[int, int] = dataclasses.field(default_factory=dict)  # tokens emitted, per choice

    @property
    def steps(self) -> int:
        """Tokens of its longest choice: its choices emit side by side, one token each per step."""
        return max(self.emitted.values(), default=0)


class DecodeEngine:
    """``headroom_tokens``: pages reserved beyond the prompt when a room's transfer starts (decoding grows
    into them without a page allocation); ``max_pending``: rooms waiting for pages before new ones are
    refused."""

    def __init__(
        self,
        engine: Engine,
        receiver: PageReceiver,
        slots: SlotAllocator,
        headroom_tokens: int,
        max_pending: int,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine, self.receiver, self.slots = engine, receiver, slots
        self.metrics = metrics or WorkerMetrics("decode")
        self.headroom_tokens, self.max_pending = headroom_tokens, max_pending
        self.layout = engine.runner.pool.layout
        self.rooms: dict[int, _Room] = {}
        self.pending: deque[int] = deque()
        self.in_transfer = 0
        if engine.spec is not None:
            engine.spec.on_verify = self.metrics.speculated
        engine.scheduler.cache_finished = True  # a no-op without a prefix cache
        engine.scheduler.on_prefix_match = self.metrics.prefix_matched

    # ---- the loop ----

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[Event]:
        if batch := len(self.engine.scheduler.running):
            self.metrics.decode_batch.observe(batch, role="decode")
        events = [self._emit(out) for out in self.engine.step()]
        self._start_transfers()  # finished requests may have freed pages
        return events

    def handle(self, cmd: Command) -> list[Event]:
        if isinstance(cmd, DecodeRoom):
            events = self._arrive(cmd)
        elif isinstance(cmd, AbortRoom):
            events = self._abort(cmd.room, cmd.reason)
        elif isinstance(cmd, TransferEnded):
            events = self._transfer_ended(cmd)
        else:
            raise TypeError(f"a decode engine does not handle {type(cmd).__name__}")
        self._start_transfers()
        return events

    # ---- state for metrics and the registry ----

    def load(self) -> Load:
        return Load(running=len(self.engine.scheduler.running), waiting=len(self.pending))

    def queue_lengths(self) -> dict[str, int]:
        return {
            "prealloc": len(self.pending),
            "transfer": self.in_transfer,
            "running": len(self.engine.scheduler.running),
        }

    @property
    def rooms_open(self) -> int:
        return len(self.rooms)

    # ---- steps of a room ----

    def _arrive(self, cmd: DecodeRoom) -> list[Event]:
        if cmd.room in self.rooms:
            return refused(
                self.metrics, cmd.room, Failure.DUPLICATE, f"room {cmd.room:x} is already being decoded here"
            )
        if len(self.pending) >= self.max_pending:
            return refused(
                self.metrics,
                cmd.room,
                Failure.BUSY,
                f"{len(self.pending)} rooms already wait for KV pages here",
            )
        if not cmd.prefill_endpoint:
            return refused(self.metrics, cmd.room, Failure.INVALID, "prefill_endpoint is required")
        try:
            req = self.engine.make_request(cmd.token_ids, cmd.sampling, rid=cmd.room)
        except ValueError as e:
            return refused(self.metrics, cmd.room, Failure.INVALID, str(e))
        if self._pages_wanted(req) > self.engine.allocator.capacity:
            message = f"the prompt needs {self._pages_wanted(req)} KV pages; this rank has {self.engine.allocator.capacity}"
            return refused(self.metrics, cmd.room, Failure.INVALID, message)
        self.rooms[cmd.room] = _Room(req, cmd.prefill_endpoint, time.monotonic())
        self.pending.append(cmd.room)
        return []

    def _pages_wanted(self, req: Req) -> int:
        tokens = min(len(req.prompt_ids) + self.headroom_tokens, req.max_total_len())
        return self.layout.pages_for(max(tokens, len(req.prompt_ids) + 1))

    def _start_transfers(self) -> None:
        """Moves pending rooms (FIFO) into transfer while pages, aux slots and the receiver's host staging
        pages last, and while the sequences running or in transfer (n per room) stay within ``max_running``:
        a decode batch never grows past it (the low-latency MoE buffers of a multi-rank instance hold that
        many tokens per rank)."""
        scheduler = self.engine.scheduler
        while self.pending:
            room = self.rooms[self.pending[0]]
            n = room.req.sampling.n
            if len(scheduler.running) + self.in_transfer + n > self.engine.cfg.max_running:
                return
            if self.slots.num_free == 0:
                return
            prompt_pages = self.layout.pages_for(len(room.req.prompt_ids))
            # Its prefix's cached pages come first: the prefill rank skips them, the rest must fit the staging.
            fits = functools.partial(self._can_receive, prompt_pages)
            taken = scheduler.take_pages(room.req, self._pages_wanted(room.req), fits)
            if taken is None:
                return
            pages, hit = taken
            slot = self.slots.alloc()
            assert slot is not None  # checked above
            self.pending.popleft()
            room.pages, room.aux_slot, room.stage = pages, slot, Stage.TRANSFER
            room.transfer_started = time.monotonic()
            self.in_transfer += n
            self.receiver.add_room(room.req.rid, room.prefill_endpoint, pages[:prompt_pages], slot, hit)

    def _can_receive(self, prompt_pages: int, cached_pages: int) -> bool:
        return self.receiver.can_add(prompt_pages - cached_pages)  # the pages the prefill rank writes

    def _transfer_ended(self, cmd: TransferEnded) -> list[Event]:
        room = self.rooms.get(cmd.room)
        if room is None or room.stage is not Stage.TRANSFER:
            return []
        assert room.pages is not None and room.aux_slot is not None
        n = room.req.sampling.n
        self.in_transfer -= n
        self.slots.free(room.aux_slot)
        self.metrics.transfer_seconds.observe(time.monotonic() - room.arrived, role="decode")
        aux = cmd.aux
        if aux is not None and len(aux.forks) != n - 1:
            reason = f"the aux record has {len(aux.forks) + 1} first tokens for {n} choices"
            cmd = TransferEnded(cmd.room, TransferState.FAILED, reason)
        elif cmd.state is TransferState.DONE and room.aborted is None and aux is not None:
            room.stage, room.req.pages, room.kv_arrived = Stage.RUNNING, room.pages, time.monotonic()
            room.unfinished = n
            first, forks = (
                Sampled(aux.first_token, aux.first_logprob),
                [Sampled(t, lp) for t, lp in aux.forks],
            )
            outputs = self.engine.add_prefilled(room.req, first, forks, aux.drafts)
            return [self._emit(out) for out in outputs]
        self.engine.allocator.free(room.pages)
        del self.rooms[cmd.room]
        if cmd.state is TransferState.FAILED:
            self.metrics.transfer_failures.inc(role="decode")
        if room.aborted is not None:
            return self._aborted(room)
        self.metrics.ended(cmd.state.value)
        return [transfer_failed(cmd.room, cmd.state, cmd.reason)]

    def _emit(self, out: TokenOutput) -> Event:
        if (
            out.error is not None
        ):  # the room fails alone; its other choices end too (the scheduler frees pages)
            failed = self.rooms.pop(out.req.rid, None)
            if failed is not None:
                self.engine.abort(failed.req)
            self.metrics.ended("failed")
            return output_event(out)
        event = tokens_event(out)
        room = self.rooms.get(out.req.rid)
        if room is not None and out.token_ids:
            now = time.monotonic()
            if room.steps == 0:
                room.first_emit, room.first_emit_unix = now, time.time()
            index = out.req.index
            room.emitted[index] = room.emitted.get(index, 0) + len(out.token_ids)
            if room.second_emit == 0.0 and room.steps > 1:
                room.second_emit = now
            room.last_emit = now
        if out.finish_reason is not None and room is not None:
            room.unfinished -= 1
            if room.unfinished == 0:  # its last choice: the room ends
                del self.rooms[out.req.rid]
                self.metrics.ended(out.finish_reason.value)
                if room.steps:
                    event = dataclasses.replace(event, phases=_phases(room))
        return event

    def _abort(self, room_id: int, reason: str) -> list[Event]:
        room = self.rooms.get(room_id)
        if room is None:
            return []
        self.metrics.aborts.inc(role="decode")
        if room.stage is Stage.TRANSFER:
            room.aborted = reason
            self.receiver.abort(room_id, reason)  # TransferEnded frees the pages once no write can land
            return []
        del self.rooms[room_id]
        if room.stage is Stage.PENDING:
            self.pending.remove(room_id)
            return self._aborted(room)
        ended = self.engine.abort(room.req)  # every choice; the scheduler frees their pages
        self.metrics.ended("abort")
        return [aborted_event(r) for r in ended]

    def _aborted(self, room: _Room) -> list[Event]:
        """The abort events of a room that never ran: one per choice."""
        self.metrics.ended("abort")
        return [aborted_event(room.req, i) for i in range(room.req.sampling.n)]


def _phases(room: _Room) -> DecodePhases:
    """Where a room's time went here, from its recorded times (durations on this rank's clock)."""
    later = room.steps - 1
    return DecodePhases(
        pages_wait_s=room.transfer_started - room.arrived,
        transfer_s=room.kv_arrived - room.transfer_started,
        admit_s=room.first_emit - room.kv_arrived,
        first_step_s=room.second_emit - room.first_emit if room.second_emit else 0.0,
        tpot_s=(room.last_emit - room.first_emit) / later if later > 0 else 0.0,
        first_emit_unix=room.first_emit_unix,
    )
