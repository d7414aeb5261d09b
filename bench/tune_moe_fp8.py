"""Block-config search for the block-FP8 routed-expert kernels (sorted layout) at the DESIGN.md §8 shape;
merges the winners into ``kernels/configs/moe_fp8_<device>.json``.

    python -m pd.bench.tune_moe_fp8 [--tokens 1 8 64 512 8192] [--max-seconds 200] [--out FILE.json]

Whole-op search (``fused_moe_fp8`` with ``config=``: alignment, both GEMMs and the top-k sum), per token
count over a small grid: row tiles by the expected rows per expert, gate/up tiles 128 columns wide (its
epilogue re-quantizes h in place) with 4/8 warps and 3/4 stages, down tiles 64/128 columns. Each
candidate's median time comes from ``triton.testing.do_bench``; the winner is checked against the torch
reference before it is written. Prints each winner beside the default config's time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pd.bench.moe_kernels import HIDDEN, INTER, NUM_EXPERTS, TOP_K, bench_us, rel_err, uniform_routing
from pd.kernels.fp8 import fused_moe_fp8, fused_moe_fp8_ref
from pd.kernels.moe_config import (
    GemmConfig,
    MoeConfig,
    config_file,
    fp8_default_config,
    fused_key,
    load_table,
)
from pd.model.quant import quantize

TOKENS = (1, 8, 32, 64, 128, 512, 2048, 8192)
GATE_UP = [GemmConfig(128, 128, w, s) for w in (4, 8) for s in (3, 4)]
DOWN = [GemmConfig(n, 128, w, s) for n, w, s in ((128, 4, 4), (128, 8, 3), (64, 4, 4), (64, 8, 3))]


def row_tiles(rows_per_expert: float) -> tuple[int, ...]:
    if rows_per_expert <= 8:
        return (16,)
    if rows_per_expert <= 64:
        return (16, 32, 64)
    return (64, 128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    p.add_argument("--max-seconds", type=float, default=200.0)
    p.add_argument("--out", type=Path, help="write the table here instead of kernels/configs/")
    args = p.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    w13, s13 = quantize(
        torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, device=dev) * 0.05, (128, 128), (INTER, INTER)
    )
    w2, s2 = quantize(torch.randn(NUM_EXPERTS, HIDDEN, INTER, device=dev) * 0.05, (128, 128))
    key = fused_key(NUM_EXPERTS, HIDDEN, INTER, TOP_K)
    table = load_table(name, "moe_fp8")
    entries = table.setdefault("fused", {}).setdefault(key, {})
    t0 = time.monotonic()
    print("| T | default µs | best µs | gain | best config | rel err |\n|---:|---:|---:|---:|---|---:|")
    for t in args.tokens:
        if time.monotonic() - t0 > args.max_seconds:
            print(f"stopped at T={t}: --max-seconds reached")
            break
        x = torch.randn(t, HIDDEN, device=dev, dtype=torch.bfloat16)
        ids, weights = uniform_routing(t, NUM_EXPERTS, TOP_K, dev)
        rows = t * TOP_K / NUM_EXPERTS

        def run(cfg: MoeConfig, x=x, ids=ids, weights=weights) -> torch.Tensor:
            return fused_moe_fp8(x, w13, s13, w2, s2, ids, weights, config=cfg)

        default = fp8_default_config(rows)
        results = {default: bench_us(lambda cfg=default: run(cfg), rep_ms=40)}
        for bm in row_tiles(rows):
            for gu in GATE_UP:
                for dn in DOWN:
                    cfg = MoeConfig(bm, gu, dn)
                    if cfg not in results:
                        results[cfg] = bench_us(lambda cfg=cfg: run(cfg), rep_ms=40)
        best = min(results, key=results.__getitem__)
        err = rel_err(run(best), fused_moe_fp8_ref(x, w13, s13, w2, s2, ids, weights))
        assert err < 2e-2, f"T={t}: config {best} is wrong (rel err {err:.2e})"
        entries[str(t)] = best.to_json()
        gain = results[default] / results[best]
        print(
            f"| {t} | {results[default]:.1f} | {results[best]:.1f} | {gain:.2f}x | {best} | {err:.1e} |",
            flush=True,
        )
    table["device"] = name
    out = args.out or config_file(name, "moe_fp8")
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
