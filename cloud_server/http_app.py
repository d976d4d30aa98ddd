"""The HTTP face: an OpenAI-compatible API (the target alone), verification sessions, health and metrics.

Routes convert JSON to engine calls on the worker and back; the worker owns the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from cloud_server.errors import (
    BEARER_HEADER,
    ModelNotFoundError,
    error_body,
    http_status,
    require_bearer,
)
from cloud_server.metrics import Metrics
from cloud_server.schemas import (
    ChatRequest,
    ClosedBody,
    CompletionRequest,
    DraftBody,
    ErrorBody,
    OpenBody,
    OpenedBody,
    VerdictBody,
)
from cloud_server.settings import ServerSettings
from cloud_server.text import IncrementalText, chat_prompt, encode, message_text
from cloud_server.wire import sparse_block
from cloud_server.worker import ModelWorker, OpenRequest
from tandem.engine import Candidate, FinishReason
from tandem.errors import InvalidRequestError, TandemError
from tandem.sampling import SamplingParams


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


WorkerDep = Annotated[ModelWorker, Depends(get_worker)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]


# declares the scheme in the OpenAPI schema only; require_bearer checks the header itself
BEARER_SCHEME = HTTPBearer(auto_error=False, description="one of the server's API keys (when it has any)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON errors a route may answer with (400 replaces FastAPI's 422)."""
    return {status: {"model": ErrorBody} for status in statuses}


API_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 503)
# a JSON object, or with "stream": true an SSE stream
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}},
}


async def require_api_key(request: Request, settings: SettingsDep, _: BearerDep) -> None:
    require_bearer(request.headers.get("authorization", ""), settings.api_keys, BEARER_HEADER)


public = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=API_ERRORS)


# --- health and metrics


@public.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/ready", responses=error_responses(503))
async def ready(worker: WorkerDep) -> JSONResponse:
    if worker.ready:
        return JSONResponse({"status": "ready", "model": worker.target.name})
    return JSONResponse({"status": "not ready"}, status_code=503)


@public.get("/metrics", response_class=PlainTextResponse)
async def metrics(worker: WorkerDep) -> Response:
    return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# --- verification sessions


@api.post("/v1/sessions")
async def open_session(body: OpenBody, worker: WorkerDep) -> OpenedBody:
    s = body.sampling
    params = SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
    )
    req = OpenRequest(body.prompt, params, body.draft_fingerprint, body.draft_name, body.client_id, body.session_id)
    info = await worker.open_session(req)
    return OpenedBody(**{**dataclasses.asdict(info), "eos_token_ids": list(info.eos_token_ids)})


@api.post("/v1/sessions/{session_id}/verify")
async def verify(session_id: str, body: DraftBody, worker: WorkerDep) -> VerdictBody:
    block = sparse_block(body.tokens, body.q_k, body.q_ids, body.q_probs)
    block.candidates = [Candidate(c.parent, c.tokens) for c in body.candidates]
    v = await worker.verify(session_id, body.seq, block, body.base_len)
    r = v.result
    return VerdictBody(
        seq=v.seq, num_accepted=r.num_accepted, next_token=r.next_token, kind=r.kind, tokens=r.tokens,
        finish_reason=r.finish_reason, target_tokens=r.target_tokens, generated=v.generated, stale=r.stale,
        server_ms=v.server_ms, candidate=r.candidate, candidate_target_tokens=r.candidate_target_tokens,
    )


@api.delete("/v1/sessions/{session_id}")
async def close_session(session_id: str, worker: WorkerDep) -> ClosedBody:
    await worker.close_session(session_id)
    return ClosedBody(session_id=session_id)


# --- OpenAI-compatible: the target alone


@api.get("/v1/models")
async def models(worker: WorkerDep, settings: SettingsDep, request: Request) -> dict[str, Any]:
    card = {
        "id": settings.served_model_name, "object": "model", "created": request.app.state.created,
        "owned_by": "tandem", "max_model_len": worker.target.context_length,
    }
    return {"object": "list", "data": [card]}


@api.post("/v1/completions", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, worker: WorkerDep, settings: SettingsDep) -> Response:
    ids = await completion_prompt(body, worker.target.tokenizer)
    return await _complete(worker, settings, body, ids, body.max_tokens, "text")


@api.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatRequest, worker: WorkerDep, settings: SettingsDep) -> Response:
    ids = await chat_completion_prompt(body, worker.target.tokenizer)
    return await _complete(worker, settings, body, ids, body.max_completion_tokens or body.max_tokens, "chat")


async def completion_prompt(body: CompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await asyncio.to_thread(encode, tokenizer, prompt)
    return list(prompt)  # type: ignore[arg-type]


async def chat_completion_prompt(body: ChatRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
    return await asyncio.to_thread(chat_prompt, tokenizer, messages)


def sampling_params(body: CompletionRequest | ChatRequest, max_tokens: int | None, prompt_len: int,
                    context_length: int, max_tokens_limit: int) -> SamplingParams:
    if body.n != 1:
        raise InvalidRequestError("only n = 1 is supported")
    if max_tokens is None:
        max_tokens = max(1, min(max_tokens_limit, context_length - prompt_len))
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def check_model(body: CompletionRequest | ChatRequest, served: str, *aliases: str) -> None:
    if body.model not in (served, *aliases):
        raise ModelNotFoundError(f"model {body.model!r} is not served here; this server serves {served!r}")


async def _complete(
    worker: ModelWorker, settings: ServerSettings, body: CompletionRequest | ChatRequest, ids: list[int],
    max_tokens: int | None, kind: Literal["text", "chat"],
) -> Response:
    check_model(body, settings.served_model_name, worker.target.name)
    params = sampling_params(body, max_tokens, len(ids), worker.target.context_length, settings.max_tokens_limit)
    gen = await worker.start_generation(ids, params)
    return await completion_response(gen, worker.target.tokenizer, body, kind, settings.served_model_name, len(ids),
                                     metrics=worker.metrics)


class Step(Protocol):
    @property
    def tokens(self) -> list[int]: ...

    @property
    def finish_reason(self) -> FinishReason | None: ...


class Steps(Protocol):
    """A running generation as the completion API consumes it: async steps, a token count, close()."""

    tokens: int

    def __aiter__(self) -> AsyncIterator[Step]: ...

    def close(self) -> None: ...


async def completion_response(
    gen: Steps, tokenizer: PreTrainedTokenizerBase, body: CompletionRequest | ChatRequest,
    kind: Literal["text", "chat"], model: str, prompt_tokens: int,
    extra: Callable[[], dict[str, Any]] | None = None, metrics: Metrics | None = None,
) -> Response:
    """The OpenAI response (JSON, or SSE ending in `data: [DONE]`) for a started generation; closes it."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    text = IncrementalText(tokenizer, stop)
    out = _Output(kind, model, prompt_tokens, body.return_token_ids)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(gen, text, out, include_usage, metrics), media_type="text/event-stream")
    parts, ids = [], []
    finish: FinishReason = "length"
    try:
        async for delta, finish_reason, tokens in _deltas(gen, text):
            parts.append(delta)
            ids.extend(tokens)
            finish = finish_reason or finish
    finally:
        gen.close()
    return JSONResponse(out.full("".join(parts), finish, gen.tokens, ids) | (extra() if extra else {}))


async def _deltas(gen: Steps, text: IncrementalText) -> AsyncIterator[tuple[str, FinishReason | None, list[int]]]:
    """(text delta, finish reason once finished, token ids) per step; stops early at a stop string."""
    async for result in gen:
        delta = text.push(result.tokens)
        if text.stopped:
            yield delta, "stop", result.tokens
            return
        if result.finish_reason is not None:
            yield delta + text.flush(), result.finish_reason, result.tokens
            return
        yield delta, None, result.tokens


async def _sse(gen: Steps, text: IncrementalText, out: _Output, include_usage: bool,
               metrics: Metrics | None = None) -> AsyncIterator[str]:
    try:
        if out.kind == "chat":
            yield _event(out.chunk("", None, role=True))
        finish: FinishReason = "length"
        async for delta, finish_reason, tokens in _deltas(gen, text):
            finish = finish_reason or finish
            if delta or (tokens and out.token_ids):
                yield _event(out.chunk(delta, None, tokens))
        yield _event(out.chunk("", finish))
        if include_usage:
            yield _event({**out.chunk("", None), "choices": [], "usage": out.usage(gen.tokens)})
    except TandemError as e:
        yield _event(error_body(e.code, str(e)))
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: close() frees the generation
        if metrics is not None:
            metrics.disconnects.labels(route="http sse").inc()
        raise
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Output:
    """OpenAI response objects for one completion."""

    def __init__(self, kind: Literal["text", "chat"], model: str, prompt_tokens: int, token_ids: bool = False) -> None:
        self.kind = kind
        self.token_ids = token_ids
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish: FinishReason, completion_tokens: int, ids: list[int]) -> dict[str, Any]:
        if self.kind == "text":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        if self.token_ids:
            choice["token_ids"] = ids
        obj = "text_completion" if self.kind == "text" else "chat.completion"
        return {**self._head(obj), "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, delta: str, finish: FinishReason | None, ids: list[int] | None = None,
              role: bool = False) -> dict[str, Any]:
        if self.kind == "text":
            choice: dict[str, Any] = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        else:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        if self.token_ids and ids:
            choice["token_ids"] = ids
        obj = "text_completion" if self.kind == "text" else "chat.completion.chunk"
        return {**self._head(obj), "choices": [choice]}


# --- wiring


def _json_error(code: str, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status or http_status(code))


class BodyLimit:
    """413 for a request body over the limit, declared or streamed; the body is read once and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _json_error("request_too_large", f"the request body exceeds {self.max_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


class RequestMetrics:
    """Counts requests by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=f"{scope['method']} {path}", status=str(status)).inc()


async def _on_tandem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TandemError)
    return _json_error(exc.code, str(exc))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]]
    return _json_error("invalid_request", "invalid request: " + "; ".join(parts))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail))
    if exc.status_code < 500:  # not an "internal_error" type: e.g. a body that is not JSON
        body["error"]["type"] = "invalid_request_error"
    return JSONResponse(body, status_code=exc.status_code)


async def _on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _json_error("internal_error", f"internal error: {type(exc).__name__}")


def install_error_handling(app: FastAPI, max_body_bytes: int, metrics: Metrics) -> None:
    """JSON errors with clear statuses, the body limit and request counting (shared with the edge's endpoint)."""
    app.add_exception_handler(TandemError, _on_tandem_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_internal_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the 413s too


def create_app(settings: ServerSettings, worker: ModelWorker) -> FastAPI:
    app = FastAPI(title="tandem cloud verifier", docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.worker = worker
    app.state.created = int(time.time())
    app.include_router(public)
    app.include_router(api)
    install_error_handling(app, settings.max_body_bytes, worker.metrics)
    return app
