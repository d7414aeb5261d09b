"""MLA attention with pd's split-KV decode kernel (``pd.kernels.mla_decode``) for decode-mode steps of few queries,
FlashInfer (``FlashInferMLABackend``) for everything else (prompt steps, graphed prompt steps, larger verify steps).

Why: FlashInfer plans each decode step on the host (~1.3 ms at batch 1 on an H200: hidden by the overlapped plain
decode loop, not by serial steps such as speculative ones), and its MLA decode kernel has a fixed cost of ~12-17 us
a layer at batch 1-32. This kernel needs no planning and splits every query's positions over several programs.
Each query is a row of its own, with its sequence's page table and the positions it sees (its own included): plain
decode steps of up to ``split_sequences`` sequences (16), and causal verify steps whose rows compute at most a few
positions (``graph_state``'s ``max_q_per_row``), of up to 32 sequences at two queries a sequence (K = 1), else 16.
A row's result depends on its own inputs alone, so eager and graph steps that both take the kernel agree bit for
bit. Its metadata is a page table and the lengths (small copies a step). ``auto``'s choice on CUDA (``pd.engine.runner.make_attention_backend``);
``pd.bench.decode_step`` and ``pd.bench.spec_step`` take ``--attention-backend`` to compare it with ``flashinfer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pd.attention.base import AttnInputs, pad_for_graph
from pd.attention.flashinfer_mla import FlashInferMLABackend, _GraphState, _StepMeta
from pd.kernels.mla_decode import mla_decode
from pd.speculative import MAX_SPECULATIVE_TOKENS
from pd.types import BatchMode

# The most sequences a decode-mode step runs on the split kernel: graph bucket sizes, so an eager step and the
# bucket that would replay it take the same kernel. Plain decode: fa3 is faster beyond 16 on an H200, and the
# overlapped loop hides its plan. Verify steps of two queries a sequence: at 32 sequences the split kernel is
# slower than fa3 (33 against 16 us a layer at 64 rows) but spares the pipelined loop FlashInfer's plan: 12.3
# against 16.2 ms a step (bench/results/spec_step_h200.md, session 12). More queries a sequence: 16, as plain.
SPLIT_SEQUENCES = 16
SPLIT_VERIFY_SEQUENCES = 32
MAX_Q_PER_ROW = MAX_SPECULATIVE_TOKENS + 1  # a verify step's queries a sequence; longer rows go to FlashInfer


@dataclass
class _SplitState(_GraphState):
    """A bucket's static buffers for the split kernel, one row per query (no FlashInfer wrapper: None)."""

    page_table: torch.Tensor | None = None  # [tokens, width] int32: each query's sequence's pages in order
    kv_lens: torch.Tensor | None = None  # [tokens] int32: positions each query sees, its own included
    max_len: int = 1  # positions the table holds: the grid's bound


def _query_rows(meta: _StepMeta, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query of the step: its sequence's page table ``[T, width]`` int32 (zeros past the pages) and the
    positions it sees ``[T]`` int32 (its own position + 1: causal)."""
    tables = np.zeros((len(meta.ends), width), dtype=np.int32)
    for i, (p0, n) in enumerate(zip(meta.page_starts.tolist(), meta.pages_used.tolist())):
        tables[i, :n] = meta.flat_pages[p0 : p0 + n]
    return tables[meta.seq_of], (meta.positions + 1).astype(np.int32)


class TritonMLABackend(FlashInferMLABackend):
    """``FlashInferMLABackend`` whose decode-mode steps of few queries run the split-KV kernel, eagerly and in
    CUDA graphs (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The most sequences a decode-mode step (a verify step of two queries a sequence) runs on the split kernel:
        # graph bucket sizes, set before any graph is captured (``pd.bench.spec_step --split-sequences`` tries
        # others).
        self.split_sequences, self.split_verify_sequences = SPLIT_SEQUENCES, SPLIT_VERIFY_SEQUENCES
        # An eager step's (page table, lengths, longest length) when the split kernel runs it; None otherwise.
        self._eager: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def prepare(self, inputs: AttnInputs) -> None:
        self._eager = None
        if inputs.mode is not BatchMode.DECODE or not self._splits(
            len(inputs.starts), max(inputs.q_lens, default=1)
        ):
            super().prepare(inputs)
            return
        self.inputs, self.active = inputs, None
        meta = _StepMeta.of(inputs, self.pool.layout.page_size)
        self.out_slots = self._to_device(meta.out_slots, np.int64)
        tables, lens = _query_rows(meta, int(meta.pages_used.max()))
        self._eager = (self._to_device(tables), self._to_device(lens), int(lens.max()))

    def _splits(self, sequences: int, max_q: int) -> bool:
        """Whether a decode-mode step of ``sequences`` sequences of at most ``max_q`` queries each runs the split
        kernel (the bounds above)."""
        if max_q > MAX_Q_PER_ROW:
            return False
        return sequences <= (self.split_verify_sequences if max_q == 2 else self.split_sequences)

    def graph_state(
        self, batch: int, max_pages: int, tokens: int | None = None, max_q_per_row: int | None = None
    ) -> _GraphState:
        q = 1 if tokens is None else max_q_per_row  # None: a graphed prompt step
        if q is None or not self._splits(batch, q):
            return super().graph_state(batch, max_pages, tokens, max_q_per_row)
        rows = batch if tokens is None else tokens
        dev, i32, width = self.device, torch.int32, -(-max_pages // batch)
        return _SplitState(
            batch, rows, None, torch.zeros(rows, dtype=torch.int64, device=dev),
            torch.zeros(rows, width, dtype=i32, device=dev), torch.zeros(rows, dtype=i32, device=dev),
            width * self.pool.layout.page_size,
        )  # fmt: skip

    def prepare_graph(self, state: object, inputs: AttnInputs) -> None:
        self._eager = None
        if not isinstance(state, _SplitState):
            super().prepare_graph(state, inputs)
            return
        assert state.page_table is not None and state.kv_lens is not None
        padded = pad_for_graph(inputs, state.batch, state.tokens, self.pool.layout.page_size)
        meta = _StepMeta.of(padded, self.pool.layout.page_size)
        tables, lens = _query_rows(meta, state.page_table.shape[1])
        state.page_table.copy_(torch.from_numpy(tables), non_blocking=True)
        state.kv_lens.copy_(torch.from_numpy(lens), non_blocking=True)
        state.out_slots.copy_(torch.from_numpy(meta.out_slots), non_blocking=True)
        self.inputs, self.active = padded, state

    def decode(self, layer: int, q_latent: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        state = self.active
        if isinstance(state, _SplitState):
            assert state.page_table is not None and state.kv_lens is not None
            meta = (state.page_table, state.kv_lens, state.max_len)
        elif state is None and self._eager is not None:
            meta = self._eager
        else:
            return super().decode(layer, q_latent, q_rope)
        table, lens, max_len = meta
        return mla_decode(q_latent, q_rope, self.pool.layer(layer), table, lens, self.scale, max_len)
