"""``pd.kernels.mla_rope`` (MLA's norm and rotary parts in one kernel) against the torch path of ``pd.model.mla``
(``RMSNorm._norm``, ``RotaryEmbedding.rotate_pair``, the concatenation): in Triton's CPU interpreter
(``test_triton_interpreter`` reruns ``TestInterpreted`` in a subprocess with ``TRITON_INTERPRET=1``, when
triton >= 3.9 is installed) and on CUDA (``-m gpu``). Float32 agrees to float32 rounding; bf16 to one bf16
rounding step. Padded rows (position 0, any values) and strided query heads are among the cases; the inputs
must come back untouched, bit for bit, and the cache write (into a strided, page-major layer) must put the
latent in the tokens' slots and nowhere else."""

from __future__ import annotations

import pytest
import torch

from pd.config import RopeConfig
from pd.kernels.mla_rope import mla_rope_norm
from pd.model.layers import RMSNorm, RotaryEmbedding
from tests.support.interpreter import (
    HAS_TRITON,
    INTERPRETING,
    interpreter_test,
    patch_float_casts,
)

if HAS_TRITON and INTERPRETING:
    patch_float_casts()

YARN = RopeConfig(
    theta=10000.0, kind="yarn", factor=40.0, original_max_position_embeddings=4096,
    mscale=1.0, mscale_all_dim=1.0,
)  # fmt: skip
# (tokens, heads, nope, rope, kv_lora, rope config): the DESIGN.md §8 and DeepSeek-V3 head shapes, a small odd one.
CASES = [
    (1, 16, 128, 64, 512, RopeConfig()),
    (7, 128, 128, 64, 512, YARN),
    (64, 16, 128, 64, 512, RopeConfig(interleave=False)),
    (5, 3, 16, 8, 24, RopeConfig(theta=500.0)),
]


def reference(q_rope, kv, positions, rotary: RotaryEmbedding, norm: RMSNorm):
    """The torch path of ``MLAttention.forward``: (rotated q_rope, latent)."""
    c_kv, k_rope = kv.split([kv.shape[1] - rotary.dim, rotary.dim], dim=-1)
    q_rope, k_rope = rotary.rotate_pair(positions, q_rope, k_rope)
    return q_rope, torch.cat([norm._norm(c_kv.contiguous()), k_rope], dim=-1)


def check(device: str, dtype: torch.dtype, case) -> None:
    t, heads, nope, rope, lora, rope_cfg = case
    gen = torch.Generator().manual_seed(t * 1000 + heads)
    rotary = RotaryEmbedding(rope_cfg, rope, 8192).to(device)
    norm = RMSNorm(lora, 1e-6).to(device=device, dtype=dtype)
    norm.weight.copy_(torch.rand(lora, generator=gen) + 0.5)
    # Query heads inside a wider buffer (row stride > heads x head dim), as a fused projection's view would be.
    buf = (torch.randn(t, heads * (nope + rope) + 8, generator=gen) * 3).to(device=device, dtype=dtype)
    q = buf[:, : heads * (nope + rope)].view(t, heads, nope + rope)
    kv = (torch.randn(t, lora + rope, generator=gen) * 3).to(device=device, dtype=dtype)
    positions = torch.randint(0, 8192, (t,), generator=gen).to(device)
    positions[-1] = 0  # a graph's padding row
    want_q, want_latent = reference(q[..., nope:], kv, positions, rotary, norm)
    buf_before, kv_before = buf.clone(), kv.clone()
    # A page-major pool of 2 layers (layer 1's pages are a strided view); the tokens' slots in random pages.
    page_size, num_pages = 4, t + 3
    pool = torch.full((num_pages, 2, page_size, lora + rope), 7.0, dtype=dtype, device=device)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:t].to(device)
    q_rope, latent = mla_rope_norm(
        q[..., nope:], kv, positions, rotary.cos_sin, norm.weight, norm.eps, rope_cfg.interleave,
        cache=(pool[:, 1], slots),
    )  # fmt: skip
    assert torch.equal(buf, buf_before) and torch.equal(kv, kv_before), "an input changed"
    cached = pool[:, 1].reshape(-1, lora + rope)
    assert torch.equal(cached[slots], latent), "the cache slots do not hold the latent"
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert (cached[untouched] == 7.0).all() and (pool[:, 0] == 7.0).all(), "other slots or layers written"
    assert latent.shape == (t, lora + rope) and latent.dtype == dtype and latent.is_contiguous()
    assert q_rope.shape == (t, heads, rope) and q_rope.dtype == dtype and q_rope.is_contiguous()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    torch.testing.assert_close(latent, want_latent, **tol)
    torch.testing.assert_close(q_rope, want_q, **tol)


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("case", CASES)
    def test_against_torch(self, case, dtype):
        check("cpu", dtype, case)

    @pytest.mark.parametrize("preset", ["ci", "nolora-groups"])  # a query LoRA (q_a_proj), and none (q_proj)
    def test_model_with_the_kernels_equals_the_torch_path(self, preset, tiny_model, monkeypatch):
        """The model with the kernels it takes on CUDA (this one writing the cache itself, the local dispatch's
        counts) in the interpreter: chunked prefill over scattered pages, then decode steps, give the logits of
        the torch path (itself held to transformers by tests/test_model.py)."""
        import functools
        import random

        from pd.config import EngineConfig, ModelConfig
        from pd.engine.runner import ModelRunner
        from pd.ep import local
        from pd.kernels import expert_counts, mla_rope
        from pd.types import BatchMode
        from tests.support.oracle import rel_err
        from tests.test_model import step_logits

        path = tiny_model(preset)
        rng = random.Random(3)
        ids = [rng.randrange(3, 200) for _ in range(40)]
        pages = rng.sample(range(1, 60), 14)  # page size 3: scattered, ending mid-chunk

        def logits() -> torch.Tensor:
            runner = ModelRunner(
                EngineConfig(str(path), page_size=3, num_pages=60), ModelConfig.from_dir(path)
            )
            with torch.no_grad():
                out = [
                    step_logits(runner, BatchMode.EXTEND, pages, ids, a, b) for a, b in ((0, 13), (13, 32))
                ]
                out += [step_logits(runner, BatchMode.DECODE, pages, ids, p, p + 1) for p in range(32, 40)]
            return torch.cat(out)

        want = logits()
        monkeypatch.setattr(mla_rope, "usable", lambda x: True)
        monkeypatch.setattr(
            local, "count_and_mask", functools.partial(expert_counts.count_and_mask, triton=True)
        )
        got = logits()
        assert rel_err(got, want) < 1e-5

    def test_no_tokens(self):
        q, kv, pos = torch.empty(0, 2, 8), torch.empty(0, 40), torch.empty(0, dtype=torch.int64)
        q_rope, latent = mla_rope_norm(q, kv, pos, torch.zeros(8, 8), torch.ones(32), 1e-6, True)
        assert q_rope.shape == (0, 2, 8) and latent.shape == (0, 40)


def test_refuses_shapes_that_do_not_fit():
    kv, pos, cs = torch.zeros(3, 40), torch.zeros(3, dtype=torch.int64), torch.zeros(8, 8)
    q = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        mla_rope_norm(q, kv, pos, cs, torch.ones(31), 1e-6, True)  # norm weight of the wrong width
    with pytest.raises(ValueError, match="contiguous last dim"):
        mla_rope_norm(torch.zeros(3, 2, 16)[..., ::2], kv, pos, cs, torch.ones(32), 1e-6, True)
    with pytest.raises(ValueError, match="cache pages"):  # a pool of another dtype
        pages = torch.zeros(4, 2, 40, dtype=torch.bfloat16)
        mla_rope_norm(q, kv, pos, cs, torch.ones(32), 1e-6, True, cache=(pages, pos))


test_triton_interpreter = interpreter_test(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_cuda_against_torch(case, dtype):
    check("cuda", dtype, case)
