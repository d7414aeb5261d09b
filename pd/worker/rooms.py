"""Small pieces both workers use for their rooms: errors as gRPC statuses, futures resolved safely."""

from __future__ import annotations

import asyncio

import grpc

from pd.transfer.state import TransferState


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


def resolve(fut: asyncio.Future, value: object) -> None:
    """Sets a pending RPC's result (on the event loop); a future already done (cancelled) is left alone."""
    if not fut.done():
        fut.set_result(value)


def reject(fut: asyncio.Future, error: Exception) -> None:
    """Fails a pending RPC with ``error`` (on the event loop); a future already done is left alone."""
    if not fut.done():
        fut.set_exception(error)
