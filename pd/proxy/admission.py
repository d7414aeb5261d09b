"""Admission: everything a request must pass before any rank hears of it.

Owns the API key check (401), the body (size limit 413, read timeout 408, JSON 400), the request's
validation (``pd.proxy.protocol`` parses the OpenAI fields; a grammar must compile, 400), the model's
resolution (404, 503), the prompt's tokenization and its length limits (400), and the proxy's in-flight
limit (429; the limit on connections is uvicorn's ``limit_concurrency``, which ``pd-proxy
--max-connections`` sets). What passes is a ``Job``, counted in flight until ``release``. No HTTP
framework here: it reads a header mapping and an async stream of body bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from pd.grammar.spec import GrammarSpec
from pd.metrics import Registry
from pd.proxy.config import ProxyConfig
from pd.proxy.protocol import APIError, ParsedRequest, parse_request
from pd.proxy.router import ModelInfo, NoWorkers, Router
from pd.proxy.structured import GrammarRequestError, check_grammar
from pd.proxy.tool_choice import forced_call_grammar
from pd.proxy.tools import make_tool_parser
from pd.types import SamplingParams


@dataclass(frozen=True)
class Job:
    """An admitted request: validated, tokenized, with its final sampling parameters."""

    req: ParsedRequest
    model: ModelInfo
    prompt_ids: list[int]
    sampling: SamplingParams  # max_tokens and seed filled in
    arrived: float  # time.monotonic() when the request arrived: latencies are measured from it


class Admission:
    def __init__(self, cfg: ProxyConfig, router: Router, metrics: Registry) -> None:
        self.cfg, self.router = cfg, router
        self.inflight = 0
        metrics.gauge("pd_proxy_requests_inflight", "Requests in flight.").set_function(lambda: self.inflight)

    def check_api_key(self, authorization: str | None) -> None:
        """``authorization``: the request's Authorization header, if any."""
        if self.cfg.api_key is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key (expected 'Authorization: Bearer <key>')")

    async def admit(
        self, headers: Mapping[str, str], body: AsyncIterator[bytes], chat: bool, arrived: float
    ) -> Job:
        """The ``Job`` for one request (now in flight: ``release`` it), or APIError."""
        req = parse_request(await self.read_json(headers, body), chat)
        if req.tools and self.cfg.tool_call_parser is None:
            raise APIError(
                400,
                "'tools' cannot be served: this server has no tool-call parser (start it with --tool-call-parser)",
                "tools",
            )
        name = self.resolve_model(req.model)
        try:
            model = await self.router.model_info(name)
        except NoWorkers as e:
            raise APIError(503, str(e)) from None
        except grpc.aio.AioRpcError as e:
            raise APIError(503, f"could not read model info from a worker: {e.details()}") from None
        if req.tools and not model.tokenizer.template_reads_tools:
            raise APIError(
                400, f"'tools' cannot be shown to {name!r}: its chat template does not render tools", "tools"
            )
        max_prompt = min(self.cfg.max_prompt_tokens or model.max_context_len, model.max_context_len)
        ids = await self.tokenize(req, model, max_prompt)
        if len(ids) >= max_prompt:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts prompts of at most {max_prompt - 1}",
                "prompt",
            )
        max_tokens = self._max_tokens(req, model, len(ids))
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        sp = req.sampling
        bad = [t for t, _ in sp.logit_bias if t >= model.vocab_size]
        if bad:
            raise APIError(400, f"'logit_bias' has token id {bad[0]} outside the vocabulary", "logit_bias")
        # min_tokens beyond what the context leaves: all of it
        sampling = dataclasses.replace(
            sp, max_tokens=max_tokens, seed=seed, min_tokens=min(sp.min_tokens, max_tokens)
        )
        grammar_param = req.grammar_param
        if self.cfg.tool_call_parser is not None and req.tools:
            parser = make_tool_parser(self.cfg.tool_call_parser)
            grammar = forced_call_grammar(
                parser, list(req.tools), req.tool_choice, model.tokenizer.token_to_id
            )
            if grammar is not None:
                if sampling.grammar is not None:
                    raise APIError(
                        400,
                        f"tool_choice {req.tool_choice.mode!r} forces tool calls; it cannot be combined with "
                        f"'{req.grammar_param}'",
                        "tool_choice",
                    )
                sampling, grammar_param = attach_tool_call_grammar(sampling, grammar), "tool_choice"
        if sampling.grammar is not None:
            try:
                await check_grammar(sampling.grammar, grammar_param)
            except GrammarRequestError as e:
                raise APIError(400, str(e), e.param) from None
        if self.inflight >= self.cfg.max_inflight:
            raise APIError(429, f"the proxy has {self.inflight} requests in flight; try again later")
        self.inflight += 1
        return Job(req, model, ids, sampling, arrived)

    def release(self, job: Job) -> None:
        """``job`` is no longer in flight."""
        self.inflight -= 1

    async def read_json(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Any:
        limit = self.cfg.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body is larger than {limit} bytes")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is larger than {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            data = await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {self.cfg.body_timeout_s:g} s") from None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None

    def resolve_model(self, requested: str | None) -> str:
        models = self.router.models()
        if not models:
            raise APIError(503, "no prefill and decode ranks are registered")
        if requested is None:
            if len(models) > 1:
                raise APIError(400, f"'model' is required: this server serves {models}", "model")
            return models[0]
        if requested not in models:
            raise APIError(404, f"model {requested!r} is not served here; available: {models}", "model")
        return requested

    async def tokenize(self, req: ParsedRequest, model: ModelInfo, max_prompt: int) -> list[int]:
        """The prompt's token ids. Text is tokenized in a thread (the tokenizer releases the GIL), so a
        megabyte prompt does not stall the streams of other requests."""
        tok = model.tokenizer
        if req.chat:
            assert req.messages is not None  # parsed for every chat request
            try:
                text = tok.apply_chat_template(req.messages, tools=list(req.tools) or None)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            return await asyncio.to_thread(tok.encode, text, False)
        assert req.prompt is not None  # parsed for every completions request
        if isinstance(req.prompt, str):
            return await asyncio.to_thread(tok.encode, req.prompt)
        if len(req.prompt) >= max_prompt:
            return req.prompt  # refused by the caller, without looking at a million ids first
        bad = [t for t in req.prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids {bad[:4]} are outside the vocabulary [0, {model.vocab_size})", "prompt"
            )
        return list(req.prompt)

    def _max_tokens(self, req: ParsedRequest, model: ModelInfo, prompt_len: int) -> int:
        cap, room_left = self.cfg.max_completion_tokens, model.max_context_len - prompt_len
        if req.prompt_only:  # the first token is computed (prefill samples one) but not returned
            return 1
        if req.max_tokens is None:
            return min(room_left, cap)
        if req.max_tokens > cap:
            raise APIError(400, f"max_tokens is {req.max_tokens}; the limit is {cap}", "max_tokens")
        if req.max_tokens > room_left:
            raise APIError(
                400,
                f"this model's maximum context length is {model.max_context_len} tokens; the request has "
                f"{prompt_len} prompt tokens and asks for {req.max_tokens} more",
                "max_tokens",
            )
        return req.max_tokens


def attach_tool_call_grammar(sampling: SamplingParams, grammar: str) -> SamplingParams:
    """``sampling`` constrained to ``grammar`` (``forced_call_grammar``'s Lark text: the output is only
    tool calls), for ``tool_choice`` "required" or a named function: the one place a forced call meets the
    sampler."""
    return dataclasses.replace(sampling, grammar=GrammarSpec.lark(grammar))
