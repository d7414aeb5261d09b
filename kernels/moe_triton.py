"""Triton kernels for the SiLU-gated MoE experts (imported only where Triton is available).

Two layouts share one pair of grouped-GEMM kernels:

- sorted (contiguous): the (token, k) pairs of ``topk_ids [T, K]`` are sorted by expert and each
  expert's group is padded to ``block_m`` rows (``moe_align``). Block ``b`` of rows belongs to
  ``block_expert[b]`` (-1 past the end), row slot ``s`` holds pair ``sorted_pairs[s]`` (``T*K`` in
  padding slots). The gate/up GEMM reads ``x[pair // K]`` and writes the activated intermediate at
  the slot; the down GEMM reads slots in order, scales by the routing weight and writes row
  ``pair`` of ``y [T*K, H]``; ``_sum_topk_kernel`` adds each token's K rows in a fixed order.
- masked: ``recv_x [E, N, H]`` with ``recv_count [E]``; block ``b`` is rows
  ``(b // E) * block_m ...`` of expert ``b % E``, and exits at once when they lie past the count.

Every launch grid is fixed by shapes alone (an upper bound on the number of row blocks), blocks past
the live data return immediately, and nothing reads a device value on the host: the whole forward can
be captured in a CUDA graph. There are no atomics: each output element is written by one program and
the sum over K runs in a fixed order, so results are bitwise reproducible, and a token's result does
not depend on the other tokens in the batch (for a fixed block config).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pd.kernels.moe_config import GemmConfig, MoeConfig

# Programs of the sorted layout are ordered in groups of this many row blocks (all column blocks of a
# group before the next group), so a group's weight tiles are reused from L2 at large token counts.
GROUP_M = 8
# Elements of the [pairs, experts] one-hot tile one alignment program holds.
_ALIGN_TILE = 16384


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
    slot = tl.arange(0, BLOCK_M)
    pad = (start + total)[:, None] + slot[None, :]
    tl.store(
        sorted_pairs_ptr + pad, tl.zeros([E_PAD, BLOCK_M], tl.int32) + num_pairs, mask=pad < end[:, None]
    )
    total_padded = tl.max(end, axis=0)
    for b0 in range(0, max_blocks, BLOCKS_PER_STEP):
        blocks = b0 + tl.arange(0, BLOCKS_PER_STEP)
        first_row = blocks * BLOCK_M
        # The block's expert is the number of experts that end at or before its first row.
        expert = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first_row < total_padded, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)


@triton.jit
def _align_one_chunk_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
):  # fmt: skip
    """All of moe_align in one program, for ``num_pairs <= CHUNK`` (decode)."""
    pairs = tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    hit = _onehot(ids, num_experts, E_PAD)
    rank = tl.cumsum(hit, axis=0)  # 1-based rank of each pair among its expert's pairs
    total = tl.sum(hit, axis=0)
    end = tl.cumsum((total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, axis=0)
    start = end - (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    dest = tl.sum(hit * (start[None, :] + rank - 1), axis=1)
    tl.store(sorted_pairs_ptr + dest, pairs, mask=tl.sum(hit, axis=1) > 0)
    _write_padding_and_blocks(
        sorted_pairs_ptr, block_expert_ptr, total, start, end, num_pairs, max_blocks,
        BLOCK_M, E_PAD, BLOCKS_PER_STEP,
    )  # fmt: skip


@triton.jit
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


@triton.jit
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


@triton.jit
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
    if num_pairs <= chunk:
        _align_one_chunk_kernel[(1,)](
            ids, sorted_pairs, block_expert, num_pairs, num_experts, max_blocks,
            BLOCK_M=block_m, CHUNK=max(16, triton.next_power_of_2(num_pairs)), E_PAD=e_pad,
            BLOCKS_PER_STEP=max(16, _ALIGN_TILE // e_pad // 4), num_warps=4,
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


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row block, column block); GROUP row blocks are visited column by column."""
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_size = tl.minimum(num_m_blocks - first_m, GROUP)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _rows(
    pid_m, sorted_pairs_ptr, block_expert_ptr, count_ptr, num_pairs, num_experts, rows_per_expert,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Returns (expert, first slot of the block, row ids [BLOCK_M], row is live [BLOCK_M], block is live).

    Sorted layout: row ids are pair indices (``num_pairs`` in padding slots). Masked layout: row ids
    index the expert's [N] slab; rows at or past the expert's count are not live."""
    if MASKED:
        expert = pid_m % num_experts
        first = (pid_m // num_experts) * BLOCK_M
        count = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows_per_expert)
        rows = first + tl.arange(0, BLOCK_M)
        return expert, first, rows, rows < count, first < count
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        first = pid_m * BLOCK_M
        pairs = tl.load(sorted_pairs_ptr + first + tl.arange(0, BLOCK_M))  # garbage in dead blocks
        return expert, first, pairs, pairs < num_pairs, expert >= 0


_GEMM_RUNTIME_INTS = ["num_pairs", "top_k", "rows_per_expert", "num_m_blocks"]


@triton.jit(do_not_specialize=_GEMM_RUNTIME_INTS)
def _gate_up_kernel(
    a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, count_ptr,
    num_pairs, top_k, num_experts, rows_per_expert, num_m_blocks, N, K,
    stride_ae, stride_am, stride_we, stride_wn, stride_oe, stride_om,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """out[row, n] = silu(a[row] . gate[n]) * (a[row] . up[n]) for a block of rows of one expert and
    BLOCK_N columns of the intermediate; gate = w[e, :N], up = w[e, N:2N] (N = intermediate).

    Sorted layout: a = x [T, H] (row = pair // top_k), out = [slots, N] at the block's slots; padding
    slots of a live block are written as zeros. Masked layout: a, out = [E, rows, .]."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert, first, rows, row_ok, live = _rows(
        pid_m, sorted_pairs_ptr, block_expert_ptr, count_ptr, num_pairs, num_experts, rows_per_expert,
        BLOCK_M, MASKED,
    )  # fmt: skip
    if not live:
        return
    if MASKED:
        a_rows = a_ptr + expert.to(tl.int64) * stride_ae + rows.to(tl.int64) * stride_am
        out_rows = out_ptr + expert.to(tl.int64) * stride_oe + rows.to(tl.int64) * stride_om
        store_ok = row_ok
    else:
        a_rows = a_ptr + (rows // top_k).to(tl.int64) * stride_am
        out_rows = out_ptr + (first + tl.arange(0, BLOCK_M)).to(tl.int64) * stride_om
        store_ok = rows >= 0
    offs_k = tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = cols % N  # columns past N wrap (their results are not stored): no mask on weight loads
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    g_ptrs = (
        w_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    )
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = out_rows[:, None] + cols[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=store_ok[:, None] & (cols[None, :] < N))


@triton.jit(do_not_specialize=_GEMM_RUNTIME_INTS)
def _down_kernel(
    a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, count_ptr, route_w_ptr,
    num_pairs, num_experts, rows_per_expert, num_m_blocks, N, K,
    stride_ae, stride_am, stride_we, stride_wn, stride_oe, stride_om,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """out[row, n] = a[row] . w[e, n] for a block of rows of one expert (N = hidden, K = intermediate).

    Sorted layout: a = the gate/up output at the block's slots, out = y [T*K, H] at row = pair, scaled
    by the pair's routing weight. Masked layout: a, out = [E, rows, .], no weight."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert, first, rows, row_ok, live = _rows(
        pid_m, sorted_pairs_ptr, block_expert_ptr, count_ptr, num_pairs, num_experts, rows_per_expert,
        BLOCK_M, MASKED,
    )  # fmt: skip
    if not live:
        return
    if MASKED:
        a_rows = a_ptr + expert.to(tl.int64) * stride_ae + rows.to(tl.int64) * stride_am
        out_rows = out_ptr + expert.to(tl.int64) * stride_oe + rows.to(tl.int64) * stride_om
    else:
        a_rows = a_ptr + (first + tl.arange(0, BLOCK_M)).to(tl.int64) * stride_am
        out_rows = out_ptr + rows.to(tl.int64) * stride_om
    offs_k = tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = cols % N
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    w_ptrs = (
        w_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not MASKED:
        acc *= tl.load(route_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_rows[:, None] + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit
def _sum_topk_kernel(y_ptr, ids_ptr, out_ptr, H, num_experts, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over k of y[t*K + k] for the pairs with a valid expert id, in order k = 0..K-1."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + k) + tl.zeros([BLOCK_H], tl.int32)  # as a vector: the
        valid = (e >= 0) & (e < num_experts)  # interpreter mis-types scalar & vector masks
        acc += tl.load(y_ptr + (t * TOP_K + k) * H + cols, mask=col_ok & valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _launch_gate_up(a, w13, out, cfg: GemmConfig, block_m, num_m_blocks, *, sorted_pairs=None,
                    block_expert=None, count=None, num_pairs=0, top_k=1, rows_per_expert=0) -> None:  # fmt: skip
    masked = count is not None
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    grid = (num_m_blocks * triton.cdiv(inter, cfg.block_n),)
    dummy = out  # pointer arguments the chosen layout never reads
    _gate_up_kernel[grid](
        a, w13, out,
        dummy if masked else sorted_pairs, dummy if masked else block_expert, count if masked else dummy,
        num_pairs, top_k, w13.shape[0], rows_per_expert, num_m_blocks, inter, hidden,
        a.stride(0) if masked else 0, a.stride(-2), w13.stride(0), w13.stride(1),
        out.stride(0) if masked else 0, out.stride(-2),
        MASKED=masked, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP=1 if masked else GROUP_M, EVEN_K=hidden % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _launch_down(a, w2, out, cfg: GemmConfig, block_m, num_m_blocks, *, sorted_pairs=None,
                 block_expert=None, count=None, route_w=None, num_pairs=0, rows_per_expert=0) -> None:  # fmt: skip
    masked = count is not None
    hidden, inter = w2.shape[1], w2.shape[2]
    grid = (num_m_blocks * triton.cdiv(hidden, cfg.block_n),)
    dummy = out
    _down_kernel[grid](
        a, w2, out,
        dummy if masked else sorted_pairs, dummy if masked else block_expert, count if masked else dummy,
        dummy if masked else route_w,
        num_pairs, w2.shape[0], rows_per_expert, num_m_blocks, hidden, inter,
        a.stride(0) if masked else 0, a.stride(-2), w2.stride(0), w2.stride(1),
        out.stride(0) if masked else 0, out.stride(-2),
        MASKED=masked, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP=1 if masked else GROUP_M, EVEN_K=inter % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoeConfig,
    out: torch.Tensor,
) -> torch.Tensor:
    """Sorted-layout MoE into ``out [T, H]``; inputs already validated and contiguous."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return out
    num_experts, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    bm = config.block_m
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, bm)
    num_m_blocks = block_expert.numel()
    h = torch.empty(num_m_blocks * bm, inter, dtype=x.dtype, device=x.device)
    _launch_gate_up(
        x, w13, h, config.gate_up, bm, num_m_blocks,
        sorted_pairs=sorted_pairs, block_expert=block_expert, num_pairs=num_pairs, top_k=top_k,
    )  # fmt: skip
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _launch_down(
        h, w2, y, config.down, bm, num_m_blocks,
        sorted_pairs=sorted_pairs, block_expert=block_expert, route_w=topk_weights, num_pairs=num_pairs,
    )  # fmt: skip
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_topk_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )
    return out


def masked_moe(
    recv_x: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: MoeConfig,
    out: torch.Tensor,
) -> torch.Tensor:
    """Masked-layout MoE into ``out [E, N, H]`` (rows past each count are not written)."""
    num_experts, rows_per_expert, _ = recv_x.shape
    if rows_per_expert == 0:
        return out
    inter = w13.shape[1] // 2
    bm = config.block_m
    num_m_blocks = num_experts * triton.cdiv(rows_per_expert, bm)
    h = torch.empty(num_experts, rows_per_expert, inter, dtype=recv_x.dtype, device=recv_x.device)
    _launch_gate_up(
        recv_x, w13, h, config.gate_up, bm, num_m_blocks, count=recv_count, rows_per_expert=rows_per_expert
    )
    _launch_down(h, w2, out, config.down, bm, num_m_blocks, count=recv_count, rows_per_expert=rows_per_expert)
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x [R, 2N]`` (last dim contiguous) -> ``out [R, N]``."""
    rows, n = out.shape
    if rows == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block)
    return out
