"""Random OpenAI bodies against a running deployment (pd-serve, prefill and decode processes, MTP with K = 2:
on CPU the serial verify loop): valid ones with every sampling, logprobs, stop, grammar and choice field mixed,
invalid ones by one mutation each, about half abandoned by the client at a random moment. Oracles: the
OpenAI contract and the ranks' gauges: no 5xx, every 4xx carries an error that names its problem, every 200
is JSON proper (no NaN or Infinity) with one finished choice per ``n``, no stop string in a choice's text and
no more tokens than asked; afterwards no page, room or request is held anywhere and the server still serves.
Seeded, bounded in count and time. It found a 500 for top logprobs under a grammar (alternatives at -inf)
and, through a grammar failing once in about 300 requests of n = 3, the sampling noise that reached 1.0."""

from __future__ import annotations

import asyncio
import contextlib
import random

import httpx
import pytest

from tests.support.clients import strict_json
from tests.support.cluster import MODEL_NAME, pd_serve, wait_idle

REQUESTS = 300
CONCURRENCY = 16
WORDS = ["the", "a", "cat", "{", "}", '"', ":", "1", "hello", " ", "\n", "é", "🙂", "<think>", "</think>"]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
FORMATS = [
    {"type": "json_object"},
    {"type": "text"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
]
# One mutation each; every one must be refused with a 4xx (the key: what the error's message or param names).
INVALID = [
    ("max_tokens", -1),
    ("max_tokens", "x"),
    ("max_tokens", 10**9),
    ("n", 0),
    ("n", "2"),
    ("temperature", -1),
    ("temperature", "hot"),
    ("top_logprobs", 50),
    ("logit_bias", {"abc": 1}),
    ("stop", [1, 2]),
    ("seed", {"nested": [1]}),
    ("bogus_field", 1),
    ("model", "no-such-model"),
]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    path = tiny_model("ci", with_mtp=True)
    log = tmp_path_factory.mktemp("random_bodies") / "pd-serve.log"
    flags = ["--model-name", MODEL_NAME, "--speculative-algorithm", "mtp", "--num-speculative-tokens", "2"]
    with pd_serve(path, log, *flags, "--page-size", "4", "--chunk-size", "32") as url:
        yield url


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_body(rng: random.Random) -> tuple[str, dict, str | None]:
    """(path, body, the field a mutation made invalid or None)."""
    chat = rng.random() < 0.5
    body: dict = {
        "model": MODEL_NAME,
        "max_tokens": rng.choice([1, 2, 3, 8, 17]),
        "stream": rng.random() < 0.6,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": text(rng, rng.randrange(1, 30))}]
        if rng.random() < 0.4:
            body |= {"logprobs": True, "top_logprobs": rng.randrange(0, 6)}
    else:
        body["prompt"] = rng.choice(
            [text(rng, rng.randrange(1, 40)), [rng.randrange(3, 500) for _ in range(30)]]
        )
        if rng.random() < 0.4:
            body["logprobs"] = rng.randrange(0, 6)
    if rng.random() < 0.3:
        body |= rng.choice([{"response_format": f} for f in FORMATS] + [{"guided_choice": ["yes", "no"]}])
    optional = {
        "n": lambda: rng.choice([1, 2, 3]),
        "temperature": lambda: rng.choice([0, 0.5, 1.0, 1.5]),
        "top_p": lambda: rng.choice([0.1, 0.9]),
        "top_k": lambda: rng.choice([1, 5, -1]),
        "seed": lambda: rng.randrange(1000),
        "stop": lambda: rng.choice(["a", ["cat", "\n"], "}"]),
        "presence_penalty": lambda: rng.choice([0.5, -1.0]),
        "frequency_penalty": lambda: 0.5,
        "repetition_penalty": lambda: rng.choice([1.1, 0.9]),
        "logit_bias": lambda: {str(rng.randrange(500)): rng.choice([-100, 5, 100])},
        "min_tokens": lambda: rng.randrange(0, 2),
        "ignore_eos": lambda: True,
    }
    for key, value in optional.items():
        if rng.random() < 0.2:
            body[key] = value()
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    invalid = None
    if rng.random() < 0.2:
        invalid, value = rng.choice(INVALID)
        body[invalid] = value
    return ("chat/completions" if chat else "completions"), body, invalid


def problems(chat: bool, body: dict, status: int, data: str, invalid: str | None) -> list:
    """What is wrong with one answer (empty: nothing)."""
    if status >= 500:
        return [("5xx", status, data[:300])]
    if invalid is not None or status != 200:
        if not 400 <= status < 500:
            return [("not refused", invalid, status)]
        error = strict_json(data)["error"]
        named = invalid is None or invalid in error["message"] or error.get("param") == invalid
        return [] if named or invalid == "model" else [("error does not name", invalid, error)]
    lines = data.splitlines()
    events = (
        [strict_json(line[6:]) for line in lines if line.startswith("data: {")]
        if body["stream"]
        else [strict_json(data)]
    )
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for event in events:
        if "error" in event:
            return [("error event", event["error"])]
        usage = event.get("usage") or usage
        for c in event["choices"]:
            part = (c.get("delta") if body["stream"] else c.get("message")) if chat else c
            texts[c["index"]] = texts.get(c["index"], "") + (
                (part or {}).get("content" if chat else "text") or ""
            )
            if c.get("finish_reason"):
                finished[c["index"]] = c["finish_reason"]
    out = []
    n = body.get("n", 1)
    if sorted(finished) != list(range(n)) or not set(finished.values()) <= {"stop", "length"}:
        out.append(("choices", n, finished))
    stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop", [])
    out += [("stop string in text", s, t) for t in texts.values() for s in stops if s in t]
    if usage and usage["completion_tokens"] > body["max_tokens"] * n:
        out.append(("usage", usage))
    return out


async def send(client: httpx.AsyncClient, url: str, path: str, body: dict) -> tuple[int, str]:
    async with client.stream("POST", f"{url}/v1/{path}", json=body) as r:
        return r.status_code, (await r.aread()).decode()


def test_random_bodies_and_aborts_never_break_the_contract_or_leak(deployment) -> None:
    rng = random.Random(20261205)
    found: list = []
    statuses: dict[int, int] = {}
    abandoned = 0

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore) -> None:
        nonlocal abandoned
        path, body, invalid = random_body(rng)
        after = rng.choice([0.0, 0.02, 0.2, 60, 60, 60])
        async with sem:
            task = asyncio.ensure_future(send(client, deployment, path, body))
            done, _ = await asyncio.wait({task}, timeout=after)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                abandoned += 1
                return
            status, data = task.result()
            statuses[status] = statuses.get(status, 0) + 1
            try:
                found.extend(
                    (p, body) for p in problems(path.startswith("chat"), body, status, data, invalid)
                )
            except ValueError as e:  # not JSON proper
                found.append(((status, str(e), data[:300]), body))

    async def run() -> None:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(one(client, sem) for _ in range(REQUESTS)))

    asyncio.run(run())
    print(f"\n{REQUESTS} bodies: {abandoned} abandoned, statuses {statuses}")
    assert not found, found[:5]
    assert (
        statuses.get(200, 0) > REQUESTS / 4
        and statuses.get(400, 0) > REQUESTS / 20
        and abandoned > REQUESTS / 10
    )
    reading = wait_idle(deployment, timeout=60)
    assert reading and all(v == 0 for v in reading.values()), reading
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{deployment}/v1/completions", json=body, timeout=60).status_code == 200
