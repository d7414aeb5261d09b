"""The prefill worker: the ``Prefill`` RPC of a prefill rank (``pd.engine.prefill`` does the work).

``Prefill`` posts a ``PrefillRoom`` and answers with the room's one event: ``Prefilled`` once its KV and
first token reached the decode rank, or the status of a ``RoomFailed``. A cancelled call aborts the room.
"""

from __future__ import annotations

import dataclasses

import grpc

from pd.engine.messages import AbortRoom, Prefilled, PrefillRoom, RoomFailed
from pd.rpc import worker_pb2 as wpb
from pd.rpc import worker_pb2_grpc as wpb_grpc
from pd.rpc.sampling import prompt_to_proto, sampling_from_proto, top_to_proto
from pd.worker.server import STATUS, RankServer


class PrefillWorker(RankServer, wpb_grpc.PrefillWorkerServicer):
    def add_servicers(self, server: grpc.aio.Server) -> None:
        wpb_grpc.add_PrefillWorkerServicer_to_server(self, server)
        super().add_servicers(server)

    async def Prefill(
        self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> wpb.PrefillReply:
        sampling = sampling_from_proto(request.sampling)
        await self.compile_grammar(sampling, context)
        events = await self.open_room(request.room, context)
        self.submit(PrefillRoom(request.room, tuple(request.token_ids), sampling))
        try:
            event = await events.get()
        except BaseException:  # cancelled: the caller went away
            self.submit(AbortRoom(request.room, "the Prefill call was cancelled"))
            raise
        finally:
            self.close_room(request.room)
        if isinstance(event, RoomFailed):
            await context.abort(STATUS[event.failure], event.message)
        assert isinstance(event, Prefilled)
        phases = wpb.PrefillPhases(**dataclasses.asdict(event.phases)) if event.phases else None
        return wpb.PrefillReply(
            prompt_tokens=event.prompt_tokens,
            phases=phases,
            prompt_logprobs=prompt_to_proto(event.prompt_logprobs),
            first_token_ids=event.first_tokens,
            first_tops=[top_to_proto(t) for t in event.first_tops],
        )
