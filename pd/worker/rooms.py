"""Small pieces both workers use for their rooms: errors as gRPC statuses, sampling from the wire."""

from __future__ import annotations

import asyncio

import grpc

from pd.rpc import worker_pb2 as wpb
from pd.transfer.state import TransferState
from pd.types import SamplingParams


class RoomError(Exception):
    """A room ends with this gRPC status (the proxy maps it to an HTTP status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def failure_status(state: TransferState, reason: str) -> tuple[grpc.StatusCode, str]:
    """The status a room that ended in ``state`` (not DONE) reports: timeouts become DEADLINE_EXCEEDED."""
    if state is TransferState.ABORTED:
        return grpc.StatusCode.ABORTED, f"KV transfer aborted: {reason}"
    if "timed out" in reason or "timeout" in reason:
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"KV transfer timed out: {reason}"
    return grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {reason}"


def sampling_from_proto(s: wpb.Sampling) -> SamplingParams:
    """Raises ValueError (naming the field) for values SamplingParams refuses."""
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed,
        max_tokens=s.max_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )


def resolve(fut: asyncio.Future, value: object) -> None:
    """Sets a pending RPC's result (on the event loop); a future already done (cancelled) is left alone."""
    if not fut.done():
        fut.set_result(value)


def reject(fut: asyncio.Future, error: Exception) -> None:
    """Fails a pending RPC with ``error`` (on the event loop); a future already done is left alone."""
    if not fut.done():
        fut.set_exception(error)
