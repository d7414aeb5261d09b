"""The request fields of /v1/completions and /v1/chat/completions (pd.proxy.fields): each one is
implemented, refused with a 400 whose message and param name it, or accepted only at its no-op values;
unknown fields are refused. One table here walks every field through the parser; the README's API table
and pd.proxy.fields must say the same, and the installed openai client must know no field the table
lacks. (test_serve.py sends a few of them through a running server.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("pydantic")  # pd's dependency, missing from a bare GPU image
from pd.proxy import fields, schemas
from pd.proxy.protocol import APIError, parse_request

IMPL, META, NOOP, REFUSED = "implemented", "metadata", "no-op value only", "refused (400)"
ENDPOINTS = ("completions", "chat")
BASE = {
    "completions": {"model": "m", "prompt": "hi"},
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}

# field: (completions, chat) status (None: not a field of that endpoint), values accepted, values refused.
# A pair of lists instead of one list: per endpoint. null is accepted for every field.
# fmt: off
TABLE = {
    "model": (IMPL, IMPL, ["m"], [5]),
    "prompt": (IMPL, None, ["other", [1, 2, 3]], [5, ""]),
    "messages": (None, IMPL, [[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]], ["hi"]),
    "max_tokens": (IMPL, IMPL, [5], [0, "5"]),
    "max_completion_tokens": (None, IMPL, [5], [0]),
    "temperature": (IMPL, IMPL, [0, 0.7], [3, "hot"]),
    "top_p": (IMPL, IMPL, [0.5], [0]),
    "n": (IMPL, IMPL, [1, 2, 16], [0, 17, True, 1.5]),
    "stream": (IMPL, IMPL, [True, False], ["yes"]),
    "stream_options": (IMPL, IMPL, [{"include_usage": True}, {"include_obfuscation": False}],
                       [{"include_obfuscation": True}, {"continuous_usage_stats": True}, [1]]),
    "stop": (IMPL, IMPL, ["\n", ["a", "b"]], [5, [""]]),
    "seed": (IMPL, IMPL, [7], [-1]),
    "logprobs": (IMPL, IMPL, ([0, 5, 20], [False, True]), ([-1, 21, True, 1.5], [1, "yes"])),
    "top_logprobs": (None, IMPL, [], [21, -1]),  # accepted with logprobs: true (test below)
    "echo": (IMPL, None, [False, True], ["yes"]),
    "best_of": (IMPL, None, [1], [3, 0]),  # equal to n only (test below)
    "suffix": (REFUSED, None, [], ["x", ""]),
    "presence_penalty": (IMPL, IMPL, [0, 0.5, -2], [2.5, False]),
    "frequency_penalty": (IMPL, IMPL, [0, -1, 2.0], [-3, "x"]),
    "logit_bias": (IMPL, IMPL, [{}, {"5": 3, "0": -100.5}], [{"x": 3}, {"5": "a"}, [5], {"-1": 1}]),
    "user": (META, META, ["user-1"], [5]),
    "response_format": (IMPL, IMPL, [{"type": "text"}, {"type": "json_object"},
                                     {"type": "json_schema", "json_schema": {"name": "x"}},
                                     {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                             "schema": {"type": "object"}}}],
                        [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_object", "json_schema": {}},
                         {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
                         {"type": "json_schema", "json_schema": {"name": "x y"}}, "json_object"]),
    "tools": (None, IMPL, [[], [{"type": "function", "function": {"name": "f"}}]],
              [{"type": "function"}, [{"type": "function", "function": {"name": "a b"}}], ["f"]]),
    "tool_choice": (None, IMPL, ["none", "auto"], ["always", "required"]),  # required, named: need tools
    "parallel_tool_calls": (None, IMPL, [True, False], ["yes"]),
    "functions": (None, NOOP, [[]], [[{"name": "f"}]]),
    "function_call": (None, NOOP, ["none"], ["auto"]),
    "modalities": (None, NOOP, [["text"]], [["text", "audio"]]),
    "audio": (None, REFUSED, [], [{"voice": "alloy", "format": "wav"}]),
    "prediction": (None, REFUSED, [], [{"type": "content", "content": "x"}]),
    "reasoning_effort": (None, REFUSED, [], ["low"]),
    "verbosity": (None, NOOP, ["medium"], ["low"]),
    "web_search_options": (None, REFUSED, [], [{}]),
    "moderation": (None, REFUSED, [], [{"model": "omni-moderation-latest"}]),
    "service_tier": (None, NOOP, ["auto", "default"], ["flex", "priority"]),
    "store": (None, NOOP, [False], [True]),
    "metadata": (None, META, [{"k": "v"}], ["k=v"]),
    "prompt_cache_key": (None, META, ["key"], [1]),
    "prompt_cache_options": (None, REFUSED, [], [{"mode": "explicit"}]),
    "prompt_cache_retention": (None, REFUSED, [], ["24h"]),
    "safety_identifier": (None, META, ["id"], [1]),
    # pd's extras
    "top_k": (IMPL, IMPL, [5, -1], ["5"]),
    "min_p": (IMPL, IMPL, [0.1], [2]),
    "ignore_eos": (IMPL, IMPL, [True], ["yes"]),
    "stop_token_ids": (IMPL, IMPL, [[1, 2]], [[-1]]),
    "return_token_ids": (IMPL, IMPL, [True], [1]),
    "return_phases": (IMPL, IMPL, [True], [1]),
    "repetition_penalty": (IMPL, IMPL, [1, 1.2, 0.5], [0, 2.5]),
    "min_tokens": (IMPL, IMPL, [0, 3], [-1, 1.5]),
    "guided_json": (IMPL, IMPL, [{"type": "integer"}, '{"type": "integer"}'], [5, ["x"], "{not json"]),
    "guided_regex": (IMPL, IMPL, ["[a-z]+"], ["", 5]),
    "guided_choice": (IMPL, IMPL, [["yes", "no"]], [[], ["yes", ""], "yes", [1]]),
    # no such field
    "frobnicate": (None, None, [], [1]),
}
# fmt: on


def cases():
    for name, (c, ch, ok, bad) in TABLE.items():
        for i, (endpoint, status) in enumerate(zip(ENDPOINTS, (c, ch))):
            ok_i, bad_i = (ok[i], bad[i]) if isinstance(ok, tuple) else (ok, bad)
            if status is None:  # unknown here: refused whatever the value
                ok_i, bad_i = [], ok_i + bad_i
            elif status != IMPL or name not in ("model", "messages", "prompt"):
                ok_i = [None, *ok_i]  # null is the default of every optional field
            for value in ok_i:
                yield pytest.param(endpoint, name, value, True, id=f"{endpoint}-{name}={json.dumps(value)}")
            for value in bad_i:
                yield pytest.param(endpoint, name, value, False, id=f"{endpoint}-{name}={json.dumps(value)}!")


@pytest.mark.parametrize("endpoint, name, value, accepted", list(cases()))
def test_every_field_is_implemented_or_refused_by_name(endpoint, name, value, accepted):
    body = {**BASE[endpoint], name: value}
    if not accepted:
        with pytest.raises(APIError) as e:
            parse_request(body, chat=endpoint == "chat")
        assert e.value.status == 400 and e.value.param.startswith(name) and name in e.value.message
        return
    parse_request(body, chat=endpoint == "chat")


def test_a_developer_message_is_the_system_prompt():
    """OpenAI's newer models take the system prompt as a "developer" message; templates know "system"."""
    chat = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    got = parse_request({**BASE["chat"], "messages": chat}, chat=True).messages
    assert got == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_logprobs_fields_reach_the_sampling_parameters():
    chat = parse_request({**BASE["chat"], "logprobs": True, "top_logprobs": 3}, chat=True)
    assert (chat.logprobs, chat.sampling.top_logprobs, chat.sampling.prompt_logprobs) == (3, 3, None)
    assert parse_request({**BASE["chat"], "logprobs": True}, chat=True).logprobs == 0
    assert parse_request(BASE["chat"], chat=True).logprobs is None
    body = {**BASE["completions"], "logprobs": 2, "echo": True, "logit_bias": {"7": 200, "3": -1}}
    req = parse_request(body, chat=False)
    assert (req.logprobs, req.echo, req.sampling.top_logprobs, req.sampling.prompt_logprobs) == (
        2,
        True,
        2,
        2,
    )
    assert req.sampling.logit_bias == ((3, -1.0), (7, 200.0))  # clamped to +-100 where applied
    assert parse_request({**BASE["completions"], "echo": True}, chat=False).sampling.prompt_logprobs is None


def test_no_op_values_change_nothing():
    """A request with every field at its no-op value parses to the same request as one without them."""
    for i, endpoint in enumerate(ENDPOINTS):
        extra = {}
        for name, (*statuses, ok, _) in TABLE.items():
            values = ok[i] if isinstance(ok, tuple) else ok
            if statuses[i] == NOOP:
                extra[name] = values[0]
        assert parse_request({**BASE[endpoint], **extra}, endpoint == "chat") == parse_request(
            BASE[endpoint], endpoint == "chat"
        )


def status_of(rule: fields.Rule | None) -> str | None:
    if rule is None:
        return None
    if rule.kind == "noop":
        return NOOP if rule.values else REFUSED
    return {"implemented": IMPL, "metadata": META}[rule.kind]


def test_pd_proxy_fields_is_this_table():
    for i, table in enumerate((fields.COMPLETIONS, fields.CHAT)):
        expected = {name: row[i] for name, row in TABLE.items() if row[i] is not None}
        assert {name: status_of(rule) for name, rule in table.items()} == expected


MODELS = {
    schemas.CompletionRequest: fields.COMPLETIONS,
    schemas.ChatCompletionRequest: fields.CHAT,
    schemas.StreamOptions: fields.STREAM_OPTIONS,
    schemas.ChatMessage: fields.MESSAGE,
    schemas.TextPart: fields.TEXT_PART,
    schemas.MessageToolCall: fields.TOOL_CALL,
    schemas.FunctionCall: fields.FUNCTION_CALL,
}


def test_the_request_models_declare_their_tables_implemented_fields():
    """Each request model is built on its pd.proxy.fields table: it declares exactly the implemented fields
    (the others are checked by their rule and dropped), and a model that declares others fails at import."""
    for model, table in MODELS.items():
        assert model.table is table
        assert set(model.model_fields) == {name for name, rule in table.items() if rule.kind == "implemented"}
    with pytest.raises(TypeError, match="its table implements"):

        class Drifted(schemas.TableModel):
            table = fields.STREAM_OPTIONS
            where = "stream_options"
            include_usage: bool = False
            continuous_usage_stats: bool = False


# body -> (param, words the message must hold): nested fields are named by their path.
# fmt: off
NESTED = [
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"stream_options": {"x": 1, "y": 2}}, "stream_options.x",
     "unknown fields 'stream_options.x', 'stream_options.y'"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or an array of text parts"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content", "lone surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "only text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     "string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}]},
     "messages[0].content[0].cache", "not a field of a text part"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "name": "bob"}]},
     "messages[1].name", "not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ({"messages": [{"role": "assistant", "tool_calls": []}]}, "messages[0].content", "is required"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "required in a tool message"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id",
     "tool messages only"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls",
     "assistant messages only"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "code",
                                                         "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].type", "'function'"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0].function.arguments", "string"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "index": 0,
                                                         "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].index", "not a field of a tool call"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}},
                                                               {"type": "function", "function": {"name": "f"}}]},
     "tools[1].function.name", "defined twice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice", "not in 'tools'"),
    ({"prompt": [["a"]]}, "prompt", "a list of one of those"),
    ({"stop": ["a", ""]}, "stop", "non-empty strings"),
    ({"stop_token_ids": [1, True]}, "stop_token_ids", "non-negative integers"),
    ({"temperature": True}, "temperature", "got true"),
]
# fmt: on


@pytest.mark.parametrize("extra, param, words", NESTED, ids=[f"{n[1]}-{i}" for i, n in enumerate(NESTED)])
def test_a_400_names_the_field_by_its_path(extra, param, words):
    chat = "prompt" not in extra
    with pytest.raises(APIError) as e:
        parse_request({**BASE["chat" if chat else "completions"], **extra}, chat)
    assert (e.value.status, e.value.param) == (400, param)
    assert f"'{param}'" in e.value.message and words in e.value.message, e.value.message


def test_the_openai_client_sends_no_field_the_table_lacks():
    """Every request field of the installed openai client's completions.create and chat.completions.create
    is in the table. The test extra pins the client, so CI stays reproducible; upgrading the pin is the moment a
    field OpenAI added shows up here, to be implemented or refused."""
    from openai.types import completion_create_params as c
    from openai.types.chat import completion_create_params as ch

    for i, params in enumerate((c.CompletionCreateParamsBase, ch.CompletionCreateParamsBase)):
        known = {name for name, row in TABLE.items() if row[i] is not None}
        assert set(params.__annotations__) - known == set(), ENDPOINTS[i]


def readme_cell(rule: fields.Rule | None) -> str:
    status = status_of(rule)
    if status is None:
        return "—"
    if status == NOOP:
        return f"{NOOP}: " + ", ".join(f"`{json.dumps(v)}`" for v in rule.values)
    return status


def test_readme_table_is_pd_proxy_fields():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| ([^|]+) \|", readme, re.M)
    got = {name: (c.strip(), ch.strip()) for name, c, ch in rows}
    names = dict.fromkeys([*fields.COMPLETIONS, *fields.CHAT])
    expected = {n: (readme_cell(fields.COMPLETIONS.get(n)), readme_cell(fields.CHAT.get(n))) for n in names}
    assert got == expected
