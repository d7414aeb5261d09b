"""Token bitmasks on logits, in plain torch: the same on CPU and CUDA, and capturable in a CUDA graph (no
host synchronization, no shape that depends on data).

A bitmask is int32 ``[B, W]``: bit ``t % 32`` of word ``t // 32`` of row ``b`` set when token ``t`` is allowed
for row ``b``. A row of all ones (every word -1, `ALL_ALLOWED`) is a row without a grammar.
"""

from __future__ import annotations

import torch

ALL_ALLOWED = -1  # an int32 word with every bit set


def bitmask_words(vocab_size: int) -> int:
    """int32 words in a bitmask row covering ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, words: int, pin_memory: bool = False) -> torch.Tensor:
    """A host bitmask ``[rows, words]`` int32 with every token allowed (pinned for asynchronous copies to
    a GPU when ``pin_memory``)."""
    return torch.full((rows, words), ALL_ALLOWED, dtype=torch.int32, pin_memory=pin_memory)


def allowed_tokens(bitmask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 32 * W]`` on the bitmask's device: column ``t`` True when bit ``t`` of its row is set."""
    # Bytes of the little-endian words (CPUs and CUDA GPUs alike), then their 8 bits: 1 byte per token.
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [B, 4 * W]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [B, 4 * W, 8]
    return bits.view(bitmask.shape[0], 32 * bitmask.shape[1]) == 1


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets the logits of disallowed tokens to -inf, in place.

    logits: ``[B, V]`` floating point (any float dtype); bitmask: int32 ``[B, W]`` on the logits' device.
    Columns ``t < min(V, 32 * W)`` follow bit ``t``. V may differ from the tokenizer's vocabulary:
      - bits past V (the padding of the last word, or a bitmask wider than the logits) are ignored;
      - columns ``t >= 32 * W`` (a model whose logits are wider than the bitmask: padded embedding rows)
        are disallowed in every row with a grammar and left alone in rows of all ones.
    Rows of all ones are unchanged. Temporary memory: about ``B * V`` bytes.
    """
    if logits.ndim != 2 or bitmask.ndim != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits [B, V] and bitmask [B, W], got {tuple(logits.shape)} and {tuple(bitmask.shape)}"
        )
    if bitmask.dtype != torch.int32 or bitmask.device != logits.device:
        raise ValueError(f"bitmask must be int32 on {logits.device}, got {bitmask.dtype} on {bitmask.device}")
    vocab = logits.shape[1]
    covered = min(vocab, 32 * bitmask.shape[1])
    logits[:, :covered].masked_fill_(~allowed_tokens(bitmask)[:, :covered], float("-inf"))
    if vocab > covered:
        constrained = (bitmask != ALL_ALLOWED).any(dim=1, keepdim=True)  # [B, 1]
        logits[:, covered:].masked_fill_(constrained, float("-inf"))
