"""transformers as the oracle: the reference model on a checkpoint, greedy generation with the exact prompt
ids, and the relative error of a result against a reference."""

from __future__ import annotations

from pathlib import Path

import torch

from pd.types import SamplingParams


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


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits ``[len(ids), V]`` of every position of ``ids``."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _processed(logits: torch.Tensor, sp: SamplingParams, prompt: list[int], out: list[int], eos: set[int]):
    """The rules of pd.engine.logits written out plainly for one position's logits ``[V]``."""
    logits = logits.clone()
    for t in set(prompt) | set(out):
        if sp.repetition_penalty != 1:
            v = logits[t]
            logits[t] = v / sp.repetition_penalty if v > 0 else v * sp.repetition_penalty
    for t in set(out):
        logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
    for t, b in sp.logit_bias:
        logits[t] += max(-100.0, min(100.0, b))
    if len(out) < sp.min_tokens:
        for t in eos | set(sp.stop_token_ids):
            logits[t] = float("-inf")
    return logits


def hf_penalized_greedy(
    hf, prompt: list[int], sp: SamplingParams, eos: set[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens under ``sp``'s processing, and each step's processed log_softmax, from transformers."""
    out: list[int] = []
    lps = []
    for _ in range(sp.max_tokens):
        lp = _processed(hf_logits(hf, prompt + out)[-1], sp, prompt, out, eos).log_softmax(-1)
        lps.append(lp)
        token = int(lp.argmax())
        out.append(token)
        if token in eos and len(out) >= sp.min_tokens and not sp.ignore_eos:
            break
    return out, lps
