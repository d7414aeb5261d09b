"""The OpenAI-compatible request schema: parsing, validation and response shapes.

Parsing never trusts the body: every field is type-checked and range-checked, and every problem
raises ``APIError`` with an OpenAI-style error body naming the field. What pd does with each field is
the table in ``pd.proxy.fields``: nothing is silently ignored, and unknown fields are refused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from pd.proxy import fields
from pd.types import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, SamplingParams


class APIError(Exception):
    """An error answered to the client: HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {
            400: "invalid_request_error",
            401: "invalid_api_key",
            404: "model_not_found",
            413: "request_too_large",
            429: "rate_limit_exceeded",
            503: "service_unavailable",
            504: "timeout",
        }.get(status, "internal_error")

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_MISSING = object()


def _get(
    body: dict, name: str, types: type | tuple[type, ...], default: Any = None, nullable: bool = True
) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    # bool is an int in Python; a JSON true is never a number here.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be of type {_type_names(types)}, got a boolean", name)
    if not isinstance(value, types):
        raise APIError(
            400, f"'{name}' must be of type {_type_names(types)}, got {type(value).__name__}", name
        )
    if isinstance(value, str):
        _check_text(value, name)
    return value


def _check_text(value: str, name: str) -> str:
    """``value`` if it is valid Unicode text; JSON's \\ud800 escapes can smuggle in lone surrogates, which
    neither the tokenizer nor protobuf can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{name}' is not valid Unicode text (a lone surrogate)", name) from None
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in ts))


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = float(_get(body, name, (int, float), default))
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{name}' must be a finite number in {bound}, got {value}", name)
    return value


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request, before tokenization."""

    chat: bool
    model: str | None
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict[str, str]] | None  # chat
    max_tokens: int | None  # None: fill the rest of the context (capped by the server)
    sampling: SamplingParams  # max_tokens filled in later, once the prompt length is known
    stream: bool
    include_usage: bool
    return_token_ids: bool
    return_phases: bool  # pd extra: "pd_phases" (seconds per latency phase) on the last chunk / the response


def check_fields(obj: dict[str, Any], rules: dict[str, fields.Rule], where: str, prefix: str = "") -> None:
    """Applies a table of ``pd.proxy.fields`` to ``obj``: refuses a key the table lacks, a metadata value
    of the wrong type, and a value a noop rule does not accept. ``prefix``: where ``obj`` is in the body."""
    unknown = [k for k in obj if k not in rules]
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        s = "s" if len(unknown) > 1 else ""
        raise APIError(400, f"unknown field{s} {names}: not a field of {where}", prefix + unknown[0])
    for key, value in obj.items():
        rule, name = rules[key], prefix + key
        if value is None or rule.kind == "implemented":
            continue
        if rule.kind == "metadata":
            if isinstance(value, bool) or not isinstance(value, rule.type):
                raise APIError(400, f"'{name}' must be of type {_type_names(rule.type)}", name)
        elif not any(_same(value, v) for v in rule.values):
            accepted = " or ".join(json.dumps(v) for v in (None, *rule.values))
            raise APIError(
                400, f"'{name}' is not supported by this server (accepted only as {accepted})", name
            )


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: a number equals a number (0 == 0.0), never a boolean."""
    if isinstance(accepted, (int, float)) and not isinstance(accepted, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == accepted
    return type(value) is type(accepted) and value == accepted


def parse_request(body: Any, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    if chat:
        check_fields(body, fields.CHAT, "/v1/chat/completions")
    else:
        check_fields(body, fields.COMPLETIONS, "/v1/completions")
    model = _get(body, "model", str)

    prompt = messages = None
    if chat:
        messages = _messages(body)
    else:
        prompt = _prompt(body)

    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, int, None if chat else 16)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'{name}' must be >= 1, got {max_tokens}", name)

    stop = _get(body, "stop", (str, list), ())
    if isinstance(stop, str):
        stop = (stop,)
    if len(stop) > MAX_STOP_STRINGS or not all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_LEN and _check_text(s, "stop") for s in stop
    ):
        raise APIError(
            400,
            f"'stop' must be up to {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_STRING_LEN} chars",
            "stop",
        )
    stop_token_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
        raise APIError(400, "'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    seed = _get(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"'seed' must be in [0, 2**63), got {seed}", "seed")
    top_k = _get(body, "top_k", int, -1)
    stream_options = _get(body, "stream_options", dict, {})
    check_fields(stream_options, fields.STREAM_OPTIONS, "stream_options", "stream_options.")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=top_k,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        max_tokens=max_tokens or 1,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=_get(body, "ignore_eos", bool, False),
    )
    return ParsedRequest(
        chat=chat,
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        sampling=sampling,
        stream=_get(body, "stream", bool, False),
        include_usage=_get(stream_options, "include_usage", bool, False),
        return_token_ids=_get(body, "return_token_ids", bool, False),
        return_phases=_get(body, "return_phases", bool, False),
    )


def _prompt(body: dict) -> str | list[int]:
    prompt = _get(body, "prompt", (str, list), nullable=False, default=_MISSING)
    if prompt is _MISSING:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise APIError(
            400, "'prompt' must be a string, a list of token ids, or a list of one of those", "prompt"
        )
    if len(prompt) == 0:
        raise APIError(400, "'prompt' is empty", "prompt")
    return prompt


def _messages(body: dict) -> list[dict[str, str]]:
    messages = _get(body, "messages", list, nullable=False, default=_MISSING)
    if messages is _MISSING or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        check_fields(m, fields.MESSAGE, "a message", f"messages[{i}].")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are served
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            for j, part in enumerate(content):
                check_fields(part, fields.TEXT_PART, "a text part", f"messages[{i}].content[{j}].")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        _check_text(m["role"] + content, "messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_id(room: int, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{room:016x}"


def stream_chunk(
    req: ParsedRequest, rid: str, model: str, text: str, finish: str | None, token_ids: list[int], first: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if req.chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice["delta"] = delta
        choice["logprobs"] = None
    else:
        choice["text"] = text
        choice["logprobs"] = None
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_chunk(req: ParsedRequest, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def full_response(
    req: ParsedRequest, rid: str, model: str, text: str, finish: str, token_ids: list[int], prompt_tokens: int
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(token_ids)),
    }
