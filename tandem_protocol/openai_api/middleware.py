"""The HTTP error contract both servers keep: JSON errors with clear statuses, a body limit, request counting."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.errors import TandemError
from tandem_protocol.errors import ShuttingDownError, error_body, http_status
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.limits import retry_after


def _json_error(code: str, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status or http_status(code))


class BodyLimit:
    """413 for a request body over the limit, declared or streamed; the body is read once and replayed. Then it
    watches the connection: a client that leaves before its response is complete cancels its request, streaming or
    not (its generation stops and frees its slot; `scope["tandem.gone"]` is set)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

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
        return await self._watched(scope, b"".join(chunks), receive, send)

    async def _watched(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the app in this task; a side task owns `receive` and cancels this task when the client leaves."""
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        started = complete = False

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            # after a complete response the server reports a "disconnect" too: only a client gone before it counts
            if not complete:
                gone.set()
                task.cancel()

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watched_send(message: Message) -> None:
            nonlocal started, complete
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, watched_send)
        except asyncio.CancelledError:
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()  # handled here: the server goes on
            if gone.is_set():  # there is no one to answer
                scope["tandem.gone"] = True
                self.metrics.cancelled.labels(reason="client_gone").inc()
            elif not started:  # cancelled by a stopping server: the client still gets an answer
                stopping = ShuttingDownError("the server is shutting down; the request was cancelled")
                response = await _on_tandem_error(Request(scope), stopping)
                await response(scope, replay, send)
            elif not complete:  # a stream cut short: ended, with no [DONE]
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            complete = True
            watcher.cancel()


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
            code = "499" if scope.get("tandem.gone") else str(status)  # nginx's "client closed request"
            self.metrics.requests.labels(route=f"{scope['method']} {path}", status=code).inc()


async def _on_tandem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TandemError)
    response = _json_error(exc.code, str(exc))
    wait = retry_after(exc)
    if wait is not None:
        response.headers["Retry-After"] = str(wait)
    return response


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _json_error("invalid_request", "invalid request: " + "; ".join(_describe(e) for e in exc.errors()[:5]))


def _describe(error: dict[str, Any]) -> str:
    loc = list(error.get("loc", ()))
    path = ".".join(str(x) for x in (loc[1:] if loc[:1] == ["body"] else loc))
    if error.get("type") == "extra_forbidden":
        return f"{path}: this server does not implement this field"
    return f"{path}: {error.get('msg', '')}"


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail))
    if exc.status_code < 500:  # not an "internal_error" type: e.g. a body that is not JSON
        body["error"]["type"] = "invalid_request_error"
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)  # a 405's `Allow`


async def _on_internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _json_error("internal_error", f"internal error: {type(exc).__name__}")


def install_error_handling(app: FastAPI, max_body_bytes: int, metrics: Metrics) -> None:
    """JSON errors with clear statuses, the body limit and request counting (shared with the edge's endpoint)."""
    app.add_exception_handler(TandemError, _on_tandem_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_internal_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the 413s too


