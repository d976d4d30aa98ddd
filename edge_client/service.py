"""The edge endpoint's worker: the draft model on one thread, running the speculative loop per request; tokens reach
the event loop through a queue, and a client that leaves stops its generation at the next token."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_client.client import EdgeClient
from edge_client.settings import EdgeSettings
from tandem.blocks import TokenLogprob
from tandem.messages import Step
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.stats import GenerationResult, GenerationStats
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.figures import edge_metrics


class EdgeService:
    """The draft model, its one thread, and the client that talks to the cloud."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel) -> None:
        self.settings = settings
        self.draft = draft
        self.client = EdgeClient(settings, draft)
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-edge-draft")

    async def start(self, prompt: list[int], params: SamplingParams) -> EdgeGeneration:
        gen = EdgeGeneration(self, prompt, params)
        await gen.start()
        return gen


class EdgeGeneration:
    """One request on the draft thread; its tokens reach the event loop through a queue."""

    def __init__(self, service: EdgeService, prompt: list[int], params: SamplingParams) -> None:
        self.service = service
        self.prompt = prompt
        self.params = params
        self.tokens = 0
        self.result: GenerationResult | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._first: tuple[str, Any] | None = None
        self._cancel = threading.Event()
        self._t0 = time.perf_counter()
        self._logprobs: list[TokenLogprob] | None = None  # the next tokens' (set on the draft thread just before)
        self.stats = GenerationStats("")  # filled by the loop as it runs: read even when the request stops early

    def _put(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _job(self) -> None:
        m = self.service.metrics
        try:
            result = self.service.client.generate(
                self.prompt, self.params, on_tokens=self._on_tokens, on_round=m.observe_verify,
                cancelled=self._cancel.is_set, on_logprobs=self._on_logprobs, stats=self.stats,
            )
            self._put("done", result)
        except BaseException as e:
            self._put("error", e)

    def _on_logprobs(self, logprobs: list[TokenLogprob]) -> None:
        self._logprobs = logprobs

    def _on_tokens(self, tokens: list[int]) -> None:
        self._put("tokens", (tokens, self._logprobs))
        self._logprobs = None

    def speculative_metrics(self) -> dict[str, object]:
        """This request's figures so far (a stop string may end it before the loop does)."""
        return edge_metrics(self.stats)

    async def start(self) -> None:
        """Run the request; return once its first token (or its failure: a clear status) is known."""
        self._loop.run_in_executor(self.service.executor, self._job)
        try:
            self._first = await self._queue.get()
        except asyncio.CancelledError:  # the request was dropped before its first token: stop the draft thread too
            self._cancel.set()
            raise
        if self._first[0] == "error":
            raise self._first[1]

    async def __aiter__(self) -> AsyncIterator[Step]:
        m = self.service.metrics
        while True:
            kind, value = self._first or await self._queue.get()
            self._first = None
            if kind == "tokens":
                tokens, logprobs = value
                if self.tokens == 0:
                    m.ttft.observe(time.perf_counter() - self._t0)
                self.tokens += len(tokens)
                m.generation_tokens.inc(len(tokens))
                yield Step(tokens, None, logprobs)
            elif kind == "done":
                self.result = value
                yield Step([], value.finish_reason)
                return
            else:
                raise value

    def close(self) -> None:
        self._cancel.set()  # the draft thread stops at its next token
