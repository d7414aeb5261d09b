"""Block-FP8 (W8A8) GEMMs vs bf16 at DeepSeek-V3 widths on one GPU, every figure beside its floor.

    python -m pd.bench.fp8_gemm [--out FILE.md]

a. Routed experts, 8 local experts (256 at EP 32), H 7168, I 2048, masked layout with T rows per
   expert (all live): ``masked_moe_fp8`` on FP8 input (e4m3 rows + scales, as an FP8 low-latency
   dispatch delivers them) and on bf16 input (quantized inside), vs bf16 ``masked_moe``; at 4096 rows
   per expert also the sorted layout (``fused_moe_fp8`` vs ``fused_moe``, 4096 tokens each routed to
   all 8 experts). Floor = max(bytes / HBM bandwidth, FLOPs / peak), bytes = expert weights (3 H x I
   per expert, plus FP8 block scales) + activations in and out.
b. Dense ``block_fp8_linear`` (the path "auto" takes: torch._scaled_mm on SM90) and its Triton GEMM
   vs a bf16 ``x @ w.T``: TFLOP/s, % of peak, and % of HBM bandwidth (weights + activations).
c. ``quant_groups`` of a [8192, 7168] bf16 tensor: % of HBM bandwidth.

Times: medians of CUDA-event timings of one CUDA-graph replay per call (triton.testing.do_bench, which
clears the L2 cache before every run), after a warm-up call (Triton JIT). Ceilings from
shared/gpu/NOTES.md (H200): HBM 4.3 TB/s copy, bf16 0.79 PFLOP/s, FP8 1.36 PFLOP/s. Every row also
carries the relative error of the FP8 result against its torch reference. No assertions on timings.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pd.kernels import fp8, moe

HIDDEN, INTER, LOCAL_EXPERTS = 7168, 2048, 8
HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS_PER_S = 0.79e15
FP8_FLOPS_PER_S = 1.36e15
MASKED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 4096)
DENSE_SHAPES = {  # name: (N, K) of y [M, N] = x [M, K] . W^T
    "mlp_down 2048->7168": (7168, 2048),
    "mlp_gate 7168->2048": (2048, 7168),
    "q_b_proj 1536->24576": (24576, 1536),
    "kv_a_proj 7168->576 (640)": (640, 7168),
    "o_proj 16384->7168": (7168, 16384),
}
DENSE_ROWS = (1, 64, 4096, 8192)
DEVICE = "cuda"


def bench_us(fn: Callable[[], object]) -> float:
    """Median µs of one CUDA-graph replay of ``fn`` (captured after a warm-up call)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    us = 1e3 * do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph
    return us


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def floor_us(nbytes: float, flops: float, peak: float) -> float:
    return 1e6 * max(nbytes / HBM_BYTES_PER_S, flops / peak)


def random_fp8_weight(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` ~ N(0, 1/K) quantized per 128x128 block: (e4m3, float32 scale [.., N/128, K/128])."""
    *batch, n, k = shape
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    scale = torch.empty(*batch, n // 128, k // 128, device=DEVICE)
    for i in range(q.view(-1, n, k).shape[0]):  # one matrix at a time: bounded float32 temporaries
        w = torch.randn(n // 128, 128, k // 128, 128, device=DEVICE) / k**0.5
        s = w.abs().amax((1, 3)) / 448
        scale.view(-1, n // 128, k // 128)[i] = s
        q.view(-1, n, k)[i] = (w / s[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    return q, scale


def experts_bytes(rows: int, weight_itemsize: int, act_itemsize: int) -> float:
    """Weights of the 8 experts (+ FP8 block scales), their rows in (+ FP8 row scales) and out (bf16)."""
    weights = LOCAL_EXPERTS * 3 * HIDDEN * INTER * weight_itemsize
    if weight_itemsize == 1:
        weights += LOCAL_EXPERTS * 3 * (HIDDEN // 128) * (INTER // 128) * 4
    acts_in = LOCAL_EXPERTS * rows * HIDDEN * act_itemsize
    if act_itemsize == 1:
        acts_in += LOCAL_EXPERTS * rows * (HIDDEN // 128) * 4
    return weights + acts_in + LOCAL_EXPERTS * rows * HIDDEN * 2


def bench_experts() -> list[dict]:
    w13, s13 = random_fp8_weight((LOCAL_EXPERTS, 2 * INTER, HIDDEN))
    w2, s2 = random_fp8_weight((LOCAL_EXPERTS, HIDDEN, INTER))
    weights = (w13, s13, w2, s2, fp8.dequant_block(w13, s13).bfloat16(), fp8.dequant_block(w2, s2).bfloat16())
    rows_out = [_bench_masked(rows, *weights) for rows in MASKED_ROWS]
    rows_out.append(_bench_sorted(4096, *weights))
    return rows_out


def _bench_masked(rows: int, w13, s13, w2, s2, w13_bf, w2_bf) -> dict:
    """Masked layout, ``rows`` live rows on each expert."""
    recv_x = torch.randn(LOCAL_EXPERTS, rows, HIDDEN, device=DEVICE).bfloat16()
    count = torch.full((LOCAL_EXPERTS,), rows, dtype=torch.int32, device=DEVICE)
    xq, xs = fp8.quant_groups(recv_x)
    out = torch.empty_like(recv_x)

    def fp8_call():
        return fp8.masked_moe_fp8(xq, count, w13, s13, w2, s2, x_scale=xs, expected_m=rows, out=out)

    def fp8_bf16_in_call():
        return fp8.masked_moe_fp8(recv_x, count, w13, s13, w2, s2, expected_m=rows, out=out)

    def bf16_call():
        return moe.masked_moe(recv_x, count, w13_bf, w2_bf, expected_m=rows, out=out)

    fp8_us = bench_us(fp8_call)
    err = rel_err(fp8_call(), fp8.masked_moe_fp8_ref(xq, count, w13, s13, w2, s2, x_scale=xs))
    cfg = fp8.masked_moe_fp8_config(xq, w13, rows)
    return _expert_row("masked", rows, fp8_us, bench_us(fp8_bf16_in_call), bench_us(bf16_call), err, cfg)


def _bench_sorted(tokens: int, w13, s13, w2, s2, w13_bf, w2_bf) -> dict:
    """Sorted layout, ``tokens`` tokens each routed to all 8 experts (``tokens`` rows per expert)."""
    x = torch.randn(tokens, HIDDEN, device=DEVICE).bfloat16()
    ids = torch.arange(LOCAL_EXPERTS, device=DEVICE).repeat(tokens, 1)
    weights = torch.rand(tokens, LOCAL_EXPERTS, device=DEVICE)
    out = torch.empty_like(x)

    def fp8_call():
        return fp8.fused_moe_fp8(x, w13, s13, w2, s2, ids, weights, out=out)

    def bf16_call():
        return moe.fused_moe(x, w13_bf, w2_bf, ids, weights, out=out)

    fp8_us = bench_us(fp8_call)
    err = rel_err(fp8_call(), fp8.fused_moe_fp8_ref(x, w13, s13, w2, s2, ids, weights))
    cfg = fp8.fused_moe_fp8_config(x, w13, ids)
    return _expert_row("fused", tokens, fp8_us, None, bench_us(bf16_call), err, cfg)


def _expert_row(layout, rows, fp8_us, bf16_in_us, bf16_us, err, cfg) -> dict:
    """One row of table a: ``rows`` rows per expert on each of the 8 experts."""
    flops = LOCAL_EXPERTS * rows * 6 * HIDDEN * INTER
    fp8_bytes = experts_bytes(rows, 1, 1)
    bf16_bytes = experts_bytes(rows, 2, 2)
    return dict(
        layout=layout,
        rows=rows,
        fp8_us=fp8_us,
        fp8_floor_us=floor_us(fp8_bytes, flops, FP8_FLOPS_PER_S),
        fp8_hbm=fp8_bytes / (fp8_us * 1e-6) / HBM_BYTES_PER_S,
        fp8_peak=flops / (fp8_us * 1e-6) / FP8_FLOPS_PER_S,
        bf16_in_us=bf16_in_us,
        bf16_us=bf16_us,
        bf16_floor_us=floor_us(bf16_bytes, flops, BF16_FLOPS_PER_S),
        bf16_hbm=bf16_bytes / (bf16_us * 1e-6) / HBM_BYTES_PER_S,
        bf16_peak=flops / (bf16_us * 1e-6) / BF16_FLOPS_PER_S,
        rel_err=err,
        config=_config_str(cfg),
    )


def bench_dense() -> list[dict]:
    rows_out = []
    for name, (n, k) in DENSE_SHAPES.items():
        w, w_scale = random_fp8_weight((n, k))
        w_bf = fp8.dequant_block(w, w_scale).bfloat16()
        for m in DENSE_ROWS:
            x = torch.randn(m, k, device=DEVICE).bfloat16()
            fp8_us = bench_us(lambda x=x, w=w, s=w_scale: fp8.block_fp8_linear(x, w, s))
            triton_us = bench_us(lambda x=x, w=w, s=w_scale: fp8.block_fp8_linear(x, w, s, backend="triton"))
            bf16_us = bench_us(lambda x=x, w=w_bf: x @ w.t())
            err = rel_err(fp8.block_fp8_linear(x, w, w_scale), fp8.block_fp8_linear_ref(x, w, w_scale))
            flops = 2 * m * n * k
            fp8_bytes = n * k + (n // 128) * (k // 128) * 4 + m * k * 2 + m * n * 2  # x read in bf16
            bf16_bytes = 2 * n * k + m * k * 2 + m * n * 2
            rows_out.append(
                dict(
                    shape=name,
                    m=m,
                    path="_scaled_mm" if fp8.scaled_mm_eligible(x, w) else "triton",
                    fp8_us=fp8_us,
                    fp8_floor_us=floor_us(fp8_bytes, flops, FP8_FLOPS_PER_S),
                    fp8_tflops=flops / (fp8_us * 1e-6) / 1e12,
                    fp8_peak=flops / (fp8_us * 1e-6) / FP8_FLOPS_PER_S,
                    fp8_hbm=fp8_bytes / (fp8_us * 1e-6) / HBM_BYTES_PER_S,
                    triton_us=triton_us,
                    bf16_us=bf16_us,
                    bf16_floor_us=floor_us(bf16_bytes, flops, BF16_FLOPS_PER_S),
                    bf16_tflops=flops / (bf16_us * 1e-6) / 1e12,
                    bf16_peak=flops / (bf16_us * 1e-6) / BF16_FLOPS_PER_S,
                    bf16_hbm=bf16_bytes / (bf16_us * 1e-6) / HBM_BYTES_PER_S,
                    rel_err=err,
                )
            )
        del w, w_scale, w_bf
    return rows_out


def bench_quant() -> dict:
    x = torch.randn(8192, 7168, device=DEVICE).bfloat16()
    us = bench_us(lambda: fp8.quant_groups(x))
    q, s = fp8.quant_groups(x)
    q_ref, s_ref = fp8.quant_groups_ref(x)
    exact = bool(torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float()))
    nbytes = x.numel() * 2 + q.numel() + s.numel() * 4
    return dict(
        us=us,
        floor_us=1e6 * nbytes / HBM_BYTES_PER_S,
        hbm=nbytes / (us * 1e-6) / HBM_BYTES_PER_S,
        exact=exact,
    )


def _config_str(cfg) -> str:
    g, d = cfg.gate_up, cfg.down
    tma = lambda t: "tma" if t else ""  # noqa: E731
    return (
        f"m{cfg.block_m} gu{g.block_n}w{g.num_warps}s{g.num_stages}{tma(g.tma)} "
        f"dn{d.block_n}w{d.num_warps}s{d.num_stages}{tma(d.tma)}"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(experts: list[dict], dense: list[dict], quant: dict, header: str) -> str:
    lines = [header, "", "## a. Routed experts: 8 local experts, H 7168, I 2048 (DeepSeek-V3 at EP 32)", ""]
    lines += [
        "| layout | rows/expert | fp8 µs | fp8 floor µs | of floor | HBM | FP8 peak | fp8 (bf16 in) µs "
        "| bf16 µs | bf16 floor µs | of floor | HBM | bf16 peak | bf16/fp8 | rel err | fp8 config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in experts:
        bf16_in = f"{r['bf16_in_us']:.1f}" if r["bf16_in_us"] is not None else "-"
        lines.append(
            f"| {r['layout']} | {r['rows']} | {r['fp8_us']:.1f} | {r['fp8_floor_us']:.1f} "
            f"| {_pct(r['fp8_floor_us'] / r['fp8_us'])} | {_pct(r['fp8_hbm'])} | {_pct(r['fp8_peak'])} | {bf16_in} "
            f"| {r['bf16_us']:.1f} | {r['bf16_floor_us']:.1f} | {_pct(r['bf16_floor_us'] / r['bf16_us'])} "
            f"| {_pct(r['bf16_hbm'])} | {_pct(r['bf16_peak'])} | {r['bf16_us'] / r['fp8_us']:.2f}x "
            f"| {r['rel_err']:.1e} | {r['config']} |"
        )
    lines += ["", "## b. Dense block_fp8_linear vs bf16 matmul", ""]
    lines += [
        "| weight (N x K) | M | fp8 path | fp8 µs | fp8 floor µs | TFLOP/s | FP8 peak | HBM | triton µs "
        "| bf16 µs | bf16 floor µs | TFLOP/s | bf16 peak | HBM | bf16/fp8 | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in dense:
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['path']} | {r['fp8_us']:.1f} | {r['fp8_floor_us']:.1f} "
            f"| {r['fp8_tflops']:.0f} | {_pct(r['fp8_peak'])} | {_pct(r['fp8_hbm'])} | {r['triton_us']:.1f} "
            f"| {r['bf16_us']:.1f} | {r['bf16_floor_us']:.1f} | {r['bf16_tflops']:.0f} | {_pct(r['bf16_peak'])} "
            f"| {_pct(r['bf16_hbm'])} | {r['bf16_us'] / r['fp8_us']:.2f}x | {r['rel_err']:.1e} |"
        )
    lines += [
        "",
        "## c. quant_groups [8192, 7168] bf16 -> e4m3 + scales",
        "",
        "| µs | floor µs | HBM | bitwise = reference |",
        "|---|---|---|---|",
        f"| {quant['us']:.1f} | {quant['floor_us']:.1f} | {_pct(quant['hbm'])} | {quant['exact']} |",
    ]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import triton

    start = time.monotonic()
    torch.manual_seed(0)
    header = (
        f"# Block-FP8 GEMMs on {torch.cuda.get_device_name()} ({datetime.date.today()}, commit {_commit()}, "
        f"torch {torch.__version__}, triton {triton.__version__})\n\n"
        f"Ceilings: HBM {HBM_BYTES_PER_S / 1e12:.1f} TB/s, bf16 {BF16_FLOPS_PER_S / 1e15:.2f} PFLOP/s, "
        f"FP8 {FP8_FLOPS_PER_S / 1e15:.2f} PFLOP/s. Times: median µs per CUDA-graph replay, L2 cleared."
    )
    experts = bench_experts()
    print(f"experts done ({time.monotonic() - start:.0f} s)", flush=True)
    dense = bench_dense()
    print(f"dense done ({time.monotonic() - start:.0f} s)", flush=True)
    quant = bench_quant()
    text = markdown(experts, dense, quant, header)
    print(text)
    print(f"total {time.monotonic() - start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
