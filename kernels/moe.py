"""Routed-expert compute of the DeepSeek-V3 MoE: ``expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))``.

Weights (the model's layout): ``w13 [E, 2I, H]`` (rows 0..I-1 gate_proj, rows I..2I-1 up_proj) and
``w2 [E, H, I]`` (down_proj), contiguous, in the activations' dtype (bf16 on GPU; float32 works).

Each op has a torch reference (``*_ref``) and a Triton version; the plain name dispatches: Triton on
CUDA tensors when Triton is importable, the reference otherwise (``backend`` forces one; "triton" on
CPU tensors needs Triton's interpreter, ``TRITON_INTERPRET=1`` set before import). Both compute the
GEMMs with float32 accumulation, round the activated intermediate and each (token, k) output, scaled
by its routing weight, to the activations' dtype, and add a token's K outputs in float32 in k order.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from pd.kernels.moe_config import MoeConfig, fused_config, masked_config

Backend = Literal["auto", "triton", "torch"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_ops() -> ModuleType:
    from pd.kernels import moe_triton

    return moe_triton


def _use_triton(t: torch.Tensor, backend: Backend) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed")
    return backend == "triton" or (backend == "auto" and HAS_TRITON and t.is_cuda)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the references: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I] -> [..., I]``: silu(first half) * second half, in float32, rounded once."""
    gate, up = x.to(_compute_dtype(x.dtype)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``[..., 2I] -> [..., I]``: silu(first half) * second half (float32 math, one rounding)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got shape {tuple(x.shape)}")
    if not _use_triton(x, backend):
        return silu_and_mul_ref(x)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    _triton_ops().silu_and_mul(rows, out)
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_weights(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> None:
    hidden = x.shape[-1]
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden:
        raise ValueError(f"w13 must be [E, 2I, H={hidden}], got {tuple(w13.shape)}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [E={num_experts}, H={hidden}, I={inter}], got {tuple(w2.shape)}")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"{name} is {w.dtype} on {w.device}; activations are {x.dtype} on {x.device}")
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {w.stride()})")


def check_routing(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """``topk_ids [T, K]`` int32/int64 and ``topk_weights [T, K]`` float on x's device, T = x's rows."""
    if (
        topk_ids.dim() != 2
        or topk_ids.shape[0] != x.shape[0]
        or topk_ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"topk_ids must be int32/int64 [T={x.shape[0]}, K], got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_weights must be float {tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if topk_ids.device != x.device or topk_weights.device != x.device:
        raise ValueError(f"topk_ids/topk_weights must be on {x.device}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if (
        tuple(out.shape) != shape
        or out.dtype != like.dtype
        or out.device != like.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def _expert_ref(a: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One expert on rows ``a [n, H]``; returns the down projection in the compute dtype (unrounded)."""
    acc = _compute_dtype(a.dtype)
    gate_up = a.to(acc) @ w13_e.to(acc).t()
    h = silu_and_mul_ref(gate_up).to(a.dtype)  # the intermediate is stored in the activations' dtype
    return h.to(acc) @ w2_e.to(acc).t()


def fused_moe_config(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor
) -> MoeConfig:
    """The block config the Triton :func:`fused_moe` uses for these shapes on x's device."""
    num_tokens, top_k = topk_ids.shape
    return fused_config(
        _device_name(x.device), w13.shape[0], x.shape[-1], w2.shape[2], top_k, num_tokens, x.element_size()
    )


def masked_moe_config(
    recv_x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expected_m: int
) -> MoeConfig:
    """The block config the Triton :func:`masked_moe` uses for these shapes and ``expected_m``."""
    return masked_config(
        _device_name(recv_x.device),
        w13.shape[0],
        recv_x.shape[-1],
        w2.shape[2],
        expected_m,
        recv_x.element_size(),
    )


# ---------------------------------------------------------------------------------------------
# fused_moe: tokens with their top-k expert ids (EP=1, and after the normal EP dispatch)
# ---------------------------------------------------------------------------------------------


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`fused_moe` (loops over the experts present; syncs with the host)."""
    num_tokens, hidden = x.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    acc = _compute_dtype(x.dtype)
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).to(acc)
    y = torch.zeros(num_tokens * top_k, hidden, dtype=acc, device=x.device)
    valid = (ids >= 0) & (ids < num_experts)
    for e in ids[valid].unique().tolist():
        pairs = (ids == e).nonzero().squeeze(1)
        out_e = _expert_ref(x[pairs // top_k], w13[e], w2[e]) * weights[pairs, None]
        y[pairs] = out_e.to(x.dtype).to(acc)  # each pair's output is rounded, as the kernel stores it
    return y.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    backend: Backend = "auto",
    config: MoeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])`` -> ``[T, H]``.

    x: ``[T, H]``; topk_ids: ``[T, K]`` int32/int64 expert ids, pairs with an id < 0 or >= E are
    skipped (a token with none gets zeros); topk_weights: ``[T, K]`` float (used as float32).
    out: optional ``[T, H]`` contiguous buffer to write (every element is written); returned.

    Triton path: no host sync and launch grids fixed by the shapes, so it can be captured in a CUDA
    graph; deterministic (no atomics). Temporary buffers: ``[~T*K + E*block_m, I]`` and ``[T*K, H]``
    in x's dtype, freed on return. ``config`` overrides the tuned/default block config.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    _check_weights(w13, w2, x)
    check_routing(x, topk_ids, topk_weights)
    out = _check_out(out, tuple(x.shape), x)
    if not _use_triton(x, backend):
        out.copy_(fused_moe_ref(x, w13, w2, topk_ids, topk_weights))
        return out
    return _triton_ops().fused_moe(
        x.contiguous(),
        w13,
        w2,
        topk_ids.contiguous(),
        topk_weights.to(torch.float32).contiguous(),
        config or fused_moe_config(x, w13, w2, topk_ids),
        out,
    )


# ---------------------------------------------------------------------------------------------
# masked_moe: the low-latency EP layout
# ---------------------------------------------------------------------------------------------


def masked_moe_ref(
    recv_x: torch.Tensor, recv_count: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`masked_moe`; rows past each count are zeros here (syncs with the host)."""
    out = torch.zeros_like(recv_x)
    rows_per_expert = recv_x.shape[1]
    for e, count in enumerate(recv_count.tolist()):
        n = max(0, min(int(count), rows_per_expert))
        if n:
            out[e, :n] = _expert_ref(recv_x[e, :n], w13[e], w2[e]).to(recv_x.dtype)
    return out


def masked_moe(
    recv_x: torch.Tensor,
    recv_count: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    expected_m: int | None = None,
    backend: Backend = "auto",
    config: MoeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e, r] = expert_e(recv_x[e, r])`` for ``r < recv_count[e]`` -> ``[E, N, H]``.

    recv_x: ``[E, N, H]`` (the low-latency dispatch layout); recv_count: ``[E]`` int32/int64 on the
    same device, read only on the device (counts above N are taken as N). Rows at or past an
    expert's count are NOT written by the Triton path (they keep what ``out`` held; the combine
    never reads them); the torch reference writes zeros there.
    expected_m: typical rows per expert (e.g. ceil(batch * EP size * top_k / total experts)); it
    picks the block config and how many programs share an expert's rows (an expert with more rows
    loops), never the result. Defaults to N (a program per row block). Triton path: no host sync,
    grids fixed by (E, N, expected_m): CUDA-graph safe.
    Temporary buffer: ``[E, N, I]`` in recv_x's dtype, freed on return.
    """
    if recv_x.dim() != 3:
        raise ValueError(f"recv_x must be [E, N, H], got {tuple(recv_x.shape)}")
    _check_weights(w13, w2, recv_x)
    if w13.shape[0] != recv_x.shape[0]:
        raise ValueError(f"recv_x has {recv_x.shape[0]} experts, the weights {w13.shape[0]}")
    if tuple(recv_count.shape) != (recv_x.shape[0],) or recv_count.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"recv_count must be int32/int64 [E={recv_x.shape[0]}], got {recv_count.dtype} {tuple(recv_count.shape)}"
        )
    if recv_count.device != recv_x.device:
        raise ValueError(f"recv_count is on {recv_count.device}, recv_x on {recv_x.device}")
    out = _check_out(out, tuple(recv_x.shape), recv_x)
    if not _use_triton(recv_x, backend):
        ref = masked_moe_ref(recv_x, recv_count, w13, w2)
        if out.numel():
            out.copy_(ref)
        return out
    expected_m = recv_x.shape[1] if expected_m is None else max(1, expected_m)
    return _triton_ops().masked_moe(
        recv_x.contiguous(),
        recv_count.contiguous(),
        w13,
        w2,
        config or masked_moe_config(recv_x, w13, w2, expected_m),
        expected_m,
        out,
    )
