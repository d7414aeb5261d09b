"""The decode worker: the ``Generate`` stream of a decode rank (``pd.engine.decode`` does the work).

``Generate`` posts a ``DecodeRoom`` naming the prefill rank that computes the prompt's KV, and streams one
chunk per step until the room finishes; a ``RoomFailed`` ends the stream with its status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from pd.engine.messages import DecodeRoom
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.sampling import sampling_from_proto
from pd.worker.server import RankServer


class DecodeWorker(RankServer, wpb_grpc.DecodeWorkerServicer):
    def add_servicers(self, server: grpc.aio.Server) -> None:
        wpb_grpc.add_DecodeWorkerServicer_to_server(self, server)
        super().add_servicers(server)

    async def Generate(
        self, request: wpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.GenerateChunk]:
        sampling = sampling_from_proto(request.sampling)
        cmd = DecodeRoom(request.room, tuple(request.token_ids), sampling, request.prefill_endpoint)
        async for chunk in self.stream(cmd, context):
            yield chunk
