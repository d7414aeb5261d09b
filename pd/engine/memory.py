"""A rank's memory plan: its weights by kind, measured on the model before it is materialised, checked
against the rank's share of the GPU, and the start-up line that says where the memory went.

Kinds: ``routed`` (this rank's routed experts and their counters), ``embeddings`` (embed_tokens and lm_head, one tensor when
tied), ``replicated`` (everything else: attention, dense MLPs, shared experts, routers, norms, tables).
A model whose weights exceed the share is refused before a byte is allocated, with the bytes named.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GB = 1e9
KV_FREE_HEADROOM = 0.05  # of the device's memory left free by the KV pool (activations, graphs, other ranks)


@dataclass(frozen=True)
class WeightBytes:
    routed: int
    replicated: int
    embeddings: int

    @property
    def total(self) -> int:
        return self.routed + self.replicated + self.embeddings

    @classmethod
    def of(cls, model: nn.Module) -> WeightBytes:
        """Bytes of ``model``'s parameters and buffers by kind (works on the meta device; shared tensors once)."""
        sizes = {"routed": 0, "replicated": 0, "embeddings": 0}
        seen: set[int] = set()
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            kind = "replicated"
            if ".experts." in name or name.endswith(".expert_tokens"):  # per local expert
                kind = "routed"
            elif name.split(".")[-2] in ("embed_tokens", "lm_head"):
                kind = "embeddings"
            sizes[kind] += t.numel() * t.element_size()
        return cls(**sizes)

    def describe(self) -> str:
        return (
            f"weights {self.total / GB:.2f} GB (routed experts {self.routed / GB:.2f}, replicated "
            f"{self.replicated / GB:.2f}, embeddings and lm_head {self.embeddings / GB:.2f})"
        )


def gpu_share(device: torch.device, fraction: float) -> tuple[float, int]:
    """(bytes this process may use on ``device``: ``fraction`` of it less what it holds, the device's total)."""
    _, total = torch.cuda.mem_get_info(device)
    return total * fraction - torch.cuda.memory_reserved(device), total


def check_fits(weights: WeightBytes, share: float, total: int, fraction: float, device: torch.device) -> None:
    """Refuses, before loading, a model whose weights do not fit the rank's share of the GPU."""
    if weights.total > share:
        raise MemoryError(
            f"the model does not fit on {device}: {weights.describe()} on this rank, but its share is "
            f"{share / GB:.2f} GB (--gpu-memory-fraction {fraction} of {total / GB:.2f} GB, less what the "
            "process holds); use more EP ranks, FP8 weights, or a larger share"
        )


def pages_in_share(device: torch.device, fraction: float, page_nbytes: int) -> int:
    """KV pages of ``page_nbytes`` that fit this process's share of the GPU: ``fraction`` of the device's memory,
    less what the process holds already (weights), and never more than is free now. A share, not a floor of free
    memory, so two instances on one GPU (``pd-serve`` gives each half) size their pools the same whichever
    starts first."""
    free, _ = torch.cuda.mem_get_info(device)
    share, total = gpu_share(device, fraction)
    num_pages = int(min(share, free - total * KV_FREE_HEADROOM) // page_nbytes)
    if num_pages < 2:
        gib = 1 << 30
        raise MemoryError(
            f"no room for a KV cache on {device}: this rank's share (--gpu-memory-fraction {fraction}) is "
            f"{total * fraction / gib:.1f} GiB of {total / gib:.1f}, it holds "
            f"{torch.cuda.memory_reserved(device) / gib:.1f} GiB already and {free / gib:.1f} GiB are free: raise the "
            "share, free the GPU, or set --num-pages"
        )
    return num_pages
