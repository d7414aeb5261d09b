"""MLA attention with pd's split-KV decode kernel (``pd.kernels.mla_decode``) for steps of one query a sequence,
FlashInfer (``FlashInferMLABackend``) for everything else: prompt steps and causal multi-query steps (MTP verify).

Why: FlashInfer's MLA decode kernel has a fixed cost of ~12-17 us a layer on an H200 at batch 1-32 (a 1K context
reads in ~2 us); this one splits every sequence's positions over enough programs to fill the GPU. Its metadata is
a page table and the lengths (two small copies a step, no planning on the host). Chosen by name
(``--attention-backend triton``); ``pd.bench.decode_step --attention-backend`` compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pd.attention.base import AttnInputs, pad_for_graph
from pd.attention.flashinfer_mla import FlashInferMLABackend, _GraphState, _StepMeta
from pd.kernels.mla_decode import mla_decode, splits_for
from pd.types import BatchMode


@dataclass
class _SplitState(_GraphState):
    """A plain decode bucket's static buffers (no FlashInfer wrapper: ``wrapper`` is None)."""

    page_table: torch.Tensor | None = None  # [batch, width] int32: each row's pages in order
    kv_lens: torch.Tensor | None = None  # [batch] int32: positions each row sees, its own included
    splits: int = 1


def _page_table(meta: _StepMeta, width: int) -> np.ndarray:
    """``[B, width]`` int32: row i holds sequence i's ``pages_used[i]`` pages, zeros after."""
    table = np.zeros((len(meta.ends), width), dtype=np.int32)
    for i, (p0, n) in enumerate(zip(meta.page_starts.tolist(), meta.pages_used.tolist())):
        table[i, :n] = meta.flat_pages[p0 : p0 + n]
    return table


class TritonMLABackend(FlashInferMLABackend):
    """``FlashInferMLABackend`` whose plain decode steps (every query alone in its sequence) run the split-KV
    kernel, eagerly and in CUDA graphs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        # An eager plain decode step's (page table, lengths, splits); None otherwise.
        self._eager: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def prepare(self, inputs: AttnInputs) -> None:
        self._eager = None
        if inputs.mode is not BatchMode.DECODE or max(inputs.q_lens) > 1:
            super().prepare(inputs)
            return
        self.inputs, self.active = inputs, None
        meta = _StepMeta.of(inputs, self.pool.layout.page_size)
        self.out_slots = self._to_device(meta.out_slots, np.int64)
        table = self._to_device(_page_table(meta, int(meta.pages_used.max())))
        splits = splits_for(len(meta.ends), self.num_heads, self.sms)
        self._eager = (table, self._to_device(meta.ends), splits)

    def graph_state(self, batch: int, max_pages: int, tokens: int | None = None) -> _GraphState:
        if tokens is not None:  # extend and verify buckets: rows of several (causal) queries
            return super().graph_state(batch, max_pages, tokens)
        dev, i32 = self.device, torch.int32
        return _SplitState(
            batch, batch, None, torch.zeros(batch, dtype=torch.int64, device=dev),
            torch.zeros(batch, -(-max_pages // batch), dtype=i32, device=dev), torch.zeros(batch, dtype=i32, device=dev),
            splits_for(batch, self.num_heads, self.sms),
        )  # fmt: skip

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        self._eager = None
        if not isinstance(state, _SplitState):
            super().prepare_graph(state, inputs)
            return
        assert state.page_table is not None and state.kv_lens is not None
        padded = pad_for_graph(inputs, state.batch, state.tokens, self.pool.layout.page_size)
        meta = _StepMeta.of(padded, self.pool.layout.page_size)
        state.page_table.copy_(
            torch.from_numpy(_page_table(meta, state.page_table.shape[1])), non_blocking=True
        )
        state.kv_lens.copy_(torch.from_numpy(meta.ends.astype(np.int32)), non_blocking=True)
        state.out_slots.copy_(torch.from_numpy(meta.out_slots), non_blocking=True)
        self.inputs, self.active = padded, state

    def decode(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        state = self.active
        if isinstance(state, _SplitState):
            assert state.page_table is not None and state.kv_lens is not None
            meta = (state.page_table, state.kv_lens, state.splits)
        elif state is None and self._eager is not None:
            meta = self._eager
        else:
            return super().decode(layer, q_latent, q_rope)
        table, lens, splits = meta
        return mla_decode(q_latent, q_rope, self.pool.layer(layer), table, lens, self.scale, splits)
