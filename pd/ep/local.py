"""EP = 1: every expert is local; dispatch is the identity."""

from __future__ import annotations

from typing import Any

import torch

from pd.ep.base import EPBackend, NormalDispatch


class LocalEP(EPBackend):
    def __init__(self, num_experts: int) -> None:
        self.rank, self.world_size, self.num_experts = 0, 1, num_experts

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> NormalDispatch:
        return NormalDispatch(x, topk_idx, topk_weights, [], None)

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return y
