"""Decode's small dense GEMMs on one GPU: cuBLAS against ``pd.kernels.skinny``, each beside its floor.

    python -m pd.bench.skinny [--rows 1,4,8,16,32,64] [--sweep] [--out FILE.md]

Shapes: the DESIGN.md §8 (Moonlight) layer's projections (``q_kv_a``, ``o_proj``, the shared experts, the router
with float32 output, the dense layer's MLP) and MLA's absorbed ``kv_b_proj`` factors (per head). Time per call:
a CUDA graph of calls over distinct weight copies (more bytes than L2 holds, so each call reads its weight from
HBM), replayed, divided by the calls (``pd.bench.moe_kernels.graph_us``). Floor = weight bytes / 4.3 TB/s (H200
copy bandwidth, shared/gpu/NOTES.md). ``--sweep`` also times a grid of kernel configs and prints the best per shape
and row count beside ``pd.kernels.skinny.config``. Every row carries the kernel's max relative error against a
float32 product. The Triton kernel serves only the per-head factors in the model (``skinny_h200.md`` says why).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable

import torch

from pd.bench.moe_kernels import graph_us
from pd.kernels import skinny

HBM_BYTES_PER_S = 4.3e12
L2_SPILL_BYTES = 300e6  # the graph's weights span this much: beyond the H200's 50 MB L2 several times
# name: (heads or 0 for a plain projection, N, K, float32 output)
SHAPES = {
    "q_kv_a 2048->3648": (0, 3648, 2048, False),
    "o_proj 2048->2048": (0, 2048, 2048, False),
    "shared gate_up 2048->5632": (0, 5632, 2048, False),
    "shared down 2816->2048": (0, 2048, 2816, False),
    "router 2048->64 (fp32 out)": (0, 64, 2048, True),
    "dense gate_up 2048->22528": (0, 22528, 2048, False),
    "dense down 11264->2048": (0, 2048, 11264, False),
    "w_uk 16 x (128->512)": (16, 512, 128, False),
    "w_uv 16 x (512->128)": (16, 128, 512, False),
}
SWEEP = [
    *itertools.product((16, 32, 64), (128, 256), (4,), (3, 5)),
    (16, 512, 4, 3), (32, 512, 8, 3), (64, 128, 8, 4), (16, 64, 4, 6),
]  # fmt: skip


def weights(heads: int, n: int, k: int) -> list[torch.Tensor]:
    nbytes = max(1, heads) * n * k * 2
    copies = int(min(256, max(4, L2_SPILL_BYTES // nbytes)))
    if heads:  # w_uk is read transposed (``[H, nope, kv_lora]`` as ``[H, N=kv_lora, K=nope]``)
        shape = (heads, k, n) if n > k else (heads, n, k)
        ws = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        return [w.transpose(1, 2) if n > k else w for w in ws]
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]


def calls_for(
    heads: int, fp32: bool, x: torch.Tensor, ws: list[torch.Tensor], cfg
) -> list[Callable[[], object]]:
    """One call per weight copy: cuBLAS (``cfg`` None) or the Triton kernel with ``cfg``."""
    ops = skinny._triton_ops()
    if heads:
        if cfg is None:
            return [lambda w=w: torch.einsum("thk,hnk->thn", x, w) for w in ws]
        out = torch.empty(x.shape[0], heads, ws[0].shape[1], dtype=x.dtype, device="cuda")
        return [lambda w=w: ops.skinny_bmm(x.transpose(0, 1), w, out.transpose(0, 1), *cfg) for w in ws]
    dtype = torch.float32 if fp32 else x.dtype
    if cfg is None:
        if fp32:
            return [lambda w=w: torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws]
        return [lambda w=w: torch.nn.functional.linear(x, w) for w in ws]
    out = torch.empty(x.shape[0], ws[0].shape[0], dtype=dtype, device="cuda")
    return [lambda w=w: ops.skinny_bmm(x[None], w[None], out[None], *cfg) for w in ws]


def rel_err(heads: int, fp32: bool, x: torch.Tensor, w: torch.Tensor) -> float:
    if heads:
        got = skinny.head_mm(x, w, triton=True).float()
        ref = torch.einsum("thk,hnk->thn", x.float(), w.float())
    else:
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32 if fp32 else x.dtype, device="cuda")
        got = skinny._triton_ops().skinny_bmm(x[None], w[None], out[None], *skinny.config(*w.shape, len(x)))
        got = got[0].float()
        ref = x.float() @ w.float().t()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run(rows: list[int], sweep: bool) -> list[dict]:
    results = []
    for name, (heads, n, k, fp32) in SHAPES.items():
        ws = weights(heads, n, k)
        floor = max(1, heads) * n * k * 2 / HBM_BYTES_PER_S * 1e6
        for m in rows:
            shape = (m, heads, k) if heads else (m, k)
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            default = skinny.config(n, k, m)
            r = {
                "shape": name, "rows": m, "floor_us": floor,
                "cublas_us": graph_us(calls_for(heads, fp32, x, ws, None)),
                "skinny_us": graph_us(calls_for(heads, fp32, x, ws, default)),
                "default": list(default), "rel_err": rel_err(heads, fp32, x, ws[0]),
            }  # fmt: skip
            if sweep:
                timed = []
                for c in SWEEP:
                    try:
                        timed.append((graph_us(calls_for(heads, fp32, x, ws, c)), c))
                    except Exception as e:  # a config past the SM's shared memory: not a candidate
                        if "out of resource" not in str(e):
                            raise
                best_us, best = min(timed)
                r.update(best_us=best_us, best=list(best))
            results.append(r)
            print(json.dumps(r), flush=True)
        del ws
        torch.cuda.empty_cache()
    return results


def markdown(results: list[dict]) -> str:
    lines = [
        "| shape | rows | floor us | cuBLAS us (x floor) | skinny us (x floor) | best swept us (config) | max rel err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        best = f"{r['best_us']:.2f} {tuple(r['best'])}" if "best_us" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['floor_us']:.2f} | {r['cublas_us']:.2f} "
            f"({r['cublas_us'] / r['floor_us']:.1f}x) | {r['skinny_us']:.2f} ({r['skinny_us'] / r['floor_us']:.1f}x) "
            f"| {best} | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,8,16,32,64")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    table = markdown(run([int(r) for r in args.rows.split(",")], args.sweep))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
