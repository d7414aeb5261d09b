"""Streaming client for the OpenAI `/v1/completions` and `/v1/chat/completions` APIs.

One request is one POST with `stream: true`; the reply is server-sent events whose `data:` fields
are JSON chunks, ending with `data: [DONE]`. The client records when each chunk that carries
output arrives, output being text or generated token ids (the `return_token_ids` extension of pd and
vLLM, asked for by default: with it, tokens that decode to no text, as dummy weights emit, still
count); any failure (HTTP status, error event, broken or stalled stream) becomes the record's error
message instead of an exception.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from pd.bench.datasets import SampleRequest
from pd.bench.metrics import RequestRecord

DONE = "[DONE]"
# How much of an error response body is read and quoted in the error message.
ERROR_BODY_LIMIT = 2048
ERROR_MESSAGE_LIMIT = 300


class StreamError(Exception):
    """The server answered, but not with a complete, well-formed stream."""


def request_body(
    sample: SampleRequest,
    model: str,
    chat: bool,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    extra_body: Mapping[str, Any] | None = None,
    return_token_ids: bool = False,
    return_phases: bool = False,
) -> dict[str, Any]:
    """The JSON body of one streaming request; `extra_body` keys are added last (and win)."""
    body: dict[str, Any] = {"model": model}
    if chat:
        if not isinstance(sample.prompt, str):
            raise ValueError("chat requests need a text prompt, got token ids")
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    body.update(
        max_tokens=sample.output_len,
        temperature=temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    if ignore_eos:
        body["ignore_eos"] = True
    if return_token_ids:
        body["return_token_ids"] = True
    if return_phases:
        body["return_phases"] = True
    body.update(extra_body or {})
    return body


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_MESSAGE_LIMIT else text[:ERROR_MESSAGE_LIMIT] + "..."


def error_message(payload: Any) -> str | None:
    """The message of an OpenAI-style error object ({"error": {...}} or {"object": "error", ...}), else None."""
    if not isinstance(payload, dict):
        return None
    err = payload.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err is not None:
        return str(err)
    if payload.get("object") == "error":
        return str(payload.get("message") or payload)
    return None


def _http_error(status: int, raw: bytes) -> StreamError:
    text = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    message = error_message(payload) or (payload.get("detail") if isinstance(payload, dict) else None) or text
    return StreamError(f"HTTP {status}: {_shorten(str(message))}")


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        line = line.rstrip("\r")
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # Other fields (event:, id:, retry:) and comments (":...") carry nothing we use.
    if data:
        yield "\n".join(data)


def chunk_text(chunk: dict[str, Any], chat: bool) -> tuple[str, str | None]:
    """(output text, finish_reason) of the first choice of a stream chunk."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return "", None
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        # Reasoning models stream their thinking first; it is output all the same.
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
    else:
        text = choice.get("text") or ""
    return (text if isinstance(text, str) else ""), choice.get("finish_reason")


def chunk_token_ids(chunk: dict[str, Any]) -> list:
    """Generated token ids a chunk carries (the ``return_token_ids`` server extension), if any.

    A chunk with ids but no text still marks token arrivals: a model can emit tokens that decode to
    nothing (e.g. dummy weights sampling ids the tokenizer does not know).
    """
    choices = chunk.get("choices") or []
    ids = choices[0].get("token_ids") if choices and isinstance(choices[0], dict) else None
    return ids if isinstance(ids, list) else []


@dataclass
class _Stream:
    """What has arrived so far on one request's stream."""

    token_times: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    token_ids: int = 0  # generated ids the chunks carried (0 when the server sends none)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    phases: dict[str, float] | None = None  # pd's per-phase latency, on the last chunk


async def _consume(
    client: httpx.AsyncClient, url: str, body: dict, chat: bool, t0: float, stream: _Stream
) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raw = b""
            async for part in response.aiter_bytes():
                raw += part
                if len(raw) >= ERROR_BODY_LIMIT:
                    break
            raise _http_error(response.status_code, raw[:ERROR_BODY_LIMIT])
        async for data in sse_data(response.aiter_lines()):
            now = time.perf_counter() - t0
            if data.strip() == DONE:
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise StreamError(f"stream chunk is not JSON: {_shorten(data)}") from None
            message = error_message(chunk)
            if message is not None:
                raise StreamError(f"error in stream: {_shorten(message)}")
            if not isinstance(chunk, dict):
                raise StreamError(f"stream chunk is not a JSON object: {_shorten(data)}")
            text, finish_reason = chunk_text(chunk, chat)
            ids = chunk_token_ids(chunk)
            if text or ids:
                stream.token_times.append(now)
                stream.texts.append(text)
                stream.token_ids += len(ids)
            if finish_reason is not None:
                stream.finish_reason = finish_reason
            if isinstance(chunk.get("usage"), dict):
                stream.usage = chunk["usage"]
            if isinstance(chunk.get("pd_phases"), dict):
                stream.phases = chunk["pd_phases"]
        raise StreamError(f"stream ended before data: {DONE}")


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    index: int,
    prompt_len: int,
    t0: float,
    timeout_s: float,
    chat: bool,
) -> RequestRecord:
    """Sends one streaming request and records it; never raises for a failed request.

    Times in the record are `time.perf_counter() - t0`. The whole request (connect, headers,
    every chunk) must finish within `timeout_s`, so a stalled server cannot hang the caller.
    """
    stream = _Stream()
    error = None
    start = time.perf_counter() - t0
    try:
        await asyncio.wait_for(_consume(client, url, body, chat, t0, stream), timeout_s)
    except asyncio.TimeoutError:
        error = f"timeout: request did not finish within {timeout_s:g} s"
    except StreamError as e:
        error = str(e)
    except Exception as e:  # a transport failure (refused, reset, ...) fails this request only
        error = f"{type(e).__name__}: {_shorten(str(e))}"
    end = time.perf_counter() - t0
    if error is None and not stream.token_times:
        error = "stream finished without any output text or token ids"

    usage = stream.usage or {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    # Without usage: the ids the stream carried, else one token per output-bearing chunk.
    counted = stream.token_ids or len(stream.token_times)
    return RequestRecord(
        index=index,
        start=start,
        end=end,
        token_times=tuple(stream.token_times),
        prompt_len=prompt_tokens if isinstance(prompt_tokens, int) else prompt_len,
        output_tokens=completion_tokens if isinstance(completion_tokens, int) else counted,
        max_tokens=body.get("max_tokens", 0),
        prompt_tokens_from_usage=isinstance(prompt_tokens, int),
        output_tokens_from_usage=isinstance(completion_tokens, int),
        finish_reason=stream.finish_reason,
        error=error,
        text="".join(stream.texts),
        phases=stream.phases,
    )
