"""Block-FP8 kernels on CUDA (``pytest -m gpu tests/test_gpu_fp8.py``; skipped elsewhere): the Triton
kernels and torch._scaled_mm against the torch references of pd.kernels.fp8 (which quantize exactly as
the kernels do, so the differences are float32 accumulation order and the roundings that follow),
CUDA-graph replay against eager, run-to-run determinism, and the default configs at DeepSeek-V3 widths.

Two probes (xfail, non-strict) report torch._scaled_mm's limits without gating: XPASS means the
workaround in ``block_fp8_linear`` (rows padded to a multiple of 4; K/128 not a multiple of 4 sent to
the Triton GEMM) is unnecessary on this torch/cuBLAS; XFAIL that it is needed (or the call fails).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pd.kernels import fp8
from pd.kernels.moe_config import GemmConfig, MoeConfig, fp8_default_config
from tests.test_kernels_fp8 import expert_weights, fresh_seed, quantized_weight, routing

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("needs triton", allow_module_level=True)

TOL = 1e-2  # relative error vs the reference (same quantization): accumulation order only


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 on the device (the outputs here reach 10^8 elements)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# quant_groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 128), (5, 300), (257, 7168), (3, 4, 2112)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_quant_groups_matches_reference_bitwise(shape, dtype, layout):
    """IEEE divisions and round-to-nearest-even casts on both sides: scales and values are equal."""
    if layout == "col" and len(shape) != 2:
        pytest.skip("col layout is 2-D only")
    seed = fresh_seed()
    x = (torch.randn(shape, generator=cuda_gen(seed), device="cuda") * 30).to(dtype)
    x.view(-1, shape[-1])[0, :128] = 0  # an all-zero group
    q, scale = fp8.quant_groups(x, scale_layout=layout)
    q_ref, scale_ref = fp8.quant_groups_ref(x, scale_layout=layout)
    assert scale.shape == scale_ref.shape and scale.stride() == scale_ref.stride()
    assert torch.equal(scale, scale_ref), f"seed {seed}"
    mismatch = int((q.float() != q_ref.float()).sum())
    assert mismatch == 0, f"seed {seed}: {mismatch} values differ"


# ---------------------------------------------------------------------------------------------
# block_fp8_linear
# ---------------------------------------------------------------------------------------------

# (N, K) of DeepSeek-V3's dense projections and one small shape (K/128 = 3: the Triton GEMM on "auto").
LINEAR_SHAPES = {
    "q_b_proj": (24576, 1536),
    "kv_a_proj_576_padded": (640, 7168),
    "o_proj": (7168, 16384),
    "mlp_down": (7168, 2048),
    "mlp_gate": (2048, 7168),
    "small": (256, 384),
}


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 100, 4096])
@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_block_fp8_linear_matches_reference(rows, shape, backend):
    seed = fresh_seed()
    gen = cuda_gen(seed)
    w, w_scale = quantized_weight(LINEAR_SHAPES[shape], gen)
    x = torch.randn(rows, w.shape[1], generator=gen, device="cuda").bfloat16()
    out = fp8.block_fp8_linear(x, w, w_scale, backend=backend)
    assert out.shape == (rows, w.shape[0]) and out.dtype == torch.bfloat16
    if rows:
        err = rel_err(out, fp8.block_fp8_linear_ref(x, w, w_scale))
        path = "_scaled_mm" if backend == "auto" and fp8.scaled_mm_eligible(x, w) else "triton"
        assert err < TOL, f"seed {seed}: {path} rel err {err}"


def test_scaled_mm_path_is_taken_for_deepseek_shapes():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the _scaled_mm path is SM90-only")
    x = torch.zeros(2, 7168, dtype=torch.bfloat16, device="cuda")
    assert fp8.scaled_mm_eligible(x, torch.empty(640, 7168, dtype=torch.float8_e4m3fn, device="cuda"))
    assert not fp8.scaled_mm_eligible(
        x[:, :384], torch.empty(256, 384, dtype=torch.float8_e4m3fn, device="cuda")
    )


# ---------------------------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------------------------

# Explicit tiles besides the shape defaults: TMA weight loads (swapped 16-row tiles), 32-row tiles with
# h quantized by a separate launch (gate/up block_n 64), 64-row wgmma tiles with 4 warps for gate/up.
CONFIGS = {
    "default": None,
    "tma": MoeConfig(16, GemmConfig(128, 128, 4, 4, True), GemmConfig(64, 128, 4, 4, True)),
    "unfused": MoeConfig(32, GemmConfig(64, 128, 4, 4), GemmConfig(128, 128, 4, 4)),
    "m64": MoeConfig(64, GemmConfig(64, 128, 4, 3), GemmConfig(128, 128, 8, 3)),
}


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_moe_fp8_matches_reference(num_tokens, name):
    seed = fresh_seed()
    gen = cuda_gen(seed)
    w13, s13, w2, s2 = expert_weights(16, 512, 256, gen)
    x = torch.randn(num_tokens, 512, generator=gen, device="cuda").bfloat16()
    ids, weights = routing(num_tokens, 16, 4, gen)  # some ids -1 or >= E
    out = torch.full_like(x, float("nan"))
    fp8.fused_moe_fp8(x, w13, s13, w2, s2, ids, weights, config=CONFIGS[name], out=out)
    assert not out.isnan().any(), f"seed {seed}: unwritten outputs"
    err = rel_err(out, fp8.fused_moe_fp8_ref(x, w13, s13, w2, s2, ids, weights))
    assert err < TOL, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fp8_input", [None, "row", "col"])
@pytest.mark.parametrize("expected_m", [None, 3, 200])
def test_masked_moe_fp8_matches_reference(name, fp8_input, expected_m):
    """Counts 0, N, partial and above N; rows past each count are not written; expected_m below the
    real counts (programs loop) and above N; FP8 input with its scales row-major or rows-fastest."""
    seed = fresh_seed()
    gen = cuda_gen(seed)
    w13, s13, w2, s2 = expert_weights(6, 512, 256, gen)
    recv_x = torch.randn(6, 48, 512, generator=gen, device="cuda").bfloat16()
    count = torch.tensor([0, 48, 17, 1, 60, 33], dtype=torch.int32, device="cuda")
    x_scale = None
    if fp8_input:
        recv_x, x_scale = fp8.quant_groups(recv_x)
        if fp8_input == "col":  # rows fastest within an expert
            x_scale = x_scale.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((6, 48, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp8.masked_moe_fp8(
        recv_x, count, w13, s13, w2, s2, x_scale=x_scale, expected_m=expected_m, config=CONFIGS[name], out=out
    )
    ref = fp8.masked_moe_fp8_ref(recv_x, count, w13, s13, w2, s2, x_scale=x_scale)
    live = torch.arange(48, device="cuda")[None, :] < count.clamp(max=48)[:, None]
    assert not out[live].isnan().any(), f"seed {seed}: unwritten live rows"
    assert out[~live].isnan().all(), f"seed {seed}: rows past the count were written"
    err = rel_err(out[live], ref[live])
    assert err < TOL, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("rows_per_expert", [1, 24, 128])
def test_default_configs_at_deepseek_widths(rows_per_expert):
    """H 7168, I 2048, 8 local experts (256 at EP 32): each default tile (16, 32, 64 rows) launches
    (shared memory, registers) and matches the reference, in both layouts."""
    seed = fresh_seed()
    gen = cuda_gen(seed)
    w13, s13, w2, s2 = expert_weights(8, 7168, 2048, gen)
    recv_x = torch.randn(8, rows_per_expert, 7168, generator=gen, device="cuda").bfloat16()
    count = torch.full((8,), rows_per_expert, dtype=torch.int32, device="cuda")
    count[0] = rows_per_expert // 2
    out = fp8.masked_moe_fp8(recv_x, count, w13, s13, w2, s2, expected_m=rows_per_expert)
    ref = fp8.masked_moe_fp8_ref(recv_x, count, w13, s13, w2, s2)
    live = torch.arange(rows_per_expert, device="cuda")[None, :] < count[:, None]
    assert rel_err(out[live], ref[live]) < TOL, f"seed {seed}"
    x = recv_x[1]
    ids, weights = routing(rows_per_expert, 8, 8, gen, invalid=False)  # every token on every expert
    err = rel_err(
        fp8.fused_moe_fp8(x, w13, s13, w2, s2, ids, weights),
        fp8.fused_moe_fp8_ref(x, w13, s13, w2, s2, ids, weights),
    )
    assert err < TOL, f"seed {seed}: fused rel err {err} with {fp8_default_config(rows_per_expert)}"


# ---------------------------------------------------------------------------------------------
# CUDA graphs and determinism
# ---------------------------------------------------------------------------------------------


def test_cuda_graph_replay_matches_eager():
    """masked_moe_fp8 (bf16 and FP8 input) and block_fp8_linear captured once, replayed on new inputs
    and counts copied into the captured buffers: the Triton kernels bitwise equal to eager calls on the
    same inputs, torch._scaled_mm to accumulation order."""
    gen = cuda_gen(fresh_seed())
    w13, s13, w2, s2 = expert_weights(8, 1024, 256, gen)
    w, w_scale = quantized_weight((2048, 1024), gen)
    recv_x = torch.zeros(8, 64, 1024, dtype=torch.bfloat16, device="cuda")
    count = torch.zeros(8, dtype=torch.int32, device="cuda")
    x8 = torch.zeros(8, 64, 1024, dtype=torch.float8_e4m3fn, device="cuda")
    x8_scale = torch.ones(8, 64, 8, device="cuda")
    x = torch.zeros(5, 1024, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty(8, 64, 1024, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

    def step():
        fp8.masked_moe_fp8(recv_x, count, w13, s13, w2, s2, expected_m=8, out=outs[0])
        fp8.masked_moe_fp8(x8, count, w13, s13, w2, s2, x_scale=x8_scale, expected_m=8, out=outs[1])
        return fp8.block_fp8_linear(x, w, w_scale)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear_out = step()
    for _ in range(3):
        recv_x.copy_(torch.randn(recv_x.shape, generator=gen, device="cuda"))
        q, s = fp8.quant_groups(recv_x)
        x8.copy_(q)
        x8_scale.copy_(s)
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        count.copy_(torch.randint(0, 80, (8,), generator=gen, device="cuda", dtype=torch.int32))
        graph.replay()
        live = torch.arange(64, device="cuda")[None, :] < count.clamp(max=64)[:, None]
        eager = [fp8.masked_moe_fp8(recv_x, count, w13, s13, w2, s2, expected_m=8)]
        eager.append(fp8.masked_moe_fp8(x8, count, w13, s13, w2, s2, x_scale=x8_scale, expected_m=8))
        for got, want in zip(outs, eager):
            assert torch.equal(got[live], want[live])
        # cuBLASLt may choose another algorithm inside a capture: equal up to accumulation order.
        assert rel_err(linear_out, fp8.block_fp8_linear(x, w, w_scale)) < 1e-3
    del graph


def test_runs_are_bitwise_reproducible():
    gen = cuda_gen(fresh_seed())
    w13, s13, w2, s2 = expert_weights(16, 512, 256, gen)
    x = torch.randn(300, 512, generator=gen, device="cuda").bfloat16()
    ids, weights = routing(300, 16, 4, gen)
    runs = [fp8.fused_moe_fp8(x, w13, s13, w2, s2, ids, weights) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    recv_x = torch.randn(16, 40, 512, generator=gen, device="cuda").bfloat16()
    count = torch.randint(0, 41, (16,), generator=gen, device="cuda", dtype=torch.int32)
    runs = [fp8.masked_moe_fp8(recv_x, count, w13, s13, w2, s2) for _ in range(2)]
    live = torch.arange(40, device="cuda")[None, :] < count[:, None]
    assert torch.equal(runs[0][live], runs[1][live])
    w, w_scale = quantized_weight((7168, 2048), gen)
    x = torch.randn(100, 2048, generator=gen, device="cuda").bfloat16()
    for backend in ("auto", "triton"):
        runs = [fp8.block_fp8_linear(x, w, w_scale, backend=backend) for _ in range(2)]
        assert torch.equal(runs[0], runs[1]), backend


# ---------------------------------------------------------------------------------------------
# Probes of torch._scaled_mm (last: a call outside its contract must not disturb the tests above)
# ---------------------------------------------------------------------------------------------


def _raw_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """torch._scaled_mm without block_fp8_linear's padding of the rows."""
    q, s = fp8.quant_groups(x, scale_layout="col")
    return torch._scaled_mm(q, w.t(), scale_a=s, scale_b=w_scale.t(), out_dtype=torch.bfloat16)


@pytest.mark.xfail(strict=False, reason="probe: block_fp8_linear pads rows to a multiple of 4 regardless")
@pytest.mark.parametrize("rows", [1, 3, 5, 17, 101])
def test_probe_scaled_mm_rows_not_multiple_of_4(rows):
    gen = cuda_gen(fresh_seed())
    w, w_scale = quantized_weight((2048, 7168), gen)
    x = torch.randn(rows, 7168, generator=gen, device="cuda").bfloat16()
    assert rel_err(_raw_scaled_mm(x, w, w_scale), fp8.block_fp8_linear_ref(x, w, w_scale)) < TOL


@pytest.mark.xfail(strict=False, reason="probe: block_fp8_linear sends K/128 % 4 != 0 to its Triton GEMM")
@pytest.mark.parametrize("k", [384, 2816])
def test_probe_scaled_mm_k_blocks_not_multiple_of_4(k):
    gen = cuda_gen(fresh_seed())
    w, w_scale = quantized_weight((2048, k), gen)
    x = torch.randn(64, k, generator=gen, device="cuda").bfloat16()
    assert rel_err(_raw_scaled_mm(x, w, w_scale), fp8.block_fp8_linear_ref(x, w, w_scale)) < TOL
