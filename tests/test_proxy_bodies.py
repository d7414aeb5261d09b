"""The response bodies and stream chunks pd.proxy.protocol builds on pd.proxy.schemas: the fields OpenAI
writes as null are there as null, pd's extras only when asked for; and the logprobs shapes."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")  # pd's dependency, missing from a bare GPU image
from pd.proxy import schemas
from pd.proxy.protocol import ChoiceResult, full_response, parse_request, stream_chunk, usage_chunk

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_stream_chunks():
    req = parse_request({"prompt": "hi"}, chat=False)
    chunk = stream_chunk(req, "cmpl-1", "m", "t", None, [7], first=True)
    assert chunk.pop("created") > 0
    assert chunk == {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": "t", "logprobs": None, "finish_reason": None}],
    }
    req = parse_request({**CHAT, "return_token_ids": True}, chat=True)
    first, last = (
        stream_chunk(req, "c", "m", "t", finish, [7], first)
        for finish, first in ((None, True), ("stop", False))
    )
    assert first["object"] == "chat.completion.chunk" and "usage" not in first
    assert first["choices"] == [
        {"index": 0, "delta": {"content": "t", "role": "assistant"}, "logprobs": None, "finish_reason": None,
         "token_ids": [7]}
    ]  # fmt: skip
    assert last["choices"][0]["delta"] == {"content": "t"} and last["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("chat", [False, True])
def test_usage_chunk_and_full_response(chat):
    req = parse_request(CHAT if chat else {"prompt": "hi"}, chat)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    last = usage_chunk(req, "id", "m", 3, 2)
    assert (last["choices"], last["usage"]) == ([], usage)
    body = full_response(req, "id", "m", [ChoiceResult("ab", "length", [1, 2])], 3)
    assert body["object"] == ("chat.completion" if chat else "text_completion") and body["usage"] == usage
    choice = {"message": {"role": "assistant", "content": "ab"}} if chat else {"text": "ab"}
    assert body["choices"] == [{"index": 0, **choice, "logprobs": None, "finish_reason": "length"}]
    # n choices: each at its index; usage counts the prompt once and every choice's tokens.
    two = full_response(
        req, "id", "m", [ChoiceResult("ab", "length", [1, 2]), ChoiceResult("c", "stop", [3])], 3
    )
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["choices"][1]["finish_reason"] == "stop"
    assert two["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert stream_chunk(req, "id", "m", "c", None, [3], True, index=2)["choices"][0]["index"] == 2


def test_logprobs_shapes():
    top = schemas.TopLogprob(token="a", logprob=-0.5, bytes=[97])
    chat = schemas.ChatLogprobs(
        content=[schemas.TokenLogprob(token="é", logprob=-0.1, bytes=None, top_logprobs=[top])]
    )
    assert chat.model_dump() == {
        "content": [
            {"token": "é", "logprob": -0.1, "bytes": None,
             "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
        ]
    }  # fmt: skip
    completions = schemas.CompletionLogprobs(
        tokens=["a"], token_logprobs=[-0.5], top_logprobs=[{"a": -0.5}], text_offset=[0]
    )
    assert set(completions.model_dump()) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


def test_tool_calls_in_the_response_and_the_deltas():
    """OpenAI's shapes: content null when the model only called tools; a call's first delta item carries
    id, type, name and arguments, later ones index and an argument piece only."""
    req = parse_request(CHAT, chat=True)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    message = full_response(req, "id", "m", [ChoiceResult("", "tool_calls", [1], tool_calls=[call])], 3)[
        "choices"
    ][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [call]}
    message = full_response(req, "id", "m", [ChoiceResult("Sure.", "tool_calls", [1], tool_calls=[call])], 3)[
        "choices"
    ][0]["message"]
    assert message == {"role": "assistant", "content": "Sure.", "tool_calls": [call]}
    assert full_response(req, "id", "m", [ChoiceResult("", "stop", [1], tool_calls=[])], 3)["choices"][0][
        "message"
    ] == {
        "role": "assistant",
        "content": "",
    }
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    later = {"index": 0, "function": {"arguments": '{"a"'}}
    delta = stream_chunk(req, "c", "m", "", None, [1], True, tool_calls=[first, later])["choices"][0]["delta"]
    assert delta == {"content": None, "role": "assistant", "tool_calls": [first, later]}
    delta = stream_chunk(req, "c", "m", "ok", None, [1], False, tool_calls=[later])["choices"][0]["delta"]
    assert delta == {"content": "ok", "tool_calls": [later]}
    assert stream_chunk(req, "c", "m", "", "stop", [1], False)["choices"][0]["delta"] == {"content": ""}
