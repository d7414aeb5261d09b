"""``pd.kernels.expert_counts`` (a one-rank dispatch's per-expert counts and masked weights in one launch):
the torch reference against counts made in Python, and the Triton kernel against the reference, exactly, in
Triton's CPU interpreter (``test_triton_interpreter`` reruns ``TestInterpreted`` with ``TRITON_INTERPRET=1``
when triton >= 3.9 is installed) and on CUDA (``-m gpu``). Cases: a decode row, padding rows (all -1), a
batch in one chunk, 256 experts (DeepSeek-V3's), a prefill chunk that loops, no tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pd.kernels.expert_counts import count_and_mask, count_and_mask_ref
from tests.support.interpreter import HAS_TRITON, INTERPRETING, interpreter_test

CASES = [(1, 6, 64), (64, 6, 64), (40, 8, 256), (3000, 6, 64), (0, 6, 64)]  # (tokens, top-k, experts)


def routing(tokens: int, k: int, experts: int, device: str):
    gen = torch.Generator().manual_seed(tokens * 31 + experts)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]) if tokens else None
    idx = idx if idx is not None else torch.empty(0, k, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1  # pairs that route nowhere
    if tokens >= 4:
        idx[-(tokens // 4) :] = -1  # padding rows
    weights = torch.rand(tokens, k, generator=gen)
    return idx.to(device), weights.to(device)


def check(device: str, case) -> None:
    idx, weights = routing(*case, device)
    counts, masked = count_and_mask(idx, weights, case[2], triton=True)
    want_counts, want_masked = count_and_mask_ref(idx, weights, case[2])
    assert torch.equal(counts, want_counts)
    assert torch.equal(masked, want_masked)


@pytest.mark.parametrize("case", CASES)
def test_reference_counts_what_python_counts(case):
    idx, weights = routing(*case, "cpu")
    counts, masked = count_and_mask_ref(idx, weights, case[2])
    seen = Counter(e for e in idx.flatten().tolist() if e >= 0)
    assert counts.tolist() == [seen[e] for e in range(case[2])]
    assert masked.dtype == torch.float32
    assert masked.tolist() == [
        [w if e >= 0 else 0.0 for e, w in zip(*row)] for row in zip(idx.tolist(), weights.tolist())
    ]


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize("case", CASES)
    def test_against_reference(self, case):
        check("cpu", case)


test_triton_interpreter = interpreter_test(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case", CASES)
def test_cuda_against_reference(case):
    check("cuda", case)
