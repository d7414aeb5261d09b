"""What one forward step passes down to every layer besides the hidden states."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd.attention.base import AttentionBackend
from pd.types import BatchMode


@dataclass
class ForwardContext:
    """Per-step state: the batch mode, the prepared attention backend, the rows to compute
    logits for, whether MoE layers use the low-latency (masked-layout) EP path, and which rows are
    real (CUDA-graph padding rows are not: they route to no expert)."""

    mode: BatchMode
    attn: AttentionBackend
    logits_indices: torch.Tensor  # [B_sample] int64 rows of the step's tokens that need logits
    low_latency_moe: bool = False
    row_mask: torch.Tensor | None = None  # [T] bool, False for padding rows; None: every row is real
