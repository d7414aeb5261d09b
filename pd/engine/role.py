"""What every role engine (prefill, decode, colocated) offers the thread that runs it.

A role engine is driven by one thread (``pd.worker.loop.EngineThread``): it ``handle``s commands between
steps and ``step``s while it ``has_work``; both return the events for the RPC side. It owns every page it
allocates (through its core ``Engine``'s allocator) and frees each exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pd.engine.engine import Engine, TokenOutput
from pd.engine.messages import Command, Event, Failure, RoomFailed, Tokens
from pd.types import FinishReason, Req
from pd.worker.metrics import WorkerMetrics


@dataclass(frozen=True)
class Load:
    """A rank's load as the registry and the proxy see it."""

    running: int  # requests being computed
    waiting: int  # requests queued before that


class RoleEngine(Protocol):
    engine: Engine  # the core: scheduler, runner, allocator

    def handle(self, cmd: Command) -> list[Event]: ...

    def step(self) -> list[Event]: ...

    def has_work(self) -> bool: ...

    def load(self) -> Load: ...

    def queue_lengths(self) -> dict[str, int]:
        """Requests per named queue (the ``pd_queue_length`` gauge)."""
        ...

    @property
    def rooms_open(self) -> int:
        """Rooms this rank holds, in any stage."""
        ...


def tokens_event(out: TokenOutput) -> Tokens:
    req = out.req
    reason = out.finish_reason.value if out.finish_reason else None
    return Tokens(
        req.rid,
        tuple(out.token_ids),
        tuple(out.logprobs),
        out.text,
        reason,
        len(req.prompt_ids),
        len(req.output_ids),
        top_logprobs=tuple(out.top_logprobs),
        prompt_logprobs=tuple(out.prompt_logprobs),
        index=req.index,
    )


def output_event(out: TokenOutput) -> Tokens | RoomFailed:
    """A step's output as its room's event: its tokens, or the failure that ended it (``out.error``)."""
    if out.error is not None:
        return RoomFailed(out.req.rid, Failure.FAILED, out.error)
    return tokens_event(out)


def aborted_event(req: Req, index: int | None = None) -> Tokens:
    """The last event of a choice (``index``, default ``req``'s) of a room aborted while it waited or
    decoded (its stream ends, not fails)."""
    reason, i = FinishReason.ABORT.value, req.index if index is None else index
    output = len(req.output_ids) if i == req.index else 0
    return Tokens(req.rid, (), (), "", reason, len(req.prompt_ids), output, index=i)


def refused(metrics: WorkerMetrics, room: int, failure: Failure, message: str) -> list[Event]:
    """The one event of a room refused on arrival (counted as "refused")."""
    metrics.ended("refused")
    return [RoomFailed(room, failure, message)]
