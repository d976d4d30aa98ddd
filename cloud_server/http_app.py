"""The HTTP face: an OpenAI-compatible API (the target alone), verification sessions, health and metrics.

Routes convert JSON to engine calls on the worker and back; the worker owns the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cloud_server.settings import ServerSettings
from cloud_server.worker import Generation, ModelWorker
from tandem.sampling import SamplingParams
from tandem_protocol import bodies
from tandem_protocol.bodies import ClosedBody, ContinueBody, DraftBody, OpenBody, OpenedBody, StepBody, VerdictBody
from tandem_protocol.errors import error_body, error_code
from tandem_protocol.openai_api.limits import Ticket
from tandem_protocol.openai_api.middleware import install_error_handling
from tandem_protocol.openai_api.openapi import Limits, install_openapi
from tandem_protocol.openai_api.params import sampling_params
from tandem_protocol.openai_api.responses import API_ERRORS, Steps, check_model
from tandem_protocol.openai_api.routes import client_of, no_overrides, openai_routers
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest
from tandem_protocol.openai_api.webui import install_web_ui


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


WorkerDep = Annotated[ModelWorker, Depends(get_worker)]


async def known_session(session_id: str, worker: WorkerDep) -> None:
    """404 for an unknown session before its body is read: what a request says matters only to a live one."""
    worker.sessions.get(session_id)


SessionDep = Depends(known_session)


class CloudOpenAI:
    """The OpenAI routes' side here: the target alone, one generation per choice, batched by the worker."""

    def __init__(self, settings: ServerSettings, worker: ModelWorker) -> None:
        self.settings, self.worker = settings, worker
        self.served_name, self.api_keys = settings.served_model_name, settings.api_keys
        self.tokenizer, self.gate, self.metrics = worker.target.tokenizer, worker.gate, worker.metrics

    def card(self) -> dict[str, Any]:
        return {"max_model_len": self.worker.target.context_length}

    def choices(self, body: CompletionRequest | ChatRequest, ids: list[int],
                max_tokens: int | None) -> list[SamplingParams]:
        target = self.worker.target
        check_model(body, self.served_name, target.name)
        return sampling_params(body, max_tokens, len(ids), target.context_length, self.settings.max_tokens_limit)

    async def start(self, ids: list[int], params: SamplingParams, ticket: Ticket, overrides: None) -> Generation:
        return await self.worker.start_generation(ids, params, ticket)

    def figures(self, gens: Sequence[Steps]) -> dict[str, Any]:
        return {}


def get_openai(request: Request) -> CloudOpenAI:
    return request.app.state.openai


OpenAIDep = Annotated[CloudOpenAI, Depends(get_openai)]


def get_client(request: Request, openai: OpenAIDep) -> str:
    return client_of(request, openai)


ClientDep = Annotated[str, Depends(get_client)]
public, api = openai_routers(get_openai, no_overrides, API_ERRORS)


# --- health and metrics


_READINESS = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string"}, "model": {"type": "string"}}, "required": ["status"],
}}}}


@public.get("/ready", responses={200: _READINESS, 503: _READINESS | {"description": "the model is not loaded yet"}})
async def ready(worker: WorkerDep) -> JSONResponse:
    if worker.ready:
        return JSONResponse({"status": "ready", "model": worker.target.name})
    return JSONResponse({"status": "not ready"}, status_code=503)


# --- verification sessions


@api.post("/v1/sessions")
async def open_session(body: OpenBody, worker: WorkerDep, client: ClientDep) -> OpenedBody:
    info = await worker.open_session(bodies.open_from_body(body), client)
    return bodies.opened_to_body(info)


@api.post("/v1/sessions/{session_id}/verify", dependencies=[SessionDep])
async def verify(session_id: str, body: DraftBody, worker: WorkerDep, client: ClientDep) -> VerdictBody:
    verdict = await worker.verify(session_id, body.seq, bodies.draft_from_body(body), body.base_len, client)
    return bodies.verdict_to_body(verdict)


@api.post("/v1/sessions/{session_id}/continue", response_class=StreamingResponse, dependencies=[SessionDep],
          responses={200: {"content": {"text/event-stream": {}}, "description": "SSE: one `StepBody` per target "
                           "step, then `[DONE]`; a failure mid-stream is an event with `error`"}})
async def continue_session(session_id: str, body: ContinueBody, worker: WorkerDep,
                           client: ClientDep) -> StreamingResponse:
    async with worker.gate.admit(client) as ticket:  # the generation holds it on while it streams
        gen = await worker.continue_generation(session_id, body.prompt, ticket)
    return StreamingResponse(_steps(gen), media_type="text/event-stream")


async def _steps(gen: Generation) -> AsyncIterator[str]:
    try:
        async for result in gen:
            step = StepBody(token_ids=result.tokens, finish_reason=result.finish_reason, generated=gen.tokens,
                            logprobs=bodies.logprobs_to_body(result.logprobs))
            yield f"data: {step.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line is sent: the error goes in the stream
        yield f"data: {json.dumps(error_body(error_code(e), str(e)))}\n\n"
    finally:
        gen.close()


@api.delete("/v1/sessions/{session_id}")
async def close_session(session_id: str, worker: WorkerDep) -> ClosedBody:
    """`closed` false: its client had ended it already (closing is idempotent)."""
    return ClosedBody(session_id=session_id, closed=await worker.close_session(session_id))


# --- wiring


def create_app(settings: ServerSettings, worker: ModelWorker) -> FastAPI:
    app = FastAPI(title="tandem cloud verifier", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.worker = worker
    app.state.created = int(time.time())
    app.state.openai = CloudOpenAI(settings, worker)
    app.include_router(public)
    app.include_router(api)
    install_web_ui(app, "cloud")
    install_error_handling(app, settings.max_body_bytes, worker.metrics)
    t = worker.target
    install_openapi(app, Limits(t.vocab_size, t.context_length, settings.max_tokens_limit, settings.max_prompt_tokens,
                                settings.max_draft_tokens), secured=bool(settings.api_keys))
    return app
