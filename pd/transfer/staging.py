"""Host staging of KV pages, for transports that copy GPU memory through the host (Mooncake's TCP).

Why: Mooncake's TCP transport moves GPU memory 64 KiB at a time, each piece through a synchronous
``cudaMemcpy``. While the GPU runs compute kernels each of those small copies waits about one kernel, so
one request's KV (32 MB at the DESIGN.md §8 shape, ~490 pieces) took 0.89 s instead of 13 ms on an H200
(``bench/gpu/tcp_contention.py``); one bulk copy of the same bytes to pinned host memory took 0.7 ms under
the same load, and TCP between pinned host buffers 6-7 ms. So with TCP each side copies a room's pages
between its GPU pool and a pinned host pool of the same layout in bulk, and the engine moves host memory
only: the sender stages a job's pages before writing them, the receiver has them written into host pages
and copies those to its GPU pages before the room is DONE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import torch

from pd.kv_cache import KVOrder, KVPool, PageAllocator, check_layers, merge_page_runs
from pd.transfer.engine import TransferConfig

logger = logging.getLogger(__name__)


class HostStaging:
    """A host pool with ``pool``'s layout but its own page count (about ``nbytes``; page 0 the dummy page),
    pinned when CUDA is available, with its page allocator and, for a GPU ``pool``, a copy stream of its own.

    Lifetime: made with the rank, registered with the transfer engine once, kept for the life of the
    process. Thread-safe: several writer threads and gRPC threads call it at once; ``alloc`` waits for
    pages until a deadline.
    """

    def __init__(self, pool: KVPool, nbytes: int) -> None:
        unit = pool.layout.num_layers * pool.layout.page_nbytes_per_layer  # one page of every layer
        if nbytes < unit:
            raise ValueError(f"host staging of {nbytes} bytes cannot hold one KV page ({unit} bytes)")
        self.device_pool = pool
        self.layout = dataclasses.replace(pool.layout, num_pages=nbytes // unit + 1)
        self.pool = KVPool(self.layout, "cpu", pin_memory=torch.cuda.is_available())
        self._pages = PageAllocator(self.layout.num_pages)
        self._cond = threading.Condition()
        self._stream = torch.cuda.Stream(pool.buffer.device) if pool.buffer.is_cuda else None

    @property
    def capacity(self) -> int:
        """Pages one room or job may stage at most."""
        return self._pages.capacity

    @property
    def num_free(self) -> int:
        with self._cond:
            return self._pages.num_free

    def try_alloc(self, n: int) -> list[int] | None:
        """``n`` host pages, or None at once if fewer are free."""
        with self._cond:
            return self._pages.alloc(n)

    def alloc(self, n: int, deadline: float) -> list[int] | None:
        """``n`` host pages, waiting for them until ``deadline`` (``time.monotonic()``); None after it."""
        if n > self.capacity:
            raise ValueError(f"{n} pages exceed the host staging's {self.capacity}")
        with self._cond:
            while (pages := self._pages.alloc(n)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return pages

    def free(self, pages: Sequence[int]) -> None:
        with self._cond:
            self._pages.free(pages)
            self._cond.notify_all()

    def to_host(
        self, device_pages: Sequence[int], host_pages: Sequence[int], layers: range | None = None
    ) -> None:
        """Copies ``device_pages`` of the device pool into ``host_pages`` (``layers`` of them, default all);
        returns once the bytes are there."""
        self._copy(self.device_pool, device_pages, self.pool, host_pages, layers)

    def to_device(self, host_pages: Sequence[int], device_pages: Sequence[int]) -> None:
        """Copies ``host_pages`` into ``device_pages`` of the device pool; returns once the bytes are there."""
        self._copy(self.pool, host_pages, self.device_pool, device_pages)

    def _copy(
        self,
        src: KVPool,
        src_pages: Sequence[int],
        dst: KVPool,
        dst_pages: Sequence[int],
        layers: range | None = None,
    ) -> None:
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            copy_pages(src, src_pages, dst, dst_pages, layers)
        if self._stream is not None:
            self._stream.synchronize()


def copy_pages(
    src: KVPool,
    src_pages: Sequence[int],
    dst: KVPool,
    dst_pages: Sequence[int],
    layers: range | None = None,
) -> None:
    """Copies pages (``layers`` of them, default all) between two pools of one layout but for the page count,
    one copy per run of pages contiguous on both sides (page-major) or per run and layer (layer-major);
    asynchronous on the current stream where a device is involved."""
    a, b = src.buffer, dst.buffer
    span = check_layers(src.layout, layers)
    for s, d, n in merge_page_runs(src_pages, dst_pages):
        if src.layout.order is KVOrder.PAGE_MAJOR:
            b[d : d + n, span.start : span.stop].copy_(
                a[s : s + n, span.start : span.stop], non_blocking=True
            )
        else:
            for layer in span:
                b[layer, d : d + n].copy_(a[layer, s : s + n], non_blocking=True)


def make_staging(config: TransferConfig, transport: str | None, pool: KVPool) -> HostStaging | None:
    """The host staging a rank uses (``TransferConfig.host_staging``): ``auto`` is on for a GPU pool over TCP."""
    mode = config.host_staging
    wanted = mode == "on" or (mode == "auto" and transport == "tcp" and pool.buffer.is_cuda)
    if not wanted:
        return None
    staging = HostStaging(pool, config.staging_mb << 20)
    logger.info(
        "KV transfer through host staging: %d pages (%.1f MB of %s host memory), %s transport",
        staging.capacity,
        staging.pool.nbytes / 1e6,
        "pinned" if staging.pool.buffer.is_pinned() else "pageable",
        transport,
    )
    return staging
