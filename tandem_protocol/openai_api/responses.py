"""OpenAI-compatible completions, shared by the cloud's API (the target alone) and the edge's endpoint (speculative):
prompts from requests, sampling parameters, and the response (JSON, or SSE ending in `data: [DONE]`) for a running
generation. Text is decoded incrementally on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from transformers import PreTrainedTokenizerBase

from tandem.blocks import FinishReason
from tandem.errors import InvalidRequestError, TandemError
from tandem.sampling import SamplingParams
from tandem_protocol.errors import ModelNotFoundError, error_body
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest, ErrorBody
from tandem_protocol.openai_api.text import IncrementalText, chat_prompt, encode, message_text

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
        delta = await asyncio.to_thread(text.push, result.tokens)  # decoding stays off the event loop
        if text.stopped:
            yield delta, "stop", result.tokens
            return
        if result.finish_reason is not None:
            yield delta + await asyncio.to_thread(text.flush), result.finish_reason, result.tokens
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


