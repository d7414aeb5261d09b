"""MoE kernel benchmark at the DESIGN.md §8 shape: correctness, then timings beside their floors.

    python -m pd.bench.moe_kernels [--tokens 1 8 64 ...] [--masked-tokens 1 8 ...] [--out FILE.json]

Rows:
- ``fused E=64``: EP=1, ``fused_moe`` on T tokens with uniform random top-6 of 64 experts.
- ``masked E=32``: EP=2 low-latency layout on one rank: T tokens per rank, 2 ranks, so 2T tokens
  routed over 64 experts and this rank's 32 experts receive their rows in ``recv_x [32, 2T, H]``.

Correctness (every row, fresh random inputs each run, never zeros): the output is poisoned with NaN,
every required element must be written, and ‖out − ref‖/‖ref‖ < 1e-2 against the float32 reference.
Times are medians of CUDA-event timings (``triton.testing.do_bench``) over 4 rotating input sets:
eager (Python launch included), replayed in a CUDA graph (what decode sees), and the torch reference.
Floor = max(bytes of the expert weights actually hit + activations in/out over HBM bandwidth,
FLOPs over bf16 matmul peak); "of floor" = floor / graph time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pd.kernels import moe

# DESIGN.md §8: the benchmark shape, and the ceilings measured on one H200.
HIDDEN, INTER, NUM_EXPERTS, TOP_K = 2048, 1408, 64, 6
HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS_PER_S = 790e12
EP_SIZE = 2  # the masked rows model EP=2: 32 local experts per rank

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192)
MASKED_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INPUT_SETS = 4


@dataclass(frozen=True)
class Floor:
    bytes: float
    flops: float
    hbm_bytes_per_s: float = HBM_BYTES_PER_S
    flops_per_s: float = BF16_FLOPS_PER_S

    @property
    def memory_s(self) -> float:
        return self.bytes / self.hbm_bytes_per_s

    @property
    def compute_s(self) -> float:
        return self.flops / self.flops_per_s

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def moe_floor(experts_hit: float, rows: float, act_rows: float, hbm: float, flops: float) -> Floor:
    """Expert weights hit (3 H x I matrices each, bf16) plus ``act_rows`` rows of H read and written;
    2 * 3 * H * I FLOPs per (row, expert) pair."""
    weight_bytes = experts_hit * 3 * HIDDEN * INTER * 2
    act_bytes = act_rows * HIDDEN * 2 * 2
    return Floor(weight_bytes + act_bytes, rows * 6 * HIDDEN * INTER, hbm, flops)


def uniform_routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device | str):
    """Distinct experts per token, uniform; weights in (0, 1) float32."""
    ids = torch.rand(num_tokens, num_experts, device=device).topk(top_k, dim=1).indices
    return ids, torch.rand(num_tokens, top_k, device=device)


def random_weights(num_experts: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
    w13 = (torch.randn(num_experts, 2 * INTER, HIDDEN, device=device) / HIDDEN**0.5).to(dtype)
    w2 = (torch.randn(num_experts, HIDDEN, INTER, device=device) / INTER**0.5).to(dtype)
    return w13, w2


def masked_inputs(tokens_per_rank: int, num_local: int, device: torch.device | str, dtype=torch.bfloat16):
    """This rank's low-latency receive buffer: ``recv_x [E_local, W*T, H]`` and counts from uniform
    routing of W*T tokens over all experts (the rank holds experts 0..E_local-1)."""
    rows = EP_SIZE * tokens_per_rank
    ids, _ = uniform_routing(rows, num_local * EP_SIZE, TOP_K, device)
    count = torch.bincount(ids.flatten(), minlength=num_local * EP_SIZE)[:num_local].to(torch.int32)
    recv_x = torch.randn(num_local, rows, HIDDEN, device=device).to(dtype)
    return recv_x, count


def expected_rows(tokens_per_rank: int) -> int:
    """Rows per local expert under uniform routing: what the model passes as ``expected_m``."""
    return math.ceil(EP_SIZE * tokens_per_rank * TOP_K / (NUM_EXPERTS))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def bench_us(fn: Callable[[], object], rep_ms: int = 100) -> float:
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()

    return call


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Median time per call of a CUDA graph that runs every call once."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    us = bench_us(graph.replay) / len(calls)
    del graph
    return us


def measure_ceilings() -> tuple[float, float]:
    """(device-to-device copy bytes/s counting read + write, bf16 matmul FLOP/s) on this GPU."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_s = bench_us(lambda: dst.copy_(src)) * 1e-6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = bench_us(lambda: a @ b) * 1e-6
    return 2 * src.numel() / copy_s, 2 * 8192**3 / mm_s


def bench_fused(
    num_tokens: int, w13, w2, w13_f, w2_f, num_experts: int, hbm: float, flops: float, with_ref: bool
) -> dict:
    sets = []
    for _ in range(INPUT_SETS):
        ids, weights = uniform_routing(num_tokens, NUM_EXPERTS, TOP_K, w13.device)
        if num_experts < NUM_EXPERTS:  # EP rank 0 after a normal dispatch: remote experts are -1
            ids = torch.where(ids < num_experts, ids, -1)
        sets.append((torch.randn(num_tokens, HIDDEN, device=w13.device).to(w13.dtype), ids, weights))
    x, ids, weights = sets[0]
    out = torch.full_like(x, float("nan"))
    moe.fused_moe(x, w13, w2, ids, weights, out=out)
    unwritten = int(out.isnan().sum())
    err = rel_err(out, moe.fused_moe_ref(x.float(), w13_f, w2_f, ids, weights))
    calls = [lambda s=s: moe.fused_moe(s[0], w13, w2, s[1], s[2]) for s in sets]
    valid = [(s[1] >= 0) & (s[1] < num_experts) for s in sets]
    hit = sum(int(s[1][v].unique().numel()) for s, v in zip(sets, valid)) / len(sets)
    pairs = sum(int(v.sum()) for v in valid) / len(sets)
    floor = moe_floor(hit, pairs, num_tokens, hbm, flops)
    ref_us = (
        bench_us(rotating([lambda s=s: moe.fused_moe_ref(s[0], w13, w2, s[1], s[2]) for s in sets]), 200)
        if with_ref
        else None
    )
    return dict(
        layout=f"fused E={num_experts}",
        tokens=num_tokens,
        experts_hit=hit,
        eager_us=bench_us(rotating(calls)),
        graph_us=graph_us(calls),
        floor_us=floor.seconds * 1e6,
        bound=floor.bound,
        ref_us=ref_us,
        rel_err=err,
        unwritten=unwritten,
        config=_config_str(moe.fused_moe_config(x, w13, w2, ids)),
    )


def bench_masked(
    tokens_per_rank: int, w13, w2, w13_f, w2_f, hbm: float, flops: float, with_ref: bool
) -> dict:
    num_local = w13.shape[0]
    sets = [masked_inputs(tokens_per_rank, num_local, w13.device, w13.dtype) for _ in range(INPUT_SETS)]
    m = expected_rows(tokens_per_rank)
    recv_x, count = sets[0]
    out = torch.full_like(recv_x, float("nan"))
    moe.masked_moe(recv_x, count, w13, w2, expected_m=m, out=out)
    live = torch.arange(recv_x.shape[1], device=w13.device)[None, :] < count[:, None]
    unwritten = int(out[live].isnan().sum())
    written_past_count = int((~out[~live].isnan()).sum())
    ref = moe.masked_moe_ref(recv_x.float(), count, w13_f, w2_f)
    err = rel_err(out[live], ref[live]) if live.any() else 0.0
    bufs = [torch.empty_like(s[0]) for s in sets]
    calls = [
        lambda s=s, o=o: moe.masked_moe(s[0], s[1], w13, w2, expected_m=m, out=o) for s, o in zip(sets, bufs)
    ]
    hit = sum(int((s[1] > 0).sum()) for s in sets) / len(sets)
    rows = sum(int(s[1].sum()) for s in sets) / len(sets)
    floor = moe_floor(hit, rows, rows, hbm, flops)
    ref_us = (
        bench_us(rotating([lambda s=s: moe.masked_moe_ref(s[0], s[1], w13, w2) for s in sets]), 200)
        if with_ref
        else None
    )
    return dict(
        layout=f"masked E={num_local}",
        tokens=tokens_per_rank,
        experts_hit=hit,
        eager_us=bench_us(rotating(calls)),
        graph_us=graph_us(calls),
        floor_us=floor.seconds * 1e6,
        bound=floor.bound,
        ref_us=ref_us,
        rel_err=err,
        unwritten=unwritten + written_past_count,
        config=_config_str(moe.masked_moe_config(recv_x, w13, w2, m)),
    )


def _config_str(cfg) -> str:
    g, d = cfg.gate_up, cfg.down
    return (
        f"m{cfg.block_m} gu{g.block_n}x{g.block_k}w{g.num_warps}s{g.num_stages} "
        f"dn{d.block_n}x{d.block_k}w{d.num_warps}s{d.num_stages}"
    )


def markdown(rows: list[dict]) -> str:
    head = (
        "| layout | T | experts hit | triton eager µs | triton graph µs | floor µs | bound | of floor "
        "| torch ref µs | rel err | config |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ref = f"{r['ref_us']:.0f}" if r["ref_us"] is not None else "-"
        lines.append(
            f"| {r['layout']} | {r['tokens']} | {r['experts_hit']:.1f} | {r['eager_us']:.1f} | {r['graph_us']:.1f} "
            f"| {r['floor_us']:.1f} | {r['bound']} | {100 * r['floor_us'] / r['graph_us']:.0f}% | {ref} "
            f"| {r['rel_err']:.1e} | {r['config']} |"
        )
    return head + "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS), help="fused (EP=1) token counts")
    p.add_argument(
        "--ep-tokens", type=int, nargs="*", default=[], help="fused E=32 (EP=2 normal) token counts"
    )
    p.add_argument(
        "--masked-tokens", type=int, nargs="*", default=list(MASKED_TOKENS), help="tokens per rank"
    )
    p.add_argument("--no-ref", action="store_true", help="skip timing the torch reference")
    p.add_argument(
        "--design-ceilings",
        action="store_true",
        help="floors from DESIGN.md §8's H200 figures instead of this GPU's measured copy/matmul rates",
    )
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_kernels: needs a CUDA device")
        return 2
    import triton

    hbm, flops = HBM_BYTES_PER_S, BF16_FLOPS_PER_S
    device = torch.cuda.get_device_name()
    print(
        f"# MoE kernels on {device}, torch {torch.__version__}, triton {triton.__version__}, commit {_commit()}"
    )
    if args.design_ceilings:
        print(
            f"floors: bytes / {hbm / 1e12:.1f} TB/s, FLOPs / {flops / 1e12:.0f} TFLOP/s (DESIGN.md §8, H200)"
        )
    else:  # the floor of the GPU it runs on, not of the one the design was sized for
        hbm, flops = measure_ceilings()
        print(
            f"measured: copy {hbm / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s (floors use these)"
        )
    w13, w2 = random_weights(NUM_EXPERTS, "cuda")
    w13_f, w2_f = w13.float(), w2.float()
    rows = []
    for t in args.tokens:
        rows.append(bench_fused(t, w13, w2, w13_f, w2_f, NUM_EXPERTS, hbm, flops, not args.no_ref))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    local = NUM_EXPERTS // EP_SIZE
    for t in args.ep_tokens:
        rows.append(
            bench_fused(t, w13[:local], w2[:local], w13_f[:local], w2_f[:local], local, hbm, flops, False)
        )
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    w13_l, w2_l = w13[:local].contiguous(), w2[:local].contiguous()
    for t in args.masked_tokens:
        rows.append(bench_masked(t, w13_l, w2_l, w13_f[:local], w2_f[:local], hbm, flops, not args.no_ref))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    failed = [r for r in rows if r["unwritten"] or not r["rel_err"] < 1e-2]
    print()
    print(markdown(rows))
    print(f"\ncorrectness: {len(rows) - len(failed)} of {len(rows)} rows pass (all written, rel err < 1e-2)")
    for r in failed:
        print(
            f"FAILED {r['layout']} T={r['tokens']}: unwritten/overwritten {r['unwritten']}, rel err {r['rel_err']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            device=device,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            commit=_commit(),
            torch=torch.__version__,
            triton=triton.__version__,
            hbm_bytes_per_s=hbm,
            flops_per_s=flops,
        )
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
