"""Attention backend interface for MLA over the paged latent cache.

A backend owns the per-step attention metadata. The runner calls ``prepare`` once per step
(outside any CUDA graph) with the batch's sequence ranges and page tables; the model's MLA
layers then call ``store``/``extend``/``decode`` for each layer.

CUDA-graph hooks (``pd.engine.graph``): a backend with ``supports_graphs`` makes one persistent
decode state per batch bucket (``graph_state``, before capture), and plans it before each capture and
replay (``prepare_graph``), outside the graph; the captured kernels read only that state's buffers.

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

    supports_graphs = False  # whether decode can be captured in CUDA graphs (the graph hooks below)

    def graph_state(self, batch: int, max_pages: int) -> object:
        """A decode bucket's persistent metadata (made once, before capture): room for ``batch`` rows
        and ``max_pages`` page ids. Lifetime: the backend's."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        """Plans ``state`` for one capture or replay of a decode step (outside the graph): the real rows
        of ``inputs`` first, the bucket's remaining rows padded onto the dummy page. Until the next
        ``prepare``, the per-layer calls use ``state``."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

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
