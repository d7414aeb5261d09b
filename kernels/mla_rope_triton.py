"""Triton kernel of ``pd.kernels.mla_rope`` (imported only where Triton is available).

One program per token: it normalises the token's ``c_kv`` and writes it to the latent (and, with
``WRITE_CACHE``, to the token's cache slot), rotates ``k_rope`` after it in both, and rotates the rotary part of
every query head into ``q_out``. The grid is the token count alone: graph-safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_rope_norm_kernel(
    q_ptr,
    kv_ptr,
    pos_ptr,
    cs_ptr,
    w_ptr,
    out_ptr,
    q_out_ptr,
    cache_ptr,
    slots_ptr,
    q_stride_t,
    q_stride_h,
    kv_stride_t,
    out_stride_t,
    cache_stride_page,
    cache_stride_slot,
    page_size,
    eps,
    HEADS: tl.constexpr,
    LORA: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_LORA: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        cache = cache_ptr + (slot // page_size) * cache_stride_page + (slot % page_size) * cache_stride_slot
    # The latent's norm: float32, rounded to the activation dtype before the weight (the reference's order).
    cols = tl.arange(0, BLOCK_LORA)
    live = cols < LORA
    x = tl.load(kv_ptr + t * kv_stride_t + cols, mask=live, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=0) / LORA + eps)
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    y = (x * rrms).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + t * out_stride_t + cols, y.to(dtype), mask=live)
    if WRITE_CACHE:
        tl.store(cache + cols, y.to(dtype), mask=live)

    # The rotation's table row and the channels of each pair.
    i = tl.arange(0, BLOCK_HALF)
    pair = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * (2 * HALF) + i, mask=pair, other=0.0)
    sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + i, mask=pair, other=0.0)
    if INTERLEAVE:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF

    # k_rope (read from kv) into the latent after c_kv.
    k = kv_ptr + t * kv_stride_t + LORA
    a = tl.load(k + first, mask=pair, other=0.0).to(tl.float32)
    b = tl.load(k + second, mask=pair, other=0.0).to(tl.float32)
    k_a, k_b = (a * cos - b * sin).to(dtype), (b * cos + a * sin).to(dtype)
    o = out_ptr + t * out_stride_t + LORA
    tl.store(o + i, k_a, mask=pair)
    tl.store(o + HALF + i, k_b, mask=pair)
    if WRITE_CACHE:
        tl.store(cache + LORA + i, k_a, mask=pair)
        tl.store(cache + LORA + HALF + i, k_b, mask=pair)

    # Every head's q_rope into q_out [T, HEADS, 2 * HALF] (contiguous).
    h = tl.arange(0, BLOCK_H)[:, None]
    m = (h < HEADS) & pair[None, :]
    qh = q_ptr + t * q_stride_t + h * q_stride_h
    qa = tl.load(qh + first[None, :], mask=m, other=0.0).to(tl.float32)
    qb = tl.load(qh + second[None, :], mask=m, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    qo = q_out_ptr + (t * HEADS + h) * (2 * HALF)
    tl.store(qo + i[None, :], (qa * c - qb * s).to(dtype), mask=m)
    tl.store(qo + HALF + i[None, :], (qb * c + qa * s).to(dtype), mask=m)


def mla_rope_norm(
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    interleave: bool,
    out: torch.Tensor,
    q_out: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Launches the kernel (shapes checked by ``pd.kernels.mla_rope.mla_rope_norm``)."""
    t, heads, rope = q_rope.shape
    lora = kv.shape[1] - rope
    half = rope // 2
    pages, slots = (
        cache if cache is not None else (out.view(1, *out.shape), positions)
    )  # unread without a cache
    _mla_rope_norm_kernel[(t,)](
        q_rope, kv, positions, cos_sin, weight, out, q_out, pages, slots,
        q_rope.stride(0), q_rope.stride(1), kv.stride(0), out.stride(0), pages.stride(0), pages.stride(1),
        pages.shape[1], eps,
        HEADS=heads, LORA=lora, HALF=half,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_LORA=triton.next_power_of_2(lora),
        BLOCK_HALF=triton.next_power_of_2(half), INTERLEAVE=interleave, WRITE_CACHE=cache is not None,
        num_warps=4,
    )  # fmt: skip
