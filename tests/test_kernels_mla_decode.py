"""``pd.kernels.mla_decode`` (split-KV absorbed MLA decode) against the torch reference backend
(``pd.attention.torch_ref.TorchMLABackend.decode``, the oracle of every attention path) on the same paged pool: in
Triton's CPU interpreter (``test_triton_interpreter`` reruns ``TestInterpreted`` in a subprocess with
``TRITON_INTERPRET=1``, when triton >= 3.9 is installed, float32) and on CUDA (``-m gpu``, bf16). Cases: both pool
axis orders (a page-major layer is a strided view), scattered pages, lengths of one position, of a page boundary
and past it, more splits than positions, one split; the inputs must come back untouched."""

from __future__ import annotations

import random

import pytest
import torch

from pd.attention.base import AttnInputs
from pd.attention.torch_ref import TorchMLABackend
from pd.kernels.mla_decode import mla_decode, mla_decode_ref, splits_for
from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.types import BatchMode
from tests.support.interpreter import HAS_TRITON, INTERPRETING, interpreter_test, patch_float_casts

if HAS_TRITON and INTERPRETING:
    patch_float_casts()

# (context lengths, heads, kv_lora, rope, page size, splits)
CASES = [
    ([1, 5, 16, 17, 40], 3, 32, 16, 8, 4),
    ([33], 16, 32, 16, 4, 32),
    ([7, 64], 20, 64, 16, 16, 1),
]


def check(device: str, dtype: torch.dtype, case, order: KVOrder, triton: bool = True) -> None:
    lens, heads, lora, rope, page_size, splits = case
    rng = random.Random(len(lens) * 100 + heads)
    num_pages = sum(-(-n // page_size) for n in lens) + 5
    layout = KVLayout(2, num_pages, page_size, lora + rope, dtype, order)
    pool = KVPool(layout, device)
    pool.buffer.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
    free = rng.sample(range(1, num_pages), num_pages - 1)
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in lens]
    gen = torch.Generator().manual_seed(heads)
    q_latent = torch.randn(len(lens), heads, lora, generator=gen).to(device=device, dtype=dtype)
    q_rope = torch.randn(len(lens), heads, rope, generator=gen).to(device=device, dtype=dtype)
    scale = (lora + rope) ** -0.5
    ref = TorchMLABackend(pool, scale, lora)
    ref.prepare(AttnInputs(BatchMode.DECODE, [n - 1 for n in lens], lens, tables))
    want = ref.decode(1, q_latent, q_rope)
    width = max(len(t) for t in tables) + 2  # entries past a sequence's pages: never read
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    before = pool.buffer.clone(), q_latent.clone(), q_rope.clone()
    got = mla_decode(q_latent, q_rope, pool.layer(1), table, kv_lens, scale, splits, triton=triton)
    assert all(torch.equal(a, b) for a, b in zip(before, (pool.buffer, q_latent, q_rope))), "an input changed"
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
def test_reference_equals_the_torch_backend(order):
    check("cpu", torch.float32, CASES[0], order, triton=False)


def test_splits_fill_the_gpu_and_stay_bounded():
    assert splits_for(1, 16, 132) == 32 and splits_for(8, 16, 132) == 32 and splits_for(32, 16, 132) == 8
    assert splits_for(64, 128, 132) == 1  # 8 head blocks of 64 sequences already fill it


def test_refuses_inputs_that_do_not_fit():
    q, r = torch.zeros(2, 4, 32), torch.zeros(2, 4, 16)
    cache, lens = torch.zeros(5, 4, 48), torch.ones(2, dtype=torch.int32)
    table = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        mla_decode(q, r, torch.zeros(5, 4, 40), table, lens, 1.0, 2)
    with pytest.raises(ValueError, match="int32"):
        mla_decode(q, r, cache, table.long(), lens, 1.0, 2)
    assert mla_decode_ref(q, r, cache, table, lens, 1.0).shape == (2, 4, 32)


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
    @pytest.mark.parametrize("case", CASES)
    def test_against_the_torch_backend(self, case, order):
        check("cpu", torch.float32, case, order)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
@pytest.mark.parametrize(
    "case", [*CASES, ([1024] * 8, 16, 512, 64, 64, 32), ([300, 1, 2000], 128, 512, 64, 64, 8)]
)
def test_on_cuda(case, order):
    check("cuda", torch.bfloat16, case, order)


test_triton_interpreter = interpreter_test(__file__)
