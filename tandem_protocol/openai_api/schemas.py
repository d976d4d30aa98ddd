"""Request bodies of the OpenAI-compatible API, and the error body every route answers with.

Every field declared here is implemented; any other field is refused with a 400 that names it (`extra="forbid"`),
so a client never gets a 200 that silently ignored what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.sampling import MAX_LOGPROBS, MIN_REPETITION_PENALTY  # MAX_LOGPROBS: 20, as OpenAI's chat API allows
from tandem_protocol.bodies import JSON_INT, Flag, Float, TokenId


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorBody(BaseModel):
    """Every error, on every route: {"error": {"message", "type", "code"}}."""

    error: ErrorDetail


# --- OpenAI-compatible


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: Flag | None = None  # the output always follows the schema: enforced whether or not it is set


class ResponseFormat(BaseModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (an object following the schema)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """An extension, as vLLM's `structured_outputs`: one of a JSON schema, a regular expression, a Lark grammar or
    a list of choices constrains the output (none set: no constraint)."""

    model_config = ConfigDict(extra="forbid")

    json_: Annotated[dict[str, Any] | None, Field(alias="json")] = None
    regex: Annotated[str, Field(min_length=1)] | None = None
    grammar: Annotated[str, Field(min_length=1)] | None = None  # Lark syntax, as llguidance reads it
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None


Penalty = Annotated[Float, Field(ge=-2.0, le=2.0)]


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not implement is a 400 naming it, never ignored

    model: str
    temperature: Annotated[Float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, lt=2**31), JSON_INT] | None = None  # vLLM's too; bounded: the wire
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None  # an extension (vLLM's)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[Float, Field(ge=MIN_REPETITION_PENALTY, le=10.0)] | None = None  # vLLM's too
    # token id (as a string, as OpenAI's) -> bias added to its logit
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[Float, Field(ge=-100, le=100)]] | None \
        = None
    n: Annotated[int, Field(ge=1, le=16), JSON_INT] = 1
    stream: Flag = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63), JSON_INT] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    ignore_eos: Flag = False  # an extension, for benchmarks
    return_token_ids: Flag = False  # an extension (as vLLM's): each choice also carries its `token_ids`
    # an extension: the response carries `metrics.speculative_decoding` (and the final SSE chunk does)
    return_metrics: Flag = False
    # an extension: each choice (each SSE chunk's) carries `tandem: {origins, pieces, rounds}`, where each token came
    # from (d draft, b a sibling, p pool, t target, e the draft alone), its text, and the verified blocks its tokens
    # end: [{nodes, chain, accepted, branch, tokens}] (docs/api.md, "Where each token came from")
    return_token_origins: Flag = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Flag = False


class CompletionRequest(_OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] \
        | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1), JSON_INT] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), JSON_INT] | None = None  # the target's top-k per token


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1), JSON_INT] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_INT] | None = None
    logprobs: Flag = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), JSON_INT] | None = None


_OpenAIRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatMessage.model_rebuild()
ChatRequest.model_rebuild()
