"""Paged KV cache for the MLA latent, and its page allocator.

The cache holds, per token and per layer, the MLA latent: ``kv_lora_rank`` normalised values
(``c_kv``) followed by ``qk_rope_head_dim`` rotated key values (``k_pe``). One contiguous
allocation per rank holds every layer, so the transfer engine registers one region and the
address of any (layer, page) is arithmetic on the base pointer.

Page 0 is never handed out: it is the dummy page that padded rows of a CUDA-graph batch write
into, so a padded row can never overwrite a live request's cache.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DUMMY_PAGE = 0
# What two pools must share for KV to move between them page for page (their page counts may differ).
TRANSFER_FIELDS = ("num_layers", "page_size", "latent_dim", "dtype", "order")


class KVOrder(str, enum.Enum):
    """Order of the pool's axes.

    ``layer_major`` is ``[layers, pages, page_size, latent]``: each layer's cache is a contiguous
    ``[pages, page_size, latent]`` tensor, what attention kernels expect; one page of one layer is
    one transfer piece. ``page_major`` is ``[pages, layers, page_size, latent]``: one page of all
    layers is one contiguous piece, so a transfer moves fewer, larger pieces.
    """

    LAYER_MAJOR = "layer_major"
    PAGE_MAJOR = "page_major"


@dataclass(frozen=True)
class KVLayout:
    """Shape of one rank's KV pool; everything a transfer peer must know to address it."""

    num_layers: int
    num_pages: int
    page_size: int
    latent_dim: int
    dtype: torch.dtype
    order: KVOrder = KVOrder.LAYER_MAJOR

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "page_size", "latent_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(
                f"KVLayout.num_pages must be >= 2 (page 0 is the dummy page), got {self.num_pages}"
            )

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_nbytes_per_layer(self) -> int:
        """Bytes of one page of one layer: ``page_size * latent_dim * itemsize``."""
        return self.page_size * self.latent_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_pages * self.page_nbytes_per_layer

    @property
    def shape(self) -> tuple[int, int, int, int]:
        if self.order is KVOrder.LAYER_MAJOR:
            return (self.num_layers, self.num_pages, self.page_size, self.latent_dim)
        return (self.num_pages, self.num_layers, self.page_size, self.latent_dim)

    @property
    def usable_pages(self) -> int:
        """Pages that can hold requests (all but the dummy page)."""
        return self.num_pages - 1

    def offset(self, layer: int, page: int) -> int:
        """Byte offset of ``(layer, page)`` from the start of the pool."""
        if self.order is KVOrder.LAYER_MAJOR:
            return (layer * self.num_pages + page) * self.page_nbytes_per_layer
        return (page * self.num_layers + layer) * self.page_nbytes_per_layer

    def check_pages(self, pages: Sequence[int], side: str) -> tuple[int, ...]:
        """``pages`` as a tuple of ints; raises ValueError (naming ``side``) unless they are non-empty,
        distinct and in ``[1, num_pages)``."""
        out = tuple(int(p) for p in pages)
        if not out:
            raise ValueError(f"no {side} pages")
        if len(set(out)) != len(out):
            raise ValueError(f"{side} pages repeat a page: {list(out)}")
        for p in out:
            if not 0 < p < self.num_pages:
                raise ValueError(f"{side} page {p} out of range [1, {self.num_pages})")
        return out

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.page_size)


def merge_page_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merges page pairs into runs that are contiguous on both sides.

    Returns ``(src_start, dst_start, num_pages)`` triples covering ``zip(src_pages, dst_pages)``
    in order; a run grows while both the source and destination page ids step by one.
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(
            f"page lists differ in length: {len(src_pages)} source vs {len(dst_pages)} destination"
        )
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_pages, dst_pages):
        if runs:
            s0, d0, n = runs[-1]
            if src == s0 + n and dst == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def transfer_pieces(
    src: KVLayout,
    dst: KVLayout,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
    layers: range | None = None,
) -> list[tuple[int, int, int]]:
    """Byte pieces that copy ``src_pages`` of pool ``src`` into ``dst_pages`` of pool ``dst``.

    Returns ``(src_offset, dst_offset, nbytes)`` triples, offsets relative to each pool's base.
    Both pools must agree on layer count, page size, latent width, dtype and axis order (the
    bootstrap registry refuses to pair peers that do not). Page-major pools move a run of pages
    of all layers as one piece; layer-major pools move one piece per layer per run. ``layers``: only
    those layers (a layer-by-layer send; page-major pools then move one piece per page), default all.
    """
    for field in TRANSFER_FIELDS:
        if getattr(src, field) != getattr(dst, field):
            raise ValueError(
                f"KV layouts differ in {field}: source {getattr(src, field)} vs destination {getattr(dst, field)}"
            )
    src.check_pages(src_pages, "source")
    dst.check_pages(dst_pages, "destination")
    layers = check_layers(src, layers)
    pieces: list[tuple[int, int, int]] = []
    runs = merge_page_runs(src_pages, dst_pages)
    unit = src.page_nbytes_per_layer
    if src.order is KVOrder.PAGE_MAJOR:
        if len(layers) == src.num_layers:
            pieces += [(src.offset(0, s), dst.offset(0, d), n * src.num_layers * unit) for s, d, n in runs]
            return pieces
        for s, d, n in runs:
            for i in range(n):
                pieces.append(
                    (src.offset(layers.start, s + i), dst.offset(layers.start, d + i), len(layers) * unit)
                )
        return pieces
    for layer in layers:
        for s, d, n in runs:
            pieces.append((src.offset(layer, s), dst.offset(layer, d), n * unit))
    return pieces


def check_layers(layout: KVLayout, layers: range | None) -> range:
    """``layers`` (a step-1 range inside ``layout``'s layers) or, for None, all of them; raises ValueError."""
    if layers is None:
        return range(layout.num_layers)
    if layers.step != 1 or not 0 <= layers.start < layers.stop <= layout.num_layers:
        raise ValueError(f"layers {layers} are not a run of the pool's {layout.num_layers} layers")
    return layers


class KVPool:
    """One rank's KV cache: a single tensor of ``layout.shape``, dtype ``layout.dtype``.

    Lifetime: allocated once at start-up and kept for the life of the process; the transfer
    engine registers ``[data_ptr, data_ptr + nbytes)`` once.
    """

    def __init__(self, layout: KVLayout, device: torch.device | str, pin_memory: bool = False) -> None:
        self.layout = layout
        self.buffer = torch.zeros(layout.shape, dtype=layout.dtype, device=device, pin_memory=pin_memory)

    @property
    def data_ptr(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def copy_page(self, src: int, dst: int) -> None:
        """Copies page ``src`` of every layer into page ``dst`` (in the device's stream order)."""
        if self.layout.order is KVOrder.LAYER_MAJOR:
            self.buffer[:, dst].copy_(self.buffer[:, src])
        else:
            self.buffer[dst].copy_(self.buffer[src])

    def layer(self, layer: int) -> torch.Tensor:
        """The cache of one layer, ``[pages, page_size, latent]`` (a view; strided if page-major)."""
        if self.layout.order is KVOrder.LAYER_MAJOR:
            return self.buffer[layer]
        return self.buffer[:, layer]

    def write_slots(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Writes ``latent [T, latent_dim]`` (pool dtype) into cache slots ``slots [T]`` int64 (``page *
        page_size + offset``) of ``layer``, in place whatever the axis order."""
        if self.layout.order is KVOrder.LAYER_MAJOR:  # one flat index copy
            self.buffer[layer].view(-1, self.layout.latent_dim).index_copy_(0, slots, latent)
        else:  # a strided layer: index its pages and offsets (a flat reshape would copy)
            self.layer(layer)[slots // self.layout.page_size, slots % self.layout.page_size] = latent

    def read_slots(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The latent in cache slots ``slots`` (any shape, int64) of ``layer``: ``[*slots.shape, latent_dim]``."""
        if self.layout.order is KVOrder.LAYER_MAJOR:
            return self.buffer[layer].view(-1, self.layout.latent_dim)[slots]
        return self.layer(layer)[slots // self.layout.page_size, slots % self.layout.page_size]


class PageAllocator:
    """Reference-counted allocator of page ids ``1 .. num_pages-1``; pure Python, no tensors.

    A page is free when its count is zero. ``alloc`` is all-or-nothing. ``free`` decrements and
    raises on a page that is already free, so a double free is an error, never a silent corruption.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the dummy page), got {num_pages}")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._refs[DUMMY_PAGE] = 1  # never handed out, never freed
        # Pop from the end: the lowest ids come out first, which keeps fresh allocations contiguous.
        self._free = list(range(num_pages - 1, DUMMY_PAGE, -1))
        self._held: list[tuple[int, int]] = []  # (step tag, page): freed, waiting for a step on the device

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can hold requests (all but the dummy page)."""
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Returns ``n`` fresh pages with count 1, or None (and changes nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: Sequence[int]) -> None:
        for p in pages:
            self._check(p)
            if self._refs[p] == 0:
                raise ValueError(f"incref of free page {p}")
            self._refs[p] += 1

    def free(self, pages: Sequence[int], hold: int | None = None) -> None:
        """Drops one reference to each page; pages whose count reaches zero return to the pool, or with
        ``hold`` (the tag of a step in flight on the device that may still write them) wait for
        ``release(hold)``: a page handed out again at once could take a KV transfer the step then overwrites."""
        counts = Counter(pages)
        for p, n in counts.items():
            self._check(p)
            if self._refs[p] < n:
                raise ValueError(f"double free of page {p}: {n} frees, {self._refs[p]} references")
        # Pushed in reverse so the stack pops them in their order again: a request's ascending run comes
        # back out ascending, and its KV moves as one transfer piece per layer (pushed in order, every
        # later allocation came out descending, so no two pages merged and each moved as its own piece).
        for p in reversed(pages):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if hold is None:
                    self._free.append(p)
                else:
                    self._held.append((hold, p))

    def release(self, tag: int) -> None:
        """The step ``tag`` (and every earlier one) has completed: the pages held for them are free."""
        done = [p for t, p in self._held if t <= tag]
        self._held = [(t, p) for t, p in self._held if t > tag]
        self._free.extend(reversed(done))

    def refcount(self, page: int) -> int:
        self._check(page)
        return self._refs[page]

    def _check(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page {page} out of range [1, {self.num_pages})")
