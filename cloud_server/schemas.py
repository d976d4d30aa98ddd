"""HTTP request and response bodies: the OpenAI-compatible API and the verification-session API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenId = Annotated[int, Field(ge=0, lt=2**31)]


# --- verification sessions (the proto's semantics, as JSON)


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    ignore_eos: bool = False


class OpenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: list[TokenId]
    sampling: SamplingBody = Field(default_factory=SamplingBody)
    draft_fingerprint: str = ""
    draft_name: str = ""
    client_id: str = ""
    session_id: str | None = None


class OpenedBody(BaseModel):
    session_id: str
    target_name: str
    target_fingerprint: str
    vocab_size: int
    context_length: int
    prompt_tokens: int
    max_draft_tokens: int
    resumed: bool
    eos_token_ids: list[int]
    server_ms: float = 0.0


class CandidateBody(BaseModel):
    """A continuation verified beside the draft (greedy only): it follows tokens[parent] (-1: the context)."""

    model_config = ConfigDict(extra="forbid")

    parent: Annotated[int, Field(ge=-1)]
    tokens: list[TokenId]


class DraftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: Annotated[int, Field(ge=0)]
    tokens: list[TokenId] = Field(default_factory=list)
    q_k: Annotated[int, Field(ge=0)] = 0
    q_ids: list[TokenId] = Field(default_factory=list)
    q_probs: list[float] = Field(default_factory=list)
    base_len: Annotated[int, Field(ge=0)] | None = None  # pipelined rounds: see the proto's Draft.base_len
    candidates: list[CandidateBody] = Field(default_factory=list)  # see the proto's Draft.candidate_parents


class VerdictBody(BaseModel):
    seq: int
    num_accepted: int
    next_token: int
    kind: Literal["recovered", "bonus"]
    tokens: list[int]
    finish_reason: Literal["stop", "length"] | None
    target_tokens: list[int]
    generated: int
    stale: bool = False
    server_ms: float = 0.0
    candidate: int | None = None  # the index of the draft's candidate on the accepted path
    candidate_target_tokens: list[list[int]] = Field(default_factory=list)  # per candidate: the target's argmax


class ClosedBody(BaseModel):
    session_id: str
    closed: bool = True


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
