"""`tandem edge serve`: an OpenAI-compatible endpoint on the device, served by the speculative loop.

The request and response shapes, the text streaming and the error statuses are the cloud's own (the protocol
package's OpenAI API): a client cannot tell the two apart, except that the edge answers with the target's output
drafted locally. The draft model runs on one worker thread; the event loop only relays its tokens.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Header, Request
from pydantic import Field

from edge_client.service import EdgeGeneration, EdgeService
from edge_client.settings import EdgeSettings
from tandem.config import Mode
from tandem.errors import InvalidRequestError
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem_protocol.openai_api.limits import Ticket
from tandem_protocol.openai_api.middleware import install_error_handling
from tandem_protocol.openai_api.openapi import Limits, install_openapi
from tandem_protocol.openai_api.params import sampling_params
from tandem_protocol.openai_api.responses import API_ERRORS, Steps, check_model, error_responses
from tandem_protocol.openai_api.routes import openai_routers
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest
from tandem_protocol.openai_api.webui import install_web_ui

log = logging.getLogger("edge_client")


# per request, the edge's own settings overridden (the page's cloud-only rerun); other servers ignore these headers
ModeHeader = Annotated[Mode | None, Header(alias="x-tandem-mode", description="this request's mode (default: the "
                                           "edge's TANDEM_MODE)")]
GammaHeader = Annotated[Annotated[int, Field(ge=0, le=64)] | Literal["adaptive"] | None, Header(
    alias="x-tandem-gamma", description="this request's draft block length, or adaptive (default: TANDEM_GAMMA)")]


@dataclass(frozen=True)
class Overrides:
    """This request's mode and block length, where its headers set them."""

    mode: Mode | None
    gamma: int | Literal["adaptive"] | None


def get_overrides(mode: ModeHeader = None, gamma: GammaHeader = None) -> Overrides:
    return Overrides(mode, gamma)


class EdgeOpenAI:
    """The OpenAI routes' side here: the speculative loop on the draft's worker thread, the cloud verifying."""

    def __init__(self, service: EdgeService) -> None:
        self.service = service
        self.served_name, self.api_keys = service.settings.model_name, service.settings.edge_api_keys
        self.tokenizer, self.gate, self.metrics = service.draft.tokenizer, service.gate, service.metrics

    def card(self) -> dict[str, Any]:
        draft = self.service.draft
        return {"max_model_len": draft.context_length, "draft": {"name": draft.name, "runtime": draft.backend}}

    def choices(self, body: CompletionRequest | ChatRequest, ids: list[int],
                max_tokens: int | None) -> list[SamplingParams]:
        s, draft = self.service.settings, self.service.draft
        check_model(body, s.model_name)
        choices = sampling_params(body, max_tokens, len(ids), draft.context_length, s.max_tokens_limit)
        if choices[0].max_tokens > s.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens is {choices[0].max_tokens}; this endpoint allows at most "
                                      f"{s.max_tokens_limit}")
        return choices

    async def start(self, ids: list[int], params: SamplingParams, ticket: Ticket,
                    overrides: Overrides) -> EdgeGeneration:
        return await self.service.start(ids, params, ticket, overrides.mode, overrides.gamma)

    def figures(self, gens: Sequence[Steps]) -> dict[str, Any]:
        done = [g.result.stats.as_dict() for g in gens if isinstance(g, EdgeGeneration) and g.result is not None]
        return {"tandem": done[0] if len(done) == 1 else done} if done else {}


def get_openai(request: Request) -> EdgeOpenAI:
    return request.app.state.openai


# the cloud's errors, and 502 (the cloud's certificate refused) / 504 (no answer from the cloud in time)
public, api = openai_routers(get_openai, get_overrides, API_ERRORS | error_responses(502, 504))


def create_app(settings: EdgeSettings, draft: LoadedModel) -> FastAPI:
    service = EdgeService(settings, draft)
    app = FastAPI(title="tandem edge", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.openai = EdgeOpenAI(service)
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
