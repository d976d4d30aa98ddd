"""Error codes both ways: a code to an HTTP status, a gRPC status and a JSON body (servers), and back (clients).

Plus the errors only a server raises, and the bearer-key check both servers apply.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc

from tandem.errors import TandemError


class UnauthenticatedError(TandemError):
    code = "unauthenticated"


class ModelNotFoundError(TandemError):
    code = "model_not_found"


class ShuttingDownError(TandemError):
    code = "unavailable"


# code -> (HTTP status, gRPC status, OpenAI-style error type); a gRPC status received reads as its first code here
_STATUS: dict[str, tuple[int, grpc.StatusCode, str]] = {
    "invalid_request": (400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    "context_length_exceeded": (400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    "unauthenticated": (401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"),
    "session_not_found": (404, grpc.StatusCode.NOT_FOUND, "not_found_error"),
    "model_not_found": (404, grpc.StatusCode.NOT_FOUND, "not_found_error"),
    "tokenizer_mismatch": (409, grpc.StatusCode.FAILED_PRECONDITION, "invalid_request_error"),
    "session_conflict": (409, grpc.StatusCode.ABORTED, "invalid_request_error"),
    "over_capacity": (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    "request_too_large": (413, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_request_error"),
    "unavailable": (503, grpc.StatusCode.UNAVAILABLE, "service_unavailable_error"),
    "deadline_exceeded": (504, grpc.StatusCode.DEADLINE_EXCEEDED, "service_unavailable_error"),  # upstream slow
    "tls_error": (502, grpc.StatusCode.UNAVAILABLE, "service_unavailable_error"),  # the edge refused the cloud's cert
}
_INTERNAL = (500, grpc.StatusCode.INTERNAL, "internal_error")


def http_status(code: str) -> int:
    return _STATUS.get(code, _INTERNAL)[0]


def grpc_status(code: str) -> grpc.StatusCode:
    return _STATUS.get(code, _INTERNAL)[1]


_FROM_GRPC = {status: code for code, (_, status, _) in reversed(_STATUS.items())}  # the first code wins


def code_from_grpc(status: grpc.StatusCode) -> str:
    return _FROM_GRPC.get(status, "internal_error")


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, TandemError) else "internal_error"


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _STATUS.get(code, _INTERNAL)[2], "code": code}}


BEARER_HEADER = "header `Authorization: Bearer <key>`"


def require_bearer(authorization: str, keys: list[str], how: str) -> None:
    """Raise UnauthenticatedError unless `authorization` is `Bearer <one of keys>`; compared in constant time."""
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
    # bytes: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500); every key is compared, no early exit
    given = token.strip().encode("utf-8", "surrogateescape")
    matched = False
    for k in keys:
        matched |= hmac.compare_digest(given, k.encode("utf-8"))
    if scheme.lower() != "bearer" or not matched:
        raise UnauthenticatedError(f"a valid API key is required ({how})")  # the same words whatever failed
