"""transformers as the oracle: greedy generation with the exact prompt ids."""

from __future__ import annotations

import torch


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (EOS ignored), from transformers' ``generate``."""
    ids = torch.tensor([prompt])
    # An explicit mask: with pad_token_id set, generate would otherwise mask every token equal to it (BOS here).
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()
