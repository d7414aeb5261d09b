"""The OpenAI-compatible HTTP front end (starlette).

For each request: validate and tokenize once, pick a prefill rank P and a decode rank D, draw a
room id, send ``Prefill`` to P and ``Generate`` to D concurrently, and relay D's token stream as
SSE chunks (or one JSON body). A client that goes away aborts the room on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HTTPRoute

from pd.metrics import Registry, parse_samples
from pd.proxy.protocol import (
    APIError,
    ParsedRequest,
    completion_id,
    full_response,
    parse_request,
    stream_chunk,
    usage_chunk,
)
from pd.proxy.router import ModelInfo, NoWorkers, Rank, Route, Router
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.types import SamplingParams

log = logging.getLogger(__name__)

# Worker status codes, as the client sees them.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
RELAYED_METRICS = ("pd_kv_pages_used", "pd_kv_pages_total", "pd_expert_tokens")


@dataclass(frozen=True)
class ProxyConfig:
    bootstrap: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cluster_token: str | None = None
    max_body_bytes: int = 8 << 20
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_completion_tokens: int = 16384  # cap of max_tokens (and the default for chat)
    max_inflight: int = 4096  # requests in flight before new ones get 429
    request_timeout_s: float = 600.0  # a whole request, from the proxy's point of view
    refresh_s: float = 1.0  # how often the registry view is refreshed


@dataclass
class _Job:
    """One request on its way through P and D."""

    req: ParsedRequest
    model: ModelInfo
    prompt_ids: list[int]
    sampling: SamplingParams
    room: int
    route: Route

    @property
    def prefill(self) -> Rank | None:
        return self.route.prefill

    @property
    def decode(self) -> Rank:
        return self.route.decode

    @property
    def rid(self) -> str:
        return completion_id(self.room, self.req.chat)


class Proxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.router = Router(cfg.bootstrap, cfg.cluster_token, cfg.refresh_s)
        self.inflight = 0
        self._background: set[asyncio.Task] = set()
        m = self.metrics = Registry()
        self.m_requests = m.counter(
            "pd_proxy_requests_total", "Requests answered, by endpoint and status.", ["endpoint", "status"]
        )
        self.m_inflight = m.gauge("pd_proxy_requests_inflight", "Requests in flight.")
        self.m_inflight.set_function(lambda: self.inflight)
        self.m_ttft = m.histogram("pd_proxy_ttft_seconds", "Time to first token seen by the proxy.")
        self.m_tpot = m.histogram(
            "pd_proxy_tpot_seconds", "Mean time per output token after the first, per request."
        )
        self.m_e2e = m.histogram("pd_proxy_e2e_seconds", "Request latency end to end.")
        self.m_aborts = m.counter(
            "pd_proxy_aborts_total", "Rooms aborted (client gone or failure).", ["reason"]
        )
        self.m_tokens = m.counter("pd_proxy_tokens_total", "Tokens, by kind.", ["kind"])

    # ---- the request path ----

    async def prepare(self, request: Request, chat: bool) -> _Job:
        body = await self._read_json(request)
        req = parse_request(body, chat)
        name = self._resolve_model(req.model)
        try:
            model = await self.router.model_info(name)
        except NoWorkers as e:
            raise APIError(503, str(e)) from None
        except grpc.aio.AioRpcError as e:
            raise APIError(503, f"could not read model info from a worker: {e.details()}") from None
        ids = self._tokenize(req, model)
        max_prompt = min(self.cfg.max_prompt_tokens or model.max_context_len, model.max_context_len)
        if len(ids) >= max_prompt:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts prompts of at most {max_prompt - 1}",
                "prompt",
            )
        room_left = model.max_context_len - len(ids)
        if req.max_tokens is None:
            max_tokens = min(room_left, self.cfg.max_completion_tokens)
        elif req.max_tokens > self.cfg.max_completion_tokens:
            raise APIError(
                400,
                f"max_tokens is {req.max_tokens}; the limit is {self.cfg.max_completion_tokens}",
                "max_tokens",
            )
        elif req.max_tokens > room_left:
            raise APIError(
                400,
                f"this model's maximum context length is {model.max_context_len} tokens; the request has "
                f"{len(ids)} prompt tokens and asks for {req.max_tokens} more",
                "max_tokens",
            )
        else:
            max_tokens = req.max_tokens
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        sampling = dataclasses.replace(req.sampling, max_tokens=max_tokens, seed=seed)
        if self.inflight >= self.cfg.max_inflight:
            raise APIError(429, f"the proxy has {self.inflight} requests in flight; try again later")
        try:
            route = self.router.pick(name)
        except NoWorkers as e:
            raise APIError(503, str(e)) from None
        return _Job(req, model, ids, sampling, secrets.randbits(63), route)

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.cfg.max_body_bytes):
            raise APIError(413, f"request body is larger than {self.cfg.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                raise APIError(413, f"request body is larger than {self.cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None

    def _resolve_model(self, requested: str | None) -> str:
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

    def _tokenize(self, req: ParsedRequest, model: ModelInfo) -> list[int]:
        tok = model.tokenizer
        if req.chat:
            try:
                return tok.encode_chat(req.messages)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
        if isinstance(req.prompt, str):
            return tok.encode(req.prompt)
        bad = [t for t in req.prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids {bad[:4]} are outside the vocabulary [0, {model.vocab_size})", "prompt"
            )
        return list(req.prompt)

    async def generate(self, job: _Job) -> AsyncIterator[wpb.GenerateChunk]:
        """D's chunks for ``job``; raises APIError if P or D fails. Aborts both sides unless it ran to the end."""
        sp = job.sampling
        sampling = wpb.Sampling(
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            min_p=sp.min_p,
            seed=sp.seed,
            max_tokens=sp.max_tokens,
            stop=list(sp.stop),
            stop_token_ids=list(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
        )
        md, timeout = self.router.metadata, self.cfg.request_timeout_s
        generate = wpb.GenerateRequest(room=job.room, token_ids=job.prompt_ids, sampling=sampling)
        if job.prefill is None:  # a colocated rank prefills itself
            prefill = asyncio.get_running_loop().create_future()
            prefill.set_result(None)
        else:
            prefill = asyncio.ensure_future(
                self.router.prefill_stub(job.prefill).Prefill(
                    wpb.PrefillRequest(
                        room=job.room,
                        token_ids=job.prompt_ids,
                        sampling=sampling,
                        decode_instance=job.decode.instance_id,
                        decode_rank=job.decode.dp_rank,
                    ),
                    timeout=timeout,
                    metadata=md,
                )
            )
            generate.prefill_instance = job.prefill.instance_id
            generate.prefill_rank = job.prefill.dp_rank
            generate.prefill_endpoint = job.prefill.endpoint
        call = self.router.decode_stub(job.decode).Generate(generate, timeout=timeout, metadata=md)
        finished = False
        stream = call.__aiter__()
        try:
            while True:
                next_chunk = asyncio.ensure_future(stream.__anext__())
                if not prefill.done():
                    await asyncio.wait({next_chunk, prefill}, return_when=asyncio.FIRST_COMPLETED)
                    if prefill.done() and prefill.exception() is not None and not next_chunk.done():
                        next_chunk.cancel()
                        raise _api_error(prefill.exception(), "prefill")
                try:
                    chunk = await next_chunk
                except StopAsyncIteration:
                    raise APIError(500, "the decode stream ended without a finish reason") from None
                except grpc.aio.AioRpcError as e:
                    if prefill.done() and prefill.exception() is not None:
                        raise _api_error(prefill.exception(), "prefill") from None
                    raise _api_error(e, "decode") from None
                yield chunk
                if chunk.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:
                call.cancel()
                prefill.cancel()
                self._spawn(self._abort(job, "client went away or request failed"))
            prefill.add_done_callback(_consume_exception)

    async def _abort(self, job: _Job, reason: str) -> None:
        self.m_aborts.inc(reason="incomplete")
        req = wpb.CancelRequest(room=job.room, reason=reason)
        for rank in job.route.ranks:
            try:
                await self.router.stub(rank).Abort(req, timeout=2.0, metadata=self.router.metadata)
            except grpc.aio.AioRpcError as e:
                log.info("room %x: abort on %s failed: %s", job.room, rank.label, e.code().name)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- HTTP handlers ----

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        started = time.monotonic()
        try:
            self._check_api_key(request)
            job = await self.prepare(request, chat)
        except APIError as e:
            self.m_requests.inc(endpoint=endpoint, status=str(e.status))
            return JSONResponse(e.body(), status_code=e.status)
        self.inflight += 1
        gen = self._timed(job, started)
        try:
            # Wait for the first token before answering, so that failures before it get a proper status.
            first = await _until_disconnect(request, gen.__anext__())
        except (APIError, _ClientGone, StopAsyncIteration) as e:
            await gen.aclose()
            self._done(job)
            status = e.status if isinstance(e, APIError) else 499
            self.m_requests.inc(endpoint=endpoint, status=str(status))
            if isinstance(e, APIError):
                return JSONResponse(e.body(), status_code=e.status)
            return Response(status_code=499)
        if job.req.stream:
            self.m_requests.inc(endpoint=endpoint, status="200")
            return _SSEResponse(self._sse(job, first, gen), on_close=lambda: self._done(job))
        try:
            chunks = [first] + await _until_disconnect(request, _collect(gen))
        except (APIError, _ClientGone) as e:
            await gen.aclose()
            self._done(job)
            status = e.status if isinstance(e, APIError) else 499
            self.m_requests.inc(endpoint=endpoint, status=str(status))
            return (
                JSONResponse(e.body(), status_code=e.status)
                if isinstance(e, APIError)
                else Response(status_code=499)
            )
        self._done(job)
        self.m_requests.inc(endpoint=endpoint, status="200")
        last = chunks[-1]
        ids = [t for c in chunks for t in c.token_ids]
        body = full_response(
            job.req,
            job.rid,
            job.model.name,
            "".join(c.text for c in chunks),
            last.finish_reason,
            ids,
            len(job.prompt_ids),
        )
        return JSONResponse(body)

    def _done(self, job: _Job) -> None:
        self.inflight -= 1
        self.router.release(*job.route.ranks)

    async def _timed(self, job: _Job, started: float) -> AsyncIterator[wpb.GenerateChunk]:
        first_at = None
        n = 0
        async with contextlib.aclosing(self.generate(job)) as chunks:
            async for chunk in chunks:
                now = time.monotonic()
                if first_at is None and chunk.token_ids:
                    first_at = now
                    self.m_ttft.observe(now - started)
                n += len(chunk.token_ids)
                if chunk.finish_reason:
                    self.m_e2e.observe(now - started)
                    if first_at is not None and n > 1:
                        self.m_tpot.observe((now - first_at) / (n - 1))
                    self.m_tokens.inc(len(job.prompt_ids), kind="prompt")
                    self.m_tokens.inc(n, kind="completion")
                yield chunk

    async def _sse(
        self, job: _Job, first: wpb.GenerateChunk, rest: AsyncIterator[wpb.GenerateChunk]
    ) -> AsyncIterator[bytes]:
        def event(obj: Any) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        chunk, is_first, completion_tokens = first, True, 0
        try:
            while True:
                completion_tokens += len(chunk.token_ids)
                finish = chunk.finish_reason or None
                yield event(
                    stream_chunk(
                        job.req, job.rid, job.model.name, chunk.text, finish, list(chunk.token_ids), is_first
                    )
                )
                is_first = False
                if finish:
                    break
                chunk = await rest.__anext__()
            if job.req.include_usage:
                yield event(
                    usage_chunk(job.req, job.rid, job.model.name, len(job.prompt_ids), completion_tokens)
                )
        except APIError as e:
            yield event(e.body())
        finally:
            await rest.aclose()
        yield b"data: [DONE]\n\n"

    def _check_api_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key (expected 'Authorization: Bearer <key>')")

    async def list_models(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "pd"} for m in self.router.models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        problems = []
        if not self.router.bootstrap_reachable:
            problems.append("bootstrap server unreachable")
        if not self.router.ranks_of(bpb.ROLE_COLOCATED):
            for role, name in ((bpb.ROLE_PREFILL, "prefill"), (bpb.ROLE_DECODE, "decode")):
                if not self.router.ranks_of(role):
                    problems.append(f"no {name} rank registered")
        if problems:
            return JSONResponse({"status": "unhealthy", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ok", "models": self.router.models()})

    async def metrics_endpoint(self, request: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render() + await self._relayed_metrics(), media_type="text/plain; version=0.0.4"
        )

    async def _relayed_metrics(self) -> str:
        """Every registered rank's KV page gauges, fetched now (so leaks can be checked from one scrape)."""

        async def fetch(rank: Rank) -> str:
            try:
                reply = await self.router.stub(rank).Metrics(
                    wpb.MetricsRequest(), timeout=2.0, metadata=self.router.metadata
                )
                return reply.text
            except grpc.aio.AioRpcError:
                return ""

        texts = await asyncio.gather(*(fetch(r) for r in list(self.router.ranks.values())))
        lines: dict[str, list[str]] = {name: [] for name in RELAYED_METRICS}
        for text in texts:
            for (name, labels), value in parse_samples(text).items():
                if name in lines:
                    body = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines[name].append(f"{name}{{{body}}} {value:g}")
        out = []
        for name, samples in lines.items():
            if samples:
                out += [f"# HELP {name} Relayed from the registered ranks.", f"# TYPE {name} gauge", *samples]
        return "\n".join(out) + ("\n" if out else "")


class _ClientGone(Exception):
    pass


async def _collect(gen: AsyncIterator[wpb.GenerateChunk]) -> list[wpb.GenerateChunk]:
    return [c async for c in gen]


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Awaits ``work`` unless the client disconnects first (then raises _ClientGone)."""
    work_task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work_task.done():
        return work_task.result()
    work_task.cancel()
    raise _ClientGone()


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SSEResponse(Response):
    """Streams server-sent events; stops the stream as soon as the client disconnects."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        # No Response.__init__: it would declare a content length.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        self.body_iterator = body
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streaming = asyncio.ensure_future(stream())
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not streaming.done():
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await streaming
            self.on_close()
        if streaming.done() and not streaming.cancelled() and streaming.exception() is not None:
            exc = streaming.exception()
            if not isinstance(exc, OSError):  # OSError: the client went away while we wrote
                raise exc


def _api_error(exc: BaseException, side: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        status = _HTTP_STATUS.get(exc.code(), 500)
        return APIError(status, f"{side} failed: {exc.details() or exc.code().name}")
    return APIError(500, f"{side} failed: {exc!r}")


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def build_app(cfg: ProxyConfig) -> Starlette:
    proxy = Proxy(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await proxy.router.start()
        yield
        await proxy.router.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404
        )

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse(
            APIError(405, f"method {request.method} not allowed here", code="method_not_allowed").body(),
            status_code=405,
        )

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal error").body(), status_code=500)

    app = Starlette(
        routes=[
            HTTPRoute("/v1/completions", proxy.completions, methods=["POST"]),
            HTTPRoute("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
            HTTPRoute("/v1/models", proxy.list_models, methods=["GET"]),
            HTTPRoute("/health", proxy.health, methods=["GET"]),
            HTTPRoute("/metrics", proxy.metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal_error},
    )
    app.state.proxy = proxy
    return app
