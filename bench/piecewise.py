"""Piecewise CUDA graphs (the routed experts eager between graphs of the rest, ``pd.engine.graph.PiecewiseGraph``)
against whole graphs and eager, on one GPU (EP = 1 through the normal path), DESIGN.md §8 shape, dummy weights:
decode steps at each batch and short prompt steps at each extend bucket, each beside its floor.

    python -m pd.bench.piecewise [--batches 1,8,32,64,128] [--context 1024] [--out FILE]

A step's time is the runner's (``ModelRunner.run``: inputs, planning, replay or eager forward, sampling, the
tokens read back), the median of ``--iters``. The decode floor is ``pd.bench.decode_step``'s (weight and KV
bytes over the measured copy bandwidth); a prompt step's is its FLOPs over the matmul peak or its weight bytes
over the bandwidth, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pd.bench.decode_step import (
    _commit,
    decode_floor_bytes,
    kv_bytes_per_token,
    make_batch,
    parameter_bytes,
    prefill_flops,
    wall,
)
from pd.bench.moe_kernels import measure_ceilings
from pd.config import EngineConfig, ModelConfig
from pd.engine.decode_graph import DecodeGraphs
from pd.engine.extend_graph import ExtendGraphs
from pd.engine.runner import ModelRunner
from pd.types import Batch, BatchMode, Req, SamplingParams

PROMPT_STEPS = ((1, 16), (2, 48), (4, 56), (8, 28), (16, 12))  # (prompts, tokens each) of a prompt step


def prompt_batch(runner: ModelRunner, n: int, tokens: int, page_base: int = 1) -> Batch:
    per = runner.pool.layout.pages_for(tokens + 1)
    reqs = []
    for i in range(n):
        r = Req(i, [(5 * i + j) % 1000 + 3 for j in range(tokens)], SamplingParams(temperature=0), i, 4096)
        r.pages = list(range(page_base + i * per, page_base + (i + 1) * per))
        reqs.append(r)
    return Batch(BatchMode.EXTEND, reqs, [0] * n, [tokens] * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="config directory (default: the moonlight-shape preset, config only)")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.model is None:
        from pd.tiny_model import make_tiny_model

        tmp = Path(tempfile.mkdtemp()) / "moonlight-shape"
        args.model = str(make_tiny_model(tmp, "moonlight-shape", config_only=True))
    bw, peak = measure_ceilings()
    page_size, max_b = 64, max(batches)
    cfg = EngineConfig(
        args.model, device="cuda", dtype="bfloat16", load_format="dummy", page_size=page_size,
        num_pages=max_b * (-(-(args.context + 1) // page_size) + 1) + 2, max_running=max_b,
        max_context_len=args.context + 64,
    )  # fmt: skip
    runner = ModelRunner(cfg, ModelConfig.from_dir(args.model))
    whole, whole_extend = runner.graphs, runner.extend_graphs
    assert whole is not None and whole_extend is not None, "no CUDA graphs were captured"
    m = runner
    pieces = DecodeGraphs(m.model, m.attn, m.pool, whole.buckets, m.context_len, piecewise=True)
    pieces_extend = ExtendGraphs(m.model, m.attn, m.pool, whole_extend.buckets, m.context_len, piecewise=True)
    runner.pool.buffer.normal_()
    mc, pb = runner.model_cfg, parameter_bytes(runner)
    kv_per_token = kv_bytes_per_token(runner)

    def time_modes(batch: Batch, modes: dict) -> dict[str, float]:
        out = {}
        for name, (decode, extend) in modes.items():
            runner.graphs, runner.extend_graphs = decode, extend
            iters = args.iters if decode is not None or extend is not None else max(5, args.iters // 4)
            out[f"{name}_ms"] = wall(lambda: runner.run(batch), iters) * 1e3
        runner.graphs, runner.extend_graphs = whole, whole_extend
        return out

    rows = []
    decode_modes = {"whole": (whole, None), "piecewise": (pieces, None), "eager": (None, None)}
    for b in batches:
        times = time_modes(make_batch(runner, b, args.context), decode_modes)
        floor = decode_floor_bytes(pb, mc, b, args.context, kv_per_token) / bw * 1e3
        rows.append({"step": "decode", "batch": b, "tokens": b, **times, "floor_ms": floor})
        print(json.dumps(rows[-1]), flush=True)
    extend_modes = {"whole": (None, whole_extend), "piecewise": (None, pieces_extend), "eager": (None, None)}
    for n, t in PROMPT_STEPS:
        batch = prompt_batch(runner, n, t)
        bucket = whole_extend.bucket(batch)
        if bucket is None:
            continue
        times = time_modes(batch, extend_modes)
        floor = (
            max(prefill_flops(runner, n * t, t) / peak, decode_floor_bytes(pb, mc, n * t, 0, 0) / bw) * 1e3
        )
        rows.append(
            {"step": "prompt", "batch": n, "tokens": n * t, "bucket": bucket, **times, "floor_ms": floor}
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nPiecewise graphs against whole graphs and eager (ms a step, median), DESIGN.md §8 shape, EP = 1, "
          f"context {args.context} for decode; floor from {bw / 1e12:.2f} TB/s and {peak / 1e12:.0f} TFLOP/s\n")  # fmt: skip
    print(
        "| step | requests | tokens | whole graph | piecewise | eager | floor | piecewise / whole | eager / piecewise |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['batch']} | {r['tokens']} | {r['whole_ms']:.2f} | {r['piecewise_ms']:.2f} | "
              f"{r['eager_ms']:.2f} | {r['floor_ms']:.2f} | {r['piecewise_ms'] / r['whole_ms']:.2f} | "
              f"{r['eager_ms'] / r['piecewise_ms']:.2f} |")  # fmt: skip
    if args.out:
        env = {"device": torch.cuda.get_device_name(), "commit": _commit(), "copy_tb_s": bw / 1e12,
               "matmul_tflops": peak / 1e12}  # fmt: skip
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    pieces.close()
    pieces_extend.close()
    runner.close()


if __name__ == "__main__":
    main()
