"""The colocated role: prefill and decode of each room in one engine, nothing transferred.

The reference engine behind the same proxy and API (the baseline of the disaggregation experiments): a
``DecodeRoom`` is queued straight into the scheduler, which prefills it (chunked) and decodes it; the
scheduler frees its pages when it finishes or is aborted. The prefix cache is on here too (``prefix_cache``):
a prompt's full pages are cached once it is computed, and a later prompt with the same prefix starts after
them.
"""

from __future__ import annotations

from pd.engine.engine import Engine
from pd.engine.messages import AbortRoom, Command, DecodeRoom, Event, Failure
from pd.engine.role import Load, aborted_event, output_event, refused
from pd.engine.scheduler import QueueFull
from pd.types import Req
from pd.worker.metrics import WorkerMetrics


class ColocatedEngine:
    def __init__(self, engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or WorkerMetrics("colocated")
        self.rooms: dict[int, Req] = {}
        engine.scheduler.on_prefix_match = self.metrics.prefix_matched

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[Event]:
        events: list[Event] = []
        for out in self.engine.step():
            events.append(output_event(out))
            if out.finish_reason is not None:
                self.rooms.pop(out.req.rid, None)
                self.metrics.ended("failed" if out.error else out.finish_reason.value)
        return events

    def handle(self, cmd: Command) -> list[Event]:
        if isinstance(cmd, DecodeRoom):
            return self._arrive(cmd)
        if isinstance(cmd, AbortRoom):
            return self._abort(cmd.room)
        raise TypeError(f"a colocated engine does not handle {type(cmd).__name__}")

    def load(self) -> Load:
        s = self.engine.scheduler
        return Load(running=len(s.running) + len(s.prefilling), waiting=len(s.waiting))

    def queue_lengths(self) -> dict[str, int]:
        s = self.engine.scheduler
        return {"waiting": len(s.waiting), "prefilling": len(s.prefilling), "running": len(s.running)}

    @property
    def rooms_open(self) -> int:
        return len(self.rooms)

    def _arrive(self, cmd: DecodeRoom) -> list[Event]:
        if cmd.room in self.rooms:
            return refused(
                self.metrics, cmd.room, Failure.DUPLICATE, f"room {cmd.room:x} is already being served here"
            )
        try:
            self.rooms[cmd.room] = self.engine.add_request(cmd.token_ids, cmd.sampling, rid=cmd.room)
        except QueueFull as e:
            return refused(self.metrics, cmd.room, Failure.BUSY, str(e))
        except ValueError as e:
            return refused(self.metrics, cmd.room, Failure.INVALID, str(e))
        return []

    def _abort(self, room: int) -> list[Event]:
        req = self.rooms.pop(room, None)
        if req is None:
            return []
        self.metrics.aborts.inc(role="colocated")
        self.engine.abort(req)
        self.metrics.ended("abort")
        return [aborted_event(req)]
