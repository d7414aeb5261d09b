"""Triton kernels for the SiLU-gated MoE experts (imported only where Triton is available).

Two layouts share one pair of grouped-GEMM kernels:

- sorted (contiguous): the (token, k) pairs of ``topk_ids [T, K]`` are sorted by expert and each
  expert's group is padded to ``block_m`` rows (``moe_align``). Block ``b`` of rows belongs to
  ``block_expert[b]`` (-1 past the end), row slot ``s`` holds pair ``sorted_pairs[s]`` (``T*K`` in
  padding slots). The gate/up GEMM reads ``x[pair // K]`` and writes the activated intermediate at
  the slot; the down GEMM reads slots in order, scales by the routing weight and writes row
  ``pair`` of ``y [T*K, H]``; ``_sum_topk_kernel`` adds each token's K rows in a fixed order.
- masked: ``recv_x [E, N, H]`` with ``recv_count [E]``; each program owns one column block of one
  expert and loops over that expert's row blocks below its count (every ``m_programs``-th block, so
  ``m_programs`` programs share an expert's rows); an expert with no rows costs one load.

Every launch grid is fixed by shapes alone (an upper bound on the number of row blocks), programs past
the live data return immediately, and nothing reads a device value on the host: the whole forward can
be captured in a CUDA graph. There are no atomics: each output element is written by one program and
the sum over K runs in a fixed order, so results are bitwise reproducible, and a token's result does
not depend on the other tokens in the batch (for a fixed block config).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import triton
import triton.language as tl

from pd.kernels.moe_align_triton import moe_align
from pd.kernels.moe_config import GemmConfig, MoeConfig

# Programs of the sorted layout are ordered in groups of this many row blocks (all column blocks of a
# group before the next group), so a group's weight tiles are reused from L2 at large token counts.
GROUP_M = 8


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
def _gate_up_tile(
    a_rows, a_ok, w, expert, pid_n, N, K, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
):  # fmt: skip
    """silu(a . gate) * (a . up) in float32 for rows ``a_rows`` (pointers to each row's first element;
    rows with ``a_ok`` false read as zeros) and columns pid_n*BLOCK_N.. of the intermediate.

    ``w`` is the weight as ``[E * 2N, K]`` rows (expert e: gate rows e*2N.., up rows e*2N + N..): a
    pointer, or with W_TMA a tensor descriptor with block [BLOCK_N, BLOCK_K]. Columns past N read
    other rows (zeros past the end); the caller drops them."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    gate_row = expert * 2 * N + pid_n * BLOCK_N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if W_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=a_ok[:, None] & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
            acc_g = tl.dot(a, w.load([gate_row, k * BLOCK_K]).T, acc_g)
            acc_u = tl.dot(a, w.load([gate_row + N, k * BLOCK_K]).T, acc_u)
            a_ptrs += BLOCK_K
    else:
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap instead of masking the loads
        g_ptrs = w + (expert * 2 * N + cols)[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + N * stride_wn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
    return acc_g * tl.sigmoid(acc_g) * acc_u


@triton.jit
def _down_tile(
    a_rows, a_ok, w, expert, pid_n, N, K, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
):  # fmt: skip
    """a . w in float32 for rows ``a_rows`` and columns pid_n*BLOCK_N.. of expert ``expert``; ``w``
    is the weight as ``[E * N, K]`` rows (pointer, or tensor descriptor with W_TMA)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if W_TMA:
        row = expert * N + pid_n * BLOCK_N
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=a_ok[:, None] & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
            acc = tl.dot(a, w.load([row, k * BLOCK_K]).T, acc)
            a_ptrs += BLOCK_K
    else:
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        w_ptrs = w + (expert * N + cols)[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
                b = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    return acc


@triton.jit
def _store_tile(out_rows, row_ok, tile, pid_n, N, BLOCK_N: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(
        out_rows[:, None] + cols[None, :],
        tile.to(out_rows.dtype.element_ty),
        mask=row_ok[:, None] & (cols[None, :] < N),
    )


# Arguments that change with the batch are not specialised on (no recompile when one is 1 or a
# multiple of 16); lists name only the kernel's own arguments (older Triton rejects others).


@triton.jit(do_not_specialize=["num_pairs", "top_k", "num_m_blocks"])
def _gate_up_sorted_kernel(
    x_ptr, w, out_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, top_k, num_m_blocks, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, W_TMA: tl.constexpr,
):  # fmt: skip
    """Sorted layout, gate/up: ``out[slot] = silu(x[pair // top_k] . gate) * (x[...] . up)`` for the
    slots of one row block; padding slots of a live block are written as zeros."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    h = _gate_up_tile(
        x_ptr + (pairs // top_k).to(tl.int64) * stride_xm, pairs < num_pairs, w, expert, pid_n, N, K,
        stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA,
    )  # fmt: skip
    _store_tile(out_ptr + slots.to(tl.int64) * stride_om, slots >= 0, h, pid_n, N, BLOCK_N)


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _down_sorted_kernel(
    h_ptr, w, y_ptr, sorted_pairs_ptr, block_expert_ptr, route_w_ptr, num_pairs, num_m_blocks, N, K,
    stride_hm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, W_TMA: tl.constexpr,
):  # fmt: skip
    """Sorted layout, down: ``y[pair] = route_w[pair] * (h[slot] . down)`` for one row block."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    live = pairs < num_pairs
    acc = _down_tile(
        h_ptr + slots.to(tl.int64) * stride_hm, live, w, expert, pid_n, N, K, stride_wn,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA,
    )  # fmt: skip
    acc *= tl.load(route_w_ptr + pairs, mask=live, other=0.0)[:, None]
    _store_tile(y_ptr + pairs.to(tl.int64) * stride_ym, live, acc, pid_n, N, BLOCK_N)


@triton.jit
def _masked_program(pid, N, num_experts, BLOCK_N: tl.constexpr):
    """Program id -> (column block, expert, first row block); column blocks vary fastest."""
    num_n = tl.cdiv(N, BLOCK_N)
    return pid % num_n, (pid // num_n) % num_experts, pid // (num_n * num_experts)


@triton.jit(do_not_specialize=["rows_per_expert", "m_programs"])
def _gate_up_masked_kernel(
    x_ptr, w, out_ptr, count_ptr, num_experts, rows_per_expert, m_programs, N, K,
    stride_xe, stride_xm, stride_wn, stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
):  # fmt: skip
    """Masked layout, gate/up: row blocks first_block, first_block + m_programs, ... of one expert,
    up to its count (none at all when the count is 0)."""
    pid_n, expert, first_block = _masked_program(tl.program_id(0), N, num_experts, BLOCK_N)
    count = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows_per_expert)
    x_e = x_ptr + expert.to(tl.int64) * stride_xe
    out_e = out_ptr + expert.to(tl.int64) * stride_oe
    for mb in range(first_block, tl.cdiv(count, BLOCK_M), m_programs):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < count
        h = _gate_up_tile(
            x_e + rows.to(tl.int64) * stride_xm, live, w, expert, pid_n, N, K, stride_wn,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA,
        )  # fmt: skip
        _store_tile(out_e + rows.to(tl.int64) * stride_om, live, h, pid_n, N, BLOCK_N)


@triton.jit(do_not_specialize=["rows_per_expert", "m_programs"])
def _down_masked_kernel(
    h_ptr, w, out_ptr, count_ptr, num_experts, rows_per_expert, m_programs, N, K,
    stride_he, stride_hm, stride_wn, stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
):  # fmt: skip
    """Masked layout, down: as the gate/up kernel, ``out[e, row] = h[e, row] . down_e``."""
    pid_n, expert, first_block = _masked_program(tl.program_id(0), N, num_experts, BLOCK_N)
    count = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows_per_expert)
    h_e = h_ptr + expert.to(tl.int64) * stride_he
    out_e = out_ptr + expert.to(tl.int64) * stride_oe
    for mb in range(first_block, tl.cdiv(count, BLOCK_M), m_programs):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < count
        acc = _down_tile(
            h_e + rows.to(tl.int64) * stride_hm, live, w, expert, pid_n, N, K, stride_wn,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, W_TMA,
        )  # fmt: skip
        _store_tile(out_e + rows.to(tl.int64) * stride_om, live, acc, pid_n, N, BLOCK_N)


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


def _kernel_options(cfg: GemmConfig, block_m: int, reduced: int) -> dict:
    return dict(
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=reduced % cfg.block_k == 0,
        W_TMA=cfg.tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


@functools.cache
def has_tma(device: torch.device) -> bool:
    """Host-side tensor descriptors (Triton >= 3.4) on a Hopper-or-newer GPU (or the interpreter)."""
    if importlib.util.find_spec("triton.tools.tensor_descriptor") is None:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _weight(w: torch.Tensor, cfg: GemmConfig):
    """The expert weight ``[E, R, K]`` as ``[E * R, K]`` rows: the tensor, or its TMA descriptor."""
    rows = w.view(-1, w.shape[-1])
    if not cfg.tma:
        return rows
    if not has_tma(w.device):
        raise RuntimeError(f"config {cfg} asks for TMA, which this Triton/GPU does not have")
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(rows, [cfg.block_n, cfg.block_k])


def gate_up_sorted(x, w13, h, sorted_pairs, block_expert, top_k: int, cfg: GemmConfig, block_m: int) -> None:
    """``h [blocks * block_m, I]`` from ``x [T, H]`` for the sorted pairs (see ``moe_align``)."""
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    num_m_blocks = block_expert.numel()
    _gate_up_sorted_kernel[(num_m_blocks * triton.cdiv(inter, cfg.block_n),)](
        x, _weight(w13, cfg), h, sorted_pairs, block_expert, x.shape[0] * top_k, top_k, num_m_blocks,
        inter, hidden, x.stride(0), w13.stride(1), h.stride(0),
        GROUP=GROUP_M, **_kernel_options(cfg, block_m, hidden),
    )  # fmt: skip


def down_sorted(h, w2, y, sorted_pairs, block_expert, route_w, cfg: GemmConfig, block_m: int) -> None:
    """``y [T*K, H]`` (rows of valid pairs only) from ``h``, scaled by ``route_w [T*K]`` float32."""
    hidden, inter = w2.shape[1], w2.shape[2]
    num_m_blocks = block_expert.numel()
    _down_sorted_kernel[(num_m_blocks * triton.cdiv(hidden, cfg.block_n),)](
        h, _weight(w2, cfg), y, sorted_pairs, block_expert, route_w, y.shape[0], num_m_blocks, hidden, inter,
        h.stride(0), w2.stride(1), y.stride(0),
        GROUP=GROUP_M, **_kernel_options(cfg, block_m, inter),
    )  # fmt: skip


def masked_programs(rows_per_expert: int, expected_m: int, block_m: int) -> int:
    """Programs per (expert, column block) along the rows: enough for ``expected_m`` rows at one
    block each; an expert with more rows loops over the rest."""
    return max(1, min(triton.cdiv(rows_per_expert, block_m), triton.cdiv(expected_m, block_m)))


def gate_up_masked(x, count, w13, h, cfg: GemmConfig, block_m: int, m_programs: int) -> None:
    """``h [E, N, I]`` from ``x [E, N, H]`` for rows below ``count [E]``."""
    num_experts, rows, _ = x.shape
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    _gate_up_masked_kernel[(m_programs * num_experts * triton.cdiv(inter, cfg.block_n),)](
        x, _weight(w13, cfg), h, count, num_experts, rows, m_programs, inter, hidden,
        x.stride(0), x.stride(1), w13.stride(1), h.stride(0), h.stride(1),
        **_kernel_options(cfg, block_m, hidden),
    )  # fmt: skip


def down_masked(h, count, w2, out, cfg: GemmConfig, block_m: int, m_programs: int) -> None:
    """``out [E, N, H]`` from ``h [E, N, I]`` for rows below ``count [E]``."""
    num_experts, rows, _ = h.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    _down_masked_kernel[(m_programs * num_experts * triton.cdiv(hidden, cfg.block_n),)](
        h, _weight(w2, cfg), out, count, num_experts, rows, m_programs, hidden, inter,
        h.stride(0), h.stride(1), w2.stride(1), out.stride(0), out.stride(1),
        **_kernel_options(cfg, block_m, inter),
    )  # fmt: skip


def sum_topk(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> None:
    """``out [T, H]`` = sum over k of ``y [T*K, H]`` rows of valid pairs."""
    num_tokens, top_k = topk_ids.shape
    hidden = out.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_topk_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )


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
    if num_tokens * top_k == 0:
        return out.zero_()
    num_experts, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    bm = config.block_m
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, bm)
    h = torch.empty(block_expert.numel() * bm, inter, dtype=x.dtype, device=x.device)
    gate_up_sorted(x, w13, h, sorted_pairs, block_expert, top_k, config.gate_up, bm)
    y = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    down_sorted(h, w2, y, sorted_pairs, block_expert, topk_weights, config.down, bm)
    sum_topk(y, topk_ids, num_experts, out)
    return out


def masked_moe(
    recv_x: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: MoeConfig,
    expected_m: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Masked-layout MoE into ``out [E, N, H]`` (rows past each count are not written)."""
    num_experts, rows, _ = recv_x.shape
    if rows == 0:
        return out
    bm = config.block_m
    m_programs = masked_programs(rows, expected_m, bm)
    h = torch.empty(num_experts, rows, w13.shape[1] // 2, dtype=recv_x.dtype, device=recv_x.device)
    gate_up_masked(recv_x, recv_count, w13, h, config.gate_up, bm, m_programs)
    down_masked(h, recv_count, w2, out, config.down, bm, m_programs)
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x [R, 2N]`` (last dim contiguous) -> ``out [R, N]``."""
    rows, n = out.shape
    if rows == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block)
    return out
