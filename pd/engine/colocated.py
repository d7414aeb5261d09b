"""The colocated role: prefill and decode of each room in one engine, nothing transferred.

The reference engine behind the same proxy and API (the baseline of the disaggregation experiments): a
``DecodeRoom`` is queued straight into the scheduler, which prefills it (chunked) and decodes it; the
scheduler frees its pages when it finishes or is aborted. The prefix cache is on here too (``prefix_cache``):
a prompt's full pages are cached once it is computed, and a later prompt with the same prefix starts after
them. A room of n choices forks into n sequences in the step that samples its first token
(``pd.engine.engine``); it ends with its last choice, or fails with the first whose output left its grammar.
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
        self.rooms: dict[int, Req] = {}  # choice 0 of each room
        self._unfinished: dict[int, int] = {}  # choices of each room not finished yet
        engine.scheduler.on_prefix_match = self.metrics.prefix_matched
        if engine.spec is not None:
            engine.spec.on_verify = self.metrics.speculated

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[Event]:
        events: list[Event] = []
        for out in self.engine.step():
            events.append(output_event(out))
            room = out.req.rid
            if out.finish_reason is None or room not in self.rooms:
                continue
            if out.error is not None:  # the room fails: its other choices end too
                self.engine.abort(self.rooms.pop(room))
                del self._unfinished[room]
                self.metrics.ended("failed")
                continue
            self._unfinished[room] -= 1
            if self._unfinished[room] == 0:
                del self.rooms[room], self._unfinished[room]
                self.metrics.ended(out.finish_reason.value)
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
            self._unfinished[cmd.room] = cmd.sampling.n
        except QueueFull as e:
            return refused(self.metrics, cmd.room, Failure.BUSY, str(e))
        except ValueError as e:
            return refused(self.metrics, cmd.room, Failure.INVALID, str(e))
        return []

    def _abort(self, room: int) -> list[Event]:
        req = self.rooms.pop(room, None)
        if req is None:
            return []
        del self._unfinished[room]
        self.metrics.aborts.inc(role="colocated")
        ended = self.engine.abort(req)
        self.metrics.ended("abort")
        if not req.forks:  # not forked yet: its other choices end too
            return [aborted_event(req, i) for i in range(req.sampling.n)]
        return [aborted_event(r) for r in ended]
