"""What pd-bench prints and writes: the result table (vllm's serving-benchmark layout), pd's latency phases,
the TTFT by turn of multi-turn workloads, the result JSON, and what a pd proxy's /metrics says about the
experts' load."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from pd.bench.metrics import LatencyStats, RequestRecord
from pd.bench.prefix_datasets import turn_lines

if TYPE_CHECKING:
    from pd.bench.serve import BenchResult

TABLE_WIDTH = 50
# Printed under the table (pd.bench.metrics has the details).
DEFINITIONS = [
    "TPOT = (last token - first token) / (output tokens - 1), per request;",
    "ITL = gaps between chunks carrying tokens, over all requests (as vllm bench serve);",
    "E2EL = request sent to end of stream.",
]


def fmt(value: float | int | str | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.2f}"
    return str(value)


def _title(text: str, fill: str = "-") -> str:
    return f"{text:{fill}^{TABLE_WIDTH}}"


def format_table(result: BenchResult) -> str:
    """The result block printed at the end of a run (the layout of vllm's serving benchmark)."""
    m, cfg = result.metrics, result.config
    source = {
        "usage": "server usage",
        "chunks": "token ids / chunks in the stream",
        "mixed": "usage where reported, else the stream",
        "none": "n/a",
    }[m.output_tokens_source]
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", m.completed),
        ("Failed requests:", m.failed),
        ("Request rate (req/s):", cfg.request_rate),
        ("Maximum request concurrency:", cfg.max_concurrency),
        ("Benchmark duration (s):", m.duration_s),
        ("Total input tokens:", m.total_input_tokens),
        ("Total generated tokens:", m.total_output_tokens),
        ("Output token counts from:", source),
        ("Request throughput (req/s):", m.request_throughput),
    ]
    if m.goodput is not None:
        rows.append(("Request goodput (req/s):", m.goodput))
    rows += [
        ("Output token throughput (tok/s):", m.output_throughput),
        ("Peak output token throughput (tok/s):", m.peak_output_throughput),
        ("Peak concurrent requests:", m.peak_concurrency),
        ("Total token throughput (tok/s):", m.total_token_throughput),
    ]
    lines = [_title(" Serving Benchmark Result ", "=")]
    lines += [f"{label:<40} {fmt(value)}" for label, value in rows]
    sections: list[tuple[str, str, LatencyStats]] = [
        ("Time to First Token", "TTFT", m.ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
        ("Inter-token Latency", "ITL", m.itl),
        ("End-to-end Latency", "E2EL", m.e2el),
    ]
    for title, short, stats in sections:
        lines.append(_title(title))
        for name, value in (
            ("Mean", stats.mean),
            ("Median", stats.median),
            ("Std", stats.std),
            ("P90", stats.p90),
            ("P99", stats.p99),
        ):
            lines.append(f"{f'{name} {short} (ms):':<40} {fmt(value)}")
    if m.slo_ms:
        slo = " ".join(f"{k}:{v:g}" for k, v in m.slo_ms.items())
        lines.append(_title("Goodput"))
        lines.append(f"{'SLO (ms):':<40} {slo}")
        lines.append(f"{'Requests meeting every SLO:':<40} {m.good_requests}")
    lines += phase_lines(result.records)
    turns = turn_lines(result.records)
    if turns:
        lines += [_title("Time to First Token by turn"), *turns]
    lines.append("=" * TABLE_WIDTH)
    lines += DEFINITIONS
    if m.errors:
        lines.append("Failed requests by error:")
        lines += [f"  {count:>6} x {message}" for message, count in m.errors.items()]
    if result.warmup_errors:
        lines.append("Failed warm-up requests by error (not counted above):")
        lines += [f"  {count:>6} x {message}" for message, count in result.warmup_errors.items()]
    lines += [f"Note: {note}" for note in result.notes]
    return "\n".join(lines)


def phase_lines(records: Sequence[RequestRecord]) -> list[str]:
    """Where the latency went (pd's ``pd_phases``): median and p90 ms per phase over the successful requests
    that carried them, in the server's order; none when no request did."""
    phased = [r.phases for r in records if r.ok and r.phases]
    if not phased:
        return []
    lines = [
        _title(f"Latency by phase (pd; {len(phased)} requests)"),
        f"{'phase':<26}{'median ms':>14}{'P90 ms':>10}",
    ]
    for name in phased[0]:
        if name == "kv_bytes":
            continue
        values = sorted(p[name] for p in phased if name in p)
        median, p90 = values[len(values) // 2], values[min(len(values) - 1, int(0.9 * len(values)))]
        lines.append(f"{name:<26}{median * 1e3:>14.2f}{p90 * 1e3:>10.2f}")
    kv = sorted(p.get("kv_bytes", 0.0) for p in phased)
    lines.append(f"{'KV bytes per request':<26}{kv[len(kv) // 2]:>14.0f}")
    return lines


def write_result_json(result: BenchResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


def expert_balance(base_url: str) -> str:
    """Load balance of the experts, from a pd proxy's ``pd_expert_tokens`` (empty for other servers).

    Per role: the (token, expert) pairs each EP rank received (cumulative since the ranks started)
    and max / mean over ranks and over experts.
    """
    from pd.metrics import parse_samples

    try:
        response = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=10)
    except httpx.HTTPError:
        return ""
    if response.status_code != 200:  # not a pd proxy (or no metrics there)
        return ""
    text = response.text
    per_rank: dict[str, dict[str, float]] = {}
    per_expert: dict[str, dict[str, float]] = {}
    for (name, labels), value in parse_samples(text).items():
        if name != "pd_expert_tokens":
            continue
        d = dict(labels)
        rank = f"{d['instance']}/{d['rank']}"
        per_rank.setdefault(d["role"], {}).setdefault(rank, 0.0)
        per_rank[d["role"]][rank] += value
        per_expert.setdefault(d["role"], {})[d["expert"]] = (
            per_expert.get(d["role"], {}).get(d["expert"], 0.0) + value
        )
    if not per_rank:
        return ""
    lines = ["Expert load (cumulative (token, expert) pairs since start):"]
    for role, ranks in sorted(per_rank.items()):
        rank_values, expert_values = list(ranks.values()), list(per_expert[role].values())
        imbalance = max(rank_values) / (sum(rank_values) / len(rank_values)) if sum(rank_values) else 0.0
        expert_imbalance = (
            max(expert_values) / (sum(expert_values) / len(expert_values)) if sum(expert_values) else 0.0
        )
        shown = ", ".join(f"{r} {v:.0f}" for r, v in sorted(ranks.items()))
        lines.append(
            f"  {role}: {shown}; max/mean over ranks {imbalance:.2f}, over experts {expert_imbalance:.2f}"
        )
    return "\n".join(lines)


def prefix_cache_tokens(base_url: str) -> tuple[float, float] | None:
    """(prompt tokens looked up, tokens found) in the prefix caches of a pd deployment's prefill and colocated
    ranks so far (what was not computed; decode ranks' hits, transfers skipped, are not counted here), from
    its proxy's /metrics; None for other servers."""
    from pd.metrics import parse_samples
    from pd.worker.metrics import PREFIX_HIT_TOKENS, PREFIX_QUERY_TOKENS

    try:
        response = httpx.get(f"{base_url.rstrip('/')}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    query = hit = 0.0
    found = False
    for (name, labels), value in parse_samples(response.text).items():
        if ("role", "decode") in labels:
            continue
        if name == PREFIX_QUERY_TOKENS:
            query, found = query + value, True
        elif name == PREFIX_HIT_TOKENS:
            hit += value
    return (query, hit) if found else None


def prefix_cache_line(before: tuple[float, float] | None, after: tuple[float, float] | None) -> str:
    """The run's prefix-cache hit rate (the counters' growth over the run), or nothing. The counters show
    once a rank has counted (``before`` None: none had)."""
    before = before or (0.0, 0.0)
    if after is None or after[0] <= before[0]:
        return ""
    query, hit = after[0] - before[0], after[1] - before[1]
    return f"Prefix cache: {hit:.0f} of {query:.0f} prompt tokens found cached ({hit / query:.1%})"
