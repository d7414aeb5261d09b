"""HTTP: the starlette app in front of admission and dispatch.

Owns the routes, the answers' framing (one JSON body, or SSE ``data:`` events ending with ``[DONE]``;
a failure after the first token is an error event), the refusals' status codes and bodies, watching
for a client that goes away, the requests counter, and the ops endpoints: ``/v1/models``,
``/v1/models/{id}``, ``/health`` and ``/metrics`` (the proxy's own metrics and the ranks' relayed gauges).
``build_app`` wires it all up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pd.metrics import Registry, parse_samples
from pd.proxy.admission import Admission, Job
from pd.proxy.chat_output import ChatOutput, chat_output
from pd.proxy.config import ProxyConfig
from pd.proxy.dispatch import Chunk, Dispatcher
from pd.proxy.logprobs import ResponseLogprobs
from pd.proxy.protocol import (
    APIError,
    ChoiceResult,
    completion_id,
    full_response,
    stream_chunk,
    usage_chunk,
)
from pd.proxy.router import NoWorkers, Rank, Router
from pd.rpc import bootstrap_pb2 as bpb
from pd.rpc import worker_pb2 as wpb
from pd.worker.metrics import RELAYED, RELAYED_COUNTERS, RELAYED_HISTOGRAMS

log = logging.getLogger(__name__)


class Proxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.router = Router(
            cfg.bootstrap, cfg.cluster_token, cfg.refresh_s, cfg.keepalive_s, cfg.tls, cfg.routing
        )
        m = self.metrics = Registry()
        self.m_requests = m.counter(
            "pd_proxy_requests_total", "Requests answered, by endpoint and status.", ["endpoint", "status"]
        )
        self.admission = Admission(cfg, self.router, m)
        self.dispatcher = Dispatcher(self.router, m, cfg.request_timeout_s, cfg.retry_prefill)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        arrived = time.monotonic()

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
            self.admission.check_api_key(request.headers.get("authorization"))
            job = await self.admission.admit(request.headers, request.stream(), chat, arrived)
        except APIError as e:
            return refuse(e)
        except ClientDisconnect:
            return refuse(None)
        chunks = self.dispatcher.run(job)
        streaming = False  # once the SSE response owns ``chunks``, it closes them and releases the job
        try:
            # Wait for the first token before answering, so that failures before it get a proper status.
            first = await _until_disconnect(request, chunks.__anext__())
            if job.req.stream:
                self.m_requests.inc(endpoint=endpoint, status="200")
                streaming = True
                return _SSEResponse(
                    self._sse(job, first, chunks), on_close=lambda: self.admission.release(job)
                )
            rest = await _until_disconnect(request, _collect(chunks))
        except (APIError, _ClientGone, StopAsyncIteration) as e:
            return refuse(e if isinstance(e, APIError) else None)
        finally:
            if not streaming:
                try:
                    await chunks.aclose()
                finally:
                    self.admission.release(job)
        self.m_requests.inc(endpoint=endpoint, status="200")
        every = [first, *rest]
        choices = [self._choice(job, [c for c in every if c.index == i]) for i in range(job.sampling.n)]
        body = full_response(
            job.req, completion_id(first.room, chat), job.model.name, choices, len(job.prompt_ids)
        )
        if job.req.return_phases and every[-1].phases:
            body["pd_phases"] = every[-1].phases
        return JSONResponse(body)

    def _choice(self, job: Job, chunks: list[Chunk]) -> ChoiceResult:
        """One choice of a whole response from its chunks, in order (its last carries its finish reason)."""
        if job.req.prompt_only:  # echo with max_tokens 0: the prompt (and its logprobs) alone
            prefix, logprobs = _logprobs(job).chunk(True, job.prompt_ids, [], [], [], chunks[0].prompt)
            return ChoiceResult(prefix, "length", [], logprobs)
        ids = [t for c in chunks for t in c.token_ids]
        prefix, logprobs = _logprobs(job).chunk(
            True,
            job.prompt_ids,
            ids,
            [lp for c in chunks for lp in c.logprobs],
            [top for c in chunks for top in c.top],
            chunks[0].prompt,
        )
        text, finish = prefix + "".join(c.text for c in chunks), chunks[-1].finish_reason
        assert finish is not None  # the stream ends once every choice has finished
        reasoning, calls = None, None
        output = self._chat_output(job)
        if output is not None:
            pieces = [output.feed(c.text, c.token_ids, c is chunks[-1]) for c in chunks]
            reasoning = "".join(p.reasoning for p in pieces) or None
            text = "".join(p.content for p in pieces)
            calls = [c.to_openai() for c in output.calls]
            finish = output.finish_reason(finish)
        return ChoiceResult(text, finish, ids, logprobs, reasoning, calls)

    async def _sse(
        self, job: Job, first: Chunk, rest: AsyncGenerator[Chunk, None]
    ) -> AsyncGenerator[bytes, None]:
        def event(obj: Any) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        rid, model = completion_id(first.room, job.req.chat), job.model.name
        chunk, completion_tokens = first, 0
        # Per choice: its logprobs (text offsets run on per choice), its chat output (reasoning and tool
        # calls split off), and whether its first event went out. Choices interleave as decode emits them.
        lps = [_logprobs(job) for _ in range(job.sampling.n)]
        outputs = [self._chat_output(job) for _ in range(job.sampling.n)]
        started: set[int] = set()
        try:
            if job.req.prompt_only:  # echo with max_tokens 0: each choice's prompt, then the stream ends
                for i in range(job.sampling.n):
                    prefix, logprobs = lps[i].chunk(True, job.prompt_ids, [], [], [], chunk.prompt)
                    yield event(
                        stream_chunk(job.req, rid, model, prefix, "length", [], True, logprobs, index=i)
                    )
            while not job.req.prompt_only:
                completion_tokens += len(chunk.token_ids)
                i, finish, ids = chunk.index, chunk.finish_reason, list(chunk.token_ids)
                is_first = i not in started
                prefix, logprobs = lps[i].chunk(
                    is_first, job.prompt_ids, ids, chunk.logprobs, chunk.top, chunk.prompt
                )
                text, reasoning, calls, output = prefix + chunk.text, None, None, outputs[i]
                if output is not None:
                    piece = output.feed(text, ids, finish is not None)
                    text, reasoning, calls = piece.content, piece.reasoning or None, piece.tool_calls
                    finish = finish and output.finish_reason(finish)
                out = stream_chunk(
                    job.req, rid, model, text, finish, ids, is_first, logprobs, reasoning, calls, i
                )
                if job.req.return_phases and chunk.phases:
                    out["pd_phases"] = chunk.phases
                yield event(out)
                started.add(i)
                if chunk.done:
                    break
                chunk = await rest.__anext__()
            if job.req.include_usage:
                yield event(usage_chunk(job.req, rid, model, len(job.prompt_ids), completion_tokens))
        except APIError as e:
            yield event(e.body())
        finally:
            await rest.aclose()
        yield b"data: [DONE]\n\n"

    def _chat_output(self, job: Job) -> ChatOutput | None:
        """Chat's output parsers for ``job`` (``--reasoning-parser``, ``--tool-call-parser``), None without."""
        req, cfg = job.req, self.cfg
        if not req.chat:
            return None
        parse_tools = bool(req.tools) and req.tool_choice.mode != "none"
        return chat_output(
            cfg.reasoning_parser,
            cfg.tool_call_parser,
            job.model.tokenizer,
            job.prompt_ids,
            parse_tools,
            req.sampling.stop,
        )

    # ---- ops endpoints ----

    async def list_models(self, request: Request) -> Response:
        try:
            self.admission.check_api_key(request.headers.get("authorization"))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        models = await asyncio.gather(*(self._model_object(m) for m in self.router.models()))
        return JSONResponse({"object": "list", "data": list(models)})

    async def retrieve_model(self, request: Request) -> Response:
        name = request.path_params["model"]  # may hold "/" (an "org/name" id)
        try:
            self.admission.check_api_key(request.headers.get("authorization"))
            if name not in self.router.models():
                raise APIError(404, f"model {name!r} is not served here", "model")
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse(await self._model_object(name))

    async def _model_object(self, name: str) -> dict[str, Any]:
        """The OpenAI model object, plus ``max_model_len`` and ``vocab_size`` when a rank tells them (benchmark
        clients draw random token ids below ``vocab_size``)."""
        obj: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "pd"}
        try:
            info = await self.router.model_info(name)
        except (NoWorkers, grpc.aio.AioRpcError):
            return obj
        return {**obj, "max_model_len": info.max_context_len, "vocab_size": info.vocab_size}

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
        """Every registered rank's gauges named in RELAYED, histograms in RELAYED_HISTOGRAMS and counters in
        RELAYED_COUNTERS (those two labelled with the rank's instance and rank), fetched now: leaks, the
        achieved decode batch and KV checksum failures show in one scrape."""

        async def fetch(rank: Rank) -> tuple[Rank, str]:
            try:
                reply = await self.router.stub(rank).Metrics(
                    wpb.MetricsRequest(), timeout=2.0, metadata=self.router.metadata
                )
                return rank, reply.text
            except (grpc.aio.AioRpcError, grpc.aio.UsageError):  # down, or its channel closed as it left
                return rank, ""

        fetched = await asyncio.gather(*(fetch(r) for r in list(self.router.ranks.values())))
        # sample name -> (family, kind); histograms and counters get the rank's labels here.
        families = {name: (name, "gauge") for name in RELAYED}
        families |= {name: (name.removesuffix("_total"), "counter") for name in RELAYED_COUNTERS}
        for name in RELAYED_HISTOGRAMS:
            families |= {f"{name}{suffix}": (name, "histogram") for suffix in ("_bucket", "_sum", "_count")}
        lines: dict[tuple[str, str], list[str]] = {family: [] for family in families.values()}
        for rank, text in fetched:
            for (name, labels), value in parse_samples(text).items():
                family = families.get(name)
                if family is None:
                    continue
                if family[1] != "gauge":
                    labels = (*labels, ("instance", rank.instance_id), ("rank", str(rank.dp_rank)))
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines[family].append(f"{name}{{{body}}} {value:g}")
        out = []
        for (name, kind), samples in lines.items():
            if samples:
                out += [
                    f"# HELP {name} Relayed from the registered ranks.",
                    f"# TYPE {name} {kind}",
                    *samples,
                ]
        return "\n".join(out) + ("\n" if out else "")


def _logprobs(job: Job) -> ResponseLogprobs:
    req = job.req
    return ResponseLogprobs(job.model.tokenizer, req.chat, req.logprobs, req.echo, req.prompt)


def _escape(label_value: str) -> str:
    """A label value as the text exposition format writes it."""
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _ClientGone(Exception):
    pass


async def _collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in chunks]


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


async def _wait_disconnect(receive: Receive) -> None:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        if streaming.done() and not streaming.cancelled():
            exc = streaming.exception()
            if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                raise exc


def build_app(cfg: ProxyConfig) -> Starlette:
    proxy = Proxy(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await proxy.router.start()
        yield
        await proxy.dispatcher.drain()  # Aborts on their way, before the channels close
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
            Route("/v1/completions", proxy.completions, methods=["POST"]),
            Route("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
            Route("/v1/models", proxy.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", proxy.retrieve_model, methods=["GET"]),
            Route("/health", proxy.health, methods=["GET"]),
            Route("/metrics", proxy.metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal_error},
    )
    app.state.proxy = proxy
    return app
