"""Absorbed MLA decode over a paged latent cache, split over the cache positions (one query a sequence).

FlashInfer's MLA decode kernel costs ~12-17 us a layer on an H200 at batch 1-32 whatever the context up to ~1K (a
fixed cost: 0.3-0.45 ms of a 27-layer step; ``pd.bench.mla_decode``). This kernel splits each row's positions
over several programs (``chunk_for``) and merges the splits in a second launch (``pd.kernels.mla_decode_triton``);
a row's result depends on its own inputs alone. ``mla_decode_ref`` is the torch reference (float32 math).

Inputs, one row per query: ``q_latent [B, H, C]`` and ``q_rope [B, H, R]`` (unit stride on the last dim), the
layer's cache ``[pages, page_size, C + R]`` (any page and slot strides: a page-major pool's layer view is strided),
``page_table [B, P]`` int32 (the row's sequence's pages in order; entries past its length unread) and ``kv_lens
[B]`` int32 (>= 1: the positions the query sees, its own included). Output ``[B, H, C]`` in q's dtype.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pd.kernels.moe import HAS_TRITON

MAX_SPLITS = 32  # a row's positions are split in at most this many programs (the partial outputs' room)
BLOCK_H = 16  # heads a program (the MMA's smallest M)
BLOCK_N = 32  # cache positions a step: [32, 576] bf16 rows, two stages in shared memory


@functools.cache
def _triton_ops() -> ModuleType:
    from pd.kernels import mla_decode_triton

    return mla_decode_triton


def chunk_for(heads: int) -> int:
    """The fewest positions a split holds: each split writes a float32 partial output of ``heads x C`` values, so
    a split reads at least twice that in cache rows (4 positions a head, at least 64: on an H200 at 16 heads, 64
    beat 128 at batch 1-8 and 32 lost from batch 8)."""
    return -(-max(64, 4 * heads) // BLOCK_N) * BLOCK_N


def mla_decode_ref(
    q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
    kv_lens: torch.Tensor, scale: float,
) -> torch.Tensor:  # fmt: skip
    """The torch reference (float32 softmax and products; loops over sequences, reads lengths on the host)."""
    c = q_latent.shape[-1]
    page_size = cache.shape[1]
    out = []
    for b, n in enumerate(kv_lens.tolist()):
        pos = torch.arange(n, device=cache.device)
        rows = cache[page_table[b, pos // page_size].long(), pos % page_size].float()  # [n, C + R]
        scores = (q_latent[b].float() @ rows[:, :c].t() + q_rope[b].float() @ rows[:, c:].t()) * scale
        out.append(scores.softmax(-1) @ rows[:, :c])
    return torch.stack(out).to(q_latent.dtype)


def mla_decode(
    q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
    kv_lens: torch.Tensor, scale: float, max_len: int, *, chunk: int | None = None, triton: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """See the module docstring. ``max_len``: a bound on ``kv_lens`` known on the host (a CUDA graph: its
    capacity), which sizes the grid but not the result. ``chunk``: the fewest positions a split holds (default
    ``chunk_for(heads)``; a multiple of ``BLOCK_N``; tests split short rows with less). Triton on CUDA when
    installed (``triton=True`` forces it, e.g. in the interpreter; ``False`` the reference)."""
    rows, heads, c = q_latent.shape
    if q_rope.shape[:2] != (rows, heads) or cache.shape[-1] != c + q_rope.shape[-1]:
        raise ValueError(
            f"q_latent {tuple(q_latent.shape)} and q_rope {tuple(q_rope.shape)} do not fit a cache of rows "
            f"{cache.shape[-1]}"
        )
    if page_table.dtype != torch.int32 or kv_lens.dtype != torch.int32 or kv_lens.shape != (rows,):
        raise ValueError("page_table [B, P] and kv_lens [B] must be int32")
    if q_latent.stride(-1) != 1 or q_rope.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("q_latent, q_rope and the cache need a unit stride on their last dim")
    if triton is None:
        triton = HAS_TRITON and q_latent.is_cuda
    if not triton:
        return mla_decode_ref(q_latent, q_rope, cache, page_table, kv_lens, scale)
    chunk = chunk or chunk_for(heads)
    if chunk % BLOCK_N:
        raise ValueError(f"chunk must be a multiple of {BLOCK_N}, got {chunk}")
    out = torch.empty_like(q_latent, memory_format=torch.contiguous_format)
    splits = max(1, min(MAX_SPLITS, -(-max_len // chunk)))
    return _triton_ops().mla_decode(
        q_latent, q_rope, cache, page_table, kv_lens, scale, splits, out, chunk, MAX_SPLITS, BLOCK_H, BLOCK_N
    )
