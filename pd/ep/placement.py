"""Where routed experts live across EP ranks.

The model routes with GLOBAL expert ids (what the checkpoint numbers). EP backends address
PHYSICAL ids: physical expert ``p`` is local slot ``p % E_local`` of rank ``p // E_local``. A
placement maps one onto the other:

- ``linear``: global ``e`` -> physical ``e`` (rank ``e // E_local``). With grouped routing,
  neighbouring experts are picked together, so a token's experts crowd onto few ranks.
- ``round_robin``: global ``e`` -> rank ``e % W``, slot ``e // W``. Neighbours land on different
  ranks, which spreads each token's experts (and the low-latency traffic) over the ranks.

The maps are small int64 device tensors made once, so translating ``topk_idx`` is one gather with
no host sync (it runs inside decode CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEMENTS = ("linear", "round_robin")


@dataclass(frozen=True)
class ExpertPlacement:
    kind: str
    num_experts: int
    world_size: int

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENTS:
            raise ValueError(f"expert placement must be one of {PLACEMENTS}, got {self.kind!r}")
        if self.world_size < 1 or self.num_experts % self.world_size:
            raise ValueError(f"{self.num_experts} experts do not split evenly over {self.world_size} ranks")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world_size

    def physical(self, expert: int) -> int:
        """Physical id of global expert ``expert``."""
        if self.kind == "linear":
            return expert
        rank, slot = expert % self.world_size, expert // self.world_size
        return rank * self.num_local + slot

    def global_to_physical(self) -> list[int]:
        return [self.physical(e) for e in range(self.num_experts)]

    def physical_to_global(self) -> list[int]:
        inverse = [0] * self.num_experts
        for e, p in enumerate(self.global_to_physical()):
            inverse[p] = e
        return inverse

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts in ``rank``'s local slots 0 .. E_local-1."""
        return self.physical_to_global()[rank * self.num_local : (rank + 1) * self.num_local]


class PlacementMap:
    """The placement as device tensors: translates routing from global to physical ids."""

    def __init__(self, placement: ExpertPlacement, device: torch.device | str) -> None:
        self.placement = placement
        self.identity = placement.kind == "linear"
        self.to_physical_table = torch.tensor(
            placement.global_to_physical(), dtype=torch.int64, device=device
        )  # [E]

    def to_physical(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """``topk_idx [T, K]`` global ids (or -1) -> physical ids (or -1)."""
        if self.identity:
            return topk_idx
        physical = self.to_physical_table[topk_idx.clamp(min=0)]  # [T, K]
        return torch.where(topk_idx >= 0, physical, topk_idx)


def placement_of(pmap: PlacementMap | None, num_experts: int, world_size: int) -> ExpertPlacement:
    """The placement a model with map ``pmap`` uses: the map's, or linear when it has none."""
    return pmap.placement if pmap is not None else ExpertPlacement("linear", num_experts, world_size)
