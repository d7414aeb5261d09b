"""Clients of a test deployment: completion bodies and random prompts; JSON parsed strictly; streamed
requests that record what came back and when (``Outcome``); requests abandoned at a random moment (the
connection is closed, as a client that goes away), bursts and random aborts; and the official openai client,
set up for greedy requests whose token ids come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from tests.support.cluster import MODEL_NAME

if TYPE_CHECKING:
    import openai


@dataclass
class Outcome:
    """What one request got: an HTTP status, the tokens streamed, how it ended, and when."""

    status: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # finish_reason of the last chunk
    error: str | None = None  # an SSE error event's or a non-200 body's message
    exception: str | None = None  # the client's own failure (timeout, connection)
    done: bool = False  # the stream ended with [DONE] (or a JSON body arrived)
    ended_at: float = 0.0  # time.monotonic()

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.finish is not None


def strict_json(text: str):
    """``text`` parsed as JSON proper: Python's parser takes -Infinity and NaN, which clients' do not."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def random_prompt(rng: random.Random, n: int, vocab: int = 500) -> list[int]:
    """``n`` token ids drawn from [3, vocab)."""
    return [rng.randrange(3, vocab) for _ in range(n)]


def completion_body(prompt: list[int] | str, max_tokens: int, stream: bool = True, **extra) -> dict:
    """A greedy /v1/completions body (EOS ignored, token ids returned)."""
    return {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


async def request(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    path: str = "completions",
    on_token=None,
) -> Outcome:
    """One request to ``url``/v1/``path``, streamed or not; never raises (failures are in the Outcome).
    ``on_token(outcome)`` runs after each streamed chunk that carried tokens."""
    out = Outcome()
    try:
        async with client.stream("POST", f"{url}/v1/{path}", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200 or not body.get("stream"):
                data = json.loads(await r.aread())
                if r.status_code != 200:
                    out.error = data["error"]["message"]
                else:
                    choice = data["choices"][0]
                    out.tokens, out.finish, out.done = (
                        choice.get("token_ids", []),
                        choice["finish_reason"],
                        True,
                    )
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                    continue
                if not event["choices"]:  # the usage chunk
                    continue
                choice = event["choices"][0]
                out.tokens += choice.get("token_ids", [])
                out.finish = choice["finish_reason"] or out.finish
                if on_token is not None and choice.get("token_ids"):
                    on_token(out)
    except httpx.HTTPError as e:
        out.exception = repr(e)
    finally:
        out.ended_at = time.monotonic()
    return out


async def abandoned(
    client: httpx.AsyncClient, url: str, body: dict, path: str, after_s: float
) -> Outcome | None:
    """The request, given up (its connection closed) after ``after_s`` seconds; None if it was."""
    task = asyncio.ensure_future(request(client, url, body, path))
    done, _ = await asyncio.wait({task}, timeout=after_s)
    if done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def burst(
    url: str, prompts: list[list[int]], max_tokens: int, headers: dict | None = None
) -> list[Outcome]:
    """Every prompt as a streaming request, all at once."""
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as client:
        return await asyncio.gather(*(request(client, url, completion_body(p, max_tokens)) for p in prompts))


async def random_aborts(
    url: str, rng: random.Random, n: int, concurrency: int = 16, headers: dict | None = None
) -> int:
    """``n`` random requests, most abandoned at a random moment; returns how many were. Requests that
    run to the end must end properly."""
    sem = asyncio.Semaphore(concurrency)
    aborted = 0

    async def one(client, i):
        nonlocal aborted
        chat = rng.random() < 0.25
        stream = rng.random() < 0.7
        max_tokens = rng.choice([1, 2, 8, 32, 64])
        if chat:
            body = {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": "tell me " * rng.randrange(1, 40)}],
                "max_tokens": max_tokens,
                "stream": stream,
                "ignore_eos": True,
            }
        else:
            body = completion_body(random_prompt(rng, rng.choice([1, 5, 17, 64, 150])), max_tokens, stream)
        after = rng.choice([0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 30.0])
        async with sem:
            out = await abandoned(client, url, body, "chat/completions" if chat else "completions", after)
        if out is None:
            aborted += 1
        else:
            assert out.ok, (out.status, out.error, out.exception)

    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return aborted


# ---- the official openai client ----


def openai_client(url: str, timeout: float = 60) -> openai.OpenAI:
    """The openai client of the deployment at ``url`` (no retries: a failure shows)."""
    import openai  # a test extra: the GPU tests import this module on hosts without it

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def async_openai_client(url: str, timeout: float = 120) -> openai.AsyncOpenAI:
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def greedy_request(prompt: list[int] | str, max_tokens: int, **kw) -> dict:
    """Keyword arguments of ``completions.create`` for ``max_tokens`` greedy tokens after ``prompt`` (EOS
    ignored, token ids returned in ``choices[0].model_extra["token_ids"]``)."""
    return {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True, "return_token_ids": True},
        **kw,
    }


def greedy_tokens(client: openai.OpenAI, prompt: list[int] | str, max_tokens: int) -> list[int]:
    """The token ids of one greedy completion (not streamed)."""
    return client.completions.create(**greedy_request(prompt, max_tokens)).choices[0].model_extra["token_ids"]
