"""The prefill role: chunked prefill of each room's prompt, its KV handed to the transfer layer.

A room's life here (every step on the engine thread):

1. ``PrefillRoom`` -> queued in the scheduler (bounded: BUSY beyond ``max_waiting``).
2. ``step``: the scheduler admits it with pages for the whole prompt (the leading ones from the prefix
   cache on a hit: their tokens are not computed again); the room's page list, cached pages included, is
   announced to the sender before its first chunk runs. After each chunk the pages it completed are sent
   (a hit's cached pages with the first chunk; with ``layer`` granularity they are handed over before
   the chunk's forward, which marks each layer as it stores it: ``pd.transfer.layers``); the last chunk
   samples the first token (n of them for a request of n choices, from the same logits), which goes out as
   the aux record with the remaining pages, the prompt's full pages join the prefix cache, and the request
   leaves the scheduler (its pages stay with this engine: the transfer still reads them). The prompt's KV
   is shipped once, whatever n.
3. ``TransferEnded`` (the sender released the room: no write reads its pages any more) -> the room's
   references to its pages are freed, exactly once (cached pages stay with the cache), and the RPC gets
   ``Prefilled`` or ``RoomFailed``.

``AbortRoom`` ends a queued room at once; an announced room is aborted in the sender, and step 3 follows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pd.engine.engine import Engine
from pd.engine.messages import (
    AbortRoom,
    Command,
    Event,
    Failure,
    Prefilled,
    PrefillPhases,
    PrefillRoom,
    RoomFailed,
    TransferEnded,
    transfer_failed,
)
from pd.engine.role import Load, refused
from pd.engine.scheduler import QueueFull
from pd.transfer.aux import AuxRecord
from pd.transfer.engine import GRANULARITIES
from pd.transfer.layers import LayerReady
from pd.transfer.state import TransferState
from pd.types import Batch, FinishReason, Req, StepResult, TopLogprobs
from pd.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class PageSender(Protocol):
    """The transfer layer's prefill side (``pd.transfer.sender.KVSender``). It holds the page lists it is
    given until it reports the room's end (``TransferEnded``); it never frees a page."""

    def add_room(self, room: int, src_pages: Sequence[int]) -> None: ...

    def send(
        self,
        room: int,
        pages: Sequence[int],
        last: bool = False,
        aux: AuxRecord | None = None,
        ready_event: Any = None,
    ) -> None: ...

    def abort(self, room: int, reason: str) -> None: ...


@dataclass(eq=False)
class _Room:
    req: Req
    arrived: float
    announced: bool = False  # the sender knows its pages: only TransferEnded ends it now
    pages_sent: int = 0  # leading pages of req.pages handed to the sender
    pages: list[int] | None = None  # taken from the scheduler after the last chunk (or an abort)
    first_tokens: tuple[int, ...] = ()  # one per choice
    first_tops: tuple[TopLogprobs, ...] = ()  # one per choice: the first token's alternatives, if asked
    started: float = 0.0  # monotonic time of the step that ran its first chunk
    computed: float = 0.0  # ... and of the end of its last chunk
    kv_bytes: int = 0  # bytes of its pages, all layers (what the transfer moves)


class PrefillEngine:
    def __init__(
        self,
        engine: Engine,
        sender: PageSender,
        metrics: WorkerMetrics | None = None,
        granularity: str = "chunk",
    ) -> None:
        """``granularity``: ``TransferConfig.granularity`` (``chunk`` or ``layer``: when pages go to the sender)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.layer_sends = granularity == "layer"
        self.engine, self.sender = engine, sender
        self.metrics = metrics or WorkerMetrics("prefill")
        self.scheduler, self.runner = engine.scheduler, engine.runner
        self.layout = self.runner.pool.layout
        self.rooms: dict[int, _Room] = {}
        self.scheduler.on_prefix_match = self.metrics.prefix_matched

    # ---- the loop ----

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[Event]:
        batch = self.scheduler.schedule()
        if batch is None:
            self.engine.idle()  # other ranks of the instance may be stepping
            return []
        self._announce(batch)
        layers = self._send_ahead(batch) if self.layer_sends else None
        try:
            result = self.runner.run(batch, self.engine.logits, layers.mark if layers is not None else None)
            if self.engine.spec is not None:  # the MTP layer's KV, and the first drafts, before the pages go
                self.engine.spec.drafter.after_extend(batch, result.tokens)
        except BaseException as e:
            if layers is not None:  # the writers waiting for this step's layers give up at once
                layers.fail(f"the forward step failed: {e!r}")
            raise
        if layers is not None:
            layers.finish()  # the layers the forward did not mark (the MTP layer's)
        self._ship(batch, result, layers)
        return []

    def handle(self, cmd: Command) -> list[Event]:
        if isinstance(cmd, PrefillRoom):
            return self._arrive(cmd)
        if isinstance(cmd, AbortRoom):
            return self._abort(cmd.room, cmd.reason)
        if isinstance(cmd, TransferEnded):
            return self._transfer_ended(cmd)
        raise TypeError(f"a prefill engine does not handle {type(cmd).__name__}")

    # ---- state for metrics and the registry ----

    def load(self) -> Load:
        return Load(running=len(self.scheduler.prefilling), waiting=len(self.scheduler.waiting))

    def queue_lengths(self) -> dict[str, int]:
        transferring = sum(r.pages is not None for r in list(self.rooms.values()))
        return {
            "waiting": len(self.scheduler.waiting),
            "prefilling": len(self.scheduler.prefilling),
            "transferring": transferring,
        }

    @property
    def rooms_open(self) -> int:
        return len(self.rooms)

    # ---- steps of a room ----

    def _arrive(self, cmd: PrefillRoom) -> list[Event]:
        if cmd.room in self.rooms:
            return refused(
                self.metrics,
                cmd.room,
                Failure.DUPLICATE,
                f"room {cmd.room:x} is already being prefilled here",
            )
        try:
            req = self.engine.make_request(cmd.token_ids, cmd.sampling, rid=cmd.room)
            self.scheduler.add(req)
        except QueueFull as e:
            return refused(self.metrics, cmd.room, Failure.BUSY, str(e))
        except ValueError as e:
            return refused(self.metrics, cmd.room, Failure.INVALID, str(e))
        self.rooms[cmd.room] = _Room(req, time.monotonic())
        log.debug("room %x: queued, %d prompt tokens", cmd.room, len(req.prompt_ids))
        return []

    def _announce(self, batch: Batch) -> None:
        """Rooms admitted in this step: the sender learns their pages before any chunk is sent."""
        now = time.monotonic()
        for req in batch.reqs:
            room = self.rooms[req.rid]
            if not room.announced:
                self.sender.add_room(req.rid, req.pages)
                room.announced, room.started = True, now

    def _send_ahead(self, batch: Batch) -> LayerReady:
        """Layer-by-layer sends: hands the sender the pages this step will complete (all the rest on a room's
        last chunk) before the forward runs, with the step's ``LayerReady`` that the forward marks."""
        layers = LayerReady(self.layout.num_layers, self.runner.pool.buffer.device)
        for req, end, last in zip(batch.reqs, batch.ends, batch.samples):
            self._send_upto(req, len(req.pages) if last else end // self.layout.page_size, layers)
        return layers

    def _send_upto(self, req: Req, upto: int, ready: Any) -> None:
        """Hands the sender ``req``'s pages not sent yet before page ``upto``."""
        room = self.rooms[req.rid]
        if upto > room.pages_sent:
            self.sender.send(req.rid, req.pages[room.pages_sent : upto], ready_event=ready)
            room.pages_sent = upto

    def _ship(self, batch: Batch, result: StepResult, layers: LayerReady | None) -> None:
        """Hands the pages this step completed to the sender (with chunk granularity; with ``layers`` they went
        before the forward); the last chunk also sends the first token."""
        ready: Any = layers
        if layers is None and self.runner.pool.buffer.is_cuda:  # the sender waits for the forward
            ready = torch.cuda.Event()
            ready.record()
        now = time.monotonic()
        for i, (req, end, token, logprob) in enumerate(
            zip(batch.reqs, batch.ends, result.tokens, result.logprobs)
        ):
            room = self.rooms[req.rid]
            req.num_computed = end
            req.prompt_logprobs += result.prompt[i]
            if token is None:
                self._send_upto(
                    req, end // self.layout.page_size, ready
                )  # pages whose every slot is computed
                continue
            forks = result.forks[i]
            self.scheduler.cache_prompt(req)  # the cache takes its own references to the full pages
            spec = self.engine.spec
            drafts = tuple(spec.drafter.drafts.get(req, ())) if spec is not None else ()  # release drops them
            room.pages, room.computed = self.scheduler.release(req), now
            room.first_tokens = (token, *(f.token for f in forks))
            room.first_tops = (result.top[i], *(f.top for f in forks))
            aux = AuxRecord(
                req.rid,
                token,
                float(logprob or 0.0),
                len(req.prompt_ids),
                tuple((f.token, f.logprob) for f in forks),
                drafts,
            )
            self.sender.send(req.rid, room.pages[room.pages_sent :], last=True, aux=aux, ready_event=ready)
            room.kv_bytes = len(room.pages) * self.layout.page_nbytes_per_layer * self.layout.num_layers
            self.metrics.transfer_bytes.inc(room.kv_bytes, role="prefill")

    def _transfer_ended(self, cmd: TransferEnded) -> list[Event]:
        room = self.rooms.pop(cmd.room, None)
        if room is None:
            return []
        pages = room.pages if room.pages is not None else self.scheduler.release(room.req)
        if pages:
            self.engine.allocator.free(pages)
        self.metrics.transfer_seconds.observe(time.monotonic() - room.arrived, role="prefill")
        self.metrics.ended(cmd.state.value)
        if cmd.state is TransferState.FAILED:
            self.metrics.transfer_failures.inc(role="prefill")
        if cmd.state is TransferState.DONE:
            now = time.monotonic()
            phases = PrefillPhases(
                room.started - room.arrived, room.computed - room.started, now - room.computed, room.kv_bytes
            )
            return [
                Prefilled(
                    cmd.room,
                    len(room.req.prompt_ids),
                    room.first_tokens,
                    phases,
                    room.first_tops,
                    tuple(room.req.prompt_logprobs),
                )
            ]
        return [transfer_failed(cmd.room, cmd.state, cmd.reason)]

    def _abort(self, room_id: int, reason: str) -> list[Event]:
        room = self.rooms.get(room_id)
        if room is None:
            return []
        self.metrics.aborts.inc(role="prefill")
        if room.announced:
            if room.pages is None:
                room.pages = self.scheduler.release(room.req)
            self.sender.abort(room_id, reason)  # TransferEnded frees the pages once no write reads them
            return []
        del self.rooms[room_id]  # still queued: no pages, nothing sent
        self.scheduler.finish(room.req, FinishReason.ABORT)
        return [RoomFailed(room_id, Failure.ABORTED, f"room {room_id:x} aborted: {reason}")]
