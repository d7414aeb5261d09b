"""A one-rank (``local``) normal dispatch's bookkeeping in one launch: pairs per expert and masked weights.

With every expert on the rank, a normal-mode dispatch hands the tokens over as they are; what it computes is
``recv_counts`` (the pairs each expert receives: the metrics' expert load) and the routing weights with 0
where a pair names no expert (-1: a padding row, or a pair that routes nowhere). In torch that is six launches
a MoE layer (the validity mask, a zero fill, a clamp, a cast, a scatter-add and a select); ``count_and_mask``
is one on CUDA when Triton is there, and ``count_and_mask_ref`` (those six) elsewhere. Both are exact: counts
are integers, weights are selected, not computed.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from pd.kernels.moe import HAS_TRITON


@functools.cache
def _triton_ops() -> ModuleType:
    from pd.kernels import expert_counts_triton

    return expert_counts_triton


def count_and_mask_ref(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_idx [T, K]`` int (-1: no expert; ids are < ``num_experts``), ``topk_weights [T, K]`` float ->
    ``(counts [num_experts] int64, weights [T, K]`` float32 with 0 where ``topk_idx`` is -1). No host sync."""
    valid = topk_idx >= 0
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    counts.scatter_add_(0, topk_idx.clamp(min=0).flatten().long(), valid.flatten().long())
    return counts, torch.where(valid, topk_weights.float(), 0.0)


def count_and_mask(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, *, triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count_and_mask_ref`` in one Triton program (on CUDA with Triton; ``triton=True`` forces it, e.g. in the
    interpreter, ``False`` the reference). Fresh outputs; graph-safe (the grid is one program)."""
    if triton is None:
        triton = HAS_TRITON and topk_idx.is_cuda
    if not triton:
        return count_and_mask_ref(topk_idx, topk_weights, num_experts)
    if topk_idx.shape != topk_weights.shape or topk_idx.dim() != 2:
        raise ValueError(
            f"topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)}: [T, K] both"
        )
    counts = torch.empty(num_experts, dtype=torch.int64, device=topk_idx.device)
    weights = torch.empty(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
    _triton_ops().count_and_mask(topk_idx.contiguous(), topk_weights.contiguous(), counts, weights)
    return counts, weights
