"""Issue 19's figure: the generated shared-prefix workload through pd-serve with and without the prefix
cache: hit rate, TTFT p50/p99 (all requests and the ones that hit), and prompt tokens computed per second.

    python -m pd.bench.prefix_cache [--device cpu|cuda] [--rates 1,4] [--groups 8 --per-group 8 ...]
        [--turns 4 --conversations 16 [--sharegpt FILE]] [--out FILE]

On CPU it serves the demo model (``pd-make-tiny-model``); on CUDA the DESIGN.md §8 shape with dummy weights.
A request "hit" when the cache held its group's system prompt at its arrival: every one of a group but
its first (when they arrive slower than a prefill). The target (one H200): TTFT p50 of the hits <= 0.3x the
uncached TTFT p50 at the same rate. ``--turns``: also a multi-turn replay (ShareGPT conversations, or synthetic
ones in that format), TTFT p50 by turn with and without the cache.
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

from tokenizers import Tokenizer

from pd.bench.disagg_vs_colocated import free_port, shape_model, stop, wait_healthy
from pd.bench.prefix_datasets import multiturn_requests, shared_prefix_requests, synthetic_sharegpt
from pd.bench.report import phase_lines, prefix_cache_tokens
from pd.bench.serve import BenchConfig, BenchResult, run_benchmark


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


def run(
    args: argparse.Namespace, model: str, cache: bool, rate: float, log_dir: Path, requests: list, tag: str
) -> tuple[BenchResult, float, float]:
    """``requests`` through a fresh pd-serve (with or without the cache) at ``rate``: the result and the
    prompt tokens queried and hit in the cache meanwhile (every prompt token queried, none hit, without)."""
    port = free_port()
    name = f"pd-serve-{tag}-{'cache' if cache else 'nocache'}.log"
    proc = serve(args, model, port, cache, log_dir / name)
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
    if not cache:  # no counters without the cache: every prompt token is computed
        return result, float(result.metrics.total_input_tokens), 0.0
    return result, after[0] - before[0], after[1] - before[1]


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
    result, query, hit = run(args, model, cache, rate, log_dir, requests, "shared")
    # A group's requests after its first (in arrival order) find its system prompt cached.
    seen: set[tuple[int, ...]] = set()
    later: set[int] = set()
    for i, sample in enumerate(requests):
        key = tuple(sample.prompt[: args.system_len])
        if key in seen:
            later.add(i)
        seen.add(key)
    # Where a hit's TTFT goes: pd's latency phases of the later requests (pd-bench's phase table).
    print(f"rate {rate:g}, cache {'on' if cache else 'off'}, a group's later requests:")
    print("\n".join(phase_lines([r for r in result.records if r.index in later])), flush=True)
    ttft = sorted(r.ttft for r in result.records if r.ok and r.ttft is not None)
    later_ttft = [r.ttft for r in result.records if r.ok and r.ttft is not None and r.index in later]
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


def measure_turns(args: argparse.Namespace, model: str, cache: bool, log_dir: Path) -> dict:
    """The multi-turn replay: TTFT p50 by turn (each turn sent when its conversation's previous one ended)."""
    path = args.sharegpt
    if path is None:
        path = str(log_dir / "synthetic_sharegpt.json")
        conversations = synthetic_sharegpt(
            args.conversations, args.turns, args.question_words, args.answer_words
        )
        Path(path).write_text(json.dumps(conversations))
    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    requests = multiturn_requests(path, args.conversations, args.turns, args.seed, tokenizer, args.output_len)
    result, query, hit = run(args, model, cache, args.turn_rate, log_dir, requests, "turns")
    by_turn: dict[int, list[float]] = {}
    for r in result.records:
        if r.ok and r.ttft is not None:
            by_turn.setdefault(r.turn, []).append(r.ttft * 1e3)
    return {
        "cache": cache,
        "completed": result.metrics.completed,
        "failed": result.metrics.failed,
        "hit_rate": hit / query if query else 0.0,
        "prompt_tokens_by_turn": [
            statistics.mean(s.prompt_len for s in requests if s.turn == t) for t in sorted(by_turn)
        ],
        "ttft_p50_ms_by_turn": [statistics.median(by_turn[t]) for t in sorted(by_turn)],
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
    p.add_argument("--turns", type=int, default=0, help="multi-turn replay: turns per conversation (0: none)")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turn-rate", type=float, default=4.0, help="conversations started per second")
    p.add_argument("--sharegpt", help="ShareGPT JSON to replay (default: synthetic conversations)")
    p.add_argument(
        "--question-words", type=int, default=150, help="synthetic conversations: words per question"
    )
    p.add_argument("--answer-words", type=int, default=150, help="synthetic conversations: words per reply")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.device == "cpu":
        from pd.tiny_model import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "ci"))
    else:
        model = shape_model(
            max(args.system_len + args.question_len + args.output_len + 64, 8192)
        )  # turns grow
    log_dir = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    rows = []
    for rate in (float(r) for r in args.rates.split(",") if r):  # --rates "": the multi-turn replay only
        for cache in (False, True):
            t0 = time.monotonic()
            rows.append(measure(args, model, cache, rate, log_dir))
            print(json.dumps(rows[-1]), f"({time.monotonic() - t0:.0f} s)", flush=True)
    if rows:
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
    turns = [measure_turns(args, model, cache, log_dir) for cache in (False, True)] if args.turns else []
    if turns:
        source = (
            args.sharegpt
            or f"synthetic ShareGPT ({args.question_words} words a question, {args.answer_words} a reply)"
        )
        print(f"\nMulti-turn replay: {args.conversations} conversations x {args.turns} turns of {source}, "
              f"{args.turn_rate:g} conversations/s, output {args.output_len}\n")  # fmt: skip
        print("| turn | prompt tokens | TTFT p50 ms, no cache | TTFT p50 ms, cache | ratio |")
        print("|---:|---:|---:|---:|---:|")
        off, on = turns
        for t, (n, a, b) in enumerate(
            zip(off["prompt_tokens_by_turn"], off["ttft_p50_ms_by_turn"], on["ttft_p50_ms_by_turn"])
        ):
            print(f"| {t + 1} | {n:.0f} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")  # fmt: skip
        print(f"hit rate with the cache {on['hit_rate']:.1%}; failed {off['failed']} / {on['failed']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"shared_prefix": rows, "multiturn": turns}, indent=2) + "\n")


if __name__ == "__main__":
    main()
