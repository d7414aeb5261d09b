"""`pd-bench`: end-to-end TTFT/TPOT benchmark of any OpenAI-compatible server.

Sends a dataset of prompts as streaming requests with Poisson (or immediate) arrivals and a
concurrency cap, measures each stream, and reports latency and throughput:

    pd-bench --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 1024 \
        --random-output-len 128 --num-prompts 200 --request-rate 8 --max-concurrency 64 \
        --slo ttft:2000 tpot:50 --result-json out.json --plot plots/

From Python: `result = asyncio.run(run_benchmark(BenchConfig(base_url=..., ...)))`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from tqdm import tqdm

from pd.bench.client import request_body, stream_request
from pd.bench.datasets import (
    CHARS_PER_TOKEN,
    SampleRequest,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from pd.bench.metrics import (
    SLO_METRICS,
    BenchMetrics,
    RequestRecord,
    compute_metrics,
    group_errors,
)
from pd.bench.prefix_datasets import (
    PREFIX_DATASETS,
    chained_offsets,
    multiturn_requests,
    shared_prefix_requests,
)

DATASETS = ("random", "sharegpt", *PREFIX_DATASETS)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run depends on. Latency SLOs are in milliseconds, timeouts in seconds."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    dataset_name: str = "random"
    dataset_path: str | None = None
    tokenizer: str | None = None  # a tokenizer.json or the directory holding it
    num_prompts: int = 100
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    # Random ids are drawn below this; None: the tokenizer's vocabulary, else the one the server lists.
    random_vocab_size: int | None = None
    sharegpt_output_len: int | None = None  # replaces the reply length of every ShareGPT sample
    # generated-shared-prefix (pd.bench.prefix_datasets): groups x prompts, each a shared system prompt + a question
    gsp_num_groups: int = 32
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2000
    gsp_question_len: int = 100
    gsp_output_len: int = 128
    multiturn_max_turns: int = (
        4  # sharegpt-multiturn: turns replayed per conversation (--num-prompts of them)
    )
    request_rate: float = math.inf  # requests/s with Poisson arrivals; inf sends all at once
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    # Ask for the generated ids in every chunk (a server extension pd and vLLM support), so tokens that
    # decode to no text (dummy weights) still count; servers without it send none and are measured by text.
    return_token_ids: bool = True
    # Ask pd for each request's latency phases (`return_phases`; servers without it send none).
    return_phases: bool = True
    request_timeout: float = 600.0
    slo_ms: Mapping[str, float] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if not self.endpoint.startswith("/") or not self.endpoint.endswith("completions"):
            raise ValueError(
                f"endpoint={self.endpoint!r}, expected a path like /v1/completions or /v1/chat/completions"
            )
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name={self.dataset_name!r}, expected one of {DATASETS}")
        if self.dataset_name in ("sharegpt", "sharegpt-multiturn") and not self.dataset_path:
            raise ValueError(f"dataset_name={self.dataset_name!r} needs dataset_path (a ShareGPT JSON file)")
        if self.dataset_name == "generated-shared-prefix" and self.is_chat:
            raise ValueError("dataset_name='generated-shared-prefix' sends token ids: use /v1/completions")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts}, expected >= 1")
        if self.random_vocab_size is not None and self.random_vocab_size < 1:
            raise ValueError(f"random_vocab_size={self.random_vocab_size}, expected >= 1 or None")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate}, expected > 0 (or inf)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency}, expected >= 1 or None")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups={self.num_warmups}, expected >= 0")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout={self.request_timeout}, expected > 0 seconds")
        unknown = set(self.slo_ms) - set(SLO_METRICS)
        if unknown:
            raise ValueError(
                f"slo_ms has unknown metric(s) {sorted(unknown)}, expected some of {SLO_METRICS}"
            )
        bad = {k: v for k, v in self.slo_ms.items() if not v > 0}
        if bad:
            raise ValueError(f"slo_ms={dict(self.slo_ms)}: thresholds {bad} must be > 0 ms")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def models_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/models"

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: inf becomes the string "inf"; the API key is left out."""
        d = dataclasses.asdict(self)
        d["slo_ms"], d["extra_body"] = dict(self.slo_ms), dict(self.extra_body)
        d["api_key"] = None if self.api_key is None else "<set>"
        if math.isinf(self.request_rate):
            d["request_rate"] = "inf"
        return d


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    model: str
    records: tuple[RequestRecord, ...]
    metrics: BenchMetrics
    warmup_errors: dict[str, int]  # error message -> count, over the warm-up requests
    notes: tuple[str, ...]  # caveats on the figures, e.g. estimated token counts
    date: str  # UTC, ISO 8601, when the run started

    def to_dict(self) -> dict[str, Any]:
        """Config, aggregate metrics and per-request records, JSON-safe."""
        metrics = dataclasses.asdict(self.metrics)
        metrics["output_tokens_source"] = self.metrics.output_tokens_source
        records = []
        for r in self.records:
            d = dataclasses.asdict(r)
            d["token_times"] = list(r.token_times)
            d.update(ttft=r.ttft, tpot=r.tpot, e2el=r.e2el, itls=r.itls)
            records.append(d)
        return {
            "date": self.date,
            "model": self.model,
            "config": self.config.to_dict(),
            "notes": list(self.notes),
            "warmup_errors": self.warmup_errors,
            "metrics": metrics,
            "requests": records,
        }


def arrival_times(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s from start) of `num` requests: a Poisson process of `rate`/s, or all at 0 for inf.

    The first request goes at 0; gaps are exponential with mean 1/rate, deterministic in `seed`.
    """
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def sample_requests(
    cfg: BenchConfig, server_vocab_size: int | None = None
) -> tuple[list[SampleRequest], list[str]]:
    """The dataset `cfg` names, and notes on how exact its token counts are. Random ids are drawn below
    `cfg.random_vocab_size`, else the tokenizer's vocabulary, else `server_vocab_size` (what the server
    lists); with none of them the random dataset is refused (ValueError saying what to pass)."""
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    notes = []
    if cfg.dataset_name == "random":
        vocab_size = cfg.random_vocab_size
        if vocab_size is None and tokenizer is None:
            vocab_size = server_vocab_size
        requests = random_requests(
            cfg.num_prompts,
            cfg.random_input_len,
            cfg.random_output_len,
            cfg.random_range_ratio,
            vocab_size,
            cfg.seed,
            tokenizer,
            as_text=cfg.is_chat,
        )
        if cfg.is_chat:
            notes.append(
                "chat prompts have the asked length in tokens without the chat template; the input token "
                "totals are the server's usage (template included) where it reports one"
            )
    elif cfg.dataset_name == "generated-shared-prefix":
        vocab_size = cfg.random_vocab_size or (tokenizer.get_vocab_size() if tokenizer else server_vocab_size)
        if vocab_size is None:
            raise ValueError(
                "generated-shared-prefix: pass --tokenizer or --random-vocab-size (ids to draw from)"
            )
        requests = shared_prefix_requests(
            cfg.gsp_num_groups,
            cfg.gsp_prompts_per_group,
            cfg.gsp_system_prompt_len,
            cfg.gsp_question_len,
            cfg.gsp_output_len,
            vocab_size,
            cfg.seed,
        )
        notes.append(
            f"{len(requests)} prompts ({cfg.gsp_num_groups} groups x {cfg.gsp_prompts_per_group}); --num-prompts ignored"
        )
    elif cfg.dataset_name == "sharegpt-multiturn":
        assert cfg.dataset_path is not None
        requests = multiturn_requests(
            cfg.dataset_path,
            cfg.num_prompts,
            cfg.multiturn_max_turns,
            cfg.seed,
            tokenizer,
            output_len=cfg.sharegpt_output_len,
        )
        notes.append(
            f"{len(requests)} turns of {cfg.num_prompts} conversations, each turn sent when the previous ended"
        )
    else:
        requests = sharegpt_requests(
            cfg.dataset_path, cfg.num_prompts, cfg.seed, tokenizer, output_len=cfg.sharegpt_output_len
        )
        if tokenizer is None:
            notes.append(
                f"ShareGPT token counts estimated as characters / {CHARS_PER_TOKEN} (no --tokenizer); "
                "input totals use the server's usage where it reports one"
            )
    return requests, notes


async def fetch_models(client: httpx.AsyncClient, models_url: str) -> list[dict[str, Any]]:
    """The model entries the server lists at GET /v1/models (at least one)."""
    try:
        response = await client.get(models_url)
        response.raise_for_status()
        data = response.json()["data"]
        if not isinstance(data, list) or not data or not all(isinstance(m, dict) for m in data):
            raise ValueError(f"no model listed: {_shorten_json(data)}")
        return data
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"could not read the models from {models_url} ({e})") from e


def _shorten_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."


def listed_vocab_size(models: Sequence[Mapping[str, Any]] | None, model: str) -> int | None:
    """``vocab_size`` of ``model``'s entry in a GET /v1/models listing, where the server gives one."""
    for entry in models or ():
        size = entry.get("vocab_size")
        if entry.get("id") == model and isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


async def _run_requests(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    model: str,
    requests: Sequence[SampleRequest],
    offsets: Sequence[float],
    progress: tqdm | None,
) -> tuple[list[RequestRecord], float]:
    """Sends request i at offsets[i] s after start, at most max_concurrency at once; returns (records, duration)."""
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    ended = [asyncio.Event() for _ in requests]  # a conversation's next turn waits for the previous one
    t0 = time.perf_counter()

    async def one(index: int, sample: SampleRequest, offset: float) -> RequestRecord:
        try:
            return dataclasses.replace(await send(index, sample, offset), turn=sample.turn)
        finally:
            ended[index].set()

    async def send(index: int, sample: SampleRequest, offset: float) -> RequestRecord:
        if sample.after is not None:
            await ended[sample.after].wait()
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        body = request_body(
            sample,
            model,
            cfg.is_chat,
            cfg.temperature,
            cfg.ignore_eos,
            cfg.extra_body,
            return_token_ids=cfg.return_token_ids,
            return_phases=cfg.return_phases,
        )
        if limit is not None:
            await limit.acquire()
        try:
            record = await stream_request(
                client,
                cfg.url,
                body,
                index=index,
                prompt_len=sample.prompt_len,
                t0=t0,
                timeout_s=cfg.request_timeout,
                chat=cfg.is_chat,
            )
        finally:
            if limit is not None:
                limit.release()
        if progress is not None:
            progress.update(1)
        return record

    records = await asyncio.gather(*(one(i, s, o) for i, (s, o) in enumerate(zip(requests, offsets))))
    return list(records), time.perf_counter() - t0


async def run_benchmark(cfg: BenchConfig, requests: Sequence[SampleRequest] | None = None) -> BenchResult:
    """Runs one benchmark against `cfg.base_url` and returns its records and metrics.

    `requests` replaces the dataset named in `cfg` (then `cfg.num_prompts` is ignored). Failed
    requests are counted with their error messages; nothing a server does raises here, except
    that the model id must be known (given, or listed by GET /v1/models), and so must the vocabulary
    of random ids (see ``sample_requests``).
    """
    notes: list[str] = []
    if requests is not None and len(requests) == 0:
        raise ValueError("no requests to send")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # No pool limit (the concurrency cap is ours to set) and no httpx timeout: stream_request
    # bounds each whole request by cfg.request_timeout.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits) as client:
        needs_vocab = (
            requests is None
            and cfg.dataset_name in ("random", "generated-shared-prefix")
            and cfg.tokenizer is None
            and cfg.random_vocab_size is None
        )
        models = None
        if cfg.model is None or needs_vocab:
            try:
                models = await fetch_models(client, cfg.models_url)
            except RuntimeError as e:
                if cfg.model is None:
                    raise RuntimeError(f"{e}; pass --model") from None
        model = cfg.model or str(models[0].get("id"))
        if requests is None:
            requests, notes = sample_requests(cfg, listed_vocab_size(models, model))
            if needs_vocab:
                notes.append(f"random token ids drawn below the vocabulary size the server lists for {model}")

        warmup_errors: dict[str, int] = {}
        if cfg.num_warmups:
            warmups = [requests[i % len(requests)] for i in range(cfg.num_warmups)]
            records, _ = await _run_requests(client, cfg, model, warmups, [0.0] * len(warmups), None)
            warmup_errors = group_errors(records)

        firsts = sum(r.after is None for r in requests)
        offsets = chained_offsets(requests, arrival_times(firsts, cfg.request_rate, cfg.seed))
        with tqdm(total=len(requests), disable=cfg.disable_tqdm, desc="requests") as progress:
            records, duration = await _run_requests(client, cfg, model, requests, offsets, progress)

    metrics = compute_metrics(records, duration, cfg.slo_ms)
    if 0 < metrics.output_tokens_from_usage < metrics.completed:
        notes.append(
            "output token counts: server usage where reported, else the token ids (or output chunks) in the stream"
        )
    elif metrics.completed and metrics.output_tokens_from_usage == 0:
        notes.append(
            "output token counts are the token ids (or output chunks) in the stream: the server reported no usage"
        )
    return BenchResult(cfg, model, tuple(records), metrics, warmup_errors, tuple(notes), date)
