"""Disaggregated serving end to end: real processes (pd-serve, or each launcher by hand), real gRPC,
real Mooncake over TCP, the official openai client; transformers is the oracle."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from pd.metrics import parse_samples
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.tokenizer import Tokenizer
from pd.types import SamplingParams
from tests.support.clients import (
    async_openai_client,
    completion_body,
    greedy_request,
    greedy_tokens,
    openai_client,
    random_prompt,
)
from tests.support.cluster import (
    SUITE_WORKER_FLAGS,
    kv_pages_used,
    pd_serve,
    proxy_metric,
    start,
    stop,
    wait_healthy,
    wait_pages_idle,
)
from tests.support.net import free_port
from tests.support.oracle import hf_greedy, hf_penalized_greedy

# The official client is a test extra (`pip install -e .[test]`), not on every host that runs `-m gpu`.
openai = pytest.importorskip("openai")

MAX_TOKENS = 16
CHUNK = 16  # small, so most prompts take several prefill chunks
BODY_TIMEOUT = 2  # seconds the proxy waits for a request body


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory) -> Path:
    """pd-serve's output (its children's too: each worker logs the endpoint it serves on)."""
    return tmp_path_factory.mktemp("serve") / "pd-serve.log"


@pytest.fixture(scope="module")
def deployment(tiny_model_dir, serve_log):
    log = serve_log
    with pd_serve(
        tiny_model_dir,
        log,
        "--chunk-size",
        str(CHUNK),
        "--page-size",
        "4",
        "--model-name",
        "tiny-ci",
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--reasoning-parser",  # the tiny model never thinks: its chat output must stay all content
        "deepseek-r1",
        "--host-staging",  # KV through pinned host pages both sides (auto: only for GPU pools over TCP)
        "on",
        "--staging-mb",
        "1",
    ) as url:
        yield url


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def prompts(vocab: int, n: int = 8) -> list[list[int]]:
    rng = random.Random(4)
    # 1 to 70 tokens: most span several chunks of CHUNK tokens and end mid-page.
    return [random_prompt(rng, rng.choice([1, 7, 16, 17, 33, 50, 70]), vocab - 2) for _ in range(n)]


def test_completions_equal_transformers_streaming_and_not(deployment, tiny_model_dir, hf_model, tok):
    hf = hf_model(tiny_model_dir)
    c = openai_client(deployment)
    for ids in prompts(tok.vocab_size):
        expected = hf_greedy(hf, ids, MAX_TOKENS)
        r = c.completions.create(**greedy_request(ids, MAX_TOKENS))
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == expected
        assert choice.text == tok.decode(expected)
        assert choice.finish_reason == "length"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == MAX_TOKENS
        stream = c.completions.create(**greedy_request(ids, MAX_TOKENS, stream=True))
        chunks = list(stream)
        assert [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]] == expected
        assert "".join(ch.choices[0].text for ch in chunks) == choice.text
        assert chunks[-1].choices[0].finish_reason == "length"


def test_text_prompt_and_chat_equal_transformers(deployment, tiny_model_dir, hf_model, tok):
    hf = hf_model(tiny_model_dir)
    c = openai_client(deployment)
    text = "The river runs past the old mill, and the café opens at nine."
    ids = tok.encode(text)
    r = c.completions.create(
        model="tiny-ci", prompt=text, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == tok.decode(hf_greedy(hf, ids, 12))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the mill?"}]
    chat_ids = tok.encode_chat(messages)
    expected = tok.decode(hf_greedy(hf, chat_ids, 12))
    r = c.chat.completions.create(
        model="tiny-ci", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(chat_ids)
    stream = c.chat.completions.create(
        model="tiny-ci",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(chat_ids)


def test_seeded_sampling_reproducible_across_requests(deployment):
    c = openai_client(deployment)
    kw = dict(
        model="tiny-ci", prompt="Once upon a time", max_tokens=20, temperature=0.9, top_p=0.9, seed=1234
    )
    a = c.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    b = c.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    assert a == b


def _metric(text: str, name: str) -> float:
    return sum(v for (n, _), v in parse_samples(text).items() if n == name)


def _abort_counts(url: str, workers: list[tuple[str, str]]) -> tuple[float, list[float]]:
    """The proxy's pd_proxy_aborts_total and each worker's pd_aborts_total (asked over gRPC)."""
    counts = []
    for role, endpoint in workers:
        with grpc.insecure_channel(endpoint) as ch:
            stub = (wpb_grpc.PrefillWorkerStub if role == "prefill" else wpb_grpc.DecodeWorkerStub)(ch)
            text = stub.Metrics(wpb.MetricsRequest(), timeout=5).text
        counts.append(_metric(text, "pd_aborts_total"))
    return _metric(httpx.get(f"{url}/metrics", timeout=10).text, "pd_proxy_aborts_total"), counts


def test_clean_requests_abort_nothing(deployment, serve_log):
    """Requests that run to their finish reason, streamed or not, completions or chat, send no Abort to
    either side and count no proxy abort (a streamed request used to count one and send two Aborts)."""
    workers = re.findall(
        r"(prefill|decode) rank \d+/\d+ of \S+ serving tiny-ci on (\S+) \(pid", serve_log.read_text()
    )
    assert sorted(role for role, _ in workers) == ["decode", "prefill"], serve_log.read_text()[-3000:]
    before = _abort_counts(deployment, workers)
    c = openai_client(deployment)
    messages = [{"role": "user", "content": "Where is the mill?"}]
    n = 6
    for i in range(n):
        r = c.completions.create(model="tiny-ci", prompt=f"clean {i}", max_tokens=4 + i)
        assert r.choices[0].finish_reason in ("stop", "length")
        r = c.chat.completions.create(model="tiny-ci", messages=messages, max_tokens=4 + i)
        assert r.choices[0].finish_reason in ("stop", "length")
        chunks = list(
            c.completions.create(model="tiny-ci", prompt=f"clean {i}", max_tokens=4 + i, stream=True)
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        stream = c.chat.completions.create(
            model="tiny-ci",
            messages=messages,
            max_tokens=4 + i,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason in ("stop", "length")
    time.sleep(1.0)  # an Abort would be sent in the background right after each request
    assert _abort_counts(deployment, workers) == before
    assert all(v == 0 for v in wait_pages_idle(deployment).values())


def test_metrics_relay_every_ranks_gauges(deployment):
    """The proxy's /metrics carries the gauges pd.worker.metrics.RELAYED names, from every rank."""
    from pd.worker.metrics import KV_PAGES_CACHED, KV_PAGES_CAPACITY, KV_PAGES_USED

    samples = parse_samples(httpx.get(f"{deployment}/metrics", timeout=10).text)
    for name in (KV_PAGES_USED, KV_PAGES_CAPACITY, KV_PAGES_CACHED):
        roles = {dict(labels)["role"] for (n, labels), _ in samples.items() if n == name}
        assert roles == {"prefill", "decode"}, name
    assert all(v > 0 for (n, _), v in samples.items() if n == KV_PAGES_CAPACITY)
    assert not any(n == "pd_kv_pages_total" for n, _ in samples)  # the former name


def test_repeated_prompt_hits_the_prefix_cache_with_the_same_tokens(
    deployment, tiny_model_dir, hf_model, tok
):
    """The second time a prompt comes, the prefill rank reuses its 10 full pages (page size 4, 41 tokens),
    reports the hit in /metrics, and the tokens are transformers' still; the cached pages are no leak."""
    hf = hf_model(tiny_model_dir)
    c = openai_client(deployment)
    ids = random_prompt(random.Random(19), 41, tok.vocab_size - 2)
    expected = hf_greedy(hf, ids, MAX_TOKENS)

    readings = [_prefix_counters(deployment)]
    for _ in range(2):
        assert greedy_tokens(c, ids, MAX_TOKENS) == expected
        readings.append(_prefix_counters(deployment))
    (q0, h0), (q1, h1), (q2, h2) = (r["prefill"] for r in readings)
    assert (q1 - q0, h1 - h0) == (41, 0), "the first time, nothing is cached"
    assert (q2 - q1, h2 - h1) == (41, 40), "then every full page before the last token"
    # Decode cached the first answer's pages too: the repeat's transfer skipped the same 10 pages.
    assert readings[2]["decode"][1] - readings[1]["decode"][1] == 40
    assert proxy_metric(deployment, "pd_kv_pages_cached") >= 10
    assert all(v == 0 for v in wait_pages_idle(deployment).values())


def _prefix_counters(url: str) -> dict[str, tuple[float, float]]:
    """Prefix-cache tokens (looked up, found) per role, summed over the ranks, from one scrape."""
    samples = parse_samples(httpx.get(f"{url}/metrics", timeout=10).text)

    def total(name: str, role: str) -> float:
        return sum(v for (n, labels), v in samples.items() if n == name and ("role", role) in labels)

    query, hit = "pd_prefix_cache_query_tokens_total", "pd_prefix_cache_hit_tokens_total"
    return {role: (total(query, role), total(hit, role)) for role in ("prefill", "decode")}


def test_second_turn_of_a_conversation_skips_the_pages_decode_holds(
    deployment, tiny_model_dir, hf_model, tok
):
    """Turn 2's prompt is turn 1's prompt and answer and 7 new tokens: the decode rank finds the 11 full pages
    turn 1 computed there (30 + 15 tokens with KV, page size 4) in its cache, the prefill rank writes only
    the rest (through host staging and Mooncake TCP), and the tokens are transformers'; no page is held
    at the end."""
    hf = hf_model(tiny_model_dir)
    c = openai_client(deployment)
    rng = random.Random(23)
    turn1 = random_prompt(rng, 30, tok.vocab_size - 2)
    out1 = greedy_tokens(c, turn1, MAX_TOKENS)
    assert out1 == hf_greedy(hf, turn1, MAX_TOKENS)
    before = _prefix_counters(deployment)["decode"]
    turn2 = turn1 + out1 + random_prompt(rng, 7, tok.vocab_size - 2)
    assert greedy_tokens(c, turn2, MAX_TOKENS) == hf_greedy(hf, turn2, MAX_TOKENS)
    after = _prefix_counters(deployment)["decode"]
    assert (after[0] - before[0], after[1] - before[1]) == (len(turn2), 44)
    assert all(v == 0 for v in wait_pages_idle(deployment).values())


def test_32_concurrent_streams_complete_correctly(deployment, tok):
    async def run() -> list[list[int]]:
        c = async_openai_client(deployment)

        async def one(ids: list[int]) -> list[int]:
            stream = await c.completions.create(**greedy_request(ids, 24, stream=True))
            return [t async for ch in stream for t in ch.choices[0].model_extra["token_ids"]]

        ps = prompts(tok.vocab_size, 32)
        got = await asyncio.gather(*(one(p) for p in ps))
        await c.close()
        return ps, got

    ps, got = asyncio.run(run())
    c = openai_client(deployment)
    for ids, out in zip(ps, got):  # the same requests alone
        assert out == greedy_tokens(c, ids, 24)
    assert all(v == 0 for v in wait_pages_idle(deployment).values())


BAD_REQUESTS = [
    ("completions", b"{not json", 400),
    ("completions", b"[1, 2]", 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": 5}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": ""}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci"}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": -3}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": "many"}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": 10**9}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "temperature": "hot"}).encode(), 400),
    ("completions", b'{"model": "tiny-ci", "prompt": "hi", "temperature": NaN}', 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "top_p": 0}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "n": 17}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "stream": "yes"}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": [1, 2, 10**7]}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "word " * 5000}).encode(), 400),
    ("completions", json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(), 404),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "logit_bias": {"5": "a"}}).encode(), 400),
    ("chat/completions", json.dumps({"model": "tiny-ci"}).encode(), 400),
    (
        "chat/completions",
        json.dumps({"model": "tiny-ci", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
    ),
    (
        "chat/completions",
        json.dumps({"model": "tiny-ci", "messages": [{"role": "user", "content": 7}]}).encode(),
        400,
    ),
    ("completions", b"x" * (9 << 20), 413),
    # Hostile or broken encodings and shapes.
    ("completions", b"", 400),
    ("completions", b"null", 400),
    ("completions", b'{"model": "tiny-ci", "prompt": "\xff\xfe bad utf-8"}', 400),
    ("completions", b'{"model": "tiny-ci", "prompt": "lone \\ud800 surrogate"}', 400),
    ("completions", b'{"model": "tiny-ci", "prompt": ["lone \\udfff"]}', 400),
    ("completions", b'{"model": "tiny-ci", "prompt": "hi", "stop": ["\\ud800"]}', 400),
    ("chat/completions", b'{"model": "tiny-ci", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400),
    ("completions", b"[" * 100_000 + b"]" * 100_000, 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": [5] * 10**6}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "ab " * 10**6}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": 0}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": 2**70}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "max_tokens": 1.5}).encode(), 400),
    ("completions", b'{"model": "tiny-ci", "prompt": "hi", "temperature": Infinity}', 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "temperature": -1}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "seed": -1}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "stop": 5}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "stop": ["x"] * 100}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": "hi", "stream_options": [1]}).encode(), 400),
    ("completions", json.dumps({"model": ["tiny-ci"], "prompt": "hi"}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": [[1, 2], [3]]}).encode(), 400),
    ("completions", json.dumps({"model": "tiny-ci", "prompt": [-1]}).encode(), 400),
    ("chat/completions", json.dumps({"model": "tiny-ci", "messages": "hi"}).encode(), 400),
    ("chat/completions", json.dumps({"model": "tiny-ci", "messages": [None]}).encode(), 400),
]


def test_bad_input_gets_4xx_and_the_server_keeps_serving(deployment, tok):
    """Every malformed or hostile request gets a 4xx naming the problem, while a stream started before
    them goes on undisturbed (same tokens as alone) and nothing leaks."""
    ids = prompts(tok.vocab_size)[2]
    body = {"model": "tiny-ci", "prompt": ids, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{deployment}/v1/completions", json={**body, "return_token_ids": True}, timeout=60)
    expected = alone.json()["choices"][0]["token_ids"]

    async def run() -> tuple[list[int], list]:
        async with httpx.AsyncClient(timeout=60) as http:

            async def stream() -> list[int]:
                got = []
                async with http.stream(
                    "POST",
                    f"{deployment}/v1/completions",
                    json={**body, "stream": True, "return_token_ids": True},
                ) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            got += json.loads(line[6:])["choices"][0]["token_ids"]
                return got

            background = asyncio.ensure_future(stream())
            answers = []
            for path, data, _ in BAD_REQUESTS:
                r = await http.post(
                    f"{deployment}/v1/{path}", content=data, headers={"content-type": "application/json"}
                )
                answers.append(r)
            return await background, answers

    streamed, answers = asyncio.run(run())
    for (path, data, status), r in zip(BAD_REQUESTS, answers):
        assert r.status_code == status, (path, data[:80], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    assert streamed == expected and len(expected) == 48
    assert httpx.get(f"{deployment}/v1/completions", timeout=10).status_code == 405
    models = httpx.get(f"{deployment}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-ci"]
    r = openai_client(deployment).completions.create(model="tiny-ci", prompt="still there?", max_tokens=4)
    assert r.usage.completion_tokens >= 1
    assert all(v == 0 for v in wait_pages_idle(deployment).values())


def test_models_list_and_retrieve_with_the_openai_client(deployment, tiny_model_dir):
    c = openai_client(deployment)
    assert [m.id for m in c.models.list()] == ["tiny-ci"]
    m = c.models.retrieve("tiny-ci")
    assert (m.id, m.object, m.owned_by) == ("tiny-ci", "model", "pd")
    # What pd-bench needs to draw random ids without a tokenizer, from the model's config.json.
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (m.vocab_size, m.max_model_len) == (config["vocab_size"], config["max_position_embeddings"])
    assert c.models.list().data[0].vocab_size == config["vocab_size"]
    for unknown in ("no-such-model", "org/no-such-model"):
        with pytest.raises(openai.NotFoundError) as e:
            c.models.retrieve(unknown)
        err = e.value.body
        assert err["code"] == "model_not_found" and err["param"] == "model" and unknown in err["message"]
        assert err["type"] == "invalid_request_error"


# (endpoint, fields added to a valid body, the param a 400 must name): see pd/proxy/fields.py.
UNSUPPORTED_FIELDS = [
    ("completions", {"n": 17}, "n"),
    ("chat/completions", {"n": 0}, "n"),
    ("completions", {"n": 2, "best_of": 3}, "best_of"),
    ("chat/completions", {"repetition_penalty": 2.5}, "repetition_penalty"),  # out of range
    ("completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"99999": 1}}, "logit_bias"),  # outside the vocabulary
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("completions", {"logprobs": 21}, "logprobs"),
    ("chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("completions", {"max_completion_tokens": 4}, "max_completion_tokens"),  # not a completions field
    ("completions", {"suffix": "x"}, "suffix"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("completions", {"best_off": 2}, "best_off"),  # a typo: unknown fields are refused
    (
        "chat/completions",
        {"stream": True, "stream_options": {"include_obfuscation": True}},
        "stream_options.include_obfuscation",
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
        "messages[0].name",
    ),
]


@pytest.mark.parametrize("path, extra, param", UNSUPPORTED_FIELDS, ids=[u[2] for u in UNSUPPORTED_FIELDS])
def test_unsupported_fields_get_400_naming_them(deployment, path, extra, param):
    body = {"model": "tiny-ci", "max_tokens": 4}
    body.update(
        {"prompt": "hi"} if path == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    r = httpx.post(f"{deployment}/v1/{path}", json={**body, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_unsupported_fields_through_the_openai_client(deployment):
    c = openai_client(deployment)
    messages = [{"role": "user", "content": "Reply in JSON."}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-ci", messages=messages, max_tokens=4, reasoning_effort="low")
    assert e.value.body["param"] == "reasoning_effort" and "reasoning_effort" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-ci", prompt="hi", max_tokens=4, best_of=2)
    assert e.value.body["param"] == "best_of"


def test_no_op_values_are_accepted_and_change_nothing(deployment):
    c = openai_client(deployment)
    messages = [{"role": "user", "content": "Where is the mill?"}]
    kw = dict(model="tiny-ci", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    plain = c.chat.completions.create(messages=messages, **kw).choices[0].message.content
    noops = c.chat.completions.create(
        messages=messages,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        logit_bias={},
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        store=False,
        service_tier="auto",
        modalities=["text"],
        user="user-1",
        metadata={"team": "pd"},
        stream_options=None,
        **kw,
    )
    assert noops.choices[0].message.content == plain
    plain = c.completions.create(prompt="Once", **kw).choices[0].text
    noops = c.completions.create(prompt="Once", n=1, best_of=1, echo=False, logprobs=None, user="u", **kw)
    assert noops.choices[0].text == plain


def test_oversized_chunked_body_gets_413(deployment):
    """Without a content-length the proxy counts the bytes as they come."""

    def chunks():
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{deployment}/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_slow_body_client_gets_408_while_others_are_served(deployment):
    """A client that sends the headers, then trickles the body a byte every 0.2 s, is answered 408
    after the body timeout and disconnected; requests meanwhile are served."""
    host, port = deployment.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        r = openai_client(deployment).completions.create(model="tiny-ci", prompt="meanwhile", max_tokens=4)
        assert r.usage.completion_tokens >= 1
        reply = _trickle_until_closed(s, deadline=time.monotonic() + 30)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request body not received" in reply


def _trickle_until_closed(s: socket.socket, deadline: float) -> bytes:
    """Sends a byte every 0.2 s until the server answers, then reads until it closes; returns the answer."""
    reply = b""
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            if not reply:
                s.sendall(b" ")
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break  # closed by the server
        reply += chunk
    return reply


def test_client_disconnect_mid_stream_frees_every_page(deployment):
    body = {
        "model": "tiny-ci",
        "prompt": "a long story " * 10,
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    for _ in range(3):
        with httpx.stream("POST", f"{deployment}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        # Leaving the block closes the connection mid-stream.
    pages = wait_pages_idle(deployment)
    assert {role for role, _, _ in pages} == {"prefill", "decode"}
    assert all(v == 0 for v in pages.values()), pages


def test_separate_launchers_by_hand(tiny_model_dir, hf_model, tmp_path, tok):
    """The README's multi-process example: bootstrap, prefill, decode and proxy started one by one."""
    hf = hf_model(tiny_model_dir)
    log = tmp_path / "procs.log"
    boot, proxy_port = free_port(), free_port()
    common = [
        "--bootstrap",
        f"127.0.0.1:{boot}",
        "--model",
        str(tiny_model_dir),
        "--model-name",
        "tiny-ci",
        "--chunk-size",
        "8",
        *SUITE_WORKER_FLAGS,
    ]
    procs = [start(["pd.launch.bootstrap", "--port", str(boot)], log)]
    try:
        procs.append(
            start(["pd.launch.proxy", "--bootstrap", f"127.0.0.1:{boot}", "--port", str(proxy_port)], log)
        )
        url = f"http://127.0.0.1:{proxy_port}"
        wait_healthy(url, procs, timeout=120, log=log, any_status=True)
        # No worker yet: the proxy says so.
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and "registered" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        procs.append(start(["pd.launch.prefill", *common], log))
        procs.append(start(["pd.launch.decode", *common], log))
        wait_healthy(url, procs, log=log)
        ids = tok.encode("Separate processes, same tokens.")
        assert greedy_tokens(openai_client(url), ids, 10) == hf_greedy(hf, ids, 10)
        assert set(kv_pages_used(url)) and all(v == 0 for v in wait_pages_idle(url).values())
    finally:
        codes = [stop(p) for p in reversed(procs)]
    assert codes == [0] * len(procs), log.read_text()[-3000:]


def test_pd_bench_against_pd_serve(deployment, tiny_model_dir, tmp_path):
    """pd-bench on the real deployment: 20 requests succeed, the JSON holds every metric, and the
    token counts are the ones the server reported in usage."""
    from pd.bench.cli import main as bench_main

    out = tmp_path / "bench.json"
    argv = ["--base-url", deployment, "--model", "tiny-ci", "--dataset-name", "random", "--random-input-len", "24",
            "--random-output-len", "12", "--num-prompts", "20", "--request-rate", "inf", "--max-concurrency", "8",
            "--ignore-eos", "--seed", "3", "--result-json", str(out), "--disable-tqdm", "--slo", "ttft:5000", "tpot:1000",
            "--tokenizer", str(tiny_model_dir)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    for key in ("ttft", "tpot", "itl", "e2el"):  # milliseconds
        assert set(metrics[key]) >= {"mean", "median", "p90", "p99"}, key
        assert metrics[key]["count"] > 0 and metrics[key]["median"] > 0, key
    for key in (
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "peak_output_throughput",
        "goodput",
    ):
        assert metrics[key] > 0, key
    assert metrics["completed"] == 20 and metrics["failed"] == 0 and metrics["peak_concurrency"] <= 8
    assert metrics["total_output_tokens"] == 20 * 12
    records = result["requests"]
    assert len(records) == 20
    # Counts come from the server's usage (flags), and equal what was asked for.
    assert all(r["output_tokens_from_usage"] and r["output_tokens"] == 12 for r in records)
    assert all(r["prompt_tokens_from_usage"] and r["prompt_len"] == 24 for r in records)
    assert metrics["output_tokens_from_usage"] == 20
    # Without --tokenizer pd-bench draws ids below the vocab_size pd's /v1/models lists.
    out2 = tmp_path / "bench2.json"
    no_tok = [*argv[: argv.index("--tokenizer")], "--num-prompts", "4"]
    no_tok[no_tok.index("--result-json") + 1] = str(out2)
    assert bench_main(no_tok) == 0
    m2 = json.loads(out2.read_text())["metrics"]
    assert (m2["completed"], m2["failed"]) == (4, 0)


def test_pd_bench_shared_prefix_workload_reports_cache_hits(deployment, capsys):
    """generated-shared-prefix against pd-serve, one request at a time: every group's later prompts find the
    system prompt's full pages cached (the counters' growth over the run, as pd-bench prints it)."""
    from pd.bench.cli import main as bench_main

    argv = ["--base-url", deployment, "--model", "tiny-ci", "--dataset-name", "generated-shared-prefix",
            "--gsp-num-groups", "2", "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "40",
            "--gsp-question-len", "6", "--gsp-output-len", "4", "--max-concurrency", "1", "--disable-tqdm"]  # fmt: skip
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("Prefix cache:")]
    assert len(lines) == 1, out
    [line] = lines
    hit, query = (int(w) for w in line.split()[2:5:2])
    # 6 prompts of 46 tokens; each group's 2nd and 3rd find its 40-token system prompt (10 pages of 4).
    assert query == 6 * 46 and hit == 2 * 2 * 40, line


def test_colocated_mode_gives_transformers_tokens(tiny_model_dir, hf_model, tmp_path, tok):
    """--colocated: the reference engine (prefill and decode in one instance) behind the same proxy."""
    hf = hf_model(tiny_model_dir)
    with pd_serve(tiny_model_dir, tmp_path / "col.log", "--colocated", "1", "--model-name", "tiny-ci") as url:
        for ids in prompts(tok.vocab_size, 3):
            assert greedy_tokens(openai_client(url), ids, 10) == hf_greedy(hf, ids, 10)
        pages = wait_pages_idle(url)
        assert {role for role, _, _ in pages} == {"colocated"} and all(v == 0 for v in pages.values())


@pytest.mark.parametrize("mode", ["colocated", "disaggregated", "layer_sends"])
def test_mtp_speculative_decoding_gives_transformers_tokens(
    mode, tiny_model, hf_model, tmp_path, tok, deployment
):
    """--speculative-algorithm mtp, colocated and prefill/decode (the prefill rank ships the MTP layer's KV
    with the pages and the first drafts in the aux record): the verified tokens are transformers' greedy
    tokens (one prompt of several chunks), seeded choices with a penalty and logprobs are the plain
    deployment's (the same checkpoint without its MTP layer), and the rank that decodes counts the drafts it
    verified.
    ``layer_sends``: --transfer-granularity layer (each layer's pages leave as the forward stores them; the
    MTP layer's after the forward) through host staging, with --kv-checksum verifying every page."""
    path = tiny_model("ci", with_mtp=True)
    hf = hf_model(path)
    flags = ["--model-name", "tiny-ci", "--speculative-algorithm", "mtp", "--num-speculative-tokens", "2"]
    if mode == "colocated":
        flags += ["--colocated", "1"]
    if mode == "layer_sends":
        flags += [
            "--transfer-granularity",
            "layer",
            "--host-staging",
            "on",
            "--staging-mb",
            "1",
            "--kv-checksum",
        ]
        flags += ["--chunk-size", "16"]
    with pd_serve(path, tmp_path / "mtp.log", *flags) as url:
        for ids in prompts(tok.vocab_size, 4)[1:]:
            assert greedy_tokens(openai_client(url), ids, 10) == hf_greedy(hf, ids, 10)
        extra = {"temperature": 0.9, "seed": 11, "n": 2, "frequency_penalty": 0.7, "logprobs": 2}
        body = completion_body(prompts(tok.vocab_size, 4)[1], 12, stream=False, **extra)
        got, want = (
            httpx.post(f"{u}/v1/completions", json=body, timeout=60).json() for u in (url, deployment)
        )
        for g, w in zip(got["choices"], want["choices"], strict=True):
            assert g["token_ids"] == w["token_ids"] and len(set(g["token_ids"])) > 1
            assert g["logprobs"]["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-4)
        assert got["choices"][0]["token_ids"] != got["choices"][1]["token_ids"]
        assert proxy_metric(url, "pd_spec_draft_tokens_total") > 0
        assert all(v == 0 for v in wait_pages_idle(url).values())


def test_logprobs_echo_and_penalties_equal_transformers(deployment, tiny_model_dir, hf_model, tok):
    """Completions with echo and logprobs (the prompt chunked), lm-eval's loglikelihood request, chat
    logprobs streaming and not, and a penalty: all against transformers' fp32 log_softmax."""
    from pd.proxy.logprobs import token_text  # pydantic: not on a bare GPU image

    hf = hf_model(tiny_model_dir)
    c = openai_client(deployment)
    ids = prompts(tok.vocab_size)[3]  # several chunks of CHUNK tokens
    extra = {"ignore_eos": True, "return_token_ids": True}
    r = c.completions.create(
        model="tiny-ci", prompt=ids, max_tokens=4, temperature=0, echo=True, logprobs=3, extra_body=extra
    )
    gen = r.choices[0].model_extra["token_ids"]
    full = ids + gen
    with torch.no_grad():
        lp = hf(torch.tensor([full])).logits[0].float().log_softmax(-1)
    got = r.choices[0].logprobs
    assert gen == hf_greedy(hf, ids, 4)
    assert r.choices[0].text == tok.decode(ids) + tok.decode(gen)
    assert got.tokens == [token_text(tok, t) for t in full] and got.token_logprobs[0] is None
    assert got.text_offset == sorted(got.text_offset) and got.text_offset[0] == 0
    for p in range(1, len(full)):
        assert abs(got.token_logprobs[p] - float(lp[p - 1, full[p]])) < 1e-4
        ref = lp[p - 1].topk(3)
        assert sorted(got.top_logprobs[p].values(), reverse=True) == pytest.approx(
            ref.values.tolist(), abs=1e-4
        )
    # lm-eval's local-completions loglikelihood request, as it sends it (prompt as token ids).
    body = {
        "model": "tiny-ci",
        "prompt": [ids],
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    lm = httpx.post(f"{deployment}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert lm["token_logprobs"][: len(ids)] == pytest.approx(got.token_logprobs[: len(ids)], abs=1e-5)
    # max_tokens 0 with echo: the prompt alone with its logprobs, whole and streamed; without echo a 400.
    zero = {**body, "max_tokens": 0, "return_token_ids": True}
    r0 = httpx.post(f"{deployment}/v1/completions", json=zero, timeout=60).json()
    (choice,) = r0["choices"]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    assert choice["token_ids"] == [] and r0["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(lm["token_logprobs"][: len(ids)], abs=1e-5)
    openai_kw = {k: v for k, v in zero.items() if k != "return_token_ids"}
    events = list(c.completions.create(**openai_kw, stream=True))
    assert "".join(e.choices[0].text for e in events) == tok.decode(ids)
    assert [e.choices[0].finish_reason for e in events][-1] == "length"
    no_echo = httpx.post(f"{deployment}/v1/completions", json={**zero, "echo": False}, timeout=60)
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"
    # chat: the sampled tokens' logprobs and two alternatives, streaming and not.
    messages = [{"role": "user", "content": "Where is the mill?"}]
    kw = dict(model="tiny-ci", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**kw, extra_body=extra)
    chat_ids = tok.encode_chat(messages)
    out = whole.choices[0].model_extra["token_ids"]
    with torch.no_grad():
        lp = hf(torch.tensor([chat_ids + out])).logits[0].float().log_softmax(-1)
    content = whole.choices[0].logprobs.content
    assert [e.token for e in content] == [token_text(tok, t) for t in out]
    for i, (t, e) in enumerate(zip(out, content)):
        row = lp[len(chat_ids) - 1 + i]
        assert abs(e.logprob - float(row[t])) < 1e-4 and bytes(e.bytes) == tok.token_bytes(t)
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)
    streamed = [
        e for ch in c.chat.completions.create(**kw, stream=True) for e in ch.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in content
    ]
    # a penalty changes the greedy tokens exactly as the rule on transformers' logits does
    sp = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5
    )
    r = c.completions.create(
        model="tiny-ci",
        prompt=ids,
        max_tokens=10,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        extra_body=extra,
    )
    assert r.choices[0].model_extra["token_ids"] == hf_penalized_greedy(hf, ids, sp, set())[0]
