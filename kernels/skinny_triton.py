"""Triton kernel of ``pd.kernels.skinny``: ``out[b] = x[b] @ w[b]^T`` for few rows (decode), ``b`` a batch of
independent weights (one for a plain projection, the heads for MLA's absorbed ``kv_b_proj`` factors).

A decode step's dense projections multiply a handful of rows by a weight read once: the step costs the weight's
bytes. cuBLAS tiles these GEMMs 64 weight rows wide (nvjet ``64x8``): on an H200 a 2048 x 2048 projection then
runs on 32 of 132 SMs and costs ~6-7 us for a ~2 us read. Here the weight is the MMA's M side (operands
swapped), each program owns ``BLOCK_N`` weight rows for every row of ``x`` (few), so the grid is
``cdiv(N, BLOCK_N)`` programs per batch entry streaming the weight once, with float32 accumulation in K order and
one rounding: deterministic, and a row's result does not depend on the other rows. Graph-safe (grid fixed by
shapes, no host reads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K,
    stride_xb, stride_xm, stride_wb, stride_wn, stride_wk, stride_ob, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_BLOCKS: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """Program (n, b): ``out[b, :, n*BLOCK_N:(n+1)*BLOCK_N]`` for all M rows (``M_BLOCKS`` blocks of ``BLOCK_M``)."""
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_first = w_ptr + b * stride_wb + (cols % N)[:, None].to(tl.int64) * stride_wn  # wrap, never masked
    for mb in tl.static_range(M_BLOCKS):
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x_ptrs = x_ptr + b * stride_xb + rows[None, :].to(tl.int64) * stride_xm + offs_k[:, None]  # x^T tile
        w_ptrs = w_first + offs_k[None, :] * stride_wk
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(w, x, acc)
            w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K
        out = out_ptr + b * stride_ob + rows[None, :].to(tl.int64) * stride_om + cols[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (cols[:, None] < N))


def skinny_bmm(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """``out [B, M, N] = x [B, M, K] @ w [B, N, K]^T`` (any strides but unit ones on x's and out's last dims,
    checked by the caller)."""
    nb, m, k = x.shape
    n = w.shape[1]
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    _skinny_kernel[(triton.cdiv(n, block_n), nb)](
        x, w, out, m, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, M_BLOCKS=triton.cdiv(m, block_m),
        EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
