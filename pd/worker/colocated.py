"""The colocated worker: the ``Generate`` stream of a rank that prefills and decodes each room itself
(``pd.engine.colocated``), behind the same proxy and API. The proxy sends it ``Generate`` alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from pd.engine.messages import DecodeRoom
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.sampling import sampling_from_proto
from pd.worker.server import RankServer


class ColocatedWorker(RankServer, wpb_grpc.DecodeWorkerServicer):
    def add_servicers(self, server: grpc.aio.Server) -> None:
        wpb_grpc.add_DecodeWorkerServicer_to_server(self, server)

    async def Generate(
        self, request: wpb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.GenerateChunk]:
        cmd = DecodeRoom(request.room, tuple(request.token_ids), sampling_from_proto(request.sampling))
        async for chunk in self.stream(cmd, context):
            yield chunk
