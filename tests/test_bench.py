"""pd-bench: metric math on synthetic records, datasets, arrivals, and whole runs against a stub server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pd.bench.cli import main, parse_slo
from pd.bench.client import sse_data
from pd.bench.datasets import (
    SampleRequest,
    count_tokens,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from pd.bench.metrics import BenchMetrics, LatencyStats, RequestRecord, compute_metrics, peak_concurrency
from pd.bench.report import format_table
from pd.bench.serve import BenchConfig, arrival_times, run_benchmark
from tests.support.net import free_port

if TYPE_CHECKING:
    from starlette.requests import Request

# The stub server runs on starlette and uvicorn: pd's own dependencies, but missing from a bare GPU
# image that runs `pytest -m gpu` with a few wheels added (../shared/gpu/fetch-wheels.sh).
uvicorn = pytest.importorskip("uvicorn")
Starlette = pytest.importorskip("starlette.applications").Starlette
JSONResponse = pytest.importorskip("starlette.responses").JSONResponse
StreamingResponse = pytest.importorskip("starlette.responses").StreamingResponse
Route = pytest.importorskip("starlette.routing").Route

# ---------------------------------------------------------------------------------------------
# Metric math on synthetic records (exact).


def row(label, value):
    """A line of the printed result table."""
    return f"{label:<40} {value}"


def rec(index, start, token_times, end, output_tokens=None, error=None, prompt_len=10, from_usage=True):
    return RequestRecord(
        index=index,
        start=start,
        end=end,
        token_times=tuple(token_times),
        prompt_len=prompt_len,
        output_tokens=len(token_times) if output_tokens is None else output_tokens,
        max_tokens=16,
        output_tokens_from_usage=from_usage,
        error=error,
    )


def test_record_latencies_are_exact():
    r = rec(0, start=1.0, token_times=[1.5, 1.6, 1.8, 2.1], end=2.2, output_tokens=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    # First to last token over the tokens after the first (vllm's definition): the stream's end after
    # the last token (usage chunk, [DONE]) is no token's time. One token per chunk: TPOT = mean ITL.
    assert r.tpot == pytest.approx((2.1 - 1.5) / 3) == pytest.approx(sum(r.itls) / len(r.itls))
    # Usage says 7 tokens arrived in 4 chunks: TPOT divides by the token count, not the chunk count.
    assert rec(0, 1.0, [1.5, 1.6, 1.8, 2.1], 2.2, output_tokens=7).tpot == pytest.approx(0.6 / 6)
    one = rec(0, 0.0, [0.25], 0.3, output_tokens=1)
    assert one.tpot is None and one.itls == []


def test_compute_metrics_exact():
    records = [
        rec(0, 0.0, [0.1, 0.2, 0.3], 0.4, prompt_len=5),  # ttft 0.1, tpot 0.1, e2el 0.4
        rec(1, 0.5, [0.8, 1.0, 1.2, 1.4], 1.5, output_tokens=8, prompt_len=7),  # ttft .3, tpot 0.6/7
        rec(2, 1.0, [1.2], 1.3, error="HTTP 500: boom"),
        rec(3, 1.1, [], 2.5, error="timeout: request did not finish within 1 s"),
        rec(4, 1.2, [], 1.3, error="HTTP 500: boom"),
    ]
    m = compute_metrics(records, duration_s=2.5)
    assert (m.completed, m.failed) == (2, 3)
    assert m.errors == {"HTTP 500: boom": 2, "timeout: request did not finish within 1 s": 1}
    assert list(m.errors) == ["HTTP 500: boom", "timeout: request did not finish within 1 s"]
    assert (m.total_input_tokens, m.total_output_tokens) == (12, 11)
    assert m.request_throughput == pytest.approx(2 / 2.5)
    assert m.output_throughput == pytest.approx(11 / 2.5)
    assert m.total_token_throughput == pytest.approx(23 / 2.5)
    assert m.ttft.mean == pytest.approx(200.0) and m.ttft.median == pytest.approx(200.0)
    assert m.ttft.std == pytest.approx(100.0)
    assert m.ttft.p90 == pytest.approx(100 + 0.9 * 200) and m.ttft.p99 == pytest.approx(100 + 0.99 * 200)
    assert m.tpot.mean == pytest.approx((100.0 + 600.0 / 7) / 2)
    assert m.itl.count == 5 and m.itl.mean == pytest.approx(1000 * (0.1 + 0.1 + 0.2 + 0.2 + 0.2) / 5)
    assert m.e2el.mean == pytest.approx(1000 * (0.4 + 1.0) / 2)
    # Windows [0,1), [1,2), [2,3): record 0 has 3 tokens in window 0; record 1 has 8 tokens in
    # 4 chunks (2 each), one chunk in window 0 and three in window 1. Failures are not counted.
    assert m.output_throughput_timeline == pytest.approx([5.0, 6.0, 0.0])
    assert m.peak_output_throughput == pytest.approx(6.0)
    # In flight at t=1.2: records 1, 2, 3, 4 (failed requests occupied the server too).
    assert m.peak_concurrency == 4
    assert m.goodput is None and m.good_requests is None
    assert m.output_tokens_source == "usage"


def test_compute_metrics_without_successes_reports_none():
    m = compute_metrics([rec(0, 0.0, [], 1.0, error="x")], duration_s=1.0)
    assert m.completed == 0 and m.failed == 1 and m.errors == {"x": 1}
    assert m.ttft == LatencyStats(0, None, None, None, None, None)
    assert m.output_tokens_source == "none"
    with pytest.raises(ValueError, match="duration_s"):
        compute_metrics([], duration_s=0.0)


def test_slo_goodput_math():
    records = [
        rec(0, 0.0, [0.1, 0.2, 0.3], 0.4),  # ttft 100, tpot 100, e2el 400
        rec(1, 0.0, [0.5, 0.55, 0.6], 0.65),  # ttft 500, tpot 50, e2el 650
        rec(2, 0.0, [0.05], 0.06, output_tokens=1),  # ttft 50, no tpot, e2el 60
        rec(3, 0.0, [0.01], 0.02, error="boom"),  # failures never count as good
    ]
    cases = [
        ({"ttft": 200}, 2),
        ({"tpot": 99}, 2),  # records 1 and 2 (no TPOT to break)
        ({"tpot": 100}, 3),  # the bound is inclusive
        ({"ttft": 200, "tpot": 99}, 1),
        ({"e2el": 650}, 3),  # the bound is inclusive
        ({"e2el": 649}, 2),
        ({"ttft": 1}, 0),
    ]
    for slo, good in cases:
        m = compute_metrics(records, duration_s=2.0, slo_ms=slo)
        assert m.good_requests == good, slo
        assert m.goodput == pytest.approx(good / 2.0), slo
    with pytest.raises(ValueError, match="itl"):
        compute_metrics(records, duration_s=1.0, slo_ms={"itl": 5})
    assert parse_slo(["ttft:2000", "tpot:50", "e2el:1e4"]) == {"ttft": 2000.0, "tpot": 50.0, "e2el": 10000.0}
    for bad in ("ttft", "itl:5", "ttft:abc", "tpot:-1"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo([bad])


def test_peak_concurrency_back_to_back_does_not_overlap():
    records = [rec(0, 0.0, [0.5], 1.0), rec(1, 1.0, [1.5], 2.0), rec(2, 1.5, [1.6], 1.7)]
    assert peak_concurrency(records) == 2


def test_arrival_times_poisson_and_inf():
    a = arrival_times(2000, rate=50.0, seed=3)
    assert a == arrival_times(2000, rate=50.0, seed=3)
    assert a != arrival_times(2000, rate=50.0, seed=4)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.1)  # exponential gaps, mean 1/rate
    assert arrival_times(5, rate=math.inf, seed=0) == [0.0] * 5


# ---------------------------------------------------------------------------------------------
# Datasets.


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small byte-level BPE tokenizer with two special tokens at ids 0 and 1."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7} again" for i in range(200)]
    tok.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return path


def test_random_dataset_deterministic_with_lengths_in_range():
    a = random_requests(50, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=7)
    assert a == random_requests(50, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=7)
    assert a != random_requests(50, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=8)
    for s in a:
        assert isinstance(s.prompt, list) and len(s.prompt) == s.prompt_len and s.prompt_len_exact
        assert 50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30
        assert all(0 <= t < 300 for t in s.prompt)
    assert len({s.prompt_len for s in a}) > 1  # lengths do vary
    exact = random_requests(5, input_len=32, output_len=8, vocab_size=1000, seed=0)
    assert all(s.prompt_len == 32 and s.output_len == 8 for s in exact)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(1, 8, 8, range_ratio=1.0, vocab_size=1000)
    with pytest.raises(ValueError, match="tokenizer"):
        random_requests(1, 8, 8, vocab_size=1000, as_text=True)


def test_random_dataset_with_tokenizer(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    ids = random_requests(20, input_len=40, output_len=4, vocab_size=100, seed=1, tokenizer=tok)
    assert all(t not in (0, 1) for s in ids for t in s.prompt)  # special tokens are never drawn
    text = random_requests(
        20, input_len=40, output_len=4, vocab_size=100, seed=1, tokenizer=tok, as_text=True
    )
    assert text == random_requests(
        20, input_len=40, output_len=4, vocab_size=100, seed=1, tokenizer=tok, as_text=True
    )
    for s in text:
        assert isinstance(s.prompt, str)
        assert s.prompt_len == count_tokens(tok, s.prompt) == 40  # the asked length, exactly
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tokenizer_path / "missing")


def sharegpt_file(tmp_path, entries):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    return path


def conv(*turns):
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_parsing(tmp_path, tokenizer_path):
    entries = [
        conv(("human", "a" * 40), ("gpt", "b" * 80)),  # 10 / 20 estimated tokens: kept
        conv(("gpt", "hello there!"), ("human", "c" * 40), ("gpt", "d" * 40)),  # first human turn: kept
        conv(("human", "short"), ("gpt", "e" * 40)),  # prompt 2 tokens: too short
        conv(("human", "f" * 40), ("gpt", "ok")),  # reply too short
        conv(("human", "g" * 5000), ("gpt", "h" * 40)),  # prompt 1250 tokens: too long
        conv(("human", "i" * 4000), ("gpt", "j" * 5000)),  # total too long
        conv(("human", "k" * 40)),  # no reply
        {"conversations": "not a list"},
        {"id": "no conversations"},
        "not an object",
    ]
    path = sharegpt_file(tmp_path, entries)
    got = sharegpt_requests(path, num_prompts=2, seed=0)
    assert sorted((s.prompt, s.prompt_len, s.output_len) for s in got) == [
        ("a" * 40, 10, 20),
        ("c" * 40, 10, 10),
    ]
    assert all(not s.prompt_len_exact for s in got)
    assert got == sharegpt_requests(path, num_prompts=2, seed=0)
    fixed = sharegpt_requests(path, num_prompts=2, seed=0, output_len=3)
    assert all(s.output_len == 3 for s in fixed)
    with pytest.raises(ValueError, match="only 2 usable"):
        sharegpt_requests(path, num_prompts=3)

    tok = load_tokenizer(tokenizer_path)
    words = "the quick brown fox jumps over the lazy dog"
    path = sharegpt_file(tmp_path, [conv(("user", words), ("assistant", words + " again and again"))])
    (s,) = sharegpt_requests(path, num_prompts=1, tokenizer=tok)
    assert s.prompt_len_exact
    assert (s.prompt_len, s.output_len) == (
        count_tokens(tok, words),
        count_tokens(tok, words + " again and again"),
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(bad, num_prompts=1)


def test_sse_data_parsing():
    async def collect(lines):
        async def gen():
            for line in lines:
                yield line

        return [d async for d in sse_data(gen())]

    lines = [": comment", "event: x", 'data: {"a": 1}', "", 'data:{"b":', "data: 2}", "", "data: [DONE]"]
    assert asyncio.run(collect(lines)) == ['{"a": 1}', '{"b":\n2}', "[DONE]"]


# ---------------------------------------------------------------------------------------------
# Whole runs against a stub OpenAI-compatible server.

# A request timeout that fails to fire must fail the test, not hang the suite.
bounded = pytest.mark.timeout(60)
FIRST_TOKEN_DELAY = 0.05
TOKEN_DELAY = 0.01
TEXT_PROMPT_TOKENS = 11  # what the stub reports as usage.prompt_tokens for a text prompt
STUB_VOCAB = 1000  # the vocabulary size the stub lists at /v1/models


class Stub:
    """An OpenAI-compatible streaming server whose behaviour is chosen by the prompt text.

    ok: first token after FIRST_TOKEN_DELAY, then one token per TOKEN_DELAY, usage at the end.
    pair: two tokens per chunk. nousage: no usage chunk. pair-nousage: both. http500: error status. midstream: an
    error event after two tokens. truncated: no [DONE]. stall: one token, then nothing.
    hang: never answers. Token-id prompts behave as ok.
    """

    def __init__(self, vocab_size: int | None = STUB_VOCAB, empty_text: bool = False):
        self.vocab_size = vocab_size  # listed at /v1/models (None: not listed)
        # Every chunk's text is empty, as for dummy weights whose tokens decode to nothing; the chunks
        # carry the ids when the request says return_token_ids (as pd's proxy does).
        self.empty_text = empty_text
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    async def models(self, request: Request):
        entry = {"id": "stub-model", "object": "model"}
        if self.vocab_size is not None:
            entry["vocab_size"] = self.vocab_size
        return JSONResponse({"object": "list", "data": [entry]})

    async def complete(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        mode = prompt if isinstance(prompt, str) else "ok"
        prompt_tokens = len(prompt) if isinstance(prompt, list) else TEXT_PROMPT_TOKENS
        n = body["max_tokens"]
        if mode == "http500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if mode == "hang":
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            return JSONResponse({}, status_code=499)

        send_ids = body.get("return_token_ids") is True

        def chunk(text, finish=None):
            k = len(text.split())
            if self.empty_text:
                text = ""
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            if send_ids:
                choice["token_ids"] = [7] * k
            return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"

        async def events():
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await asyncio.sleep(FIRST_TOKEN_DELAY)
                per_chunk = 2 if mode in ("pair", "pair-nousage") else 1
                sent = 0
                while sent < n:
                    k = min(per_chunk, n - sent)
                    sent += k
                    yield chunk("tok " * k, "length" if sent == n else None)
                    if mode == "midstream" and sent == 2:
                        yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                        return
                    if mode == "stall":
                        await asyncio.sleep(3600)
                    await asyncio.sleep(TOKEN_DELAY)
                if mode not in ("nousage", "pair-nousage"):
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": n,
                        "total_tokens": prompt_tokens + n,
                    }
                    yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
                if mode != "truncated":
                    yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.contextmanager
def serve(stub: Stub):
    """Runs the stub on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(stub.app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def stub_url():
    stub = Stub()
    with serve(stub) as url:
        yield stub, url


@contextlib.contextmanager
def stub_server(**kw):
    stub = Stub(**kw)
    with serve(stub) as url:
        yield stub, url


@bounded
def test_run_against_stub_counts_failures_and_usage(stub_url):
    stub, url = stub_url
    modes = ["ok", "ok", "pair", "nousage", "http500", "midstream", "truncated", "stall", "hang", "ok"]
    requests = [SampleRequest(prompt=m, prompt_len=3, output_len=6) for m in modes]
    cfg = BenchConfig(
        base_url=url, request_timeout=1.0, ignore_eos=True, disable_tqdm=True, slo_ms={"ttft": 60000}
    )
    result = asyncio.run(run_benchmark(cfg, requests))

    assert result.model == "stub-model"
    by_mode = dict(zip(modes, result.records))
    m = result.metrics
    assert (m.completed, m.failed) == (5, 5)
    assert m.errors == {
        "HTTP 500: boom": 1,
        "error in stream: engine died": 1,
        "stream ended before data: [DONE]": 1,
        "timeout: request did not finish within 1 s": 2,
    }
    for mode in ("stall", "hang"):
        r = by_mode[mode]
        assert r.error.startswith("timeout") and r.e2el >= 1.0
    assert by_mode["stall"].token_times and not by_mode["hang"].token_times
    assert m.duration_s >= 1.0

    # Counts come from usage where the stub sent it, else from chunks (one token per chunk there).
    for r, mode in zip(result.records, modes):
        if mode in ("ok", "pair"):
            assert r.ok and r.output_tokens == 6 and r.output_tokens_from_usage
            assert r.prompt_len == TEXT_PROMPT_TOKENS and r.prompt_tokens_from_usage
            assert r.finish_reason == "length" and r.text == "tok " * 6
    assert len(by_mode["pair"].token_times) == 3
    nousage = by_mode["nousage"]
    assert nousage.ok and nousage.output_tokens == 6 and not nousage.output_tokens_from_usage
    assert nousage.prompt_len == 3  # the dataset's count
    assert m.total_output_tokens == 5 * 6 and m.total_input_tokens == 4 * TEXT_PROMPT_TOKENS + 3
    assert m.output_tokens_source == "mixed"
    assert any("usage where reported" in n for n in result.notes)

    # Against the stub's schedule (lower bounds only: a late client can only measure more).
    for r in result.records:
        if r.ok:
            assert r.ttft >= FIRST_TOKEN_DELAY
            assert r.e2el >= FIRST_TOKEN_DELAY + (len(r.token_times) - 1) * TOKEN_DELAY
    assert m.good_requests == 5 and m.goodput == pytest.approx(5 / m.duration_s)

    body = next(b for b in stub.bodies if b.get("prompt") == "ok")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 6 and body["temperature"] == 0.0 and body["ignore_eos"] is True
    assert body["model"] == "stub-model"

    table = format_table(result)
    for line in (row("Successful requests:", "5"), row("Failed requests:", "5")):
        assert line in table
    assert "       2 x timeout: request did not finish within 1 s" in table
    assert "Request goodput (req/s):" in table and "Median TPOT (ms):" in table


@bounded
def test_chat_endpoint_and_concurrency_cap(stub_url):
    stub, url = stub_url
    requests = [SampleRequest(prompt="ok", prompt_len=3, output_len=4) for _ in range(6)]
    cfg = BenchConfig(
        base_url=url,
        endpoint="/v1/chat/completions",
        model="given",
        api_key="secret",
        max_concurrency=2,
        request_rate=200.0,
        num_warmups=2,
        disable_tqdm=True,
    )
    result = asyncio.run(run_benchmark(cfg, requests))
    assert result.metrics.completed == 6 and result.metrics.failed == 0 and result.warmup_errors == {}
    assert result.metrics.peak_concurrency <= 2 and stub.peak_in_flight <= 2
    assert len(stub.bodies) == 8  # warm-ups are sent, not counted
    assert all(
        b["messages"] == [{"role": "user", "content": "ok"}] and b["model"] == "given" for b in stub.bodies
    )
    assert set(stub.auth) == {"Bearer secret"}
    assert all(r.text == "tok " * 4 and r.output_tokens == 4 for r in result.records)


@bounded
def test_cli_writes_json_with_every_metric(stub_url, tmp_path, capsys):
    stub, url = stub_url
    out = tmp_path / "result.json"
    argv = ["--base-url", url, "--num-prompts", "5", "--random-input-len", "8", "--random-output-len", "3"]
    argv += ["--request-rate", "100", "--seed", "1", "--slo", "ttft:60000", "tpot:60000"]
    argv += ["--result-json", str(out), "--disable-tqdm"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "Serving Benchmark Result" in printed and row("Output token counts from:", "server usage") in printed
    )

    data = json.loads(out.read_text())
    assert data["model"] == "stub-model" and data["config"]["request_rate"] == 100.0
    metric_names = {f.name for f in dataclasses.fields(BenchMetrics)} | {"output_tokens_source"}
    assert metric_names <= set(data["metrics"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert set(data["metrics"][name]) == {f.name for f in dataclasses.fields(LatencyStats)}
        assert data["metrics"][name]["count"] > 0
    assert data["metrics"]["completed"] == 5 and data["metrics"]["good_requests"] == 5
    assert len(data["requests"]) == 5
    for r, body in zip(sorted(data["requests"], key=lambda r: r["index"]), stub.bodies):
        assert r["output_tokens"] == 3 and r["prompt_len"] == 8 == len(body["prompt"])  # from usage
        assert r["ttft"] == pytest.approx(r["token_times"][0] - r["start"])
    # The same seed sends the same prompts.
    assert sorted(map(str, (b["prompt"] for b in stub.bodies))) == sorted(
        str(s.prompt) for s in random_requests(5, 8, 3, vocab_size=STUB_VOCAB, seed=1)
    )


@bounded
def test_cli_reports_all_failed_and_bad_flags(tmp_path, capsys):
    # Nothing listens on this port: every request fails with a connection error, and the run ends.
    port = free_port()
    argv = ["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3"]
    argv += ["--random-vocab-size", "100"]
    assert main([*argv, "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"]) == 1
    out = capsys.readouterr().out
    assert row("Failed requests:", "3") in out and "3 x ConnectError" in out
    assert main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1", "--disable-tqdm"]) == 2
    assert "pass --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--slo", "itl:5"])


@bounded
def test_plot_writes_pngs(stub_url, tmp_path):
    pytest.importorskip("matplotlib")
    _, url = stub_url
    argv = ["--base-url", url, "--num-prompts", "4", "--random-input-len", "4", "--random-output-len", "3"]
    assert main([*argv, "--plot", str(tmp_path / "plots"), "--disable-tqdm"]) == 0
    for name in ("ttft_cdf.png", "tpot_cdf.png", "output_throughput.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG")


def _sweep_point(rate: float, attainment: float, failed: int = 0) -> dict:
    pct = {"p50": 10.0 * rate, "p90": 20.0 * rate, "p99": 30.0 * rate}
    return {"rate": rate, "completed": 8, "failed": failed, "request_throughput": rate, "goodput": rate * attainment,
            "slo_attainment": attainment, "ttft_ms": pct, "tpot_ms": pct, "requests": [[0.1, 0.02], [None, None]]}  # fmt: skip


def test_experiment_report_and_plots(tmp_path):
    """The 1P1D/colocated report: highest rate with >= 90% SLO attainment and no failure, the ratio, the PNGs."""
    from types import SimpleNamespace

    from pd.bench.disagg_vs_colocated import plot_sweeps, report

    results = [
        {"system": "1p1d", "workloads": [{"input": 8, "output": 4, "points": [
            _sweep_point(4, 1.0), _sweep_point(8, 0.95, failed=1), _sweep_point(12, 0.4)]}]},
        {"system": "colocated", "workloads": [{"input": 8, "output": 4, "points": [
            _sweep_point(4, 1.0), _sweep_point(8, 0.9), _sweep_point(12, 0.89)]}]},
    ]  # fmt: skip
    text = report(results, SimpleNamespace(slo_ttft_ms=2000.0, slo_tpot_ms=50.0))
    assert "Sustained at the SLO: 1p1d 4 req/s, colocated 8 req/s" in text
    assert "1P1D / colocated: 0.50x" in text
    pytest.importorskip("matplotlib")
    written = plot_sweeps(results, tmp_path, 2000.0, 50.0)
    assert [p.name for p in written] == [
        "disagg_vs_colocated_8_4.png",
        "cdf_1p1d_8_4.png",
        "cdf_colocated_8_4.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


# ---------------------------------------------------------------------------------------------
# Prompt lengths, token ids, the TPOT / ITL definitions, and the vocabulary of random ids.


def test_chat_prompts_on_random_data_have_the_asked_length(tokenizer_path):
    """Text prompts (chat) encode to exactly the asked number of tokens, although decoding random ids and
    encoding the text merges and splits tokens (this tokenizer holds all 256 byte tokens, so random ids
    include pieces of UTF-8 sequences that decode to U+FFFD)."""
    tok = load_tokenizer(tokenizer_path)
    for n in (1, 2, 40, 1024):
        reqs = random_requests(8, input_len=n, output_len=4, seed=n, tokenizer=tok, as_text=True)
        assert [s.prompt_len for s in reqs] == [n] * 8, n
        assert all(count_tokens(tok, s.prompt) == n for s in reqs), n
    ranged = random_requests(
        20, input_len=100, output_len=4, range_ratio=0.5, seed=3, tokenizer=tok, as_text=True
    )
    assert all(50 <= s.prompt_len <= 150 and s.prompt_len == count_tokens(tok, s.prompt) for s in ranged)


@bounded
def test_chat_run_sends_prompts_of_the_asked_length(tokenizer_path, capsys):
    """Through the CLI: each chat message is --random-input-len tokens; the note says the template's tokens
    come on top (the stub's usage.prompt_tokens is what the totals report)."""
    tok = load_tokenizer(tokenizer_path)
    with stub_server() as (stub, url):
        argv = ["--base-url", url, "--endpoint", "/v1/chat/completions", "--tokenizer", str(tokenizer_path)]
        argv += [
            "--num-prompts",
            "4",
            "--random-input-len",
            "300",
            "--random-output-len",
            "2",
            "--disable-tqdm",
        ]
        assert main(argv) == 0
    assert [count_tokens(tok, b["messages"][0]["content"]) for b in stub.bodies] == [300] * 4
    assert "without the chat template" in capsys.readouterr().out


@bounded
def test_tokens_without_text_count_through_their_ids():
    """Dummy weights emit tokens that decode to no text: pd-bench asks for the ids (return_token_ids) and
    counts them, so those requests succeed; without the ids they cannot be told from an empty stream."""
    requests = [SampleRequest(prompt="ok", prompt_len=3, output_len=5) for _ in range(3)]
    with stub_server(empty_text=True) as (stub, url):
        result = asyncio.run(run_benchmark(BenchConfig(base_url=url, disable_tqdm=True), requests))
        assert all(b["return_token_ids"] is True for b in stub.bodies)
        assert (result.metrics.completed, result.metrics.failed) == (3, 0)
        assert all(r.output_tokens == 5 and len(r.token_times) == 5 for r in result.records)
        cfg = BenchConfig(base_url=url, disable_tqdm=True, return_token_ids=False)
        without = asyncio.run(run_benchmark(cfg, requests))
        assert "return_token_ids" not in stub.bodies[-1]
        assert without.metrics.errors == {"stream finished without any output text or token ids": 3}


@bounded
def test_token_ids_count_output_tokens_without_usage(stub_url):
    """Without usage, the ids the chunks carried are the output count (two per chunk here), not the chunks."""
    _, url = stub_url
    requests = [SampleRequest(prompt="pair-nousage", prompt_len=3, output_len=6)]
    (r,) = asyncio.run(run_benchmark(BenchConfig(base_url=url, disable_tqdm=True), requests)).records
    assert r.ok and not r.output_tokens_from_usage and len(r.token_times) == 3 and r.output_tokens == 6
    cfg = BenchConfig(base_url=url, disable_tqdm=True, return_token_ids=False)
    (r,) = asyncio.run(run_benchmark(cfg, requests)).records
    assert r.ok and r.output_tokens == 3  # no ids: one token per chunk is all the client can tell


@bounded
def test_mean_itl_equals_mean_tpot_with_one_token_per_chunk(stub_url):
    """As in vllm bench serve: with one token per chunk and equal lengths, mean ITL = mean TPOT (the time
    after the last token, before the usage chunk and [DONE], is in E2EL only)."""
    _, url = stub_url
    requests = [SampleRequest(prompt="ok", prompt_len=3, output_len=8) for _ in range(4)]
    result = asyncio.run(run_benchmark(BenchConfig(base_url=url, disable_tqdm=True), requests))
    m = result.metrics
    assert m.completed == 4 and m.itl.count == 4 * 7
    assert m.tpot.mean == pytest.approx(m.itl.mean, rel=1e-9)
    for r in result.records:
        assert r.e2el - r.ttft > r.tpot * (r.output_tokens - 1)
    table = format_table(result)
    assert "TPOT = (last token - first token) / (output tokens - 1)" in table
    assert "ITL = gaps between chunks carrying tokens" in table


def test_random_ids_are_drawn_from_the_models_vocabulary(tokenizer_path):
    """Below the tokenizer's vocabulary (400 here) whatever --random-vocab-size's old default was; without a
    tokenizer or a size the dataset is refused, saying what to pass."""
    tok = load_tokenizer(tokenizer_path)
    reqs = random_requests(50, input_len=40, output_len=4, seed=0, tokenizer=tok)
    ids = [t for s in reqs for t in s.prompt]
    assert max(ids) < tok.get_vocab_size() == 400 and max(ids) > 300
    capped = random_requests(50, input_len=40, output_len=4, vocab_size=50, seed=0, tokenizer=tok)
    assert max(t for s in capped for t in s.prompt) < 50
    with pytest.raises(ValueError, match=r"--tokenizer .*--random-vocab-size"):
        random_requests(1, 8, 8)


@bounded
def test_cli_takes_the_vocabulary_from_the_tokenizer_or_the_server(tokenizer_path, capsys):
    base = ["--num-prompts", "6", "--random-input-len", "30", "--random-output-len", "2", "--disable-tqdm"]
    # The server lists no vocab_size and there is no tokenizer: refused before any request is sent.
    with stub_server(vocab_size=None) as (stub, url):
        assert main(["--base-url", url, *base]) == 2
        err = capsys.readouterr().err
        assert "--tokenizer" in err and "--random-vocab-size" in err and stub.bodies == []
        assert main(["--base-url", url, "--tokenizer", str(tokenizer_path), *base]) == 0
        assert max(t for b in stub.bodies for t in b["prompt"]) < 400
    # The server lists one: ids below it.
    with stub_server(vocab_size=50) as (stub, url):
        assert main(["--base-url", url, *base]) == 0
        assert len(stub.bodies) == 6 and max(t for b in stub.bodies for t in b["prompt"]) < 50
        assert "vocabulary size the server lists" in capsys.readouterr().out
