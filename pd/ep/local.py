"""``local``: the EP backend for an EP group of one rank (every expert is local).

No communication. Normal mode is the identity routing; low-latency mode builds the masked
layout on the device with scatter (no host sync, CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd.ep.base import EPBackend, EPConfig, LLDispatch, NormalDispatch
from pd.ep.fp8 import quant_rows
from pd.ep.layout import MaskedRows, expert_slots, weighted_gather_sum
from pd.kernels.expert_counts import count_and_mask


@dataclass(frozen=True)
class _LLHandle:
    valid: torch.Tensor  # [T, K] bool: slot names an expert
    slot: torch.Tensor  # [T, K] int64 flat row in the masked layout (dump row where not valid)


class LocalEP(EPBackend):
    """EP over one rank. ``ll_dispatch`` output ``recv_x`` (and with ``ll_fp8`` ``recv_scale``) is
    a persistent buffer ``[E, M, H]`` (``[E, M, H / 128]``) allocated at construction and
    overwritten by every ``ll_dispatch``. With ``ll_fp8`` the rows are ``quant_rows(x)`` exactly.

    Normal mode delivers every token (``recv_x`` is ``x`` itself, not a copy), also tokens whose
    slots are all -1; their expert output must be 0, as for any row without a local expert.
    """

    name = "local"

    def __init__(self, config: EPConfig, group: dist.ProcessGroup | None = None) -> None:
        if config.world_size != 1:
            raise ValueError(f"the local EP backend serves world_size=1, got {config.world_size}")
        super().__init__(config, group)
        self._ll = MaskedRows(config, config.num_experts, config.max_tokens_per_rank)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> NormalDispatch:
        # Shapes only: the value check would sync with the device, and this path runs in decode graphs.
        self._check_routing(x, topk_idx, topk_weights)
        # No host sync (this path runs inside decode CUDA graphs); one launch on CUDA.
        counts, weights = count_and_mask(topk_idx, topk_weights, self.config.num_experts)
        return NormalDispatch(
            recv_x=x, recv_topk_idx=topk_idx, recv_topk_weights=weights, recv_counts=counts, handle=None
        )

    def combine(self, y: torch.Tensor, handle: object) -> torch.Tensor:
        return y

    def ll_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> LLDispatch:
        self._check_ll(x, topk_idx)
        cfg = self.config
        valid, slot, count = expert_slots(topk_idx, cfg.num_experts, cfg.max_tokens_per_rank)
        if cfg.ll_fp8:
            self._ll.put(slot, *quant_rows(x))
        else:
            self._ll.put(slot, x)
        return LLDispatch(self._ll.recv_x, count, _LLHandle(valid, slot), self._ll.recv_scale)

    def ll_combine(
        self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: object
    ) -> torch.Tensor:
        self._check_ll_combine(y, topk_idx, topk_weights)
        assert isinstance(handle, _LLHandle)
        out = weighted_gather_sum(y.view(-1, self.config.hidden), handle.slot, handle.valid, topk_weights)
        return out.to(self.config.dtype)
