"""Triton kernel of ``pd.kernels.expert_counts`` (imported only where Triton is available).

One program walks the pairs in chunks of a ``[CHUNK, E_PAD]`` one-hot tile, summing it per expert, and writes
each pair's weight or 0. Decode batches fit one chunk; a prefill chunk loops (a few microseconds more than
the torch path there, one launch instead of six where it counts: inside the decode graphs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 16384  # elements of the one-hot tile


@triton.jit(do_not_specialize=["num_pairs"])
def _count_and_mask_kernel(
    ids_ptr, w_ptr, counts_ptr, out_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int64)
    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        live = pairs < num_pairs
        ids = tl.load(ids_ptr + pairs, mask=live, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]).to(tl.int64)
        counts += tl.sum(hit, axis=0)
        w = tl.load(w_ptr + pairs, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + pairs, tl.where(ids >= 0, w, 0.0), mask=live)
    tl.store(counts_ptr + experts, counts, mask=experts < num_experts)


def count_and_mask(ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, out: torch.Tensor) -> None:
    """Launches the kernel: ``ids``, ``weights`` ``[T, K]`` contiguous; writes ``counts [E]`` and ``out [T, K]``."""
    e_pad = triton.next_power_of_2(counts.numel())
    chunk = max(16, min(triton.next_power_of_2(max(ids.numel(), 1)), _TILE // e_pad))
    _count_and_mask_kernel[(1,)](
        ids, weights, counts, out, ids.numel(), counts.numel(), CHUNK=chunk, E_PAD=e_pad,
        num_warps=4 if chunk * e_pad <= 4096 else 8,
    )  # fmt: skip
