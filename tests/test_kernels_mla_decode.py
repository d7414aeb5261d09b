"""``pd.kernels.mla_decode`` (split-KV absorbed MLA decode) against the torch reference backend
(``pd.attention.torch_ref.TorchMLABackend.decode``, the oracle of every attention path) on the same paged pool: in
Triton's CPU interpreter (``test_triton_interpreter`` reruns ``TestInterpreted`` in a subprocess with
``TRITON_INTERPRET=1``, when triton >= 3.9 is installed, float32) and on CUDA (``-m gpu``, bf16). Cases: both pool
axis orders (a page-major layer is a strided view), scattered pages, lengths of one position, of a page boundary
and past it, several splits, splits grown past ``MAX_SPLITS`` blocks, one split; a larger grid must not change a
row's result, and the inputs must come back untouched. ``TritonMLABackend``'s metadata (page
tables, lengths, cache slots, a padded graph bucket) is checked on CPU through the reference and, in the
interpreter, through the kernel."""

from __future__ import annotations

import random

import pytest
import torch

from pd.attention.base import AttnInputs
from pd.attention.torch_ref import TorchMLABackend
from pd.kernels.mla_decode import BLOCK_N, MAX_SPLITS, chunk_for, mla_decode, mla_decode_ref
from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.types import BatchMode
from tests.support.interpreter import HAS_TRITON, INTERPRETING, interpreter_test, patch_float_casts

if HAS_TRITON and INTERPRETING:
    patch_float_casts()

# (context lengths, heads, kv_lora, rope, page size, fewest positions a split holds (None: the default)): splits
# of one block, a row longer than MAX_SPLITS of them (its splits grow), one split a row.
CASES = [
    ([1, 5, 16, 17, 40], 3, 32, 16, 8, BLOCK_N),
    ([33], 16, 32, 16, 4, BLOCK_N),
    ([MAX_SPLITS * BLOCK_N + 70, 2], 2, 32, 16, 16, BLOCK_N),
    ([7, 64], 20, 64, 16, 16, None),
]


def check(device: str, dtype: torch.dtype, case, order: KVOrder, triton: bool = True) -> None:
    lens, heads, lora, rope, page_size, chunk = case
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
    args = (q_latent, q_rope, pool.layer(1), table, kv_lens, scale)
    got = mla_decode(*args, max(lens), chunk=chunk, triton=triton)
    assert all(torch.equal(a, b) for a, b in zip(before, (pool.buffer, q_latent, q_rope))), "an input changed"
    # A larger grid (a graph's capacity) leaves every row's splits, and so its result, as they were.
    assert torch.equal(mla_decode(*args, 8 * max(lens), chunk=chunk, triton=triton), got)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
def test_reference_equals_the_torch_backend(order):
    check("cpu", torch.float32, CASES[0], order, triton=False)


def test_chunks_grow_with_the_heads_in_whole_blocks():
    assert chunk_for(16) == 64 and chunk_for(128) == 512 and chunk_for(20) == 96
    assert all(chunk_for(h) % BLOCK_N == 0 for h in range(1, 200))


def test_refuses_inputs_that_do_not_fit():
    q, r = torch.zeros(2, 4, 32), torch.zeros(2, 4, 16)
    cache, lens = torch.zeros(5, 4, 48), torch.ones(2, dtype=torch.int32)
    table = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        mla_decode(q, r, torch.zeros(5, 4, 40), table, lens, 1.0, 4)
    with pytest.raises(ValueError, match="int32"):
        mla_decode(q, r, cache, table.long(), lens, 1.0, 4)
    assert mla_decode_ref(q, r, cache, table, lens, 1.0).shape == (2, 4, 32)


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
    @pytest.mark.parametrize("case", CASES)
    def test_against_the_torch_backend(self, case, order):
        check("cpu", torch.float32, case, order)

    @pytest.mark.parametrize("q", [1, 3], ids=["plain", "verify"])
    @pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
    def test_backend_metadata_through_the_kernel(self, order, q, monkeypatch):
        import functools

        from pd.attention import triton_mla

        monkeypatch.setattr(triton_mla, "mla_decode", functools.partial(mla_decode, triton=True))
        test_triton_backend_metadata_eager_and_in_a_padded_bucket(order, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
@pytest.mark.parametrize(
    "case", [*CASES, ([1024] * 8, 16, 512, 64, 64, 32), ([300, 1, 2000], 128, 512, 64, 64, BLOCK_N)]
)
def test_on_cuda(case, order):
    check("cuda", torch.bfloat16, case, order)


test_triton_interpreter = interpreter_test(__file__)


def _cpu_backend(pool: KVPool, heads: int, lora: int, scale: float):
    """A ``TritonMLABackend`` without FlashInfer (its plain decode steps need none): the metadata it builds, run
    through ``mla_decode``'s reference on CPU (its kernel in the interpreter)."""
    from pd.attention import triton_mla
    from pd.attention.triton_mla import TritonMLABackend

    b = TritonMLABackend.__new__(TritonMLABackend)
    b.pool, b.scale, b.kv_lora_rank, b.num_heads = pool, scale, lora, heads
    b.device, b.dtype = pool.buffer.device, pool.layout.dtype
    b.active, b.inputs, b._eager = None, None, None
    b.split_sequences, b.split_verify_sequences = (
        triton_mla.SPLIT_SEQUENCES,
        triton_mla.SPLIT_VERIFY_SEQUENCES,
    )
    return b


@pytest.mark.parametrize("q", [1, 3], ids=["plain", "verify"])
@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.value)
def test_triton_backend_metadata_eager_and_in_a_padded_bucket(order, q):
    """``TritonMLABackend``'s per-query page tables, lengths and cache slots: a decode step of ``q`` causal queries
    a sequence (1: plain decode; 3: a verify step), eager and planned into a bucket of 5 rows (3 padding rows on the
    dummy page), gives the reference backend's attention for the real queries and stores the new latent where the
    reference does (padding rows: the dummy page only)."""
    from pd.kv_cache import DUMMY_PAGE

    lens, heads, lora, rope, page_size, rows = [3, 9], 4, 32, 16, 4, 5
    layout = KVLayout(2, 12, page_size, lora + rope, torch.float32, order)
    pool = KVPool(layout, "cpu")
    pool.buffer.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(3)))
    tables = [[7], [2, 11, 5]]
    inputs = AttnInputs(BatchMode.DECODE, [n - q for n in lens], lens, tables)
    t = q * len(lens)
    gen = torch.Generator().manual_seed(4)
    q_latent, q_rope = torch.randn(t, heads, lora, generator=gen), torch.randn(t, heads, rope, generator=gen)
    ref = TorchMLABackend(pool, 0.2, lora)
    ref.prepare(inputs)
    want = ref.decode(1, q_latent, q_rope)
    _, want_slots = ref.store_target(1)
    backend = _cpu_backend(pool, heads, lora, 0.2)
    backend.prepare(inputs)
    assert backend._eager is not None  # the split kernel's path, not FlashInfer's
    torch.testing.assert_close(backend.decode(1, q_latent, q_rope), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(backend.store_target(1)[1], want_slots)
    state = backend.graph_state(rows, rows * 4, None if q == 1 else rows * q, max_q_per_row=q)
    backend.prepare_graph(state, inputs)
    pad = rows * q - t  # the padding rows' queries
    got = backend.decode(
        1,
        torch.cat([q_latent, torch.zeros(pad, heads, lora)]),
        torch.cat([q_rope, torch.zeros(pad, heads, rope)]),
    )
    torch.testing.assert_close(got[:t], want, rtol=1e-5, atol=1e-5)
    slots = backend.store_target(1)[1]
    assert torch.equal(slots[:t], want_slots) and (slots[t:] // page_size == DUMMY_PAGE).all()
    own = [p + 1 for n in lens for p in range(n - q, n)]  # causal: each query sees up to its own position
    assert state.kv_lens.tolist()[:t] == own and len(state.kv_lens) == rows * q


@pytest.mark.parametrize("split", [None, 32], ids=["default", "32"])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_an_eager_step_and_its_bucket_take_the_same_kernel(q, split, monkeypatch):
    """Eager and graph steps agree bit for bit only if both take the same kernel: for every count of sequences up
    to the largest bucket, and ``q`` queries a sequence (plain decode; verify steps of K = 1-3), an eager step runs
    the split kernel exactly when the bucket that would replay it does (FlashInfer's planning stubbed), with the
    default sequence bounds (16; 32 for verify steps of two queries a sequence) and one a benchmark sets."""
    from pd.attention import triton_mla
    from pd.engine.decode_graph import default_buckets

    monkeypatch.setattr(triton_mla.FlashInferMLABackend, "prepare", lambda self, inputs: None)
    monkeypatch.setattr(triton_mla.FlashInferMLABackend, "graph_state", lambda self, *a, **k: "flashinfer")
    layout = KVLayout(1, 4, 4, 48, torch.float32, KVOrder.LAYER_MAJOR)
    backend = _cpu_backend(KVPool(layout, "cpu"), 4, 32, 1.0)
    if split is not None:
        backend.split_sequences = backend.split_verify_sequences = split
    bound = backend.split_verify_sequences if q == 2 else backend.split_sequences
    assert bound == (split or {2: 32}.get(q, 16))
    buckets = default_buckets(64)
    assert bound in buckets
    for n in range(1, 65):
        backend.prepare(AttnInputs(BatchMode.DECODE, [4] * n, [4 + q] * n, [[1, 2]] * n))
        bucket = next(b for b in buckets if b >= n)
        state = backend.graph_state(bucket, bucket * 2, None if q == 1 else bucket * q, max_q_per_row=q)
        assert (backend._eager is not None) == isinstance(state, triton_mla._SplitState), (n, bucket)
        assert (backend._eager is not None) == (n <= bound)
    # Longer rows than a verify step's (a prompt in decode form) go to FlashInfer, eager and graphed alike.
    q = triton_mla.MAX_Q_PER_ROW + 1
    backend.prepare(AttnInputs(BatchMode.DECODE, [4], [4 + q], [[1, 2, 3]]))
    assert backend._eager is None and backend.graph_state(1, 3, q, max_q_per_row=q) == "flashinfer"
    assert backend.graph_state(1, 3, q) == "flashinfer"  # a graphed prompt step
