"""pd.bench.kernel_classes: kernel names (as the CUDA profiler reports pd's kernels) land in their class, and
the breakdown adds up to the wall time."""

from __future__ import annotations

import pytest

from pd.bench.kernel_classes import OTHER, breakdown, classify, format_breakdown


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("_fused_moe_kernel_masked", "routed experts"),
        ("_gate_up_sorted_kernel", "routed experts"),  # pd's own, as the H200 profile names them
        ("_down_sorted_kernel", "routed experts"),
        ("_align_scatter_kernel", "routed experts"),
        ("_sum_topk_kernel", "routed experts"),
        ("_silu_and_mul_kernel", "routed experts"),
        ("void flashinfer::NoAuxTc<float>(...)", "routing"),
        ("void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>", "norm"),
        ("void flashinfer::BatchPrefillWithRaggedKVCacheKernel<...>", "attention"),
        ("void flashinfer::mla::hopper::BatchMLAPageAttentionHopperKernel<...>", "attention"),
        ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "routing"),
        ("void flashinfer::BatchMLAPagedAttentionKernel<...>", "attention"),
        ("_grouped_topk_kernel", "routing"),
        ("void at::native::(anonymous namespace)::fused_rms_norm_kernel", "norm"),
        ("_apply_rope_and_store", "rope"),
        ("nvjet_tst_128x64_64x4_1x2_h_bz_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"),
        ("_block_fp8_quant_kernel", "quantization"),
        ("void at::native::elementwise_kernel<128, 2>", "elementwise/copies"),
        ("Memcpy DtoD (Device -> Device)", "elementwise/copies"),
        ("_gumbel_sample_kernel", "sampling"),
        ("mystery", OTHER),
    ],
)
def test_classify(name, cls):
    assert classify(name) == cls


def test_breakdown_sums_to_the_wall_with_the_gap():
    kernels = [("moe_a", 50.0), ("moe_b", 25.0), ("nvjet_x", 10.0), ("flashinfer_mla", 5.0)]
    rows = breakdown(kernels, wall_us=120.0)
    assert rows == {"routed experts": 75.0, "gemm": 10.0, "attention": 5.0, "gap": 30.0}
    assert sum(rows.values()) == pytest.approx(120.0)
    assert breakdown(kernels, wall_us=60.0)["gap"] == 0.0  # overlapping kernels: no negative gap
    table = format_breakdown(rows, 120.0)
    assert table.splitlines()[2] == "| routed experts | 75.0 | 62.5% |"
