"""Triton kernels of ``moe_align``: the (token, k) pairs of ``topk_ids [T, K]`` sorted by expert, each expert's
group padded to ``block_m`` rows, for the sorted layout of the grouped GEMMs (``pd.kernels.moe_triton``).

Decode sizes run one program per expert; larger steps three passes (counts per chunk, offsets, scatter). Grids
are fixed by shapes alone and nothing is read back on the host: the alignment can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of the [pairs, experts] one-hot tile one alignment program holds; up to _ONE_PROGRAM_TILE the
# whole alignment is one launch of a program per expert (a decode batch of up to 512 pairs at 64 experts:
# three passes took ~13.6 us a layer at batch 64 on an H200, one program for all experts ~17 us).
_ALIGN_TILE = 16384
_ONE_PROGRAM_TILE = 32768


# ---------------------------------------------------------------------------------------------
# moe_align: sort (token, k) pairs by expert, pad each expert's group to block_m
# ---------------------------------------------------------------------------------------------


@triton.jit
def _onehot(ids, num_experts, E_PAD: tl.constexpr):
    """[CHUNK] expert ids -> [CHUNK, E_PAD] int32 one-hot; ids < 0 or >= num_experts match nothing."""
    experts = tl.arange(0, E_PAD)
    hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)
    return hit.to(tl.int32)


@triton.jit
def _write_padding_and_blocks(
    sorted_pairs_ptr, block_expert_ptr, total, start, end, num_pairs, max_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):  # fmt: skip
    """Writes the sentinel ``num_pairs`` into each expert's padding slots [start+total, end) and the
    expert of every row block (-1 for blocks at or past the last expert's end)."""
    PAD_STEP: tl.constexpr = min(BLOCK_M, 16)
    for s0 in tl.static_range(0, BLOCK_M, PAD_STEP):  # an expert has fewer than BLOCK_M padding slots
        pad = (start + total + s0)[:, None] + tl.arange(0, PAD_STEP)[None, :]
        sentinel = tl.zeros([E_PAD, PAD_STEP], tl.int32) + num_pairs
        tl.store(sorted_pairs_ptr + pad, sentinel, mask=pad < end[:, None])
    total_padded = tl.max(end, axis=0)
    for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        first_row = blocks * BLOCK_M
        # The block's expert is the number of experts that end at or before its first row.
        expert = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first_row < total_padded, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_small_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):  # fmt: skip
    """All of moe_align for ``num_pairs <= CHUNK`` (decode), one program per expert: program ``e`` counts every
    expert's pairs (for its group's first slot), then writes expert ``e``'s pairs in order, its padding and its
    row blocks' expert; program 0 also marks the blocks past the last group -1."""
    e = tl.program_id(0)
    pairs = tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    total = tl.sum(_onehot(ids, num_experts, E_PAD), axis=0)  # [E_PAD] pairs per expert
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    experts = tl.arange(0, E_PAD)
    start = tl.sum(tl.where(experts < e, padded, 0), axis=0)
    mine = tl.sum(tl.where(experts == e, total, 0), axis=0)
    end = start + (mine + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    hit = (ids == e).to(tl.int32)
    tl.store(sorted_pairs_ptr + start + tl.cumsum(hit, axis=0) - 1, pairs, mask=hit > 0)
    PAD_STEP: tl.constexpr = min(BLOCK_M, 16)
    for s0 in tl.static_range(0, BLOCK_M, PAD_STEP):  # fewer than BLOCK_M padding slots
        pad = start + mine + s0 + tl.arange(0, PAD_STEP)
        tl.store(sorted_pairs_ptr + pad, tl.zeros([PAD_STEP], tl.int32) + num_pairs, mask=pad < end)
    for b0 in range(start // BLOCK_M, end // BLOCK_M, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        tl.store(
            block_expert_ptr + blocks, tl.zeros([BLOCKS_PER_STEP], tl.int32) + e, mask=blocks < end // BLOCK_M
        )
    if e == 0:
        for b0 in range(tl.sum(padded, axis=0) // BLOCK_M, max_blocks, BLOCKS_PER_STEP):
            blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
            tl.store(
                block_expert_ptr + blocks, tl.zeros([BLOCKS_PER_STEP], tl.int32) - 1, mask=blocks < max_blocks
            )


@triton.jit(do_not_specialize=["num_pairs"])
def _align_count_kernel(
    ids_ptr, chunk_counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr
):
    """Pass 1 of 3: ``chunk_counts[c, e]`` = pairs of chunk c routed to expert e."""
    c = tl.program_id(0)
    pairs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    tl.store(
        chunk_counts_ptr + c * E_PAD + tl.arange(0, E_PAD), tl.sum(_onehot(ids, num_experts, E_PAD), axis=0)
    )


@triton.jit(do_not_specialize=["num_chunks", "num_pairs", "max_blocks"])
def _align_offsets_kernel(
    chunk_counts_ptr, chunk_offsets_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_chunks, num_pairs, max_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):  # fmt: skip
    """Pass 2 of 3 (one program): each expert's padded extent, the first slot of each chunk's pairs
    of each expert, the padding sentinels and the block -> expert table."""
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, num_chunks, CHUNKS_PER_STEP):
        rows = c0 + tl.arange(0, CHUNKS_PER_STEP)
        mask = rows[:, None] < num_chunks
        total += tl.sum(
            tl.load(chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :], mask=mask, other=0), 0
        )
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    carry = start
    for c0 in range(0, num_chunks, CHUNKS_PER_STEP):
        rows = c0 + tl.arange(0, CHUNKS_PER_STEP)
        offs = rows[:, None] * E_PAD + experts[None, :]
        mask = rows[:, None] < num_chunks
        counts = tl.load(chunk_counts_ptr + offs, mask=mask, other=0)
        tl.store(chunk_offsets_ptr + offs, carry[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        carry += tl.sum(counts, axis=0)
    _write_padding_and_blocks(
        sorted_pairs_ptr, block_expert_ptr, total, start, end, num_pairs, max_blocks,
        BLOCK_M, E_PAD, BLOCKS_PER_STEP,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_pairs"])
def _align_scatter_kernel(
    ids_ptr,
    chunk_offsets_ptr,
    sorted_pairs_ptr,
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Pass 3 of 3: writes each pair into its slot (pairs keep their order within an expert)."""
    c = tl.program_id(0)
    pairs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    hit = _onehot(ids, num_experts, E_PAD)
    first = tl.load(chunk_offsets_ptr + c * E_PAD + tl.arange(0, E_PAD))
    dest = tl.sum(hit * (first[None, :] + tl.cumsum(hit, axis=0) - 1), axis=1)
    tl.store(sorted_pairs_ptr + dest, pairs, mask=tl.sum(hit, axis=1) > 0)


def max_row_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum over experts of ceil(rows_e / block_m) given ``num_pairs`` pairs: at most
    ``min(E, pairs)`` experts are non-empty and each wastes at most ``block_m - 1`` padding rows."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts the pairs of ``topk_ids [T, K]`` (int32/int64, contiguous) by expert.

    Returns ``sorted_pairs [max_blocks * block_m]`` int32 (pair index ``t*K + k``, or ``T*K`` in
    padding slots; slots past the last expert are unwritten) and ``block_expert [max_blocks]`` int32
    (-1 past the end). Pairs with ids outside [0, num_experts) are dropped. No host sync.
    """
    num_pairs = topk_ids.numel()
    max_blocks = max_row_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, _ALIGN_TILE // e_pad)
    ids = topk_ids.reshape(-1)
    if num_pairs <= max(16, _ONE_PROGRAM_TILE // e_pad):
        one_chunk = max(16, triton.next_power_of_2(num_pairs))
        tile = one_chunk * e_pad
        _align_small_kernel[(num_experts,)](
            ids, sorted_pairs, block_expert, num_pairs, num_experts, max_blocks,
            BLOCK_M=block_m, CHUNK=one_chunk, E_PAD=e_pad, BLOCKS_PER_STEP=64,
            num_warps=4 if tile <= 8192 else 8,
        )  # fmt: skip
        return sorted_pairs, block_expert
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty_like(chunk_counts)
    _align_count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, num_experts, CHUNK=chunk, E_PAD=e_pad)
    _align_offsets_kernel[(1,)](
        chunk_counts, chunk_offsets, sorted_pairs, block_expert, num_chunks, num_pairs, max_blocks,
        BLOCK_M=block_m, E_PAD=e_pad, CHUNKS_PER_STEP=max(16, _ALIGN_TILE // e_pad // 4),
        BLOCKS_PER_STEP=max(16, _ALIGN_TILE // e_pad // 4), num_warps=8,
    )  # fmt: skip
    _align_scatter_kernel[(num_chunks,)](
        ids, chunk_offsets, sorted_pairs, num_pairs, num_experts, CHUNK=chunk, E_PAD=e_pad, num_warps=8
    )
    return sorted_pairs, block_expert
