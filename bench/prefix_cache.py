"""Issue 19's figure: the generated shared-prefix workload through pd-serve with and without the prefix
cache: hit rate, TTFT p50/p99 (all requests and the ones that hit), and prompt tokens computed per second.

    python -m pd.bench.prefix_cache [--device cpu|cuda] [--rates 1,4] [--groups 8 --per-group 8 ...] [--out FILE]

On CPU it serves the demo model (``pd-make-tiny-model``); on CUDA the DESIGN.md §8 shape with dummy weights.
A request "hit" when the cache held its group's system prompt at its arrival: every one of a group but
its first (when they arrive slower than a prefill). The target (one H200): TTFT p50 of the hits <= 0.3x the
uncached TTFT p50 at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pd.bench.disagg_vs_colocated import free_port, shape_model, stop, wait_healthy
from pd.bench.prefix_datasets import shared_prefix_requests
from pd.bench.report import prefix_cache_tokens
from pd.bench.serve import BenchConfig, run_benchmark


def serve(args: argparse.Namespace, model: str, port: int, cache: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pd.launch.serve", "--model", model, "--port", str(port)]
    cmd += [
        "--model-name",
        "bench",
        "--device",
        args.device,
        "--prefix-cache" if cache else "--no-prefix-cache",
    ]
    if args.device != "cpu":
        cmd += ["--load-format", "dummy", "--dtype", "bfloat16"]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def measure(args: argparse.Namespace, model: str, cache: bool, rate: float, log_dir: Path) -> dict:
    requests = shared_prefix_requests(
        args.groups,
        args.per_group,
        args.system_len,
        args.question_len,
        args.output_len,
        args.vocab,
        args.seed,
    )
    port = free_port()
    proc = serve(args, model, port, cache, log_dir / f"pd-serve-{'cache' if cache else 'nocache'}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, args.ready_timeout)
        cfg = BenchConfig(
            base_url=url, model="bench", request_rate=rate, ignore_eos=True, disable_tqdm=True, seed=args.seed
        )
        before = prefix_cache_tokens(url) or (0.0, 0.0)
        result = asyncio.run(run_benchmark(cfg, requests))
        after = prefix_cache_tokens(url) or (0.0, 0.0)
    finally:
        stop(proc, 60)
    # A group's requests after its first (in arrival order) find its system prompt cached.
    seen: set[tuple[int, ...]] = set()
    later: set[int] = set()
    for i, sample in enumerate(requests):
        key = tuple(sample.prompt[: args.system_len])
        if key in seen:
            later.add(i)
        seen.add(key)
    ttft = sorted(r.ttft for r in result.records if r.ok and r.ttft is not None)
    later_ttft = [r.ttft for r in result.records if r.ok and r.ttft is not None and r.index in later]
    query, hit = after[0] - before[0], after[1] - before[1]
    if not cache:  # no counters without the cache: every prompt token is computed
        query, hit = float(result.metrics.total_input_tokens), 0.0
    return {
        "rate": rate,
        "cache": cache,
        "completed": result.metrics.completed,
        "failed": result.metrics.failed,
        "hit_rate": hit / query if query else 0.0,
        "ttft_p50_ms": statistics.median(ttft) * 1e3,
        "ttft_p99_ms": ttft[int(0.99 * (len(ttft) - 1))] * 1e3,
        "ttft_p50_later_ms": statistics.median(later_ttft) * 1e3 if later_ttft else None,
        "computed_tokens_per_s": (query - hit) / result.metrics.duration_s,
        "req_per_s": result.metrics.request_throughput,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rates", default="1,4", help="request rates, each with and without the cache")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--system-len", type=int, default=2000)
    p.add_argument("--question-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1000, help="random ids drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.device == "cpu":
        from pd.tiny_model import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "ci"))
    else:
        model = shape_model(args.system_len + args.question_len + args.output_len + 64)
    log_dir = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for cache in (False, True):
            t0 = time.monotonic()
            rows.append(measure(args, model, cache, rate, log_dir))
            print(json.dumps(rows[-1]), f"({time.monotonic() - t0:.0f} s)", flush=True)
    print(
        f"\nShared-prefix workload: {args.groups} groups x {args.per_group}, system prompt {args.system_len} "
        f"tokens, question {args.question_len}, output {args.output_len}, {args.device}\n"
    )
    print(
        "| rate | prefix cache | hit rate | TTFT p50 ms | TTFT p99 ms | TTFT p50, later requests of a group | prompt tokens computed/s | req/s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        later = f"{r['ttft_p50_later_ms']:.1f}" if r["ttft_p50_later_ms"] is not None else "-"
        print(f"| {r['rate']:g} | {'on' if r['cache'] else 'off'} | {r['hit_rate']:.1%} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
              f"{later} | {r['computed_tokens_per_s']:.0f} | {r['req_per_s']:.2f} |")  # fmt: skip
    for off, on in zip(rows[0::2], rows[1::2]):
        if off["ttft_p50_later_ms"] and on["ttft_p50_later_ms"]:
            ratio = on["ttft_p50_later_ms"] / off["ttft_p50_later_ms"]
            print(
                f"rate {off['rate']:g}: later requests' TTFT p50 with the cache / without {ratio:.2f}x (target <= 0.3x)"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
