"""The OpenAI-compatible protocol: a body parsed into a ``ParsedRequest``, and the response bodies.

Parsing never trusts the body: the request models of ``pd.proxy.schemas`` type-check and range-check
every field, and every problem raises ``APIError`` with an OpenAI-style error body naming the field. What
pd does with each field is the table in ``pd.proxy.fields``: nothing is silently ignored, and unknown
fields are refused. The response builders fill the response models of ``pd.proxy.schemas`` and return
their JSON objects.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pd.proxy import schemas
from pd.proxy.structured import GrammarRequestError, grammar_fields, grammar_for_response_format
from pd.proxy.tool_choice import NO_TOOLS, ToolChoice, ToolRequestError, validate_tools
from pd.types import SamplingParams


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


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request, before tokenization."""

    chat: bool
    model: str | None
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict[str, Any]] | None  # chat, as the template reads them (ChatMessage.for_template)
    max_tokens: int | None  # None: fill the rest of the context (capped by the server)
    sampling: SamplingParams  # max_tokens filled in later, once the prompt length is known
    stream: bool
    include_usage: bool
    return_token_ids: bool
    return_phases: bool  # pd extra: "pd_phases" (seconds per latency phase) on the last chunk / the response
    logprobs: int | None = None  # alternatives per token in the response's logprobs; None: no logprobs
    echo: bool = False  # completions: the prompt before the completion
    prompt_only: bool = False  # completions with echo and max_tokens 0: the prompt alone, nothing generated
    grammar_param: str | None = None  # the field sampling.grammar came from (its errors name it)
    tools: tuple[dict[str, Any], ...] = ()  # chat: the request's tools, checked (validate_tools)
    tool_choice: ToolChoice = NO_TOOLS  # chat: what tool_choice asks


def parse_request(body: Any, chat: bool) -> ParsedRequest:
    """``body`` (parsed JSON) validated by the endpoint's model; every problem is an ``APIError`` 400
    naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    model = schemas.ChatCompletionRequest if chat else schemas.CompletionRequest
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise APIError(400, *schemas.describe(e, model)) from None
    echo, prompt_logprobs = False, None
    tools: list[dict[str, Any]] = []
    tool_choice = NO_TOOLS
    if isinstance(req, schemas.ChatCompletionRequest):
        prompt, messages = None, [m.for_template() for m in req.messages]
        try:
            tools, tool_choice = validate_tools(req.tools, req.tool_choice)
        except ToolRequestError as e:
            raise APIError(400, str(e), e.param) from None
        if not req.parallel_tool_calls and tools:
            if tool_choice.mode != "required":
                message = "'parallel_tool_calls': false needs tool_choice 'required' or a named function (a grammar then allows one call); with 'auto' the model's calls cannot be limited"
                raise APIError(400, message, "parallel_tool_calls")
            tool_choice = dataclasses.replace(tool_choice, parallel=False)
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        assert isinstance(req, schemas.CompletionRequest)
        prompt, messages, max_tokens = req.prompt, None, req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(
                400,
                "'max_tokens': 0 asks for nothing; it needs 'echo': true (the prompt alone)",
                "max_tokens",
            )
        logprobs, echo = req.logprobs, req.echo
        prompt_logprobs = logprobs if echo else None
        if req.best_of is not None and req.best_of != req.n:
            message = (
                f"'best_of' must equal 'n' ({req.n}): every sampled choice is returned, got {req.best_of}"
            )
            raise APIError(400, message, "best_of")
    try:
        grammar = grammar_for_response_format(req)
    except GrammarRequestError as e:
        raise APIError(400, str(e), e.param) from None
    try:
        sampling = SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            max_tokens=max_tokens or max(1, req.min_tokens),  # the real one is set once the prompt is known
            stop=tuple(req.stop),
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            logit_bias=tuple(sorted((int(t), b) for t, b in req.logit_bias.items())),
            min_tokens=req.min_tokens,
            top_logprobs=logprobs or 0,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
            n=req.n,
        )
    except ValueError as e:  # names the field first
        raise APIError(400, str(e), str(e).split()[0]) from None
    return ParsedRequest(
        chat=chat,
        model=req.model,
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        prompt_only=max_tokens == 0,
        sampling=sampling,
        stream=req.stream,
        include_usage=req.stream_options.include_usage,
        return_token_ids=req.return_token_ids,
        return_phases=req.return_phases,
        logprobs=logprobs,
        echo=echo,
        grammar_param=next(iter(grammar_fields(req)), None),
        tools=tuple(tools),
        tool_choice=tool_choice,
    )


def completion_id(room: int, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{room:016x}"


def stream_chunk(
    req: ParsedRequest,
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    token_ids: list[int],
    first: bool,
    logprobs: Any = None,
    reasoning: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One stream event, of choice ``index``; ``first``: that choice's first event; ``logprobs``: the chunk's
    ``ChatLogprobs`` or ``CompletionLogprobs``, if asked; ``reasoning``: chat's ``reasoning_content`` delta
    (``--reasoning-parser``); ``tool_calls``: chat's tool-call delta items (``--tool-call-parser``; content
    is null in a delta of calls and no text)."""
    ids = token_ids if req.return_token_ids else None
    chunk: schemas.ChatCompletionChunk | schemas.CompletionChunk
    if req.chat:
        delta = schemas.ChatDelta(
            content=None if tool_calls and not text else text,
            role="assistant" if first else None,
            reasoning_content=reasoning,
            tool_calls=None if not tool_calls else [schemas.DeltaToolCall(**c) for c in tool_calls],
        )
        choice = schemas.ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish, token_ids=ids
        )
        chunk = schemas.ChatCompletionChunk(id=rid, created=int(time.time()), model=model, choices=[choice])
    else:
        c = schemas.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, token_ids=ids
        )
        chunk = schemas.CompletionChunk(id=rid, created=int(time.time()), model=model, choices=[c])
    return chunk.model_dump()


def usage_chunk(
    req: ParsedRequest, rid: str, model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    kind = schemas.ChatCompletionChunk if req.chat else schemas.CompletionChunk
    usage = schemas.Usage.of(prompt_tokens, completion_tokens)
    return kind(id=rid, created=int(time.time()), model=model, choices=[], usage=usage).model_dump()


@dataclass(frozen=True)
class ChoiceResult:
    """One choice of a whole response: its text, finish reason and token ids; ``logprobs``: its
    ``ChatLogprobs`` or ``CompletionLogprobs``, if asked; ``reasoning``: chat's ``reasoning_content``
    (``--reasoning-parser``); ``tool_calls``: the calls parsed from its output (``--tool-call-parser``, in
    OpenAI's shape: ``pd.proxy.tools.ToolCall.to_openai``)."""

    text: str
    finish: str
    token_ids: list[int]
    logprobs: Any = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


def full_response(
    req: ParsedRequest, rid: str, model: str, choices: list[ChoiceResult], prompt_tokens: int
) -> dict[str, Any]:
    """The whole response: ``choices`` in index order; usage counts the prompt once and every choice's
    tokens. A chat choice with tool calls has null content when it has no other text, as OpenAI has it."""
    usage = schemas.Usage.of(prompt_tokens, sum(len(c.token_ids) for c in choices))
    created = int(time.time())
    if req.chat:
        chat = [
            schemas.ChatChoice(
                index=i,
                message=schemas.AssistantMessage(
                    content=None if c.tool_calls and not c.text else c.text,
                    reasoning_content=c.reasoning,
                    tool_calls=[schemas.ToolCall(**t) for t in c.tool_calls] if c.tool_calls else None,
                ),
                logprobs=c.logprobs,
                finish_reason=c.finish,
                token_ids=c.token_ids if req.return_token_ids else None,
            )
            for i, c in enumerate(choices)
        ]
        return schemas.ChatCompletionResponse(
            id=rid, created=created, model=model, choices=chat, usage=usage
        ).model_dump()
    completions = [
        schemas.CompletionChoice(
            index=i,
            text=c.text,
            logprobs=c.logprobs,
            finish_reason=c.finish,
            token_ids=c.token_ids if req.return_token_ids else None,
        )
        for i, c in enumerate(choices)
    ]
    return schemas.CompletionResponse(
        id=rid, created=created, model=model, choices=completions, usage=usage
    ).model_dump()
