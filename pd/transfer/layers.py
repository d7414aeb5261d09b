"""Layer-by-layer KV sends (``TransferConfig.granularity == "layer"``): a chunk's pages move layer by layer
while the forward that fills them is still running, instead of all at once after it.

With ``chunk`` granularity the prefill engine hands a chunk's pages to the sender after the chunk's forward,
with one CUDA event recorded after it, and the last chunk's transfer is fully exposed after compute. With
``layer`` it hands them over *before* the forward, with a ``LayerReady``: the model calls ``mark(layer)``
right after it stored each layer's KV into the pool (``ForwardContext.kv_stored``), which records a CUDA
event on the compute stream there; the sender's writer thread writes each layer's pages (copying them to
pinned host pages first with host staging) once that layer's event has passed (``layer_groups``), so
layer ``l``'s bytes are on the wire while layers ``l + 1 ..`` compute. The pool is layer-major by default
(``pd.kv_cache``): one layer's pages of one request are a few contiguous runs, merged as for a whole chunk.

On CPU there are no events: a store is complete when ``store`` returns, so the mark alone says the bytes
are there. Layers the forward does not mark (the MTP layer, written after the main forward) are marked by
``finish`` once the step is over; ``fail`` wakes every waiter when the step raised.

Layers ready together go as one group: after waiting for layer ``l`` the writer also takes every following
layer whose event has already passed, so a writer that falls behind the forward (or a job queued after it)
writes in as few pieces as a chunk send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pd.transfer.engine import TransferError

WAIT_SLICE_S = 0.05  # a waiting writer looks at ``cancelled`` this often


class LayerReady:
    """When each KV layer of one forward step is in the pool: ``num_layers`` marks (the pool's layers, the MTP
    layer included), each set once, from the engine thread, with a CUDA event on the current stream when
    ``device`` is a GPU. Waited on by writer threads. Lifetime: one step; the sender keeps it until the jobs
    that name it ended (the jobs of the step's rooms, and a later step's merged into them)."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self._cuda = device.type == "cuda"
        self._events: list[Any] = [None] * num_layers  # torch.cuda.Event per marked layer (GPU only)
        self._marked = [False] * num_layers
        self._failed = ""
        self._cond = threading.Condition()
        self.order: list[int] = []  # layers in the order they were marked (logs, tests)

    def mark(self, layer: int) -> None:
        """Layer ``layer``'s KV of this step has been stored (issued on the current stream, on a GPU)."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        with self._cond:
            if self._marked[layer]:
                raise ValueError(f"KV layer {layer} was marked twice in one step")
            self._events[layer], self._marked[layer] = event, True
            self.order.append(layer)
            self._cond.notify_all()

    def finish(self) -> None:
        """The step is over: marks every layer it did not mark (e.g. the MTP layer, stored after the forward)."""
        for layer in range(self.num_layers):
            with self._cond:
                marked = self._marked[layer]
            if not marked:
                self.mark(layer)

    def fail(self, reason: str) -> None:
        """The step raised: every waiter (now or later) raises ``TransferError(reason)``."""
        with self._cond:
            self._failed = reason or "the forward step failed"
            self._cond.notify_all()

    def wait(self, layer: int, deadline: float, cancelled: Callable[[], bool]) -> None:
        """Returns once layer ``layer``'s bytes are in the pool. Raises ``TransferError`` when the step failed,
        ``deadline`` (``time.monotonic()``) passed, or ``cancelled()`` turned true (checked every
        ``WAIT_SLICE_S``: a room aborted while its forward runs lets its writer go)."""
        with self._cond:
            while not self._marked[layer]:
                if self._failed:
                    raise TransferError(f"KV layer {layer} was never stored: {self._failed}")
                if cancelled():
                    raise TransferError(f"room ended while waiting for KV layer {layer}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError(f"KV layer {layer} was not stored before the write deadline")
                self._cond.wait(min(left, WAIT_SLICE_S))
            event = self._events[layer]
        if event is not None:
            event.synchronize()

    def ready_until(self, start: int) -> int:
        """The end of the run of layers from ``start`` whose bytes are in the pool now (no waiting)."""
        end = start
        while end < self.num_layers:
            with self._cond:
                marked, event = self._marked[end], self._events[end]
            if not marked or (event is not None and not event.query()):
                break
            end += 1
        return end


def layer_groups(
    ready: LayerReady | None, num_layers: int, deadline: float, cancelled: Callable[[], bool]
) -> Iterator[range]:
    """The layers of a job to write, in order, as runs that are in the pool when each is yielded: every layer
    at once without ``ready`` (a chunk send, its event already waited for), else one run per wait (see the
    module docstring)."""
    if ready is None:
        yield range(num_layers)
        return
    if ready.num_layers != num_layers:
        raise ValueError(f"LayerReady of {ready.num_layers} layers for a pool of {num_layers}")
    start = 0
    while start < num_layers:
        ready.wait(start, deadline, cancelled)
        end = ready.ready_until(start + 1)
        yield range(start, end)
        start = end
