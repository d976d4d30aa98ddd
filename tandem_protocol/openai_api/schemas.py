"""Request bodies of the OpenAI-compatible API, and the error body every route answers with."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tandem_protocol.bodies import TokenId


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorBody(BaseModel):
    """Every error, on every route: {"error": {"message", "type", "code"}}."""

    error: ErrorDetail


# --- OpenAI-compatible


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields we do not implement are ignored, as OpenAI servers do

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: Annotated[int, Field(ge=0, lt=2**31)] | None = None  # an extension (vLLM has it too); bounded: the wire
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    ignore_eos: bool = False  # an extension, for benchmarks
    return_token_ids: bool = False  # an extension (as vLLM's): each choice also carries its `token_ids`


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
