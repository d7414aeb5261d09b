"""Attention backend interface for MLA over the paged latent cache.

A backend owns the per-step attention metadata. The runner calls ``prepare`` once per step
(outside any CUDA graph) with the batch's sequence ranges and page tables; the model's MLA
layers then call ``store``/``extend``/``decode`` for each layer.

MLA forms (DESIGN.md §4): extend (prefill, chunked prefill) uses the non-absorbed form, where the
latent of every context token is expanded into per-head keys and values; decode uses the absorbed
form, attending with a latent-space query directly over the cached latent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pd.types import BatchMode


@dataclass(frozen=True)
class AttnInputs:
    """One step's sequences: sequence ``i`` computes positions ``[starts[i], ends[i])`` and its
    cache holds positions ``[0, ends[i])`` once the step has stored them, in ``page_tables[i]``."""

    mode: BatchMode
    starts: list[int]
    ends: list[int]
    page_tables: list[list[int]]

    @property
    def q_lens(self) -> list[int]:
        return [e - s for s, e in zip(self.starts, self.ends)]

    @property
    def has_prefix(self) -> bool:
        return any(s > 0 for s in self.starts)


class AttentionBackend(ABC):
    """MLA attention for one rank over its ``KVPool``.

    Shapes: ``T`` new tokens in the step, ``S`` context tokens (prefix + new) of all sequences,
    ``B`` sequences, ``Hh`` attention heads. Latent width ``D = kv_lora_rank + qk_rope_head_dim``.
    """

    @abstractmethod
    def prepare(self, inputs: AttnInputs) -> None:
        """Plans the step; must run before any layer of the step."""

    @abstractmethod
    def store(self, layer: int, latent: torch.Tensor) -> None:
        """Writes the new tokens' latent ``[T, D]`` (pool dtype) into their cache slots."""

    @abstractmethod
    def context_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Latent of every context token ``[S, D]``, sequences in batch order.

        ``latent`` is the new tokens' latent ``[T, D]``; when no sequence has a cached prefix it
        is the whole context and is returned as is, without reading the cache.
        """

    @abstractmethod
    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal ragged attention: ``q [T, Hh, Dqk]`` over ``k [S, Hh, Dqk]``, ``v [S, Hh, Dv]``.

        Each sequence's queries are its last ``q_len`` context positions. Returns ``[T, Hh, Dv]``.
        """

    @abstractmethod
    def decode(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Absorbed MLA decode: ``q_latent [B, Hh, kv_lora_rank]``, ``q_rope [B, Hh, rope_dim]``
        attend over each sequence's cached latent. Returns ``[B, Hh, kv_lora_rank]``."""
