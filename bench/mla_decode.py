"""FlashInfer's paged MLA decode kernels at decode batch sizes, one per backend it offers on this GPU, and pd's
split-KV Triton kernel (``pd.kernels.mla_decode``, the ``triton`` attention backend's decode).

    python -m pd.bench.mla_decode                         # fa3, fa2 and pd's triton kernel, §8 heads (16), context 1K
    python -m pd.bench.mla_decode --heads 128 --contexts 1024,4096 --out mla.json

Why: on an H200 the decode step at batch 1 spends ~19 us a layer in the MLA kernel (FlashInfer's "auto" picks
fa3 on sm90) for a 1.2 MB cache (``bench/results/decode_step_h200_1203.md``): a kernel that does not spread one
sequence over the SMs. This times each backend the way pd calls it (``pd.attention.flashinfer_mla``: split query
and cache, one plan per batch, page size 64, random pages) and checks the outputs agree. Each figure is the
median over 20 replays of a CUDA graph of 27 calls (one per layer of the §8 shape), per call; floor = the
cache bytes read / the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import numpy as np
import torch

from pd.bench.decode_step import measure_ceilings, timed

PAGE = 64
LORA, ROPE = 512, 64
LAYERS = 27


def _host(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


def _flashinfer_call(
    backend: str, batch: int, context: int, heads: int, pages_per: int, pages: torch.Tensor,
    cache: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
) -> Callable[[], torch.Tensor]:  # fmt: skip
    """One planned FlashInfer MLA decode call (``backend``: fa3 or fa2) the way ``pd.attention.flashinfer_mla``
    plans it."""
    from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata

    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = BatchMLAPagedAttentionWrapper(workspace, backend=backend)
    metadata = MLAPlanMetadata.csr(
        _host(np.arange(batch + 1)), _host(np.arange(batch + 1) * pages_per), _host(pages.numpy()),
        _host(np.full(batch, context)),
    )  # fmt: skip
    wrapper.plan(
        metadata=metadata, num_heads=heads, head_dim_ckv=LORA, head_dim_kpe=ROPE, page_size=PAGE, causal=False,
        sm_scale=(128 + ROPE) ** -0.5, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
        query_layout="split", kv_cache_layout="split",
    )  # fmt: skip
    kv = (cache[..., :LORA], cache[..., LORA:])
    return lambda: wrapper.run(query=(q_nope, q_pe), kv_cache=kv)


def _triton_call(
    batch: int, context: int, heads: int, pages_per: int, pages: torch.Tensor, cache: torch.Tensor,
    q_nope: torch.Tensor, q_pe: torch.Tensor, chunk: int | None = None,
) -> Callable[[], torch.Tensor]:  # fmt: skip
    """One call of pd's split-KV kernel (``pd.kernels.mla_decode``) the way ``TritonMLABackend`` makes it
    (``chunk``: the fewest positions a split holds, default the kernel's)."""
    from pd.kernels.mla_decode import mla_decode

    table = pages.view(batch, pages_per).to(device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return lambda: mla_decode(q_nope, q_pe, cache, table, lens, (128 + ROPE) ** -0.5, context, chunk=chunk)


def run_backend(
    backend: str, batch: int, context: int, heads: int, gen: torch.Generator
) -> tuple[float, torch.Tensor]:
    """(seconds per call, output of one call) of ``backend`` for ``batch`` sequences of ``context`` tokens."""
    pages_per = -(-context // PAGE)
    num_pages = batch * pages_per + 1
    cache = torch.randn(num_pages, PAGE, LORA + ROPE, generator=gen, device="cuda").to(torch.bfloat16)
    q_nope = torch.randn(batch, heads, LORA, generator=gen, device="cuda").to(torch.bfloat16)
    q_pe = torch.randn(batch, heads, ROPE, generator=gen, device="cuda").to(torch.bfloat16)
    pages = (
        torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(batch))[: batch * pages_per] + 1
    )
    name, _, chunk = backend.partition(":")  # triton:64: pd's kernel with splits of at least 64 positions
    if name == "triton":
        make = functools.partial(_triton_call, chunk=int(chunk) if chunk else None)
    else:
        make = functools.partial(_flashinfer_call, backend)
    call = make(batch, context, heads, pages_per, pages, cache, q_nope, q_pe)

    def layers() -> None:
        for _ in range(LAYERS):
            call()

    out = call()
    graph = torch.cuda.CUDAGraph()
    layers()  # warm-up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        layers()
    return timed(graph.replay, 20) / LAYERS, out.clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backends",
        default="fa3,fa2,triton",
        help="triton:N: pd's kernel with splits of at least N positions",
    )
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--contexts", default="1024")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    bw, _ = measure_ceilings()
    backends = args.backends.split(",")
    rows = []
    print(f"| context | batch | floor us | {' | '.join(f'{b} us' for b in backends)} | max abs diff |")
    print(f"|---:|---:|---:|{'---:|' * len(backends)}---:|")
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            floor = batch * context * (LORA + ROPE) * 2 / bw
            times, outs = {}, {}
            for backend in backends:
                try:
                    t, out = run_backend(
                        backend, batch, context, args.heads, torch.Generator("cuda").manual_seed(1)
                    )
                    times[backend], outs[backend] = t, out
                except Exception as e:  # a backend this GPU or build does not offer: say so, time the others
                    print(f"{backend} at batch {batch}: {type(e).__name__}: {e}")
            ref = next(iter(outs.values()), None)
            diff = (
                max(((o - ref).abs().max().item() for o in outs.values()), default=float("nan"))
                if ref is not None
                else float("nan")
            )
            cells = " | ".join(f"{times[b] * 1e6:.1f}" if b in times else "-" for b in backends)
            print(f"| {context} | {batch} | {floor * 1e6:.2f} | {cells} | {diff:.3g} |", flush=True)
            rows.append({"context": context, "batch": batch, "heads": args.heads, "floor_us": floor * 1e6,
                         "us": {b: t * 1e6 for b, t in times.items()}, "max_abs_diff": diff})  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
