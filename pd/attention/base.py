"""Attention backend interface for MLA over the paged latent cache.

A backend owns the per-step attention metadata. The runner calls ``prepare`` once per step
(outside any CUDA graph) with the batch's sequence ranges and page tables; the model's MLA
layers then call ``store``/``extend``/``decode`` for each layer.

CUDA-graph hooks (``pd.engine.graph``, ``pd.engine.verify_graph``): a backend with ``supports_graphs`` makes
one persistent decode state per batch bucket (``graph_state``, before capture), and plans it before each
capture and replay (``prepare_graph``), outside the graph; the captured kernels read only that state's
buffers.

MLA forms (DESIGN.md §4): extend (prefill, chunked prefill) uses the non-absorbed form, where the
latent of every context token is expanded into per-head keys and values; decode uses the absorbed
form, attending with a latent-space query directly over the cached latent. A decode step may compute
several consecutive positions of a sequence (a speculative verify: its last token and the drafts after it),
each query seeing the cache up to its own position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pd.kv_cache import DUMMY_PAGE
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


def pad_for_graph(inputs: AttnInputs, batch: int, tokens: int, page_size: int) -> AttnInputs:
    """A graph bucket's decode inputs: ``batch`` sequences computing ``tokens`` positions in all. The real rows
    of ``inputs`` keep their ranges; a table that ends before its row's last position goes on with the dummy
    page (only padding queries reach those positions, e.g. a verify row's tokens past its drafts); the
    remaining rows compute positions on the dummy page alone, one each and the last one the rest."""
    widths = inputs.q_lens
    pad, rest = batch - len(widths), tokens - sum(widths)
    assert (pad > 0 and rest >= pad) or (pad == 0 and rest == 0), (
        f"{widths} do not pad to {batch} rows, {tokens}"
    )
    pads = [1] * (pad - 1) + [rest - pad + 1] if pad else []
    tables = [
        t if len(t) * page_size >= e else [*t, *[DUMMY_PAGE] * (-(-e // page_size) - len(t))]
        for t, e in zip(inputs.page_tables, inputs.ends)
    ]
    return AttnInputs(
        BatchMode.DECODE,
        list(inputs.starts) + [0] * pad,
        list(inputs.ends) + pads,
        tables + [[DUMMY_PAGE] * -(-w // page_size) for w in pads],
    )


class AttentionBackend(ABC):
    """MLA attention for one rank over its ``KVPool``.

    Shapes: ``T`` new tokens in the step, ``S`` context tokens (prefix + new) of all sequences,
    ``B`` sequences, ``Hh`` attention heads. Latent width ``D = kv_lora_rank + qk_rope_head_dim``.
    """

    supports_graphs = False  # whether decode can be captured in CUDA graphs (the graph hooks below)

    def graph_state(
        self, batch: int, max_pages: int, tokens: int | None = None, max_q_per_row: int | None = None
    ) -> object:
        """A decode bucket's persistent metadata (made once, before capture): room for ``batch`` rows computing
        ``tokens`` positions in all (default: one each; more: causal queries) and ``max_pages`` page ids.
        ``max_q_per_row``: a bound on the positions any real row computes, where the caller has one (a verify
        step's K + 1; None: any, as a graphed prompt step's rows); a backend may pick its kernel by it.
        Lifetime: the backend's."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        """Plans ``state`` for one capture or replay of a decode step (outside the graph): the real rows
        of ``inputs`` first, the bucket's remaining rows padded onto the dummy page (``pad_for_graph``).
        Until the next ``prepare``, the per-layer calls use ``state``."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    @abstractmethod
    def prepare(self, inputs: AttnInputs) -> None:
        """Plans the step; must run before any layer of the step."""

    @abstractmethod
    def store(self, layer: int, latent: torch.Tensor) -> None:
        """Writes the new tokens' latent ``[T, D]`` (pool dtype) into their cache slots."""

    @abstractmethod
    def store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``store`` writes, for a kernel that writes the latent itself: the layer's cache ``[pages,
        page_size, D]`` (pool dtype; a view, strided when page-major) and the new tokens' slots ``[T]`` int64
        (``page * page_size + offset``; a graph's padding rows name the dummy page). Valid for this step."""

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
        """Absorbed MLA decode: ``q_latent [T, Hh, kv_lora_rank]``, ``q_rope [T, Hh, rope_dim]`` (``T``: the
        step's positions, sequences in order, ``q_lens`` each) attend over their sequence's cached latent up to
        their own position. Returns ``[T, Hh, kv_lora_rank]``."""
