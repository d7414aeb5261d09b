"""pd-bench's command line: its flags (defaults from ``BenchConfig``) and the config they make."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from pd.bench import serve
from pd.bench.metrics import SLO_METRICS
from pd.bench.report import (
    expert_balance,
    fmt,
    format_table,
    prefix_cache_line,
    prefix_cache_tokens,
    write_result_json,
)
from pd.bench.serve import DATASETS, BenchConfig, run_benchmark


def parse_slo(items: Sequence[str]) -> dict[str, float]:
    """["ttft:2000", "tpot:50"] -> {"ttft": 2000.0, "tpot": 50.0} (milliseconds)."""
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = None
        if not sep or name not in SLO_METRICS or ms is None or not ms > 0:
            raise ValueError(f"--slo {item!r}: expected NAME:MILLISECONDS with NAME one of {SLO_METRICS}")
        slo[name] = ms
    return slo


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="pd-bench", description=serve.__doc__.split("\n\n")[0] if serve.__doc__ else None
    )
    p.add_argument("--base-url", default=d.base_url, help="server root, without /v1")
    p.add_argument("--endpoint", default=d.endpoint, help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: first id from GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset-name", default=d.dataset_name, choices=DATASETS)
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for --dataset-name sharegpt)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="the model's tokenizer.json or its directory: the vocabulary random ids are drawn from, exact "
        "token counts, and text prompts for chat on random data",
    )
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument(
        "--random-input-len",
        type=int,
        default=d.random_input_len,
        help="prompt tokens; for chat, those of the message: the server's chat template adds its own "
        "(counted in its usage, which the input totals report)",
    )
    p.add_argument("--random-output-len", type=int, default=d.random_output_len)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=d.random_range_ratio,
        help="lengths uniform in [len*(1-r), len*(1+r)]",
    )
    p.add_argument(
        "--random-vocab-size",
        type=int,
        default=d.random_vocab_size,
        help="draw random ids from [0, N) (default: the --tokenizer's vocabulary, else the vocab_size the "
        "server lists at GET /v1/models; with neither pd-bench refuses to start, since ids the model does "
        "not know are refused)",
    )
    p.add_argument(
        "--sharegpt-output-len", type=int, default=None, help="max_tokens for every ShareGPT prompt"
    )
    g = p.add_argument_group("shared-prefix workloads (pd.bench.prefix_datasets)")
    g.add_argument("--gsp-num-groups", type=int, default=d.gsp_num_groups, help="system prompts")
    g.add_argument(
        "--gsp-prompts-per-group", type=int, default=d.gsp_prompts_per_group, help="questions each"
    )
    g.add_argument("--gsp-system-prompt-len", type=int, default=d.gsp_system_prompt_len, help="tokens")
    g.add_argument("--gsp-question-len", type=int, default=d.gsp_question_len, help="tokens")
    g.add_argument("--gsp-output-len", type=int, default=d.gsp_output_len, help="max_tokens")
    g.add_argument(
        "--multiturn-max-turns", type=int, default=d.multiturn_max_turns, help="turns per conversation"
    )
    p.add_argument(
        "--request-rate", type=float, default=d.request_rate, help="requests/s, Poisson; inf: all at once"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=d.num_warmups, help="requests sent first, not counted")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos: true (a common server extension)"
    )
    p.add_argument(
        "--return-token-ids",
        action=argparse.BooleanOptionalAction,
        default=d.return_token_ids,
        help="send return_token_ids: true (pd and vLLM), and count the generated ids every chunk carries, "
        "so that tokens decoding to no text (dummy weights) are measured; --no-return-token-ids for a "
        "server that refuses the field (then only chunks with text count) (default: on)",
    )
    p.add_argument(
        "--return-phases",
        action=argparse.BooleanOptionalAction,
        default=d.return_phases,
        help="send return_phases: true (pd) and print where each request's latency went, phase by phase; "
        "--no-return-phases for a server that refuses the field (default: on)",
    )
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")
    p.add_argument(
        "--slo", nargs="+", default=[], metavar="NAME:MS", help="e.g. ttft:2000 tpot:50 e2el:10000"
    )
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--result-json", default=None, help="write config, metrics and per-request records here")
    p.add_argument(
        "--plot", default=None, metavar="DIR", help="write TTFT/TPOT CDFs and throughput PNGs here"
    )
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra_body, dict):
        raise ValueError(f"--extra-body {args.extra_body!r}: expected a JSON object")
    return BenchConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        tokenizer=args.tokenizer,
        num_prompts=args.num_prompts,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        random_vocab_size=args.random_vocab_size,
        sharegpt_output_len=args.sharegpt_output_len,
        gsp_num_groups=args.gsp_num_groups,
        gsp_prompts_per_group=args.gsp_prompts_per_group,
        gsp_system_prompt_len=args.gsp_system_prompt_len,
        gsp_question_len=args.gsp_question_len,
        gsp_output_len=args.gsp_output_len,
        multiturn_max_turns=args.multiturn_max_turns,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        return_token_ids=args.return_token_ids,
        return_phases=args.return_phases,
        request_timeout=args.request_timeout,
        slo_ms=parse_slo(args.slo),
        extra_body=extra_body,
        disable_tqdm=args.disable_tqdm,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"pd-bench: {cfg.url}, dataset {cfg.dataset_name}, "
        f"{cfg.gsp_num_groups * cfg.gsp_prompts_per_group if cfg.dataset_name == 'generated-shared-prefix' else cfg.num_prompts} prompts, "
        f"request rate {fmt(cfg.request_rate)}/s, max concurrency {fmt(cfg.max_concurrency)}"
    )
    cached_before = prefix_cache_tokens(cfg.base_url)
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"pd-bench: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    cached = prefix_cache_line(cached_before, prefix_cache_tokens(cfg.base_url))
    if cached:
        print(cached)
    balance = expert_balance(cfg.base_url)
    if balance:
        print(balance)
    if args.result_json:
        write_result_json(result, args.result_json)
        print(f"Wrote {args.result_json}")
    if args.plot:
        from pd.bench.plot import plot_results

        files = plot_results(list(result.records), result.metrics, args.plot)
        print("Wrote " + ", ".join(str(f) for f in files))
    return 0 if result.metrics.completed else 1


if __name__ == "__main__":
    sys.exit(main())
