"""Block-size search for the MoE kernels at the DESIGN.md §8 shape; writes the device's config table.

    python -m pd.bench.tune_moe [--tokens 1 2 4 ...] [--max-seconds 450] [--out FILE.json]

Shapes searched (hidden 2048, intermediate 1408, top-6):
- fused, E=64 (EP=1) and E=32 (EP=2 rank after the normal dispatch: ids of the other rank's experts
  are -1), for each token count;
- masked, E=32 (EP=2 low-latency layout), T tokens per rank, keyed by the expected rows per expert.

For each shape and each row tile (``block_m``, chosen from the expected rows per expert) the gate/up
and down GEMMs are timed separately over a pruned grid of (block_n, block_k, num_warps, num_stages),
the two fastest tiles of each again with their weights loaded through TMA (where Triton and the GPU
have it); the row tile whose two fastest GEMMs sum lowest wins. The winner is checked against the float32
reference before it is written. The search stops at ``--max-seconds`` (shapes not reached keep the
built-in default) and merges its results into ``kernels/configs/moe_<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from pd.bench.moe_kernels import (
    EP_SIZE,
    HIDDEN,
    INTER,
    MASKED_TOKENS,
    NUM_EXPERTS,
    TOKENS,
    TOP_K,
    expected_rows,
    masked_inputs,
    random_weights,
    rel_err,
    uniform_routing,
)
from pd.kernels import moe
from pd.kernels.moe_config import GemmConfig, MoeConfig, config_file, default_config, fused_key, masked_key

# Shared memory one program may use for its pipeline buffers (H100/H200 allow 227 KB per block), and
# fp32 accumulator registers per thread.
SMEM_BUDGET = 224 * 1024
ACC_REGS_BUDGET = 128


def pipeline_smem(block_m: int, tile: GemmConfig, gate_up: bool) -> int:
    """Bytes of the operand buffers Triton allocates (bf16): num_stages buffers on the wgmma path
    (block_m >= 64), num_stages - 1 on the mma.sync path (seen in sm_90 compiles with Triton 3.9)."""
    buffers = tile.num_stages if block_m >= 64 else tile.num_stages - 1
    return buffers * (block_m * tile.block_k + (2 if gate_up else 1) * tile.block_k * tile.block_n) * 2


def block_m_choices(rows_per_expert: float) -> tuple[int, ...]:
    if rows_per_expert <= 2:
        return (16,)
    if rows_per_expert <= 12:
        return (16, 32)
    if rows_per_expert <= 48:
        return (16, 32, 64)
    if rows_per_expert <= 160:
        return (32, 64, 128)
    return (64, 128)


def gemm_choices(block_m: int, gate_up: bool) -> list[GemmConfig]:
    """Pruned tile grid: small row tiles stream weights (deep K tiles, more stages), large ones feed
    the tensor cores (square-ish tiles, 8 warps for the big ones)."""
    if block_m == 16:
        grid = ((32, 64, 128), (128, 256), (4,), (3, 4, 5))
    elif block_m == 32:
        grid = ((64, 128), (64, 128), (4,), (3, 4))
    elif block_m == 64:
        grid = ((64, 128) if gate_up else (64, 128, 256), (64, 128), (4, 8), (3, 4))
    else:
        grid = ((64, 128) if gate_up else (64, 128, 256), (64,), (4, 8), (3, 4, 5))
    tiles = 2 if gate_up else 1  # gate/up keeps two accumulators and streams two weight tiles
    out = []
    for bn in grid[0]:
        for bk in grid[1]:
            for warps in grid[2]:
                for stages in grid[3]:
                    tile = GemmConfig(bn, bk, warps, stages)
                    acc_regs = tiles * block_m * bn // (warps * 32)
                    if warps == 8 and block_m * bn < 64 * 128:
                        continue
                    if pipeline_smem(block_m, tile, gate_up) <= SMEM_BUDGET and acc_regs <= ACC_REGS_BUDGET:
                        out.append(tile)
    return out


def time_us(fn) -> float:
    from triton.testing import do_bench

    try:
        return 1e3 * do_bench(fn, warmup=5, rep=25, return_mode="median")
    except Exception as e:  # a tile the device cannot run (e.g. out of shared memory) is skipped
        if "out of resource" not in str(e).lower() and "OutOfResources" not in type(e).__name__:
            print(f"    skipped a tile: {type(e).__name__}: {str(e)[:120]}")
        return math.inf


@dataclasses.dataclass
class Result:
    config: MoeConfig
    gate_up_us: float
    down_us: float
    default_us: float

    @property
    def total_us(self) -> float:
        return self.gate_up_us + self.down_us


def _best(candidates: list[GemmConfig], run, tma: bool) -> tuple[GemmConfig, float]:
    """Fastest tile; with ``tma``, the two fastest are also tried with their weights through TMA."""
    timed = sorted(((time_us(lambda c=c: run(c)), c) for c in candidates), key=lambda t: t[0])
    if tma:
        twins = [dataclasses.replace(c, tma=True) for _, c in timed[:2]]
        timed = sorted(timed + [(time_us(lambda c=c: run(c)), c) for c in twins], key=lambda t: t[0])
    us, cfg = timed[0]
    return cfg, us


def _search(row_tiles, default: MoeConfig, tma: bool) -> Result:
    """``row_tiles`` yields ``(block_m, gate_up(cfg), down(cfg))``; for each row tile the fastest gate/up and
    down GEMM tiles are found, and the row tile whose two sum lowest wins. ``default_us`` is the built-in
    ``default``'s time (inf when its row tile is not searched)."""
    best: Result | None = None
    default_us = math.inf
    for bm, gate_up, down in row_tiles:
        extra = [default.gate_up] if default.block_m == bm else []
        gu_cfg, gu_us = _best(gemm_choices(bm, True) + extra, gate_up, tma)
        gate_up(gu_cfg)  # h holds real activations for timing the down GEMM
        dn_cfg, dn_us = _best(gemm_choices(bm, False) + ([default.down] if extra else []), down, tma)
        if extra:
            default_us = time_us(lambda g=gate_up: g(default.gate_up)) + time_us(
                lambda d=down: d(default.down)
            )
        if best is None or gu_us + dn_us < best.total_us:
            best = Result(MoeConfig(bm, gu_cfg, dn_cfg), gu_us, dn_us, math.inf)
    assert best is not None
    best.default_us = default_us
    return best


def tune_fused(num_tokens: int, w13, w2, itemsize: int = 2) -> Result:
    from pd.kernels import moe_triton as mt
    from pd.kernels.moe_align_triton import moe_align

    num_experts = w13.shape[0]
    ids, weights = uniform_routing(num_tokens, NUM_EXPERTS, TOP_K, w13.device)
    ids = torch.where(ids < num_experts, ids, -1)
    x = torch.randn(num_tokens, HIDDEN, device=w13.device).to(w13.dtype)
    route_w = weights.flatten().contiguous()
    rows_per_expert = int((ids >= 0).sum()) / num_experts
    tma = mt.has_tma(x.device)
    default = default_config(num_tokens * TOP_K / num_experts, itemsize)  # as moe.fused_moe_config

    def row_tiles():
        for bm in block_m_choices(rows_per_expert):
            sorted_pairs, block_expert = moe_align(ids, num_experts, bm)
            h = torch.empty(block_expert.numel() * bm, INTER, dtype=x.dtype, device=x.device)
            y = torch.empty(num_tokens * TOP_K, HIDDEN, dtype=x.dtype, device=x.device)

            def gate_up(c, bm=bm, sp=sorted_pairs, be=block_expert, h=h):
                mt.gate_up_sorted(x, w13, h, sp, be, TOP_K, c, bm)

            def down(c, bm=bm, sp=sorted_pairs, be=block_expert, h=h, y=y):
                mt.down_sorted(h, w2, y, sp, be, route_w, c, bm)

            yield bm, gate_up, down

    best = _search(row_tiles(), default, tma)
    out = moe.fused_moe(x, w13, w2, ids, weights, config=best.config)
    err = rel_err(out, moe.fused_moe_ref(x.float(), w13.float(), w2.float(), ids, weights))
    if not err < 1e-2:
        raise RuntimeError(f"fused T={num_tokens}: config {best.config} gives rel err {err}")
    return best


def tune_masked(tokens_per_rank: int, w13, w2, itemsize: int = 2) -> Result:
    from pd.kernels import moe_triton as mt

    num_local = w13.shape[0]
    recv_x, count = masked_inputs(tokens_per_rank, num_local, w13.device, w13.dtype)
    rows = recv_x.shape[1]
    m = expected_rows(tokens_per_rank)
    tma = mt.has_tma(recv_x.device)
    default = default_config(m, itemsize)
    h = torch.empty(num_local, rows, INTER, dtype=recv_x.dtype, device=recv_x.device)
    out = torch.empty_like(recv_x)

    def row_tiles():
        for bm in block_m_choices(m):
            programs = mt.masked_programs(rows, m, bm)

            def gate_up(c, bm=bm, programs=programs):
                mt.gate_up_masked(recv_x, count, w13, h, c, bm, programs)

            def down(c, bm=bm, programs=programs):
                mt.down_masked(h, count, w2, out, c, bm, programs)

            yield bm, gate_up, down

    best = _search(row_tiles(), default, tma)
    got = moe.masked_moe(recv_x, count, w13, w2, expected_m=m, config=best.config)
    ref = moe.masked_moe_ref(recv_x.float(), count, w13.float(), w2.float())
    live = torch.arange(rows, device=recv_x.device)[None, :] < count[:, None]
    err = rel_err(got[live], ref[live]) if live.any() else 0.0
    if not err < 1e-2:
        raise RuntimeError(f"masked T={tokens_per_rank}: config {best.config} gives rel err {err}")
    return best


def _report(label: str, r: Result, seconds: float) -> None:
    c = r.config
    print(
        f"{label:<26} block_m {c.block_m:>3}  gate_up {c.gate_up}  {r.gate_up_us:8.1f} us  "
        f"down {c.down}  {r.down_us:8.1f} us  (default {r.default_us:.1f} us)  [{seconds:.0f} s]",
        flush=True,
    )


def dumps_table(table: dict) -> str:
    """The config table as JSON with one line per entry, entries in numeric order."""
    sections = []
    for section in ("fused", "masked"):
        shapes = []
        for shape, entries in table.get(section, {}).items():
            rows = sorted(entries.items(), key=lambda kv: int(kv[0]))
            body = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in rows)
            shapes.append(f"  {json.dumps(shape)}: {{\n{body}\n  }}")
        sections.append(f" {json.dumps(section)}: {{\n" + ",\n".join(shapes) + "\n }")
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items() if k not in ("fused", "masked")]
    text = "{\n" + ",\n".join(head + sections) + "\n}\n"
    assert json.loads(text) == {**table, "fused": table.get("fused", {}), "masked": table.get("masked", {})}
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS), help="fused token counts")
    p.add_argument(
        "--masked-tokens", type=int, nargs="*", default=list(MASKED_TOKENS), help="tokens per rank"
    )
    p.add_argument("--max-seconds", type=float, default=450.0, help="stop searching after this long")
    p.add_argument(
        "--out", type=Path, help="config file to merge into (default: the device's in kernels/configs)"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_moe: needs a CUDA device")
        return 2
    import triton

    device = torch.cuda.get_device_name()
    path = args.out or config_file(device)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.update(device=device, triton=triton.__version__)
    print(f"# tuning MoE kernels on {device} (triton {triton.__version__}) -> {path}")
    start = time.monotonic()
    w13, w2 = random_weights(NUM_EXPERTS, "cuda")
    local = NUM_EXPERTS // EP_SIZE
    w13_l, w2_l = w13[:local].contiguous(), w2[:local].contiguous()
    jobs = [("fused", NUM_EXPERTS, t) for t in args.tokens]
    # One masked entry per expected-rows key: the largest token count that maps to it.
    by_key = {expected_rows(t): t for t in sorted(args.masked_tokens)}
    jobs += [("masked", local, t) for t in by_key.values()]
    jobs += [("fused", local, t) for t in args.tokens]
    done = 0
    for kind, num_experts, t in jobs:
        elapsed = time.monotonic() - start
        if elapsed > args.max_seconds:
            print(f"stopping after {elapsed:.0f} s: {len(jobs) - done} shapes keep the default config")
            break
        wa, wb = (w13, w2) if num_experts == NUM_EXPERTS else (w13_l, w2_l)
        if kind == "fused":
            r = tune_fused(t, wa, wb)
            entry = table.setdefault("fused", {}).setdefault(fused_key(num_experts, HIDDEN, INTER, TOP_K), {})
            entry[str(t)] = r.config.to_json()
        else:
            r = tune_masked(t, wa, wb)
            entry = table.setdefault("masked", {}).setdefault(masked_key(num_experts, HIDDEN, INTER), {})
            entry[str(expected_rows(t))] = r.config.to_json()
        _report(f"{kind} E={num_experts} T={t}", r, time.monotonic() - start)
        done += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps_table(table))  # after every shape: an interrupted run keeps its results
    print(f"wrote {path} ({done} shapes, {time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
