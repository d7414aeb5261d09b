"""Triton kernels for DeepSeek-style block-FP8 (W8A8) GEMMs (imported only where Triton is available).

Operands: float8_e4m3fn values with float32 scales that multiply them back ("dequantize"):
activations one scale per row per 128 columns (1x128 groups, made on the fly by ``quant_rows``),
weights one scale per 128x128 block (the checkpoint's ``weight_scale_inv``).

- ``quant_rows``: x -> (e4m3, scale) per 1x``GROUP`` group: with a = max(amax, 1e-10), scale = a /
  448 and q = x * (448 / a) (one IEEE division per row and group, ``div_rn``: Triton's ``/`` is the
  approximate ``div.full.f32``), saturating round-to-nearest-even cast.
  Scale strides are free (row-major for the grouped GEMMs, M-major for ``torch._scaled_mm``).
  With ``count`` it reads ``[E, N, K]`` and skips rows at or past each expert's count (the masked
  layout), looping like the masked GEMMs so the grid is fixed by shapes.
- Grouped GEMMs, same structure as kernels/moe_triton.py (sorted and masked layouts, moe_align,
  sum_topk): one 128-wide K step per scale group, ``acc += dot(a, b) * a_scale[:, None] *
  b_scale[None, :]``. The gate/up epilogue applies SiLU-and-mul, rounds h to the activation dtype and,
  when its column tile is one 128-column group (block_n == 128), re-quantizes h per 1x128 group in
  registers and writes e4m3 h + its scales (``FUSE_QUANT``); otherwise it writes h in the activation
  dtype and ``quant_rows`` runs as a separate launch.

No host syncs, grids fixed by shapes, no atomics: CUDA-graph safe and bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd.kernels.moe_align_triton import moe_align
from pd.kernels.moe_config import GemmConfig, MoeConfig
from pd.kernels.moe_triton import (
    GROUP_M,
    _masked_program,
    _tile_ids,
    _weight,
    masked_programs,
    sum_topk,
)

FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-10)  # an all-zero group gets this amax: finite scale, zero values
SCALE_BLOCK = tl.constexpr(128)  # weight block and activation group of the GEMMs (also their BLOCK_K)
# Rows per program of quant_rows and the largest grid dimension Triton launches.
QUANT_ROWS = 32
MAX_GRID = 65535

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ---------------------------------------------------------------------------------------------
# 1 x GROUP quantization
# ---------------------------------------------------------------------------------------------


@triton.jit
def _quantize(x):
    """``x [R, G]`` float32 -> (e4m3 ``[R, G]``, float32 scale ``[R]``), one group per row."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
    scale = tl.math.div_rn(amax, FP8_MAX)
    q = tl.clamp(x * tl.math.div_rn(FP8_MAX, amax)[:, None], -FP8_MAX, FP8_MAX)
    return q.to(tl.float8e4nv), scale


@triton.jit(do_not_specialize=["rows", "rows_out", "m_programs"])
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, count_ptr, rows, rows_out, m_programs, K,
    stride_xe, stride_xm, stride_qe, stride_qm, stride_se, stride_sm, stride_sg,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, HAS_COUNT: tl.constexpr,
):  # fmt: skip
    """Program (group g, expert e, first row block): row blocks first, first + m_programs, ... of
    expert e. Rows at or past ``rows`` (or the expert's count) read as zeros; rows below
    ``rows_out`` are written (padding rows: zeros with the scale of an all-zero group)."""
    g = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    cols = g * GROUP + tl.arange(0, GROUP)
    col_ok = cols < K
    if HAS_COUNT:
        live = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows)
        end = live
    else:
        live = rows
        end = rows_out
    x_e = x_ptr + expert * stride_xe
    q_e = q_ptr + expert * stride_qe
    s_e = s_ptr + expert * stride_se + g * stride_sg
    for rb in range(tl.program_id(2), tl.cdiv(end, BLOCK_R), m_programs):
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r64 = r.to(tl.int64)
        x = tl.load(
            x_e + r64[:, None] * stride_xm + cols[None, :],
            mask=(r < live)[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        q, scale = _quantize(x)
        tl.store(q_e + r64[:, None] * stride_qm + cols[None, :], q, mask=(r < end)[:, None] & col_ok[None, :])
        tl.store(s_e + r64 * stride_sm, scale, mask=r < end)


def quant_rows(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    *,
    count: torch.Tensor | None = None,
    expected_m: int | None = None,
) -> None:
    """Quantizes ``x [E, N, K]`` (last dim contiguous) into ``q [E, N_out, K]`` e4m3 and ``scale
    [E, N_out, ceil(K/group)]`` float32 (any strides; N_out >= N, rows past N written as zeros).

    ``count [E]`` (int32/int64, device): only rows below each count are read and written (N_out
    must be N); ``expected_m`` then sizes the programs per expert as in the masked GEMMs.
    ``group`` must be a power of two >= 16.
    """
    num_experts, rows, k = x.shape
    rows_out = q.shape[1]
    if num_experts == 0 or rows_out == 0 or k == 0:
        return
    if count is None:
        m_programs = min(triton.cdiv(rows_out, QUANT_ROWS), MAX_GRID)
    else:
        m_programs = masked_programs(rows, rows if expected_m is None else expected_m, QUANT_ROWS)
    _quant_rows_kernel[(triton.cdiv(k, group), num_experts, m_programs)](
        x, q, scale, count, rows, rows_out, m_programs, k,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        GROUP=group, BLOCK_R=QUANT_ROWS, HAS_COUNT=count is not None, num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Grouped GEMM tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scaled_dot(acc, a, b, a_s, b_s, SWAP: tl.constexpr):
    """``acc + (a . b) * a_s[:, None] * b_s`` for e4m3 ``a [BM, 128]``, ``b [128, BN]``, float32 row
    scales ``a_s [BM]`` and one weight block scale ``b_s``. With SWAP the accumulator is transposed
    (``[BN, BM]``, computed as ``b^T . a^T``): the weight tile is the MMA's M side, so a tile with
    fewer than 64 rows still runs on wgmma with B from shared memory instead of mma.sync."""
    if SWAP:
        return acc + tl.dot(tl.trans(b), tl.trans(a)) * (a_s[None, :] * b_s)
    else:
        return acc + tl.dot(a, b) * (a_s[:, None] * b_s)


@triton.jit
def _gate_up_tile(
    a_rows, as_rows, stride_asg, a_ok, w, ws_ptr, expert, pid_n, N, K, stride_wn, stride_wse, stride_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W_TMA: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    """silu(a . gate) * (a . up) in float32 ``[BLOCK_M, BLOCK_N]`` for rows ``a_rows`` (pointers to
    each e4m3 row; rows with ``a_ok`` false read as zeros), their scales ``as_rows`` (pointers to each
    row's first group scale, groups ``stride_asg`` apart) and columns pid_n*BLOCK_N.. of the intermediate
    (N = I columns; BLOCK_N divides 128, so a tile lies in one weight block and never wraps).

    ``w``: the e4m3 weight as ``[E * 2N, K]`` rows (pointer, or tensor descriptor with W_TMA);
    ``ws_ptr``: its block scales ``[E, 2N/128, K/128]`` (expert stride, row-block stride, contiguous
    along K)."""
    offs_k = tl.arange(0, SCALE_BLOCK)
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    gate_row = expert * 2 * N + pid_n * BLOCK_N
    gs_ptr = ws_ptr + expert.to(tl.int64) * stride_wse + (pid_n * BLOCK_N // SCALE_BLOCK) * stride_wsn
    us_ptr = gs_ptr + (N // SCALE_BLOCK) * stride_wsn
    if SWAP:
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if not W_TMA:
        g_ptrs = w + (gate_row + tl.arange(0, BLOCK_N))[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    for k in range(0, K // SCALE_BLOCK):
        a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
        a_s = tl.load(as_rows + k * stride_asg, mask=a_ok, other=0.0)
        if W_TMA:
            g = w.load([gate_row, k * SCALE_BLOCK]).T
            u = w.load([gate_row + N, k * SCALE_BLOCK]).T
        else:
            g = tl.load(g_ptrs + k * SCALE_BLOCK)
            u = tl.load(g_ptrs + k * SCALE_BLOCK + N * stride_wn)
        acc_g = _scaled_dot(acc_g, a, g, a_s, tl.load(gs_ptr + k), SWAP)
        acc_u = _scaled_dot(acc_u, a, u, a_s, tl.load(us_ptr + k), SWAP)
        a_ptrs += SCALE_BLOCK
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    if SWAP:
        h = tl.trans(h)
    return h


@triton.jit
def _down_tile(
    a_rows, as_rows, stride_asg, a_ok, w, ws_ptr, expert, pid_n, N, K, stride_wn, stride_wse, stride_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W_TMA: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    """a . w in float32 ``[BLOCK_M, BLOCK_N]`` for rows ``a_rows`` / scales ``as_rows`` (as in
    ``_gate_up_tile``) and columns pid_n*BLOCK_N.. of expert ``expert``; ``w`` is the weight as
    ``[E * N, K]`` rows, ``ws_ptr`` its block scales ``[E, N/128, K/128]``."""
    offs_k = tl.arange(0, SCALE_BLOCK)
    a_ptrs = a_rows[:, None] + offs_k[None, :]
    row = expert * N + pid_n * BLOCK_N
    bs_ptr = ws_ptr + expert.to(tl.int64) * stride_wse + (pid_n * BLOCK_N // SCALE_BLOCK) * stride_wsn
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if not W_TMA:
        b_ptrs = w + (row + tl.arange(0, BLOCK_N))[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    for k in range(0, K // SCALE_BLOCK):
        a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
        a_s = tl.load(as_rows + k * stride_asg, mask=a_ok, other=0.0)
        if W_TMA:
            b = w.load([row, k * SCALE_BLOCK]).T
        else:
            b = tl.load(b_ptrs + k * SCALE_BLOCK)
        acc = _scaled_dot(acc, a, b, a_s, tl.load(bs_ptr + k), SWAP)
        a_ptrs += SCALE_BLOCK
    if SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _store_h(
    h_rows, hs_rows, row_ok, h, pid_n, N,
    BLOCK_N: tl.constexpr, FUSE_QUANT: tl.constexpr, ACT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Writes the activated intermediate of one tile, rounded to ACT_DTYPE: with FUSE_QUANT (the
    tile is one 128-column group) as e4m3 at ``h_rows`` plus its scale at ``hs_rows + pid_n``;
    otherwise in ACT_DTYPE at ``h_rows`` (``hs_rows`` unused)."""
    h = h.to(ACT_DTYPE)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if FUSE_QUANT:
        q, scale = _quantize(h.to(tl.float32))
        tl.store(h_rows[:, None] + cols[None, :], q, mask=row_ok[:, None])
        tl.store(hs_rows + pid_n, scale, mask=row_ok)
    else:
        tl.store(h_rows[:, None] + cols[None, :], h, mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit
def _store_tile(out_rows, row_ok, tile, pid_n, N, BLOCK_N: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(
        out_rows[:, None] + cols[None, :],
        tile.to(out_rows.dtype.element_ty),
        mask=row_ok[:, None] & (cols[None, :] < N),
    )


# ---------------------------------------------------------------------------------------------
# Sorted layout
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_pairs", "top_k", "num_m_blocks"])
def _gate_up_sorted_kernel(
    x_ptr, xs_ptr, w, ws_ptr, h_ptr, hs_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, top_k, num_m_blocks, N, K,
    stride_xm, stride_xsm, stride_wn, stride_wse, stride_wsn, stride_hm, stride_hsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, FUSE_QUANT: tl.constexpr,
    ACT_DTYPE: tl.constexpr, W_TMA: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    """``h[slot] = silu(x[pair // top_k] . gate) * (x[...] . up)`` for the slots of one row block
    (padding slots of a live block are written as zeros)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    tokens = (pairs // top_k).to(tl.int64)
    h = _gate_up_tile(
        x_ptr + tokens * stride_xm, xs_ptr + tokens * stride_xsm, 1, pairs < num_pairs, w, ws_ptr, expert,
        pid_n, N, K, stride_wn, stride_wse, stride_wsn, BLOCK_M, BLOCK_N, W_TMA, SWAP_AB,
    )  # fmt: skip
    slots64 = slots.to(tl.int64)
    _store_h(
        h_ptr + slots64 * stride_hm, hs_ptr + slots64 * stride_hsm, slots >= 0, h, pid_n, N,
        BLOCK_N, FUSE_QUANT, ACT_DTYPE,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_pairs", "num_m_blocks"])
def _down_sorted_kernel(
    h_ptr, hs_ptr, w, ws_ptr, y_ptr, sorted_pairs_ptr, block_expert_ptr, route_w_ptr,
    num_pairs, num_m_blocks, N, K,
    stride_hm, stride_hsm, stride_wn, stride_wse, stride_wsn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, W_TMA: tl.constexpr,
    SWAP_AB: tl.constexpr,
):  # fmt: skip
    """``y[pair] = route_w[pair] * (h[slot] . down)`` for one row block."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + slots)
    live = pairs < num_pairs
    slots64 = slots.to(tl.int64)
    acc = _down_tile(
        h_ptr + slots64 * stride_hm, hs_ptr + slots64 * stride_hsm, 1, live, w, ws_ptr, expert, pid_n, N, K,
        stride_wn, stride_wse, stride_wsn, BLOCK_M, BLOCK_N, W_TMA, SWAP_AB,
    )  # fmt: skip
    acc *= tl.load(route_w_ptr + pairs, mask=live, other=0.0)[:, None]
    _store_tile(y_ptr + pairs.to(tl.int64) * stride_ym, live, acc, pid_n, N, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Masked layout (and, with HAS_COUNT false and one expert, a plain GEMM)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["rows_per_expert", "m_programs"])
def _gate_up_masked_kernel(
    x_ptr, xs_ptr, w, ws_ptr, h_ptr, hs_ptr, count_ptr, num_experts, rows_per_expert, m_programs, N, K,
    stride_xe, stride_xm, stride_xse, stride_xsm, stride_xsg, stride_wn, stride_wse, stride_wsn,
    stride_he, stride_hm, stride_hse, stride_hsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FUSE_QUANT: tl.constexpr, ACT_DTYPE: tl.constexpr,
    W_TMA: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    """Row blocks first_block, first_block + m_programs, ... of one expert, up to its count."""
    pid_n, expert, first_block = _masked_program(tl.program_id(0), N, num_experts, BLOCK_N)
    count = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows_per_expert)
    e64 = expert.to(tl.int64)
    for mb in range(first_block, tl.cdiv(count, BLOCK_M), m_programs):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < count
        r64 = rows.to(tl.int64)
        x_rows = x_ptr + e64 * stride_xe + r64 * stride_xm
        xs_rows = xs_ptr + e64 * stride_xse + r64 * stride_xsm
        h = _gate_up_tile(
            x_rows, xs_rows, stride_xsg, live, w, ws_ptr, expert, pid_n, N, K, stride_wn, stride_wse, stride_wsn,
            BLOCK_M, BLOCK_N, W_TMA, SWAP_AB,
        )  # fmt: skip
        _store_h(
            h_ptr + e64 * stride_he + r64 * stride_hm, hs_ptr + e64 * stride_hse + r64 * stride_hsm, live,
            h, pid_n, N, BLOCK_N, FUSE_QUANT, ACT_DTYPE,
        )  # fmt: skip


@triton.jit(do_not_specialize=["rows_per_expert", "m_programs"])
def _down_masked_kernel(
    h_ptr, hs_ptr, w, ws_ptr, out_ptr, count_ptr, num_experts, rows_per_expert, m_programs, N, K,
    stride_he, stride_hm, stride_hse, stride_hsm, stride_wn, stride_wse, stride_wsn, stride_oe, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COUNT: tl.constexpr, W_TMA: tl.constexpr,
    SWAP_AB: tl.constexpr,
):  # fmt: skip
    """``out[e, row] = h[e, row] . w_e`` for rows below the expert's count (all rows without
    HAS_COUNT: the dense GEMM of ``block_fp8_linear``'s Triton path, one expert)."""
    pid_n, expert, first_block = _masked_program(tl.program_id(0), N, num_experts, BLOCK_N)
    if HAS_COUNT:
        count = tl.minimum(tl.load(count_ptr + expert).to(tl.int32), rows_per_expert)
    else:
        count = rows_per_expert
    e64 = expert.to(tl.int64)
    for mb in range(first_block, tl.cdiv(count, BLOCK_M), m_programs):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < count
        r64 = rows.to(tl.int64)
        acc = _down_tile(
            h_ptr + e64 * stride_he + r64 * stride_hm, hs_ptr + e64 * stride_hse + r64 * stride_hsm, 1, live,
            w, ws_ptr, expert, pid_n, N, K, stride_wn, stride_wse, stride_wsn, BLOCK_M, BLOCK_N, W_TMA, SWAP_AB,
        )  # fmt: skip
        _store_tile(out_ptr + e64 * stride_oe + r64 * stride_om, live, acc, pid_n, N, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def swaps_ab(cfg: GemmConfig, block_m: int) -> bool:
    """Whether the tiles run transposed (weights on the MMA's M side): row tiles under 64 rows with
    column tiles of at least 64, so that the MMA is wgmma (M >= 64 per warpgroup) instead of
    mma.sync, which on SM90 converts e4m3 to f16 in registers."""
    return block_m < 64 <= cfg.block_n


def _options(cfg: GemmConfig, block_m: int) -> dict:
    if cfg.block_k != 128 or cfg.block_n not in (16, 32, 64, 128):
        raise ValueError(
            f"block-FP8 GEMMs step K by one 128-column scale group and keep a column tile inside one "
            f"128-row weight block: block_k must be 128 and block_n 16/32/64/128, got {cfg}"
        )
    return dict(
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, W_TMA=cfg.tma, SWAP_AB=swaps_ab(cfg, block_m),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def fuses_quant(cfg: GemmConfig) -> bool:
    """Whether the gate/up epilogue re-quantizes h itself (its column tile is one 128-column group)."""
    return cfg.block_n == 128


def _h_buffers(shape: tuple[int, ...], cfg: GemmConfig, act_dtype: torch.dtype, device: torch.device):
    """(h written by gate/up, its scales or None, e4m3 h for down, its scales) for ``shape [..., I]``."""
    groups = shape[-1] // 128
    hq = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    hs = torch.empty(*shape[:-1], groups, dtype=torch.float32, device=device)
    if fuses_quant(cfg):
        return hq, hs, hq, hs
    return torch.empty(shape, dtype=act_dtype, device=device), None, hq, hs


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoeConfig,
    out: torch.Tensor,
) -> torch.Tensor:
    """Sorted-layout block-FP8 MoE into ``out [T, H]`` (x's dtype); inputs validated and contiguous.

    Launches: quant x, moe_align (1 or 3), gate/up (+ quant h unless fused), down, sum over K.
    Temporaries: x e4m3 ``[T, H]`` + scales, h e4m3 ``[~T*K + E*block_m, I]`` + scales (and h in x's
    dtype when not fused), y ``[T*K, H]`` in x's dtype; freed on return.
    """
    num_tokens, top_k = topk_ids.shape
    if num_tokens * top_k == 0:
        return out.zero_()
    num_experts, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    bm, gu, dn = config.block_m, config.gate_up, config.down
    xq = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    xs = torch.empty(num_tokens, hidden // 128, dtype=torch.float32, device=x.device)
    quant_rows(x[None], xq[None], xs[None], 128)
    sorted_pairs, block_expert = moe_align(topk_ids, num_experts, bm)
    num_m_blocks = block_expert.numel()
    h, h_s, hq, hs = _h_buffers((num_m_blocks * bm, inter), gu, x.dtype, x.device)
    _gate_up_sorted_kernel[(num_m_blocks * triton.cdiv(inter, gu.block_n),)](
        xq, xs, _weight(w13, gu), w13_scale, h, h_s if h_s is not None else hs, sorted_pairs, block_expert,
        num_tokens * top_k, top_k, num_m_blocks, inter, hidden,
        xq.stride(0), xs.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
        h.stride(0), hs.stride(0),
        GROUP=GROUP_M, FUSE_QUANT=fuses_quant(gu), ACT_DTYPE=_TL_DTYPE[x.dtype], **_options(gu, bm),
    )  # fmt: skip
    if not fuses_quant(gu):
        quant_rows(h[None], hq[None], hs[None], 128)
    y = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _down_sorted_kernel[(num_m_blocks * triton.cdiv(hidden, dn.block_n),)](
        hq, hs, _weight(w2, dn), w2_scale, y, sorted_pairs, block_expert, topk_weights,
        num_tokens * top_k, num_m_blocks, hidden, inter,
        hq.stride(0), hs.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1), y.stride(0),
        GROUP=GROUP_M, **_options(dn, bm),
    )  # fmt: skip
    sum_topk(y, topk_ids, num_experts, out)
    return out


def masked_moe(
    xq: torch.Tensor,
    xs: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    config: MoeConfig,
    expected_m: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Masked-layout block-FP8 MoE from quantized rows ``xq [E, N, H]`` e4m3 with scales ``xs [E, N,
    H/128]`` (any strides) into ``out [E, N, H]`` (rows past each count are not written).

    Launches: gate/up (+ quant h unless fused), down. Temporaries: h e4m3 ``[E, N, I]`` + scales (and
    h in out's dtype when not fused); freed on return.
    """
    num_experts, rows, hidden = xq.shape
    if rows == 0:
        return out
    inter = w13.shape[1] // 2
    bm, gu, dn = config.block_m, config.gate_up, config.down
    m_programs = masked_programs(rows, expected_m, bm)
    h, h_s, hq, hs = _h_buffers((num_experts, rows, inter), gu, out.dtype, out.device)
    h_s = h_s if h_s is not None else hs
    _gate_up_masked_kernel[(m_programs * num_experts * triton.cdiv(inter, gu.block_n),)](
        xq, xs, _weight(w13, gu), w13_scale, h, h_s, recv_count, num_experts, rows, m_programs, inter, hidden,
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), xs.stride(2), w13.stride(1), w13_scale.stride(0),
        w13_scale.stride(1), h.stride(0), h.stride(1), h_s.stride(0), h_s.stride(1),
        FUSE_QUANT=fuses_quant(gu), ACT_DTYPE=_TL_DTYPE[out.dtype], **_options(gu, bm),
    )  # fmt: skip
    if not fuses_quant(gu):
        quant_rows(h, hq, hs, 128, count=recv_count, expected_m=expected_m)
    _down_masked_kernel[(m_programs * num_experts * triton.cdiv(hidden, dn.block_n),)](
        hq, hs, _weight(w2, dn), w2_scale, out, recv_count, num_experts, rows, m_programs, hidden, inter,
        hq.stride(0), hq.stride(1), hs.stride(0), hs.stride(1), w2.stride(1), w2_scale.stride(0),
        w2_scale.stride(1), out.stride(0), out.stride(1),
        HAS_COUNT=True, **_options(dn, bm),
    )  # fmt: skip
    return out


def linear(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    cfg: GemmConfig,
    block_m: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out [M, N] = (xq [M, K] e4m3 * xs [M, K/128]) . (w [N, K] e4m3 * w_scale [N/128, K/128])^T``
    (xs and w_scale contiguous): the masked down kernel with one expert and every row live."""
    rows, k = xq.shape
    n = w.shape[0]
    if rows == 0:
        return out
    m_programs = triton.cdiv(rows, block_m)
    _down_masked_kernel[(m_programs * triton.cdiv(n, cfg.block_n),)](
        xq, xs, _weight(w[None], cfg), w_scale, out, None, 1, rows, m_programs, n, k,
        0, xq.stride(0), 0, xs.stride(0), w.stride(0), 0, w_scale.stride(0), 0, out.stride(0),
        HAS_COUNT=False, **_options(cfg, block_m),
    )  # fmt: skip
    return out
