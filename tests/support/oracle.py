"""transformers as the oracle: the reference model on a checkpoint, greedy generation with the exact prompt
ids, and the relative error of a result against a reference."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV3ForCausalLM on the checkpoint at ``path``, in eval mode (test-only oracle)."""
    import transformers

    return transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64 on the CPU (any dtype or device in)."""
    ref = ref.double().cpu()
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))
