"""Triton kernels of ``pd.kernels.mla_decode``: split-KV absorbed MLA decode over a paged latent cache.

Pass 1 (grid: row x split x head block): one program walks its split of a row's cache positions in blocks of
``BLOCK_N``, gathering each position's latent row ``[c_kv | k_pe]`` through the page table, and keeps an online
softmax for ``BLOCK_H`` heads: scores ``q_c . c_kv + q_r . k_pe`` (float32 accumulation), probabilities rounded to
the cache dtype for the value product (values are ``c_kv``), running max and sum in float32. It writes its
normalised partial output and its log-sum-exp (base 2); a split past the row's end writes only a log-sum-exp of
-inf. Pass 2 (grid: row x head) weighs the live splits by their log-sum-exps, in split order.

A row's splits depend on its own length alone: ``max(CHUNK, cdiv(len, MAX_SPLITS) rounded up to a block)``
positions each. So a row's result does not depend on the batch, the bucket or the grid (the grid's split count
only bounds which programs exist): eager and graph steps agree bit for bit. Graph-safe: no host reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_split(
    qc_ptr, qr_ptr, cache_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr, num_heads, scale_log2,
    stride_qc_b, stride_qc_h, stride_qr_b, stride_qr_h, stride_page, stride_slot, stride_table,
    stride_o_b, stride_o_s, stride_o_h, stride_lse_b, stride_lse_s,
    PAGE_SIZE: tl.constexpr, C: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr, MAX_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    kv_len = tl.load(lens_ptr + b)
    chunk = tl.maximum(CHUNK, tl.cdiv(tl.cdiv(kv_len, MAX_SPLITS), BLOCK_N) * BLOCK_N)
    lo = s * chunk
    hi = tl.minimum(kv_len, lo + chunk)
    lse_at = lse_ptr + b * stride_lse_b + s * stride_lse_s + heads
    if lo >= hi:  # past the row's end: no output, weight 0
        tl.store(lse_at, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=h_ok)
        return
    offs_c = tl.arange(0, C)
    offs_r = tl.arange(0, R)
    q_c = tl.load(qc_ptr + b * stride_qc_b + heads[:, None] * stride_qc_h + offs_c[None, :], mask=h_ok[:, None],
                  other=0.0)  # fmt: skip
    q_r = tl.load(qr_ptr + b * stride_qr_b + heads[:, None] * stride_qr_h + offs_r[None, :], mask=h_ok[:, None],
                  other=0.0)  # fmt: skip
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, C], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < hi
        page = tl.load(table_ptr + b * stride_table + pos // PAGE_SIZE, mask=ok, other=0)
        row = cache_ptr + page.to(tl.int64) * stride_page + (pos % PAGE_SIZE) * stride_slot
        k_c = tl.load(row[:, None] + offs_c[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, C]
        k_r = tl.load(row[:, None] + C + offs_r[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, R]
        qk = tl.dot(q_c, tl.trans(k_c)) + tl.dot(q_r, tl.trans(k_r))  # [BLOCK_H, BLOCK_N] float32
        qk = tl.where(ok[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c)
        m = m_new
    tl.store(o_ptr + b * stride_o_b + s * stride_o_s + heads[:, None] * stride_o_h + offs_c[None, :],
             acc / total[:, None], mask=h_ok[:, None])  # fmt: skip
    tl.store(lse_at, m + tl.log2(total), mask=h_ok)


@triton.jit
def _mla_decode_merge(
    o_ptr, lse_ptr, out_ptr, num_splits, stride_o_b, stride_o_s, stride_o_h, stride_lse_b, stride_lse_s,
    stride_out_b, stride_out_h, C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    top = tl.load(lse_ptr + b * stride_lse_b + h)  # split 0 always holds positions (a row sees >= 1)
    for s in range(1, num_splits):
        top = tl.maximum(top, tl.load(lse_ptr + b * stride_lse_b + s * stride_lse_s + h))
    offs_c = tl.arange(0, C)
    acc = tl.zeros([C], tl.float32)
    weight = 0.0
    for s in range(0, num_splits):
        lse = tl.load(lse_ptr + b * stride_lse_b + s * stride_lse_s + h)
        if lse > float("-inf"):  # splits past the row's end wrote no output
            w = tl.exp2(lse - top)
            acc += w * tl.load(o_ptr + b * stride_o_b + s * stride_o_s + h * stride_o_h + offs_c)
            weight += w
    tl.store(
        out_ptr + b * stride_out_b + h * stride_out_h + offs_c, (acc / weight).to(out_ptr.dtype.element_ty)
    )


def mla_decode(
    q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
    kv_lens: torch.Tensor, scale: float, splits: int, out: torch.Tensor, chunk: int, max_splits: int,
    block_h: int, block_n: int,
) -> torch.Tensor:  # fmt: skip
    """Launches both passes over ``splits`` programs a row (enough for the longest row); shapes and dtypes checked
    by the caller (``pd.kernels.mla_decode``)."""
    rows, heads, c = q_latent.shape
    r = q_rope.shape[-1]
    o = torch.empty(rows, splits, heads, c, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(rows, splits, heads, dtype=torch.float32, device=q_latent.device)
    _mla_decode_split[(rows, splits, triton.cdiv(heads, block_h))](
        q_latent, q_rope, cache, page_table, kv_lens, o, lse, heads, scale * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(0),
        cache.stride(1), page_table.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        PAGE_SIZE=cache.shape[1], C=c, R=r, CHUNK=chunk, MAX_SPLITS=max_splits, BLOCK_H=block_h, BLOCK_N=block_n,
        num_warps=8, num_stages=2,
    )  # fmt: skip
    _mla_decode_merge[(rows, heads)](
        o, lse, out, splits, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), out.stride(0),
        out.stride(1), C=c, num_warps=4,
    )  # fmt: skip
    return out
