"""The response bodies and stream chunks of ``/v1/completions`` and ``/v1/chat/completions``.

A field typed ``X | None`` without a default is always written, as ``null`` when None (OpenAI writes
``"logprobs": null``, and ``"finish_reason": null`` in every chunk but the last); a field listed in a
model's ``omitted_if_none`` is left out when None (pd's ``token_ids``, only when asked for; a chunk's
``usage``; a delta's ``role``, only on the first), by ``model_dump``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer


class Response(BaseModel):
    """A part of a response body."""

    omitted_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in self.omitted_if_none:
            if out.get(name, 0) is None:
                del out[name]
        return out


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


# ---- logprobs (pd.proxy.logprobs fills them) ----


class CompletionLogprobs(Response):
    """Completions' logprobs, one entry per generated token in each list: its text, its logprob, the most
    likely tokens there ({text: logprob}) and where its text starts in the completion."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first token of an echoed prompt
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Response):
    """A token, its logprob and its UTF-8 bytes (None where the token is no whole bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token and the most likely tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[TokenLogprob] | None


# ---- choices ----


class CompletionChoice(Response):
    omitted_if_none = frozenset({"token_ids"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # None until the last chunk
    token_ids: list[int] | None = None  # pd extra: the generated ids, when the request asks


class ToolCallFunction(Response):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Response):
    """A parsed tool call (``--tool-call-parser``)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(Response):
    omitted_if_none = frozenset({"reasoning_content", "tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the model only called tools
    reasoning_content: str | None = None  # with --reasoning-parser
    tool_calls: list[ToolCall] | None = None  # with --tool-call-parser, when the model called tools


class ChatChoice(Response):
    omitted_if_none = frozenset({"token_ids"})

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str
    token_ids: list[int] | None = None


class DeltaFunction(Response):
    omitted_if_none = frozenset({"name", "arguments"})

    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # a piece of the arguments ("" in a first delta that has none yet)


class DeltaToolCall(Response):
    """A piece of tool call ``index``: its first carries id, type and name, the others argument pieces."""

    omitted_if_none = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(Response):
    omitted_if_none = frozenset({"role", "reasoning_content", "tool_calls"})

    content: str | None  # None in a delta of tool calls only
    role: Literal["assistant"] | None = None  # on the first chunk
    reasoning_content: str | None = None  # with --reasoning-parser
    tool_calls: list[DeltaToolCall] | None = None  # with --tool-call-parser


class ChatChunkChoice(Response):
    omitted_if_none = frozenset({"token_ids"})

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    token_ids: list[int] | None = None


# ---- bodies ----


class _Body(Response):
    id: str
    object: str
    created: int  # Unix seconds
    model: str


class CompletionResponse(_Body):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Body):
    """A completions stream event: one choice, or none and ``usage`` (the last, when asked for)."""

    omitted_if_none = frozenset({"usage"})

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatCompletionResponse(_Body):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Body):
    """A chat stream event: one choice, or none and ``usage`` (the last, when asked for)."""

    omitted_if_none = frozenset({"usage"})

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
