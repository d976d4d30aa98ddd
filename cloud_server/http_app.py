"""The HTTP face: an OpenAI-compatible API (the target alone), verification sessions, health and metrics.

Routes convert JSON to engine calls on the worker and back; the worker owns the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from cloud_server.settings import ServerSettings
from cloud_server.worker import Generation, ModelWorker
from tandem_protocol import bodies
from tandem_protocol.bodies import ClosedBody, ContinueBody, DraftBody, OpenBody, OpenedBody, StepBody, VerdictBody
from tandem_protocol.errors import BEARER_HEADER, error_body, error_code, require_bearer
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
)
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest
from tandem_protocol.openai_api.webui import install_web_ui


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


WorkerDep = Annotated[ModelWorker, Depends(get_worker)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]


def get_client(request: Request, settings: SettingsDep) -> str:
    """Whose share the request counts against (its key; on an open server its address)."""
    address = request.client.host if request.client is not None else ""
    return client_key(request.headers.get("authorization", ""), address, bool(settings.api_keys))


ClientDep = Annotated[str, Depends(get_client)]


async def require_api_key(request: Request, settings: SettingsDep, _: BearerDep) -> None:
    require_bearer(request.headers.get("authorization", ""), settings.api_keys, BEARER_HEADER)


async def known_session(session_id: str, worker: WorkerDep) -> None:
    """404 for an unknown session before its body is read: what a request says matters only to a live one."""
    worker.sessions.get(session_id)


SessionDep = Depends(known_session)


public = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=API_ERRORS)


# --- health and metrics


@public.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


_READINESS = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string"}, "model": {"type": "string"}}, "required": ["status"],
}}}}


@public.get("/ready", responses={200: _READINESS, 503: _READINESS | {"description": "the model is not loaded yet"}})
async def ready(worker: WorkerDep) -> JSONResponse:
    if worker.ready:
        return JSONResponse({"status": "ready", "model": worker.target.name})
    return JSONResponse({"status": "not ready"}, status_code=503)


@public.get("/metrics", response_class=PlainTextResponse)
async def metrics(worker: WorkerDep) -> Response:
    return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)


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


# --- OpenAI-compatible: the target alone


@api.get("/v1/models")
async def models(worker: WorkerDep, settings: SettingsDep, request: Request) -> dict[str, Any]:
    card = {
        "id": settings.served_model_name, "object": "model", "created": request.app.state.created,
        "owned_by": "tandem", "max_model_len": worker.target.context_length,
    }
    return {"object": "list", "data": [card]}


@api.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, worker: WorkerDep, settings: SettingsDep,
                      client: ClientDep) -> Response:
    ids = await completion_prompt(body, worker.target.tokenizer)
    return await _complete(worker, settings, body, ids, body.max_tokens, "text", client)


@api.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatRequest, worker: WorkerDep, settings: SettingsDep,
                           client: ClientDep) -> Response:
    ids = await chat_completion_prompt(body, worker.target.tokenizer)
    return await _complete(worker, settings, body, ids, body.max_completion_tokens or body.max_tokens, "chat",
                           client)


async def _complete(
    worker: ModelWorker, settings: ServerSettings, body: CompletionRequest | ChatRequest, ids: list[int],
    max_tokens: int | None, kind: Literal["text", "chat"], client: str,
) -> Response:
    check_model(body, settings.served_model_name, worker.target.name)
    choices = sampling_params(body, max_tokens, len(ids), worker.target.context_length, settings.max_tokens_limit)
    gens: list[Generation] = []
    async with worker.gate.admit(client) as ticket:  # one slot per request; its generations hold it while they run
        try:
            for params in choices:  # n > 1: one generation per choice, batched together by the worker
                gens.append(await worker.start_generation(ids, params, ticket))
        except BaseException:
            for gen in gens:
                gen.close()
            raise
        return await completion_response(gens, worker.target.tokenizer, body, kind, settings.served_model_name,
                                          len(ids), metrics=worker.metrics)


# --- wiring


def create_app(settings: ServerSettings, worker: ModelWorker) -> FastAPI:
    app = FastAPI(title="tandem cloud verifier", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.worker = worker
    app.state.created = int(time.time())
    app.include_router(public)
    app.include_router(api)
    install_web_ui(app, "cloud")
    install_error_handling(app, settings.max_body_bytes, worker.metrics)
    t = worker.target
    install_openapi(app, Limits(t.vocab_size, t.context_length, settings.max_tokens_limit, settings.max_prompt_tokens,
                                settings.max_draft_tokens), secured=bool(settings.api_keys))
    return app
