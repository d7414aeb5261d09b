"""``pd.kernels.skinny.head_mm`` (MLA's absorbed ``kv_b_proj`` factors at decode) against torch's einsum: in Triton's
CPU interpreter (``test_triton_interpreter`` reruns ``TestInterpreted`` in a subprocess with ``TRITON_INTERPRET=1``,
when triton >= 3.9 is installed) and on CUDA (``-m gpu``). The operands are the strided views the model hands it
(query heads inside the fused projection's rows, the factors as views of ``kv_b_proj``, one transposed); inputs must
come back untouched and the output be ``[T, H, N]`` contiguous. Float32 (interpreter) agrees to float32 rounding, bf16 (CUDA) to one
bf16 rounding step. In the interpreter the whole model decodes with it and gives the einsum path's logits."""

from __future__ import annotations

import pytest
import torch

from pd.kernels import skinny
from tests.support.interpreter import HAS_TRITON, INTERPRETING, interpreter_test, patch_float_casts

if HAS_TRITON and INTERPRETING:
    patch_float_casts()

# (tokens, heads, nope, v, kv_lora): the DESIGN.md §8 heads at 1, 64 (MAX_ROWS) and 128 tokens (two row blocks: the
# kernel computes them, the model does not use it there), 8 tokens of DeepSeek-V3's 128 heads, and small odd shapes whose K is no multiple of the block, the second
# over two row blocks.
CASES = [
    (1, 16, 128, 128, 512), (64, 16, 128, 128, 512), (128, 16, 128, 128, 512), (8, 128, 128, 128, 512),
    (5, 3, 24, 40, 72), (70, 2, 16, 24, 40),
]  # fmt: skip


def check(device: str, dtype: torch.dtype, case) -> None:
    t, heads, nope, v, lora = case
    gen = torch.Generator().manual_seed(t * 100 + heads)
    kv_b = (torch.randn(heads, nope + v, lora, generator=gen) / lora**0.5).to(device=device, dtype=dtype)
    w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]  # MLAttention.absorbed_weights' views
    q = torch.randn(t, heads, nope + 64, generator=gen).to(device=device, dtype=dtype)
    q_nope = q[..., :nope]  # strided: the query heads' rows also hold their rotary part
    latent = torch.randn(t, heads, lora, generator=gen).to(device=device, dtype=dtype)
    before = kv_b.clone(), q.clone(), latent.clone()
    q_latent = skinny.head_mm(q_nope, w_uk.transpose(1, 2), triton=True)
    out = skinny.head_mm(latent, w_uv, triton=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (kv_b, q, latent))), "an input changed"
    assert q_latent.shape == (t, heads, lora) and q_latent.is_contiguous() and q_latent.dtype == dtype
    assert out.shape == (t, heads, v) and out.is_contiguous() and out.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    f = torch.float64 if device == "cpu" else torch.float32
    torch.testing.assert_close(
        q_latent, torch.einsum("thn,hnc->thc", q_nope.to(f), w_uk.to(f)).to(dtype), **tol
    )
    torch.testing.assert_close(out, torch.einsum("thc,hvc->thv", latent.to(f), w_uv.to(f)).to(dtype), **tol)


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize("case", CASES[:1] + CASES[4:])
    def test_against_einsum(self, case):
        check("cpu", torch.float32, case)  # bf16 runs on CUDA: the interpreter's bf16 dot is not the GPU's

    def test_model_with_the_kernel_equals_the_einsum_path(self, tiny_model, monkeypatch):
        """Decode steps of the tiny model with ``head_mm`` for both factors (as on CUDA) give the einsum path's
        logits (itself held to transformers by tests/test_model.py)."""
        import random

        from pd.config import EngineConfig, ModelConfig
        from pd.engine.runner import ModelRunner
        from pd.types import BatchMode
        from tests.support.oracle import rel_err
        from tests.test_model import step_logits

        path = tiny_model("ci")
        rng = random.Random(5)
        ids = [rng.randrange(3, 200) for _ in range(24)]
        pages = rng.sample(range(1, 40), 9)

        def logits() -> torch.Tensor:
            runner = ModelRunner(
                EngineConfig(str(path), page_size=3, num_pages=40), ModelConfig.from_dir(path)
            )
            with torch.no_grad():
                step_logits(runner, BatchMode.EXTEND, pages, ids, 0, 18)
                return torch.cat(
                    [step_logits(runner, BatchMode.DECODE, pages, ids, p, p + 1) for p in range(18, 24)]
                )

        want = logits()
        calls = []
        monkeypatch.setattr(skinny, "usable", lambda x, w: calls.append(x.shape) or True)
        got = logits()
        assert len(calls) == 2 * 6 * ModelConfig.from_dir(path).num_hidden_layers  # both factors, every layer
        assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_on_cuda(case):
    check("cuda", torch.bfloat16, case)


def test_usable_only_for_few_rows_of_16_bit_cuda_tensors():
    x, w = torch.zeros(4, 2, 8, dtype=torch.bfloat16), torch.zeros(2, 16, 8, dtype=torch.bfloat16)
    assert not skinny.usable(x, w)  # CPU: the einsum
    if torch.cuda.is_available():
        assert skinny.usable(x.cuda(), w.cuda())
        assert not skinny.usable(
            torch.zeros(skinny.MAX_ROWS + 1, 2, 8, dtype=torch.bfloat16, device="cuda"), w
        )
        assert not skinny.usable(x.cuda().float(), w.cuda().float())


test_triton_interpreter = interpreter_test(__file__)
