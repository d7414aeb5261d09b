"""Every request field of ``/v1/completions`` and ``/v1/chat/completions``, and what pd does with it.

Nothing is silently ignored. Each field the OpenAI API defines (and each pd extra) is one of:

- ``IMPLEMENTED``: a typed field of the request model (``pd.proxy.schemas``), honoured;
- ``metadata(type)``: type-checked, then dropped: pd stores, logs and forwards none of it;
- ``noop(*values)``: accepted only as ``null`` or one of ``values``, the values that ask for nothing pd
  does not do (``functions: []``, ``modalities: ["text"]``); any other value
  gets 400 naming the field. ``noop()`` (no values) is a refused field: only ``null`` passes.

Any field not in an endpoint's table (a typo, a vendor extension, the other endpoint's field) gets 400
naming it. The request models of ``pd.proxy.schemas`` are built on these tables (a model declaring other
implemented fields than its table fails at import); the README's API section carries the same table (a
test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    kind: str  # "implemented", "metadata" or "noop"
    values: tuple[Any, ...] = ()  # noop: accepted besides null
    type: type | tuple[type, ...] = object  # metadata: the accepted JSON type


IMPLEMENTED = Rule("implemented")


def noop(*values: Any) -> Rule:
    return Rule("noop", values)


def metadata(t: type | tuple[type, ...]) -> Rule:
    return Rule("metadata", type=t)


_SHARED = {
    "model": IMPLEMENTED,
    "max_tokens": IMPLEMENTED,
    "temperature": IMPLEMENTED,
    "top_p": IMPLEMENTED,
    "stream": IMPLEMENTED,
    "stream_options": IMPLEMENTED,
    "stop": IMPLEMENTED,
    "seed": IMPLEMENTED,
    "n": IMPLEMENTED,
    "presence_penalty": IMPLEMENTED,
    "frequency_penalty": IMPLEMENTED,
    "logit_bias": IMPLEMENTED,
    "user": metadata(str),
    # pd's extras (vLLM's names)
    "top_k": IMPLEMENTED,
    "min_p": IMPLEMENTED,
    "ignore_eos": IMPLEMENTED,
    "stop_token_ids": IMPLEMENTED,
    "return_token_ids": IMPLEMENTED,
    "return_phases": IMPLEMENTED,
    "repetition_penalty": IMPLEMENTED,
    "min_tokens": IMPLEMENTED,
    # structured output (pd.proxy.structured): OpenAI's, and vLLM's guided_* extras
    "response_format": IMPLEMENTED,
    "guided_json": IMPLEMENTED,
    "guided_regex": IMPLEMENTED,
    "guided_choice": IMPLEMENTED,
}

COMPLETIONS = {
    **_SHARED,
    "prompt": IMPLEMENTED,
    "logprobs": IMPLEMENTED,
    "echo": IMPLEMENTED,
    "best_of": IMPLEMENTED,  # only equal to n: pd returns every choice it samples
    "suffix": noop(),
}

CHAT = {
    **_SHARED,
    "messages": IMPLEMENTED,
    "max_completion_tokens": IMPLEMENTED,
    "logprobs": IMPLEMENTED,
    "top_logprobs": IMPLEMENTED,
    "tools": IMPLEMENTED,  # with --tool-call-parser (pd.proxy.tool_choice checks them)
    "tool_choice": IMPLEMENTED,
    "parallel_tool_calls": IMPLEMENTED,  # false only with a forced tool_choice (the grammar allows one call)
    "functions": noop([]),
    "function_call": noop("none"),
    "modalities": noop(["text"]),
    "audio": noop(),
    "prediction": noop(),
    "reasoning_effort": noop(),
    "verbosity": noop("medium"),
    "web_search_options": noop(),
    "moderation": noop(),
    "service_tier": noop("auto", "default"),
    "store": noop(False),
    "metadata": metadata(dict),
    "prompt_cache_key": metadata(str),
    "prompt_cache_options": noop(),
    "prompt_cache_retention": noop(),
    "safety_identifier": metadata(str),
}

STREAM_OPTIONS = {"include_usage": IMPLEMENTED, "include_obfuscation": noop(False)}

MESSAGE = {
    "role": IMPLEMENTED,
    "content": IMPLEMENTED,
    "name": noop(),
    "tool_calls": IMPLEMENTED,  # an assistant message's calls
    "tool_call_id": IMPLEMENTED,  # a tool message: the call it answers
    "function_call": noop(),
    "audio": noop(),
    "refusal": noop(),
}

RESPONSE_FORMAT = {"type": IMPLEMENTED, "json_schema": IMPLEMENTED}

JSON_SCHEMA_FORMAT = {
    "name": IMPLEMENTED,
    "description": metadata(str),
    "schema": IMPLEMENTED,
    "strict": IMPLEMENTED,
}

TOOL_CALL = {"id": IMPLEMENTED, "type": IMPLEMENTED, "function": IMPLEMENTED}  # in messages[].tool_calls

FUNCTION_CALL = {"name": IMPLEMENTED, "arguments": IMPLEMENTED}  # a tool call's function

TEXT_PART = {"type": IMPLEMENTED, "text": IMPLEMENTED, "prompt_cache_breakpoint": noop()}
