"""Benchmark metrics as pure functions of per-request timestamps.

All times are seconds since the benchmark started; latency statistics are reported in milliseconds.

Definitions (those of ``vllm bench serve``, so its users read the figures the same way):

- TTFT: from sending the request to the first chunk carrying output (text or token ids).
- TPOT, per request: (last output chunk - first output chunk) / (output tokens - 1), with the token
  count from the server's usage where it reports one; undefined for one output token. Statistics are
  over requests.
- ITL: the gaps between consecutive output chunks, pooled over all requests. When every chunk carries
  one token, a request's mean ITL equals its TPOT, and the mean ITL equals the mean TPOT when every
  request has as many tokens (e.g. with ``--ignore-eos``); a server that puts several tokens in a chunk
  shows fewer, longer ITLs than TPOTs.
- E2EL: from sending the request to the end of the stream (``[DONE]``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# SLO names accepted by `--slo name:ms`, each a latency that a request must not exceed.
SLO_METRICS = ("ttft", "tpot", "e2el")
# Width of the windows that output throughput over time (and its peak) is counted in.
THROUGHPUT_WINDOW_S = 1.0


@dataclass(frozen=True)
class RequestRecord:
    """What one request did, as seen by the client.

    `token_times` holds the arrival time of every chunk that carried output (text or token ids).
    `output_tokens` is the server's `usage.completion_tokens` when `output_tokens_from_usage`, else
    the token ids the chunks carried, else the number of such chunks; `prompt_len` likewise comes
    from `usage.prompt_tokens` or from the dataset.
    """

    index: int
    start: float
    end: float
    token_times: tuple[float, ...]
    prompt_len: int
    output_tokens: int
    max_tokens: int
    prompt_tokens_from_usage: bool = False
    output_tokens_from_usage: bool = False
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    phases: Mapping[str, float] | None = None  # pd's `pd_phases` (seconds per latency phase), if sent
    turn: int = 0  # the request's turn in its conversation (multi-turn workloads)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """(last output chunk - first output chunk) / (output tokens - 1); undefined for one output token.

        The end of the stream after the last token (usage chunk, ``[DONE]``) is no token's time."""
        if not self.token_times or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    def meets(self, slo_ms: Mapping[str, float]) -> bool:
        """True when every given SLO holds. A request without a TPOT (one token) has none to break."""
        if not self.ok:
            return False
        values = {"ttft": self.ttft, "tpot": self.tpot, "e2el": self.e2el}
        return all(values[name] is None or values[name] * 1000.0 <= limit for name, limit in slo_ms.items())


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency metric in milliseconds; None where there were no samples."""

    count: int
    mean: float | None
    median: float | None
    std: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(samples_s: Sequence[float]) -> LatencyStats:
        if len(samples_s) == 0:
            return LatencyStats(0, None, None, None, None, None)
        ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return LatencyStats(len(ms), float(ms.mean()), float(p50), float(ms.std()), float(p90), float(p99))


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    errors: dict[str, int]  # error message -> number of requests that failed with it
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    output_tokens_from_usage: int  # successful requests whose output count came from `usage`
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float
    peak_concurrency: int
    slo_ms: dict[str, float]
    good_requests: int | None
    goodput: float | None  # requests/s meeting every SLO; None without SLOs
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    output_throughput_timeline: list[float]  # output tokens/s in each THROUGHPUT_WINDOW_S window

    @property
    def output_tokens_source(self) -> str:
        if self.completed == 0:
            return "none"
        if self.output_tokens_from_usage == self.completed:
            return "usage"
        if self.output_tokens_from_usage == 0:
            return "chunks"
        return "mixed"


def group_errors(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Error messages with their counts, most frequent first."""
    return dict(Counter(r.error for r in records if r.error is not None).most_common())


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once; a request is in flight on [start, end)."""
    # At equal times ends (-1) sort before starts (+1), so back-to-back requests do not overlap.
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def output_throughput_timeline(
    records: Sequence[RequestRecord], duration_s: float, window_s: float = THROUGHPUT_WINDOW_S
) -> list[float]:
    """Output tokens/s in consecutive windows from time 0 over the successful requests.

    Each token-bearing chunk counts output_tokens / chunks tokens, so the windows sum to the
    reported output token total even when a chunk carries several tokens.
    """
    n_windows = max(1, math.ceil(duration_s / window_s))
    counts = [0.0] * n_windows
    for r in records:
        if not r.ok or not r.token_times:
            continue
        weight = r.output_tokens / len(r.token_times)
        for t in r.token_times:
            counts[min(n_windows - 1, max(0, int(t // window_s)))] += weight
    return [c / window_s for c in counts]


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, slo_ms: Mapping[str, float] | None = None
) -> BenchMetrics:
    """Aggregates per-request records of a run that lasted `duration_s` seconds.

    Token totals, throughput and latency statistics count successful requests only; peak
    concurrency counts every request, since failed ones also occupied the server.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s={duration_s}, expected > 0")
    slo_ms = dict(slo_ms or {})
    unknown = set(slo_ms) - set(SLO_METRICS)
    if unknown:
        raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}, expected some of {SLO_METRICS}")
    ok = [r for r in records if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    timeline = output_throughput_timeline(ok, duration_s)
    good = sum(r.meets(slo_ms) for r in ok) if slo_ms else None
    return BenchMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=group_errors(records),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        output_tokens_from_usage=sum(r.output_tokens_from_usage for r in ok),
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        peak_output_throughput=max(timeline),
        peak_concurrency=peak_concurrency(records),
        slo_ms=slo_ms,
        good_requests=good,
        goodput=None if good is None else good / duration_s,
        ttft=LatencyStats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=LatencyStats.of([r.tpot for r in ok if r.tpot is not None]),
        itl=LatencyStats.of([gap for r in ok for gap in r.itls]),
        e2el=LatencyStats.of([r.e2el for r in ok]),
        output_throughput_timeline=timeline,
    )
