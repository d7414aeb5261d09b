"""Per-head GEMMs of few rows: MLA's absorbed ``kv_b_proj`` factors at decode, ``[T, H, K] x [H, N, K] -> [T, H, N]``.

torch computes these as two einsums, each copying a strided operand to a contiguous one and leaving a permuted
output that the next consumer copies again: small launches that cost ~2.5 us each on an H200 whatever their size,
several per layer. The Triton kernel (``pd.kernels.skinny_triton``) reads the strided operands in place and writes
``[T, H, N]`` contiguous, with float32 accumulation and one rounding (what cuBLAS's bf16 batched GEMM computes, up
to the order of the sum). It is taken on CUDA for 16-bit tensors and at most ``MAX_ROWS`` tokens; elsewhere the
einsum runs (the reference). ``pd.bench.skinny`` measured it against cuBLAS, plain projections included:
for those cuBLAS is as fast or faster from 16 rows on, and at most ~1 us faster below, so they stay on cuBLAS.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pd.kernels.moe import HAS_TRITON

# Measured up to 64 rows (pd.bench.skinny). The kernel computes more (a program walks the rows in blocks of up to
# 64; tested at 128 on CUDA), untimed there: 128-row decode steps stay on the einsums.
MAX_ROWS = 64
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _triton_ops() -> ModuleType:
    from pd.kernels import skinny_triton

    return skinny_triton


def config(n: int, k: int, rows: int) -> tuple[int, int, int, int]:
    """``(block_n, block_k, num_warps, num_stages)`` for ``[rows, k] x [n, k]^T`` products: the best of the sweep
    on an H200 (``pd.bench.skinny --sweep``, 2026-12-04) for MLA's two factors, 64 weight rows a program for the
    wide one (N 512, K 128), 16 for the narrow one (N 128, K 512), whose K steps shorten as the rows grow."""
    k_pow2 = max(16, 1 << (k - 1).bit_length())  # a tile's K extent is a power of two
    if n >= 512:
        return 64, min(k_pow2, 128), 4, 3
    return 16, min(k_pow2, 256 if rows <= 16 else 128), 4, 4


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``head_mm(x, w)`` runs: CUDA, 16-bit ``x [T, H, K]`` (unit stride on K) and ``w`` of its dtype,
    ``T <= MAX_ROWS``."""
    return (
        HAS_TRITON
        and x.is_cuda
        and x.dtype in _HALF
        and w.dtype == x.dtype
        and x.shape[0] <= MAX_ROWS
        and x.stride(-1) == 1
    )


def head_mm(x: torch.Tensor, w: torch.Tensor, *, triton: bool | None = None) -> torch.Tensor:
    """Per head ``h``: ``x[:, h] [T, K] @ w[h] [N, K]^T`` -> ``[T, H, N]``; ``w [H, N, K]`` in any strides. The
    Triton kernel (contiguous output) where ``usable(x, w)``; ``triton=True`` forces it (tests: more rows, the
    interpreter), ``False`` the einsum reference."""
    if not (usable(x, w) if triton is None else triton):
        return torch.einsum("thk,hnk->thn", x, w)
    out = torch.empty(x.shape[0], x.shape[1], w.shape[1], dtype=x.dtype, device=x.device)
    cfg = config(w.shape[1], w.shape[2], x.shape[0])
    _triton_ops().skinny_bmm(x.transpose(0, 1), w, out.transpose(0, 1), *cfg)
    return out
