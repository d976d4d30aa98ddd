"""`tandem edge serve`: an OpenAI-compatible endpoint on the device, served by the speculative loop.

The request and response shapes, the text streaming and the error statuses are the cloud's own (the protocol
package's OpenAI API): a client cannot tell the two apart, except that the edge answers with the target's output
drafted locally. The draft model runs on one worker thread; the event loop only relays its tokens.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field

from edge_client.service import EdgeGeneration, EdgeService
from edge_client.settings import EdgeSettings
from tandem.config import Mode
from tandem.errors import InvalidRequestError
from tandem.models import LoadedModel
from tandem.session import validate_prompt
from tandem_protocol.errors import BEARER_HEADER, require_bearer
from tandem_protocol.openai_api.limits import client_key
from tandem_protocol.openai_api.middleware import install_error_handling
from tandem_protocol.openai_api.openapi import Limits, install_openapi
from tandem_protocol.openai_api.params import sampling_params
from tandem_protocol.openai_api.responses import (
    API_ERRORS,
    COMPLETION_RESPONSES,
    BearerDep,
    chat_completion_prompt,
    check_model,
    completion_prompt,
    completion_response,
    error_responses,
)
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest
from tandem_protocol.openai_api.webui import install_web_ui

log = logging.getLogger("edge_client")


def get_service(request: Request) -> EdgeService:
    return request.app.state.service


ServiceDep = Annotated[EdgeService, Depends(get_service)]


def get_client(request: Request, service: ServiceDep) -> str:
    """Whose share the request counts against (its key; on an open endpoint its address)."""
    address = request.client.host if request.client is not None else ""
    return client_key(request.headers.get("authorization", ""), address, bool(service.settings.edge_api_keys))


ClientDep = Annotated[str, Depends(get_client)]


# per request, the edge's own settings overridden (the page's cloud-only rerun); other servers ignore these headers
ModeHeader = Annotated[Mode | None, Header(alias="x-tandem-mode", description="this request's mode (default: the "
                                           "edge's TANDEM_MODE)")]
GammaHeader = Annotated[Annotated[int, Field(ge=0, le=64)] | Literal["adaptive"] | None, Header(
    alias="x-tandem-gamma", description="this request's draft block length, or adaptive (default: TANDEM_GAMMA)")]


async def require_api_key(request: Request, service: ServiceDep, _: BearerDep) -> None:
    require_bearer(request.headers.get("authorization", ""), service.settings.edge_api_keys, BEARER_HEADER)


public = APIRouter()
# the cloud's errors, and 502 (the cloud's certificate refused) / 504 (no answer from the cloud in time)
api = APIRouter(dependencies=[Depends(require_api_key)], responses=API_ERRORS | error_responses(502, 504))


@public.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models")
async def models(service: ServiceDep, request: Request) -> dict[str, Any]:
    card = {"id": service.settings.model_name, "object": "model", "created": request.app.state.created,
            "owned_by": "tandem", "max_model_len": service.draft.context_length,
            "draft": {"name": service.draft.name, "runtime": service.draft.backend}}
    return {"object": "list", "data": [card]}


@api.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, service: ServiceDep, client: ClientDep, mode: ModeHeader = None,
                      gamma: GammaHeader = None) -> Response:
    ids = await completion_prompt(body, service.draft.tokenizer)
    return await _complete(service, body, ids, body.max_tokens, "text", client, mode, gamma)


@api.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatRequest, service: ServiceDep, client: ClientDep, mode: ModeHeader = None,
                           gamma: GammaHeader = None) -> Response:
    ids = await chat_completion_prompt(body, service.draft.tokenizer)
    return await _complete(service, body, ids, body.max_completion_tokens or body.max_tokens, "chat", client, mode,
                           gamma)


async def _complete(service: EdgeService, body: CompletionRequest | ChatRequest, ids: list[int],
                    max_tokens: int | None, kind: Literal["text", "chat"], client: str, mode: Mode | None = None,
                    gamma: int | Literal["adaptive"] | None = None) -> Response:
    s, draft = service.settings, service.draft
    check_model(body, s.model_name)
    choices = sampling_params(body, max_tokens, len(ids), draft.context_length, s.max_tokens_limit)
    if choices[0].max_tokens > s.max_tokens_limit:
        raise InvalidRequestError(f"max_tokens is {choices[0].max_tokens}; this endpoint allows at most "
                                  f"{s.max_tokens_limit}")
    validate_prompt(ids, draft.vocab_size, draft.context_length)
    gens: list[EdgeGeneration] = []

    def stats() -> dict[str, Any]:
        done = [g.result.stats.as_dict() for g in gens if g.result is not None]
        return {"tandem": done[0] if len(done) == 1 else done} if done else {}

    async with service.gate.admit(client) as ticket:  # one slot per request; its generations hold it while they run
        try:
            for params in choices:  # n > 1: one generation per choice, in turn on the draft thread
                gens.append(await service.start(ids, params, ticket, mode, gamma))
        except BaseException:
            for gen in gens:
                gen.close()
            raise
        return await completion_response(gens, draft.tokenizer, body, kind, s.model_name, len(ids), extra=stats,
                                         metrics=service.metrics)


def create_app(settings: EdgeSettings, draft: LoadedModel) -> FastAPI:
    service = EdgeService(settings, draft)
    app = FastAPI(title="tandem edge", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.created = int(time.time())
    app.include_router(public)
    app.include_router(api)
    install_web_ui(app, "edge")
    install_error_handling(app, settings.max_body_bytes, service.metrics)
    install_openapi(app, Limits(draft.vocab_size, draft.context_length, settings.max_tokens_limit),
                    secured=bool(settings.edge_api_keys))
    return app


class EdgeServer(uvicorn.Server):
    """uvicorn, stopping as the cloud does: on SIGTERM (or `should_exit`) new requests get 503, those in flight
    have `shutdown_grace_s` to finish, then they are cancelled (their cloud sessions closed)."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel) -> None:
        app = create_app(settings, draft)
        self.service: EdgeService = app.state.service
        super().__init__(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=settings.edge_tls_cert_file, ssl_keyfile=settings.edge_tls_key_file,
            timeout_graceful_shutdown=settings.shutdown_grace_s + 1.0,  # type: ignore[arg-type]  # a backstop
        ))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gate = self.service.gate
        gate.close()
        drain = asyncio.create_task(gate.drain(self.service.settings.shutdown_grace_s))
        try:
            await super().shutdown(sockets)
            await drain
        finally:
            drain.cancel()
            self.service.shutdown()


def run(settings: EdgeSettings) -> None:
    import torch

    from tandem.models import load_draft

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(settings.threads)
    draft = load_draft(settings.draft, settings, settings.threads)
    log.info("edge endpoint on %s://%s:%d (draft %s, %d torch threads; cloud %s over %s, mode %s)",
             "https" if settings.edge_tls_cert_file else "http", settings.host, settings.port, draft.describe(),
             settings.threads,
             settings.cloud, settings.transport, settings.mode)
    EdgeServer(settings, draft).run()
    log.info("stopped")


class BackgroundEdge:
    """The endpoint on its own thread, for tests: `with BackgroundEdge(settings, draft) as port: ...`."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel) -> None:
        self.server = EdgeServer(settings, draft)
        self.thread = threading.Thread(target=self.server.run, name="tandem-edge-http", daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the edge endpoint did not start")
            time.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout: float = 30.0) -> None:
        """As SIGTERM does: the graceful stop, then the thread ends."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()
