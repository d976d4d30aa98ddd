"""The gRPC face: a thin Verifier servicer, the standard health service and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud_server.settings import ServerSettings
from cloud_server.worker import ModelWorker
from tandem.errors import InvalidRequestError, SessionNotFoundError, TandemError
from tandem_protocol import pb as wire
from tandem_protocol.errors import UnauthenticatedError, error_code, grpc_status, require_bearer
from tandem_protocol.openai_api.limits import client_key, grpc_peer_address, retry_after
from tandem_protocol.proto import verifier_pb2 as pb
from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["Verifier"].full_name
_PUSHBACK = "grpc-retry-pushback-ms"
_DEADLINE_SLACK_S = 0.25


class VerifierServicer(pb_grpc.VerifierServicer):
    def __init__(self, worker: ModelWorker, settings: ServerSettings) -> None:
        self.worker = worker
        self.settings = settings
        # session id -> the Session stream holding it; an Open under that id (a resume) elsewhere takes it over
        self._streams: dict[str, object] = {}

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        value = dict(context.invocation_metadata() or ()).get("authorization", "")
        require_bearer(str(value), self.settings.api_keys, "metadata `authorization: Bearer <key>`")

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        value = dict(context.invocation_metadata() or ()).get("authorization", "")
        return client_key(str(value), grpc_peer_address(context.peer() or ""), bool(self.settings.api_keys))

    def _count(self, method: str, status: str) -> None:
        self.worker.metrics.requests.labels(route=f"grpc {SERVICE}/{method}", status=status).inc()

    def _cancelled(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """The call was cancelled: its client went away, or its deadline passed (a shutdown counts its own)."""
        self._count(method, "CANCELLED")
        if not self.worker.gate.accepting:
            return
        left = context.time_remaining()
        # a client cancels at its own deadline, which is earlier than ours by the time its headers took to arrive
        # (tens of ms on a loaded server): a cancel that close to the deadline is the deadline
        reason = "deadline" if left is not None and left <= _DEADLINE_SLACK_S else "client_gone"
        self.worker.metrics.cancelled.labels(reason=reason).inc()

    async def _abort(self, method: str, context: grpc.aio.ServicerContext, e: Exception) -> NoReturn:
        code = grpc_status(error_code(e))
        if not isinstance(e, TandemError):
            log.exception("%s failed", method)
        self._count(method, code.name)
        wait = retry_after(e)
        if wait is not None:  # gRFC A6: the client's retry policy waits this long
            context.set_trailing_metadata(((_PUSHBACK, str(wait * 1000)),))
        await context.abort(code, str(e) if isinstance(e, TandemError) else f"internal error: {type(e).__name__}")
        raise AssertionError("context.abort returned")

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        try:
            self._authorize(context)
            reply = await call()
        except asyncio.CancelledError:
            self._cancelled(method, context)
            raise
        except Exception as e:
            await self._abort(method, context, e)
        self._count(method, "OK")
        return reply

    async def OpenSession(self, request: pb.Open, context: grpc.aio.ServicerContext) -> pb.Opened:
        async def call() -> pb.Opened:
            info = await self.worker.open_session(wire.open_from_pb(request), self._client(context))
            self._streams.pop(info.session_id, None)
            return wire.opened_to_pb(info)

        return await self._unary("OpenSession", context, call)

    async def Verify(self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext) -> pb.Verdict:
        async def call() -> pb.Verdict:
            d = request.draft
            block, base_len = wire.block_from_pb(d), wire.base_len_from_pb(d)
            verdict = await self.worker.verify(request.session_id, d.seq, block, base_len, self._client(context))
            return wire.verdict_to_pb(verdict)

        return await self._unary("Verify", context, call)

    async def CloseSession(self, request: pb.Close, context: grpc.aio.ServicerContext) -> pb.Closed:
        async def call() -> pb.Closed:
            return pb.Closed(existed=await self.worker.close_session(request.session_id))

        return await self._unary("CloseSession", context, call)

    async def Generate(self, request: pb.Open, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Verdict]:
        try:
            self._authorize(context)
            async with self.worker.gate.admit(self._client(context)) as ticket:  # held on by the generation
                if request.continue_session:
                    if not request.HasField("session_id"):
                        raise InvalidRequestError("continue_session needs the session_id to continue")
                    gen = await self.worker.continue_generation(request.session_id, list(request.prompt), ticket)
                else:
                    req = wire.open_from_pb(request)
                    gen = await self.worker.start_generation(req.prompt, req.params, ticket)
        except asyncio.CancelledError:
            self._cancelled("Generate", context)
            raise
        except Exception as e:
            await self._abort("Generate", context, e)
        try:
            step = 0
            async for result in gen:
                yield pb.Verdict(seq=step, tokens=result.tokens, finish_reason=wire.finish_to_pb(result.finish_reason),
                                 generated=gen.tokens, logprobs=wire.logprobs_to_pb(result.logprobs))
                step += 1
        except (asyncio.CancelledError, GeneratorExit):  # the client left (while a message is sent: GeneratorExit)
            self.worker.metrics.disconnects.labels(route="grpc Generate").inc()
            self._cancelled("Generate", context)
            raise
        except TandemError as e:  # past the wall-time limit
            await self._abort("Generate", context, e)
        finally:
            gen.close()
        self._count("Generate", "OK")

    async def Session(
        self, request_iterator: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage]:
        try:
            self._authorize(context)
        except UnauthenticatedError as e:
            self._count("Session", "UNAUTHENTICATED")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        session_id: str | None = None
        reason = "disconnected"  # until the client says Close: a stream that just ends, or is cancelled, left us
        me = object()
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                if kind == "close":
                    reason = "closed"
                    break
                try:
                    if kind == "open":
                        if session_id is not None:
                            raise InvalidRequestError("this stream already has a session")
                        info = await self.worker.open_session(wire.open_from_pb(msg.open), self._client(context))
                        session_id = info.session_id
                        self._streams[session_id] = me
                        yield pb.ServerMessage(opened=wire.opened_to_pb(info))
                    elif kind == "draft":
                        if session_id is None:
                            raise InvalidRequestError("open a session before sending drafts")
                        if self._streams.get(session_id) is not me:
                            raise SessionNotFoundError(f"session {session_id!r} was taken over by a resume")
                        d = msg.draft
                        verdict = await self.worker.verify(session_id, d.seq, wire.block_from_pb(d),
                                                           wire.base_len_from_pb(d), self._client(context))
                        yield pb.ServerMessage(verdict=wire.verdict_to_pb(verdict))
                    else:
                        raise InvalidRequestError("an empty message")
                except TandemError as e:
                    yield pb.ServerMessage(error=pb.Error(code=e.code, message=str(e),
                                                          grpc_status=grpc_status(e.code).name))
                    if session_id is None:
                        break  # a failed Open ends the stream
            self._count("Session", "OK")
            # a cancelled client's stream may end here (end of input) rather than in a CancelledError below
            if reason == "disconnected" and session_id is not None:
                self.worker.metrics.disconnects.labels(route="grpc Session").inc()
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or its connection dropped
            self.worker.metrics.disconnects.labels(route="grpc Session").inc()
            self._cancelled("Session", context)
            reason = "disconnected"
            raise
        finally:
            # a session taken over by a resume is no longer this stream's to close
            if session_id is not None and self._streams.get(session_id) is me:
                del self._streams[session_id]
                with contextlib.suppress(SessionNotFoundError):  # expired
                    await self.worker.close_session(session_id, reason)


def create_grpc_server(
    settings: ServerSettings, worker: ModelWorker
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    # messages are bounded like HTTP bodies; grpc answers RESOURCE_EXHAUSTED beyond it
    limit = settings.max_body_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a second server on a port in use fails instead of sharing it
    ])
    pb_grpc.add_VerifierServicer_to_server(VerifierServicer(worker, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)
