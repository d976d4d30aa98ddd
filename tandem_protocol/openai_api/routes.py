"""The OpenAI-compatible routes both servers serve, once: `/health`, `/metrics`, `/v1/models`, `/v1/completions` and
`/v1/chat/completions`. Each side supplies what generates (`Side`: the cloud's target alone, the edge's speculative
loop). No `from __future__ import annotations`: FastAPI reads the routes' annotations, which name the factory's own
dependencies.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from transformers import PreTrainedTokenizerBase

from tandem.sampling import SamplingParams
from tandem_protocol.errors import BEARER_HEADER, require_bearer
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.limits import Gate, Ticket, client_key
from tandem_protocol.openai_api.responses import (
    COMPLETION_RESPONSES,
    BearerDep,
    Steps,
    chat_completion_prompt,
    completion_prompt,
    completion_response,
)
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest


class Side(Protocol):
    """What a server supplies to the shared routes."""

    @property
    def served_name(self) -> str: ...

    @property
    def api_keys(self) -> Sequence[str]: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def metrics(self) -> Metrics: ...

    def card(self) -> dict[str, Any]:
        """`/v1/models`: this model's fields beyond id, object, created and owned_by."""

    def choices(self, body: CompletionRequest | ChatRequest, ids: list[int],
                max_tokens: int | None) -> list[SamplingParams]:
        """The request checked (model, limits, prompt), one sampling setting per choice."""

    async def start(self, ids: list[int], params: SamplingParams, ticket: Ticket, overrides: Any) -> Steps:
        """One generation started under the request's ticket; `overrides` is what the side's own dependency read."""

    def figures(self, gens: Sequence[Steps]) -> dict[str, Any]:
        """Extra fields of the final response ({} for none)."""


def openai_routers(get_side: Callable[..., Side], get_overrides: Callable[..., Any],
                   responses: dict[int | str, dict[str, Any]]) -> tuple[APIRouter, APIRouter]:
    """(public, api): health and metrics, and the OpenAI routes behind the side's keys. `get_overrides` is a
    FastAPI dependency (its parameters, e.g. headers, are documented on both completion routes)."""
    SideDep = Annotated[Side, Depends(get_side)]
    OverridesDep = Annotated[Any, Depends(get_overrides)]

    def get_client(request: Request, side: SideDep) -> str:
        return client_of(request, side)

    ClientDep = Annotated[str, Depends(get_client)]

    async def require_api_key(request: Request, side: SideDep, _: BearerDep) -> None:
        require_bearer(request.headers.get("authorization", ""), list(side.api_keys), BEARER_HEADER)

    public = APIRouter()
    api = APIRouter(dependencies=[Depends(require_api_key)], responses=responses)

    @public.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @public.get("/metrics", response_class=PlainTextResponse)
    async def metrics(side: SideDep) -> Response:
        return Response(side.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(side: SideDep, request: Request) -> dict[str, Any]:
        card = {"id": side.served_name, "object": "model", "created": request.app.state.created, "owned_by": "tandem",
                **side.card()}
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, side: SideDep, client: ClientDep,
                          overrides: OverridesDep) -> Response:
        ids = await completion_prompt(body, side.tokenizer)
        return await complete(side, body, ids, body.max_tokens, "text", client, overrides)

    @api.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
    async def chat_completions(body: ChatRequest, side: SideDep, client: ClientDep,
                               overrides: OverridesDep) -> Response:
        ids = await chat_completion_prompt(body, side.tokenizer)
        return await complete(side, body, ids, body.max_completion_tokens or body.max_tokens, "chat", client,
                              overrides)

    return public, api


async def complete(side: Side, body: CompletionRequest | ChatRequest, ids: list[int], max_tokens: int | None,
                   kind: Literal["text", "chat"], client: str, overrides: Any) -> Response:
    choices = side.choices(body, ids, max_tokens)
    gens: list[Steps] = []
    async with side.gate.admit(client) as ticket:  # one slot per request; its generations hold it while they run
        try:
            for params in choices:  # n > 1: one generation per choice
                gens.append(await side.start(ids, params, ticket, overrides))
        except BaseException:
            for gen in gens:
                gen.close()
            raise
        return await completion_response(gens, side.tokenizer, body, kind, side.served_name, len(ids),
                                         extra=lambda: side.figures(gens), metrics=side.metrics)


def client_of(request: Request, side: Side) -> str:
    """Whose share a request counts against (its key; on an open server its address)."""
    address = request.client.host if request.client is not None else ""
    return client_key(request.headers.get("authorization", ""), address, bool(side.api_keys))


def no_overrides() -> None:
    """A side whose requests take no per-request settings."""
    return None
