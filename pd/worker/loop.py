"""The engine thread of a worker, and how the asyncio side talks to it.

One thread owns the scheduler, the page allocator and the model: every change to them runs on it.
Other threads (the gRPC server's event loop, the transfer engine's callbacks) hand it work with
``submit(fn)``; results go back to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from pd.worker.parallel import Lockstep

log = logging.getLogger(__name__)


class EngineThread:
    """Runs ``step()`` while ``has_work()``; otherwise sleeps until something is submitted.

    ``step`` and ``has_work`` come from the worker; commands submitted from other threads run on
    this thread between steps, in submission order. With ``lockstep`` (a multi-rank instance) the
    ranks agree before each step: all step if any has work (``step`` then runs an idle forward on
    ranks with nothing to do), and all stop together when any is asked to stop. ``device``: the
    CUDA device the model lives on, made current on the thread.
    """

    IDLE_WAIT_S = 0.05  # bounds how long a stop request waits on an idle thread
    LOCKSTEP_IDLE_WAIT_S = 0.002  # idle ranks poll the agreement this often: work elsewhere waits no longer

    def __init__(
        self,
        step: Callable[[], None],
        has_work: Callable[[], bool],
        name: str,
        lockstep: Lockstep | None = None,
        device: torch.device | None = None,
    ) -> None:
        self._step = step
        self._device = device
        self._has_work = has_work
        self._lockstep = lockstep
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        """Runs ``fn()`` on the engine thread before its next step."""
        self._inbox.put(fn)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain(self, block: bool) -> None:
        wait = self.LOCKSTEP_IDLE_WAIT_S if self._lockstep is not None else self.IDLE_WAIT_S
        try:
            fn = self._inbox.get(timeout=wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                # The current CUDA device is per thread, and Triton launches (and CUDA graphs' streams)
                # follow it: without this a rank on cuda:1 launched its kernels on cuda:0.
                torch.cuda.set_device(self._device)
            while True:
                self._drain(block=not self._has_work())
                if self._lockstep is None:
                    if self._stop.is_set():
                        return
                    work = self._has_work()
                else:
                    work, stopping = self._lockstep.agree(self._has_work(), self._stop.is_set())
                    if stopping:
                        return
                if work:
                    self._step()
        except BaseException as exc:  # the worker reports it and fails every request
            self.error = exc
            log.exception("engine thread died")
            raise
