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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
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
from pd.rpc.sampling import sampling_to_proto
from pd.types import SamplingParams
from pd.worker.metrics import RELAYED

log = logging.getLogger(__name__)

# Worker status codes, as the client sees them.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Prefill failures worth one more try on another prefill instance (see Proxy.generate).
_RETRY_PREFILL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


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
    body_timeout_s: float = 30.0  # reading a request body (a client that trickles it gets 408)
    refresh_s: float = 1.0  # how often the registry view is refreshed
    keepalive_s: float = 5.0  # pings on worker channels: a hung worker fails its calls within ~2x this
    retry_prefill: bool = True  # a prefill rank that fails before the first token: retry once elsewhere


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
        self.router = Router(cfg.bootstrap, cfg.cluster_token, cfg.refresh_s, cfg.keepalive_s)
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
        self.m_retries = m.counter(
            "pd_proxy_prefill_retries_total", "Requests moved to another prefill instance after a failure."
        )

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
        max_prompt = min(self.cfg.max_prompt_tokens or model.max_context_len, model.max_context_len)
        ids = await self._tokenize(req, model, max_prompt)
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

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.cfg.max_body_bytes:
                    raise APIError(413, f"request body is larger than {self.cfg.max_body_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {self.cfg.body_timeout_s:g} s") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None

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

    async def _tokenize(self, req: ParsedRequest, model: ModelInfo, max_prompt: int) -> list[int]:
        """The prompt's token ids. Text is tokenized in a thread (the tokenizer releases the GIL), so a
        megabyte prompt does not stall the streams of other requests."""
        tok = model.tokenizer
        if req.chat:
            try:
                text = tok.apply_chat_template(req.messages)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            return await asyncio.to_thread(tok.encode, text, False)
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

    async def generate(self, job: _Job) -> AsyncIterator[wpb.GenerateChunk]:
        """D's chunks for ``job``; raises APIError if P or D fails.

        A prefill rank that fails with UNAVAILABLE (dead, hung past the keepalive, or its transfer
        failed) or refuses with RESOURCE_EXHAUSTED (its queue is full) before the first token is
        replaced once by a rank of another prefill instance when ``retry_prefill`` is set: a new room
        on the same decode rank. Every attempt that did not run to the end is aborted on both of its
        sides.
        """
        retries = 1 if self.cfg.retry_prefill else 0
        while True:
            try:
                async with contextlib.aclosing(self._attempt(job)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except _PrefillFailed as e:
                if retries == 0 or e.code not in _RETRY_PREFILL or job.prefill is None:
                    raise e.error from None
                try:
                    other = self.router.pick_prefill(job.model.name, [job.prefill.instance_id])
                except NoWorkers:
                    raise e.error from None
                retries -= 1
                self.m_retries.inc()
                log.warning("room %x: %s; retrying on %s", job.room, e.error.message, other.label)
                self.router.release(job.prefill)
                job.route, job.room = Route(job.decode, other), secrets.randbits(63)

    async def _attempt(self, job: _Job) -> AsyncIterator[wpb.GenerateChunk]:
        """One try of ``job`` on its current room, prefill and decode rank. Raises _PrefillFailed if the
        prefill rank fails before D produced anything (after that its outcome no longer matters)."""
        room, route = job.room, job.route
        prefill_rank, decode_rank = route.prefill, route.decode
        sampling = sampling_to_proto(job.sampling)
        md, timeout = self.router.metadata, self.cfg.request_timeout_s
        generate = wpb.GenerateRequest(room=room, token_ids=job.prompt_ids, sampling=sampling)
        if prefill_rank is None:  # a colocated rank prefills itself
            prefill = asyncio.get_running_loop().create_future()
            prefill.set_result(None)
        else:
            prefill = asyncio.ensure_future(
                self.router.prefill_stub(prefill_rank).Prefill(
                    wpb.PrefillRequest(
                        room=room,
                        token_ids=job.prompt_ids,
                        sampling=sampling,
                        decode_instance=decode_rank.instance_id,
                        decode_rank=decode_rank.dp_rank,
                    ),
                    timeout=timeout,
                    metadata=md,
                )
            )
            generate.prefill_instance = prefill_rank.instance_id
            generate.prefill_rank = prefill_rank.dp_rank
            generate.prefill_endpoint = prefill_rank.endpoint
        call = self.router.decode_stub(decode_rank).Generate(generate, timeout=timeout, metadata=md)
        finished = started = False
        stream = call.__aiter__()
        next_chunk: asyncio.Future | None = None
        try:
            while True:
                next_chunk = asyncio.ensure_future(stream.__anext__())
                if not started and not prefill.done():
                    await asyncio.wait({next_chunk, prefill}, return_when=asyncio.FIRST_COMPLETED)
                prefill_error = prefill.exception() if not started and prefill.done() else None
                # Prefill failed and D has no token to show for it: this attempt is lost.
                if prefill_error is not None and (not next_chunk.done() or next_chunk.exception()):
                    raise self._prefill_failed(prefill_rank, prefill_error)
                try:
                    chunk = await next_chunk
                except StopAsyncIteration:
                    raise APIError(500, "the decode stream ended without a finish reason") from None
                except grpc.aio.AioRpcError as e:
                    self._call_failed(decode_rank, e)
                    raise _api_error(e, "decode") from None
                started = True
                # Finished once the last chunk is handed over: a consumer that stops after it (the SSE
                # writer does) closes this generator at the yield, and that must not abort the room.
                finished = bool(chunk.finish_reason)
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                call.cancel()
                prefill.cancel()
                self._spawn(self._abort(room, route.ranks, "client went away or request failed"))
            for fut in (prefill, next_chunk):
                if fut is not None:
                    fut.cancel()
                    fut.add_done_callback(_consume_exception)

    def _prefill_failed(self, rank: Rank, exc: BaseException) -> _PrefillFailed:
        self._call_failed(rank, exc)
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        return _PrefillFailed(_api_error(exc, "prefill"), code)

    def _call_failed(self, rank: Rank, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.router.call_failed(rank)

    async def _abort(self, room: int, ranks: tuple[Rank, ...], reason: str) -> None:
        self.m_aborts.inc(reason="incomplete")
        req = wpb.CancelRequest(room=room, reason=reason)
        for rank in ranks:
            try:
                await self.router.stub(rank).Abort(req, timeout=2.0, metadata=self.router.metadata)
            except grpc.aio.AioRpcError as e:
                log.info("room %x: abort on %s failed: %s", room, rank.label, e.code().name)

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

        def refuse(e: APIError | None) -> Response:
            status = e.status if e is not None else 499  # 499: the client went away
            self.m_requests.inc(endpoint=endpoint, status=str(status))
            if e is None:
                return Response(status_code=499)
            # A client too slow to send its body would hold the connection: close it. (After a 413 the
            # server reads and drops the rest, so that the client can read the answer.)
            headers = {"connection": "close"} if status == 408 else None
            return JSONResponse(e.body(), status_code=status, headers=headers)

        try:
            self._check_api_key(request)
            job = await self.prepare(request, chat)
        except APIError as e:
            return refuse(e)
        except ClientDisconnect:
            return refuse(None)
        self.inflight += 1
        gen = self._timed(job, started)
        streaming = False  # once the SSE response owns ``gen``, it closes it and calls _done
        try:
            # Wait for the first token before answering, so that failures before it get a proper status.
            first = await _until_disconnect(request, gen.__anext__())
            if job.req.stream:
                self.m_requests.inc(endpoint=endpoint, status="200")
                streaming = True
                return _SSEResponse(self._sse(job, first, gen), on_close=lambda: self._done(job))
            chunks = [first] + await _until_disconnect(request, _collect(gen))
        except (APIError, _ClientGone, StopAsyncIteration) as e:
            return refuse(e if isinstance(e, APIError) else None)
        finally:
            if not streaming:
                try:
                    await gen.aclose()
                finally:
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
        lines: dict[str, list[str]] = {name: [] for name in RELAYED}
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


class _PrefillFailed(Exception):
    """The prefill rank failed before the decode stream produced anything (a retry may help)."""

    def __init__(self, error: APIError, code: grpc.StatusCode | None) -> None:
        super().__init__(error.message)
        self.error, self.code = error, code


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
    # Wait for the cancellation to land: until then a generator behind ``work`` is still running and
    # cannot be closed (aclose() would raise "asynchronous generator is already running").
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task
    raise _ClientGone()


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SSEResponse(Response):
    """Streams server-sent events; stops the stream as soon as the client disconnects."""

    def __init__(self, body: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
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
            try:  # cancelled while sending, the body's generator was left suspended: close it (aborts the room)
                await self.body_iterator.aclose()
            finally:
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
