"""Expert-parallel communication interface (minimal; the full contracts land with the EP work)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NormalDispatch:
    recv_x: torch.Tensor  # [N, H]
    recv_topk_idx: torch.Tensor  # [N, K] int64 local expert ids or -1
    recv_topk_weights: torch.Tensor  # [N, K] float32
    num_recv_per_expert: list[int]
    handle: Any


class EPBackend(ABC):
    rank: int
    world_size: int
    num_experts: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> NormalDispatch: ...

    @abstractmethod
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor: ...
