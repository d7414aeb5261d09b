"""MoE kernels (pd.kernels.moe): the torch references against a naive per-token loop (CPU, always),
the Triton kernels in Triton's CPU interpreter (when triton is installed: ``test_triton_interpreter``
reruns the ``TestInterpreted`` cases in a subprocess with ``TRITON_INTERPRET=1``, which must be set
before triton decorates the kernels), and the Triton kernels on CUDA (``-m gpu``).

Inputs are drawn fresh for every run; each failure message carries the seed to replay it.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import torch
import torch.nn.functional as F

from pd.kernels import moe
from pd.kernels.moe_config import GemmConfig, MoeConfig
from tests.support.interpreter import HAS_TRITON, INTERPRETING, interpreter_test
from tests.support.oracle import rel_err

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Inputs and oracles
# ---------------------------------------------------------------------------------------------


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_weights(num_experts, hidden, inter, dtype, gen):
    """Random expert weights on the generator's device."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=gen.device) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=gen.device) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def make_routing(num_tokens, num_experts, top_k, kind, gen):
    """``kind``: "topk" (distinct experts per token), "invalid" (some -1 and some >= E),
    "one_expert" (every pair on expert 1), "first_slot" (slot 0 on expert 2, the rest -1),
    "all_invalid" (every id -1)."""
    ids = torch.rand(num_tokens, num_experts, generator=gen, device=gen.device).topk(top_k, dim=1).indices
    if kind == "invalid":
        r = torch.rand(num_tokens, top_k, generator=gen, device=gen.device)
        ids = torch.where(r < 0.3, -1, ids)
        ids = torch.where((r > 0.9) & (r < 0.95), num_experts + 3, ids)
    elif kind == "one_expert":
        ids = torch.full_like(ids, 1)
    elif kind == "first_slot":
        ids = torch.full_like(ids, -1)
        ids[:, 0] = 2
    elif kind == "all_invalid":
        ids = torch.full_like(ids, -1)
    else:
        assert kind == "topk", kind
    return ids, torch.rand(num_tokens, top_k, generator=gen, device=gen.device)


def naive_moe(x, w13, w2, topk_ids, topk_weights):
    """Per token, per slot, in float64."""
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for t in range(num_tokens):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if 0 <= e < num_experts:
                xt = x[t].double().cpu()
                g = w13[e, :inter].double().cpu() @ xt
                u = w13[e, inter:].double().cpu() @ xt
                out[t] += float(topk_weights[t, k]) * (w2[e].double().cpu() @ (F.silu(g) * u))
    return out


def naive_masked(recv_x, recv_count, w13, w2):
    """Rows below each count, in float64; zeros elsewhere."""
    num_experts, rows, hidden = recv_x.shape
    out = torch.zeros(num_experts, rows, hidden, dtype=torch.float64)
    ones = torch.ones(1)
    for e in range(num_experts):
        for r in range(min(int(recv_count[e]), rows)):
            out[e, r] = naive_moe(
                recv_x[e, r : r + 1], w13[e : e + 1], w2[e : e + 1], torch.zeros(1, 1), ones[None]
            )[0]
    return out


# ---------------------------------------------------------------------------------------------
# CPU: references vs the naive loop, the dispatcher, input checks
# ---------------------------------------------------------------------------------------------


def test_silu_and_mul_ref_matches_formula():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = x[..., :8] * torch.sigmoid(x[..., :8]) * x[..., 8:]
    torch.testing.assert_close(moe.silu_and_mul_ref(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe.silu_and_mul(x), expected, rtol=1e-12, atol=1e-12)  # CPU -> reference


@pytest.mark.parametrize(
    "num_tokens,kind,ids_dtype",
    [
        (9, "topk", torch.int64),
        (9, "invalid", torch.int32),
        (7, "one_expert", torch.int64),
        (5, "first_slot", torch.int64),
        (4, "all_invalid", torch.int64),
        (1, "topk", torch.int32),
        (0, "topk", torch.int64),
    ],
)
def test_fused_moe_ref_matches_naive_loop(num_tokens, kind, ids_dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = make_weights(6, 24, 16, torch.float64, gen)
    x = torch.randn(num_tokens, 24, generator=gen, dtype=torch.float64)
    ids, weights = make_routing(num_tokens, 6, 3, kind, gen)
    out = moe.fused_moe_ref(x, w13, w2, ids.to(ids_dtype), weights)
    expected = naive_moe(x, w13, w2, ids, weights)
    assert out.shape == (num_tokens, 24) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def test_fused_moe_ref_bf16_close_to_float64():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = make_weights(8, 64, 32, torch.bfloat16, gen)
    x = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    ids, weights = make_routing(16, 8, 2, "invalid", gen)
    err = rel_err(moe.fused_moe_ref(x, w13, w2, ids, weights), naive_moe(x, w13, w2, ids, weights))
    assert err < 1e-2, f"seed {seed}: rel err {err}"


def test_masked_moe_ref_matches_naive_loop():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = make_weights(5, 24, 16, torch.float64, gen)
    recv_x = torch.randn(5, 6, 24, generator=gen, dtype=torch.float64)
    recv_count = torch.tensor([0, 6, 3, 1, 9], dtype=torch.int32)  # empty, full, partial, one, over N
    out = moe.masked_moe_ref(recv_x, recv_count, w13, w2)
    torch.testing.assert_close(
        out,
        naive_masked(recv_x, recv_count, w13, w2),
        rtol=1e-10,
        atol=1e-12,
        msg=lambda m: f"seed {seed}: {m}",
    )


def test_dispatch_on_cpu_writes_out_with_the_reference():
    gen = torch.Generator().manual_seed(fresh_seed())
    w13, w2 = make_weights(4, 16, 8, torch.float32, gen)
    x = torch.randn(3, 16, generator=gen)
    ids, weights = make_routing(3, 4, 2, "invalid", gen)
    out = torch.full((3, 16), float("nan"))
    assert moe.fused_moe(x, w13, w2, ids, weights, out=out) is out
    assert torch.equal(out, moe.fused_moe_ref(x, w13, w2, ids, weights))
    recv_x = torch.randn(4, 3, 16, generator=gen)
    count = torch.tensor([3, 0, 1, 2])
    assert torch.equal(moe.masked_moe(recv_x, count, w13, w2), moe.masked_moe_ref(recv_x, count, w13, w2))


def test_bad_inputs_are_refused_with_the_offending_value():
    w13, w2 = make_weights(4, 16, 8, torch.float32, torch.Generator().manual_seed(0))
    x = torch.randn(3, 16)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    weights = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"w13 must be \[E, 2I, H=32\]"):
        moe.fused_moe(torch.randn(3, 32), w13, w2, ids, weights)
    with pytest.raises(ValueError, match=r"w2 must be \[E=4, H=16, I=8\]"):
        moe.fused_moe(x, w13, w2.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match="topk_ids must be int32/int64"):
        moe.fused_moe(x, w13, w2, ids.float(), weights)
    with pytest.raises(ValueError, match="topk_weights must be float"):
        moe.fused_moe(x, w13, w2, ids, weights[:, :1])
    with pytest.raises(ValueError, match=r"activations are torch\.bfloat16"):
        moe.fused_moe(x.bfloat16(), w13, w2, ids, weights)
    with pytest.raises(ValueError, match=r"recv_count must be int32/int64 \[E=4\]"):
        moe.masked_moe(torch.randn(4, 2, 16), torch.zeros(3, dtype=torch.int32), w13, w2)
    with pytest.raises(ValueError, match="backend must be"):
        moe.silu_and_mul(x, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Triton in the CPU interpreter (fp32 and fp16: the interpreter multiplies bf16 as raw integers)
# ---------------------------------------------------------------------------------------------


test_triton_interpreter = interpreter_test(__file__, runs=HAS_TRITON)


def small_config(block_m: int, block_n: int, block_k: int, tma: bool = False) -> MoeConfig:
    gemm = GemmConfig(block_n, block_k, num_warps=4, num_stages=2, tma=tma)
    return MoeConfig(block_m, gemm, gemm)


@pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING), reason="run by test_triton_interpreter in a subprocess"
)
class TestInterpreted:
    @pytest.mark.parametrize(
        "num_pairs,num_experts,block_m",
        [(1, 4, 16), (37, 6, 16), (200, 64, 32), (384, 64, 16), (600, 64, 16), (5000, 8, 64), (999, 9, 16)],
    )
    def test_moe_align_sorts_and_pads(self, num_pairs, num_experts, block_m):
        """Both paths (one program; three passes past 32768 / next_pow2(E) pairs) produce every valid
        pair once, grouped by expert in pair order, each group padded with the sentinel."""
        from pd.kernels.moe_align_triton import max_row_blocks, moe_align

        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(-1, num_experts + 2, (num_pairs, 1), generator=gen)
        sorted_pairs, block_expert = moe_align(ids, num_experts, block_m)
        assert block_expert.numel() == max_row_blocks(num_pairs, num_experts, block_m)
        flat = ids[:, 0]
        expected_pairs, expected_blocks = [], []
        for e in range(num_experts):
            pairs = (flat == e).nonzero().squeeze(1).tolist()
            n_blocks = -(-len(pairs) // block_m)
            expected_pairs += pairs + [num_pairs] * (n_blocks * block_m - len(pairs))
            expected_blocks += [e] * n_blocks
        expected_blocks += [-1] * (block_expert.numel() - len(expected_blocks))
        assert block_expert.tolist() == expected_blocks, f"seed {seed}"
        assert sorted_pairs[: len(expected_pairs)].tolist() == expected_pairs, f"seed {seed}"

    @pytest.mark.parametrize(
        "num_tokens,kind,block,dtype",
        [
            (*case, dtype)
            for case in [
                (9, "invalid", (16, 16, 16)),
                (9, "invalid", (16, 16, 16, True)),  # weights through tensor descriptors (TMA)
                (13, "topk", (16, 32, 32)),  # I = 24 < BLOCK_N, H = 40 not a multiple of BLOCK_K
                (13, "topk", (32, 32, 32, True)),
                (40, "topk", (32, 16, 16)),
                (21, "one_expert", (16, 16, 32)),
                (6, "first_slot", (64, 32, 16)),
                (3, "all_invalid", (16, 16, 16)),
                (1, "topk", (16, 16, 16)),
                (0, "topk", (16, 16, 16)),
            ]
            for dtype in (torch.float32, torch.float16)
        ]
        + [(110, "invalid", (16, 32, 16), torch.float32)]  # 330 pairs over 64 experts: one 16-warp program
        + [(200, "invalid", (16, 32, 16), torch.float32)],  # 600 pairs over 64 experts: three-pass align
    )
    def test_fused_moe(self, num_tokens, kind, block, dtype):
        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        num_experts = 64 if num_tokens in (110, 200) else 6
        w13, w2 = make_weights(num_experts, 40, 24, dtype, gen)
        x = torch.randn(num_tokens, 40, generator=gen).to(dtype)
        ids, weights = make_routing(num_tokens, num_experts, 3, kind, gen)
        out = torch.full((num_tokens, 40), float("nan"), dtype=dtype)
        moe.fused_moe(x, w13, w2, ids, weights, backend="triton", config=small_config(*block), out=out)
        assert not out.isnan().any(), f"seed {seed}: unwritten outputs"
        ref = moe.fused_moe_ref(x, w13, w2, ids, weights)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert rel_err(out, ref) < tol, f"seed {seed}: rel err {rel_err(out, ref)}"
        if num_tokens:
            assert rel_err(out, naive_moe(x, w13, w2, ids, weights)) < 10 * tol, f"seed {seed}"

    @pytest.mark.parametrize(
        "block_m,expected_m,dtype",
        [
            (16, None, torch.float32),
            (32, None, torch.float16),
            (16, 5, torch.float32),
            (16, 20, torch.float16),
        ],
    )
    @pytest.mark.parametrize("tma", [False, True])
    def test_masked_moe(self, block_m, expected_m, dtype, tma):
        """Rows below each count match the reference; rows past it are left as they were. A small
        ``expected_m`` gives fewer programs than row blocks: they loop over the rest."""
        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        w13, w2 = make_weights(6, 40, 24, dtype, gen)
        recv_x = torch.randn(6, 40, 40, generator=gen).to(dtype)
        recv_count = torch.tensor([0, 40, 17, 1, 33, 55], dtype=torch.int32)  # 55 > N is taken as N
        out = torch.full_like(recv_x, float("nan"))
        config = small_config(block_m, 16, 16, tma)
        moe.masked_moe(
            recv_x, recv_count, w13, w2, expected_m=expected_m, backend="triton", config=config, out=out
        )
        ref = moe.masked_moe_ref(recv_x, recv_count, w13, w2)
        live = torch.arange(40)[None, :] < recv_count.clamp(max=40)[:, None]  # [E, N]
        assert not out[live].isnan().any(), f"seed {seed}: unwritten live rows"
        assert out[~live].isnan().all(), f"seed {seed}: rows past the count were written"
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert rel_err(out[live], ref[live]) < tol, f"seed {seed}: rel err {rel_err(out[live], ref[live])}"

    def test_masked_moe_no_rows(self):
        w13, w2 = make_weights(3, 16, 16, torch.float32, torch.Generator().manual_seed(0))
        out = moe.masked_moe(
            torch.randn(3, 0, 16), torch.zeros(3, dtype=torch.int32), w13, w2, backend="triton"
        )
        assert out.shape == (3, 0, 16)

    @pytest.mark.parametrize("shape", [(5, 48), (2, 3, 2048 + 96), (0, 8)])
    def test_silu_and_mul(self, shape):
        x = torch.randn(*shape)
        out = moe.silu_and_mul(x, backend="triton")
        torch.testing.assert_close(out, moe.silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


def gpu_test(fn):
    return pytest.mark.gpu(
        pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")(fn)
    )


def cuda_tokens(num_tokens, num_experts, hidden, top_k, kind, dtype, gen):
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(dtype)
    return (x, *make_routing(num_tokens, num_experts, top_k, kind, gen))


def cuda_case(num_tokens, num_experts, hidden, inter, top_k, kind, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13, w2 = make_weights(num_experts, hidden, inter, dtype, gen)
    x, ids, weights = cuda_tokens(num_tokens, num_experts, hidden, top_k, kind, dtype, gen)
    return x, w13, w2, ids, weights


@gpu_test
@pytest.mark.parametrize(
    "num_tokens,kind",
    [(1, "topk"), (7, "invalid"), (64, "topk"), (300, "one_expert"), (2048, "invalid"), (0, "topk")],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_experts,hidden,inter", [(64, 2048, 1408), (8, 256, 96)])
def test_cuda_fused_moe_matches_reference(num_tokens, kind, dtype, num_experts, hidden, inter):
    seed = fresh_seed()
    x, w13, w2, ids, weights = cuda_case(num_tokens, num_experts, hidden, inter, 6, kind, dtype, seed)
    out = torch.full_like(x, float("nan"))
    moe.fused_moe(x, w13, w2, ids, weights, out=out)
    assert not out.isnan().any(), f"seed {seed}: unwritten outputs"
    ref = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), ids, weights)
    assert rel_err(out, ref) < 1e-2, f"seed {seed}: rel err {rel_err(out, ref)}"


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 24, 256])
def test_cuda_masked_moe_matches_reference(dtype, rows):
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13, w2 = make_weights(32, 2048, 1408, dtype, gen)
    recv_x = torch.randn(32, rows, 2048, generator=gen, device="cuda").to(dtype)
    recv_count = torch.randint(0, rows + 1, (32,), generator=gen, device="cuda", dtype=torch.int32)
    recv_count[:3] = torch.tensor([0, rows, rows + 5])
    out = torch.full_like(recv_x, float("nan"))
    moe.masked_moe(recv_x, recv_count, w13, w2, out=out)
    ref = moe.masked_moe_ref(recv_x.float(), recv_count, w13.float(), w2.float())
    live = torch.arange(rows, device="cuda")[None, :] < recv_count.clamp(max=rows)[:, None]
    assert not out[live].isnan().any(), f"seed {seed}: unwritten live rows"
    assert out[~live].isnan().all(), f"seed {seed}: rows past the count were written"
    assert rel_err(out[live], ref[live]) < 1e-2, f"seed {seed}"


@gpu_test
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        MoeConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(32, 256, 4, 3)),
        MoeConfig(64, GemmConfig(64, 64, 4, 4), GemmConfig(128, 128, 4, 3)),
        MoeConfig(128, GemmConfig(64, 64, 8, 4), GemmConfig(256, 64, 8, 3)),
    ],
)
def test_cuda_explicit_configs(config, tma):
    """Tiles of each kind the tuner may pick (mma.sync and wgmma, K tail with block_k 256), with and
    without TMA weight loads, in both layouts."""
    from pd.kernels.moe_triton import has_tma

    if tma and not has_tma(torch.device("cuda")):
        pytest.skip("no TMA in this Triton/GPU")
    config = MoeConfig(
        config.block_m,
        dataclasses.replace(config.gate_up, tma=tma),
        dataclasses.replace(config.down, tma=tma),
    )
    seed = fresh_seed()
    x, w13, w2, ids, weights = cuda_case(500, 64, 2048, 1408, 6, "invalid", torch.bfloat16, seed)
    out = torch.full_like(x, float("nan"))
    moe.fused_moe(x, w13, w2, ids, weights, config=config, out=out)
    ref = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), ids, weights)
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2, f"seed {seed}: rel err {rel_err(out, ref)}"
    recv_x = torch.randn(64, 40, 2048, device="cuda").to(torch.bfloat16)
    count = torch.randint(0, 41, (64,), device="cuda", dtype=torch.int32)
    out = torch.full_like(recv_x, float("nan"))
    moe.masked_moe(recv_x, count, w13, w2, expected_m=8, config=config, out=out)
    ref = moe.masked_moe_ref(recv_x.float(), count, w13.float(), w2.float())
    live = torch.arange(40, device="cuda")[None, :] < count[:, None]
    assert not out[live].isnan().any() and out[~live].isnan().all(), f"seed {seed}"
    assert rel_err(out[live], ref[live]) < 1e-2, f"seed {seed}"


@gpu_test
def test_cuda_fused_moe_is_deterministic_and_batch_invariant():
    """Bitwise: the same call twice, and a token's row whatever the other tokens route to."""
    seed = fresh_seed()
    x, w13, w2, ids, weights = cuda_case(256, 64, 2048, 1408, 6, "topk", torch.bfloat16, seed)
    out = moe.fused_moe(x, w13, w2, ids, weights)
    assert torch.equal(out, moe.fused_moe(x, w13, w2, ids, weights)), f"seed {seed}"
    other_ids = ids.clone()
    other_ids[1:] = torch.roll(ids[1:], 1, dims=1).flip(0)  # same count: same config
    other = moe.fused_moe(x, w13, w2, other_ids, weights)
    assert torch.equal(out[0], other[0]), f"seed {seed}"


@gpu_test
def test_cuda_graph_replay_matches_eager():
    """Both layouts captured in one CUDA graph; new inputs copied into the static buffers replay to
    the eager result bitwise."""
    seed = fresh_seed()
    x, w13, w2, ids, weights = cuda_case(16, 64, 2048, 1408, 6, "invalid", torch.bfloat16, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    recv_x = torch.randn(32, 32, 2048, generator=gen, device="cuda").to(torch.bfloat16)
    count = torch.randint(0, 33, (32,), generator=gen, device="cuda", dtype=torch.int32)
    w13_l, w2_l = w13[:32].contiguous(), w2[:32].contiguous()
    masked_out = torch.zeros_like(recv_x)
    moe.fused_moe(x, w13, w2, ids, weights)  # compile outside the capture
    moe.masked_moe(recv_x, count, w13_l, w2_l, out=masked_out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_out = moe.fused_moe(x, w13, w2, ids, weights)
        moe.masked_moe(recv_x, count, w13_l, w2_l, out=masked_out)
    for _ in range(2):
        x2, ids2, weights2 = cuda_tokens(16, 64, 2048, 6, "topk", torch.bfloat16, gen)
        x.copy_(x2)
        ids.copy_(ids2)
        weights.copy_(weights2)
        recv_x.normal_()
        count.random_(0, 33)
        graph.replay()
        assert torch.equal(fused_out, moe.fused_moe(x, w13, w2, ids, weights)), f"seed {seed}"
        eager = moe.masked_moe(recv_x, count, w13_l, w2_l, out=torch.full_like(recv_x, float("nan")))
        live = torch.arange(32, device="cuda")[None, :] < count[:, None]
        assert not eager[live].isnan().any() and torch.equal(masked_out[live], eager[live]), f"seed {seed}"


@gpu_test
@pytest.mark.parametrize("shape", [(1, 2 * 1408), (4096, 2 * 5632), (3, 7, 96)])
def test_cuda_silu_and_mul(shape):
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    out = moe.silu_and_mul(x)
    ref = moe.silu_and_mul_ref(x.float())
    assert rel_err(out, ref) < 1e-2


# ---------------------------------------------------------------------------------------------
# Block configs and the tuner's search space (CPU)
# ---------------------------------------------------------------------------------------------


def test_config_table_lookup_and_default(tmp_path, monkeypatch):
    from pd.bench.tune_moe import dumps_table
    from pd.kernels import moe_config

    assert moe_config.config_file("NVIDIA H100 80GB HBM3").name == "moe_NVIDIA_H100_80GB_HBM3.json"
    small, large = small_config(16, 64, 128), small_config(128, 128, 64)
    table = {
        "device": "Fake GPU",
        "fused": {moe_config.fused_key(64, 2048, 1408, 6): {"1": small.to_json(), "512": large.to_json()}},
        "masked": {moe_config.masked_key(32, 2048, 1408): {"4": small.to_json()}},
    }
    monkeypatch.setattr(moe_config, "CONFIG_DIR", tmp_path)
    moe_config.config_file("Fake GPU").write_text(dumps_table(table))
    for fn in (moe_config.load_table, moe_config.fused_config, moe_config.masked_config):
        fn.cache_clear()
    try:
        fused = functools.partial(moe_config.fused_config, "Fake GPU", 64, 2048, 1408, 6)
        assert fused(1, 2) == small
        assert fused(2, 2) == large  # the smallest tuned count at or above
        assert fused(9000, 2) == large  # past the end: the largest
        assert fused(1, 4) == moe_config.default_config(6 / 64, 4)  # float32 never uses bf16 tables
        assert moe_config.fused_config("Fake GPU", 32, 2048, 1408, 6, 1, 2) == moe_config.default_config(
            6 / 32, 2
        )
        assert moe_config.masked_config("Fake GPU", 32, 2048, 1408, 3, 2) == small
        assert moe_config.fused_config("Other GPU", 64, 2048, 1408, 6, 8192, 2).block_m == 128
    finally:
        for fn in (moe_config.load_table, moe_config.fused_config, moe_config.masked_config):
            fn.cache_clear()


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_tuner_tiles_fit_the_device(block_m):
    from pd.bench.tune_moe import ACC_REGS_BUDGET, SMEM_BUDGET, gemm_choices, pipeline_smem

    for gate_up in (True, False):
        tiles = gemm_choices(block_m, gate_up)
        assert len(tiles) >= 4
        for t in tiles:
            assert pipeline_smem(block_m, t, gate_up) <= SMEM_BUDGET
            assert (2 if gate_up else 1) * block_m * t.block_n // (t.num_warps * 32) <= ACC_REGS_BUDGET
