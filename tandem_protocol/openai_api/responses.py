"""OpenAI-compatible completions, shared by the cloud's API (the target alone) and the edge's endpoint (speculative):
prompts from requests, sampling parameters, and the response (JSON, or SSE ending in `data: [DONE]`) for a running
generation. Text is decoded incrementally on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

from fastapi import Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from transformers import PreTrainedTokenizerBase

from tandem.blocks import FinishReason, TokenLogprob
from tandem.errors import InvalidRequestError, TandemError
from tandem.stats import RoundShape
from tandem_protocol.errors import ModelNotFoundError, error_body
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.figures import LogprobFormat, merged_metrics
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest, ErrorBody
from tandem_protocol.openai_api.text import IncrementalText, chat_prompt, encode, message_text

# declares the scheme in the OpenAPI schema only; require_bearer checks the header itself
BEARER_SCHEME = HTTPBearer(auto_error=False, description="one of the server's API keys (when it has any)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON errors a route may answer with (400 replaces FastAPI's 422)."""
    return {status: {"model": ErrorBody} for status in statuses}


# 429 and 503 carry `Retry-After`; 504: past the server's wall-time limit
API_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 503, 504)
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
        return _or_start(await asyncio.to_thread(encode, tokenizer, prompt), tokenizer)
    return list(prompt)  # type: ignore[arg-type]


async def chat_completion_prompt(body: ChatRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
    return _or_start(await asyncio.to_thread(chat_prompt, tokenizer, messages), tokenizer)


def _or_start(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """An empty text prompt starts a document, as OpenAI's completions do: the tokenizer's beginning-of-sequence
    token, else its end-of-sequence one (GPT-2's `<|endoftext|>`)."""
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InvalidRequestError("the prompt is empty, and this tokenizer has no token to start a document")
    return [int(start)]


def check_model(body: CompletionRequest | ChatRequest, served: str, *aliases: str) -> None:
    if body.model not in (served, *aliases):
        raise ModelNotFoundError(f"model {body.model!r} is not served here; this server serves {served!r}")


class Emitted(Protocol):
    """What a generation step gives the API: the edge's `tandem.messages.Step`, the cloud's `VerifyResult`."""

    @property
    def tokens(self) -> list[int]: ...

    @property
    def finish_reason(self) -> FinishReason | None: ...

    @property
    def logprobs(self) -> list[TokenLogprob] | None: ...


class Steps(Protocol):
    """A running generation as the completion API consumes it: async steps, a token count, its speculative
    figures (`speculative_metrics`, the counts of `tandem_protocol.openai_api.figures`), close()."""

    tokens: int

    def __aiter__(self) -> AsyncIterator[Emitted]: ...

    def speculative_metrics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


async def completion_response(
    gens: Sequence[Steps], tokenizer: PreTrainedTokenizerBase, body: CompletionRequest | ChatRequest,
    kind: Literal["text", "chat"], model: str, prompt_tokens: int,
    extra: Callable[[], dict[str, Any]] | None = None, metrics: Metrics | None = None,
) -> Response:
    """The OpenAI response (JSON, or SSE ending in `data: [DONE]`) for started generations, one per choice; closes
    them."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    out = _Output(kind, model, prompt_tokens, body.return_token_ids, tokenizer, body.return_token_origins)
    choices = [_Choice(i, gen, IncrementalText(tokenizer, stop), out.marked) for i, gen in enumerate(gens)]
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(choices, out, include_usage, body.return_metrics, metrics),
                                 media_type="text/event-stream")
    try:
        await asyncio.gather(*(c.run_whole() for c in choices))
    finally:
        for c in choices:
            c.gen.close()
    full = out.full(choices)
    if body.return_metrics:
        full["metrics"] = merged_metrics([c.gen for c in choices])
    return JSONResponse(full | (extra() if extra else {}))


# `return_token_origins`: per token where it came from (`tandem.stats.GenerationStats.origins`), and the text it
# released; the pieces partition the delta (one more, unmarked, when the end releases text held back before); the
# verified blocks the tokens end, each `tandem.stats.RoundShape`'s fields (none: not speculative)
Marks = tuple[str, list[str], list[dict[str, int]]]
Delta = tuple[str, FinishReason | None, list[int], list[TokenLogprob] | None, Marks | None]


class _Choice:
    """One choice: its generation, its text so far, what it emitted."""

    def __init__(self, index: int, gen: Steps, text: IncrementalText, marked: bool = False) -> None:
        self.index = index
        self.gen = gen
        self.text = text
        self.marked = marked
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.has_logprobs = False
        self.origins = ""
        self.pieces: list[str] = []
        self.rounds: list[dict[str, int]] = []
        self.finish: FinishReason = "length"

    def _push(self, tokens: list[int], origins: str, shapes: tuple[RoundShape, ...]) -> tuple[str, Marks | None]:
        if not self.marked:
            return self.text.push(tokens), None
        pieces = [self.text.push([t]) for t in tokens]
        return "".join(pieces), (origins, pieces, [s._asdict() for s in shapes])

    async def deltas(self) -> AsyncIterator[Delta]:
        """(text delta, finish reason once finished, token ids, their logprobs, their marks) per step; stops at a stop
        string."""
        async for result in self.gen:
            # the edge's steps say where each token came from; the target alone's are all its own
            origins = getattr(result, "origins", None) or "t" * len(result.tokens)
            # decoding stays off the event loop
            shapes = getattr(result, "shapes", ())
            delta, marks = await asyncio.to_thread(self._push, result.tokens, origins, shapes)
            if self.text.stopped:
                yield delta, "stop", result.tokens, result.logprobs, marks
                return
            if result.finish_reason is not None:
                tail = await asyncio.to_thread(self.text.flush)
                if tail and marks is not None:
                    marks[1].append(tail)
                yield delta + tail, result.finish_reason, result.tokens, result.logprobs, marks
                return
            yield delta, None, result.tokens, result.logprobs, marks

    async def run_whole(self) -> None:
        async for delta, finish, tokens, logprobs, marks in self.deltas():
            self.parts.append(delta)
            self.ids.extend(tokens)
            if logprobs is not None:
                self.has_logprobs = True
                self.logprobs.extend(logprobs)
            if marks is not None:
                self.origins += marks[0]
                self.pieces += marks[1]
                self.rounds += marks[2]
            self.finish = finish or self.finish


async def _sse(choices: list[_Choice], out: _Output, include_usage: bool, return_metrics: bool,
               metrics: Metrics | None = None) -> AsyncIterator[str]:
    events: asyncio.Queue[tuple[_Choice, Any] | None] = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            async for item in c.deltas():
                await events.put((c, item))
        except TandemError as e:
            await events.put((c, e))
        finally:
            await events.put(None)

    tasks: list[asyncio.Task[None]] = []
    try:
        if out.kind == "chat":
            for c in choices:
                yield _event(out.chunk(c.index, "", None, role=True))
        tasks = [asyncio.create_task(pump(c)) for c in choices]
        running = len(tasks)
        while running:
            event = await events.get()
            if event is None:
                running -= 1
                continue
            c, item = event
            if isinstance(item, TandemError):
                yield _event(error_body(item.code, str(item)))
                continue
            delta, finish, tokens, logprobs, marks = item
            c.finish = finish or c.finish
            if delta or (tokens and (out.token_ids or out.marked or logprobs is not None)):
                yield _event(out.chunk(c.index, delta, None, tokens, logprobs, marks=marks))
        for c in choices:
            yield _event(out.chunk(c.index, "", c.finish))
        tail: dict[str, Any] = {}
        if include_usage:
            tail["usage"] = out.usage(sum(c.gen.tokens for c in choices))
        if return_metrics:
            tail["metrics"] = merged_metrics([c.gen for c in choices])
        if tail:
            yield _event({**out.head(), "choices": [], **tail})
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: close() frees the generations
        if metrics is not None:
            metrics.disconnects.labels(route="http sse").inc()
        raise
    finally:
        for task in tasks:
            task.cancel()
        for c in choices:
            c.gen.close()
    yield "data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Output:
    """OpenAI response objects for one completion."""

    def __init__(self, kind: Literal["text", "chat"], model: str, prompt_tokens: int, token_ids: bool,
                 tokenizer: PreTrainedTokenizerBase, marked: bool = False) -> None:
        self.kind = kind
        self.token_ids = token_ids
        self.marked = marked
        self.logprobs = LogprobFormat(tokenizer, kind)
        self.id = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def head(self) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "text" else "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[_Choice]) -> dict[str, Any]:
        items = []
        for c in choices:
            text = "".join(c.parts)
            lp = self.logprobs.render(c.logprobs) if c.has_logprobs else None
            if self.kind == "text":
                choice: dict[str, Any] = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish}
            else:
                choice = {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                          "finish_reason": c.finish}
            if self.token_ids:
                choice["token_ids"] = c.ids
            if self.marked:
                choice["tandem"] = {"origins": c.origins, "pieces": c.pieces, "rounds": c.rounds}
            items.append(choice)
        obj = "text_completion" if self.kind == "text" else "chat.completion"
        return {**self.head(), "object": obj, "choices": items,
                "usage": self.usage(sum(c.gen.tokens for c in choices))}

    def chunk(self, index: int, delta: str, finish: FinishReason | None, ids: list[int] | None = None,
              logprobs: list[TokenLogprob] | None = None, role: bool = False,
              marks: Marks | None = None) -> dict[str, Any]:
        lp = None if logprobs is None else self.logprobs.render(logprobs)
        if self.kind == "text":
            choice: dict[str, Any] = {"index": index, "text": delta, "logprobs": lp, "finish_reason": finish}
        else:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}
        if self.token_ids and ids:
            choice["token_ids"] = ids
        if marks is not None:
            choice["tandem"] = {"origins": marks[0], "pieces": marks[1], "rounds": marks[2]}
        return {**self.head(), "choices": [choice]}
