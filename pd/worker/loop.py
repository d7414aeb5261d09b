"""The engine thread of a worker rank, and the command queue other threads feed it through.

One thread owns the role engine (scheduler, pages, model): every change to them runs on it. Other threads
hand it typed commands (``pd.engine.messages``): the gRPC event loop posts ``PrefillRoom``/``DecodeRoom``/
``AbortRoom``; the transfer layer's control threads post ``TransferEnded`` through ``CommandQueue``'s final
callbacks. The events the engine returns go to ``emit`` (the worker routes them back to the event loop).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from pd.engine.messages import Command, Event, TransferEnded
from pd.engine.role import RoleEngine
from pd.transfer.aux import AuxRecord
from pd.transfer.state import TransferState
from pd.worker.parallel import Lockstep

log = logging.getLogger(__name__)


class CommandQueue:
    """Commands for the engine thread, from any thread. ``None`` only wakes the thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command | None] = queue.SimpleQueue()

    def put(self, cmd: Command | None) -> None:
        self._queue.put(cmd)

    def empty(self) -> bool:
        return self._queue.empty()

    def get(self, timeout: float | None) -> Command | None:
        """The next command; raises ``queue.Empty`` after ``timeout`` (0: don't wait)."""
        return self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()

    def sender_final(self, room: int, state: TransferState, reason: str) -> None:
        """``KVSender``'s ``on_final``: the room's source pages are no longer read."""
        self._queue.put(TransferEnded(room, state, reason))

    def receiver_final(self, room: int, state: TransferState, aux: AuxRecord | None, reason: str) -> None:
        """``KVReceiver``'s ``on_final``: the room's destination pages can be used (DONE) or reused."""
        self._queue.put(TransferEnded(room, state, reason, aux))


class EngineThread:
    """Runs ``engine.step()`` while ``engine.has_work()``; otherwise sleeps until a command comes.

    Commands run between steps, in arrival order. With ``lockstep`` (a multi-rank instance) the ranks
    agree before each step: all step if any has work (the engine then runs an idle forward on ranks with
    nothing to do), all stop together when any is asked to ``stop``, and, asked to ``finish``, when no rank
    holds a room any more. ``bind``: called first on the thread (``ModelRunner.bind_thread``: the model's CUDA
    device and stream are per thread).
    """

    IDLE_WAIT_S = 0.05  # bounds how long a stop request waits on an idle thread
    LOCKSTEP_IDLE_WAIT_S = 0.002  # idle ranks poll the agreement this often: work elsewhere waits no longer

    def __init__(
        self,
        engine: RoleEngine,
        commands: CommandQueue,
        emit: Callable[[list[Event]], None],
        name: str,
        lockstep: Lockstep | None = None,
        bind: Callable[[], None] | None = None,
    ) -> None:
        self.engine, self.commands, self._emit = engine, commands, emit
        self._bind, self._lockstep = bind, lockstep
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, cmd: Command) -> None:
        """Runs ``engine.handle(cmd)`` on the engine thread before its next step."""
        self.commands.put(cmd)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops after the step running now; the rooms held are abandoned."""
        self._stop.set()
        self.commands.put(None)
        self._thread.join(timeout)

    def finish(self, timeout: float) -> None:
        """Runs on until the engine holds no room (on every rank of a multi-rank instance), then stops; after
        ``timeout`` seconds, or on ``stop``, it stops anyway. The caller must refuse new rooms first: one
        submitted after this call may find the thread gone."""
        self._finishing.set()
        self.commands.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain(self, block: bool) -> None:
        wait = (self.LOCKSTEP_IDLE_WAIT_S if self._lockstep is not None else self.IDLE_WAIT_S) if block else 0
        try:
            cmd = self.commands.get(wait)
            while True:
                if cmd is not None:
                    self._send(self.engine.handle(cmd))
                cmd = self.commands.get(0)
        except queue.Empty:
            return

    def _send(self, events: list[Event]) -> None:
        if events:
            self._emit(events)

    def _done(self) -> bool:
        """Asked to finish, and nothing is left: no room, no work, no command (``_finishing`` is read first:
        a room's command was queued before the worker stopped taking rooms, which was before ``finish``)."""
        return (
            self._finishing.is_set()
            and self.commands.empty()
            and not self.engine.has_work()
            and self.engine.rooms_open == 0
        )

    def _run(self) -> None:
        try:
            if self._bind is not None:  # without it a rank on cuda:1 launched its kernels on cuda:0
                self._bind()
            while True:
                self._drain(block=not self.engine.has_work())
                work, staying = self.engine.has_work(), not self._done()
                if self._lockstep is None:
                    if self._stop.is_set() or not staying:
                        return
                else:
                    work, stopping, staying = self._lockstep.agree(work, self._stop.is_set(), staying)
                    if stopping or not staying:
                        return
                if work:
                    self._send(self.engine.step())
        except BaseException as exc:  # the worker reports it and fails every request
            self.error = exc
            log.exception("engine thread died")
            raise
