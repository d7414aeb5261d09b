"""Optional shared cluster token for every pd gRPC service.

With a token configured, a server rejects every call (unary or streaming) that does not carry
``authorization: Bearer <token>`` metadata with UNAUTHENTICATED. Without one, nothing is checked.
The token only keeps stray clients out; without TLS (``pd.rpc.tls``) it is sent in clear text.
"""

from __future__ import annotations

import collections
import hmac
from pathlib import Path
from typing import Any

import grpc

METADATA_KEY = "authorization"
DENIED = "missing or wrong cluster token (send 'authorization: Bearer <token>' metadata)"


def check_token(token: str) -> str:
    """Returns ``token`` if it can travel as gRPC metadata: non-empty visible ASCII, no spaces."""
    if not token or not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("cluster token must be non-empty printable ASCII without spaces")
    return token


def read_token_file(path: str | Path) -> str:
    """The token in ``path``, surrounding whitespace stripped."""
    text = Path(path).read_text().strip()
    try:
        return check_token(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty without one); pass as ``metadata=`` to any call."""
    return () if token is None else ((METADATA_KEY, f"Bearer {check_token(token)}"),)


def _authorized(expected: bytes, metadata: Any) -> bool:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            got = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(got, expected)
    return False


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Any) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind and (de)serializers as ``handler`` running ``behavior``."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _deny(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_async(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Sync-server interceptor that admits only calls carrying the cluster token."""

    def __init__(self, token: str):
        self._expected = f"Bearer {check_token(token)}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or _authorized(self._expected, handler_call_details.invocation_metadata):
            return handler
        return _same_kind(handler, _deny)


class AioTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio-server interceptor that admits only calls carrying the cluster token."""

    def __init__(self, token: str):
        self._expected = f"Bearer {check_token(token)}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _authorized(self._expected, handler_call_details.invocation_metadata):
            return handler
        return _same_kind(handler, _deny_async)


def server_interceptors(token: str | None) -> list[grpc.ServerInterceptor]:
    """``interceptors=`` for ``grpc.server``: the token check, or nothing without a token."""
    return [] if token is None else [TokenAuthInterceptor(token)]


def aio_server_interceptors(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """``interceptors=`` for ``grpc.aio.server``: the token check, or nothing without a token."""
    return [] if token is None else [AioTokenAuthInterceptor(token)]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _AddToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self._metadata = auth_metadata(token)

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = (*(d.metadata or ()), *self._metadata)
        return _CallDetails(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """``channel`` with the token added to every call (sync channels; for grpc.aio channels pass
    ``metadata=auth_metadata(token)`` per call). Returns ``channel`` itself without a token."""
    return channel if token is None else grpc.intercept_channel(channel, _AddToken(token))
