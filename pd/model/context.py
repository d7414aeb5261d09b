"""What one forward step passes down to every layer besides the hidden states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd.attention.base import AttentionBackend
from pd.types import BatchMode


@dataclass
class ForwardContext:
    """Per-step state: the batch mode, the prepared attention backend, the rows to compute
    logits for, whether MoE layers use the low-latency (masked-layout) EP path, and which rows are
    real (CUDA-graph padding rows are not: they route to no expert). ``kv_stored(layer)``, when set, runs
    right after each MLA layer issued the store of its new KV into the pool (on the forward's thread, before
    the layer's attention): layer-by-layer KV sends (``pd.transfer.layers``) start there."""

    mode: BatchMode
    attn: AttentionBackend
    logits_indices: torch.Tensor  # [B_sample] int64 rows of the step's tokens that need logits
    low_latency_moe: bool = False
    row_mask: torch.Tensor | None = None  # [T] bool, False for padding rows; None: every row is real
    kv_stored: Callable[[int], None] | None = None
    # MoE layers may run their shared experts on a side stream from ``route`` to ``finish`` (CUDA). False where
    # the forward is cut between the two: each piece of a piecewise CUDA graph must join the streams it forks.
    overlap_shared: bool = True
