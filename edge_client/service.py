"""The edge endpoint's worker: the draft model on one thread, running the speculative loop per request; tokens reach
the event loop through a queue. A request that ends early (its client left, its wall time ran out, the server stops)
stops its generation: the loop stops at its next token or reconnect, and the call in flight to the cloud is cancelled
at once, so the cloud frees the session's cache now rather than at its TTL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_client.client import make_verifier
from edge_client.remote import GrpcVerifier, HttpVerifier
from edge_client.settings import EdgeSettings
from tandem.blocks import TokenLogprob
from tandem.config import Gamma, Mode
from tandem.messages import Step
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.speculate import Cancelled, SpeculativeDecoder
from tandem.stats import GenerationResult, GenerationStats
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.figures import edge_metrics
from tandem_protocol.openai_api.limits import Gate, Ticket


class EdgeService:
    """The draft model, its one thread, the client that talks to the cloud, and admission to the thread."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel) -> None:
        self.settings = settings
        self.draft = draft
        self.client = SpeculativeDecoder(settings, draft, self._connect)
        self.metrics = Metrics()
        s = settings
        self.gate = Gate(self.metrics, s.max_concurrent_requests, s.max_requests_per_key, s.max_queue,
                         s.max_queue_wait_s, s.max_request_s)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-edge-draft")
        self._lock = threading.Lock()
        self._running: EdgeGeneration | None = None  # on the draft thread now
        self._verifier: GrpcVerifier | HttpVerifier | None = None  # its connection to the cloud

    def _connect(self) -> GrpcVerifier | HttpVerifier:
        """On the draft thread: a connection for the running generation, unless it was cancelled (the loop calls
        this before each attempt: a cancelled request stops retrying)."""
        with self._lock:
            if self._running is not None and self._running.cancelled:
                raise Cancelled
            self._verifier = make_verifier(self.settings, self.draft)
            return self._verifier

    def _abort(self, gen: EdgeGeneration) -> None:
        with self._lock:
            if self._running is gen and self._verifier is not None:
                self._verifier.abort()

    async def start(self, prompt: list[int], params: SamplingParams, ticket: Ticket, mode: Mode | None = None,
                    gamma: Gamma | None = None) -> EdgeGeneration:
        """`mode`, `gamma`: this request's (default: the settings')."""
        gen = EdgeGeneration(self, prompt, params, ticket, mode, gamma)
        await gen.start()
        return gen

    def shutdown(self) -> None:
        """Stop the draft thread's queue; a generation still on it was cancelled already."""
        self.executor.shutdown(wait=False, cancel_futures=True)


class EdgeGeneration:
    """One request on the draft thread; its tokens reach the event loop through a queue."""

    def __init__(self, service: EdgeService, prompt: list[int], params: SamplingParams, ticket: Ticket,
                 mode: Mode | None = None, gamma: Gamma | None = None) -> None:
        ticket.share()
        self.ticket = ticket
        self.service = service
        self.prompt = prompt
        self.params = params
        self.mode, self.gamma = mode, gamma
        self.tokens = 0
        self.result: GenerationResult | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._first: tuple[str, Any] | None = None
        self._cancel = threading.Event()
        self._closed = False
        self._t0 = time.perf_counter()
        self._logprobs: list[TokenLogprob] | None = None  # the next tokens' (set on the draft thread just before)
        self._shapes = 0  # verified blocks already passed on with tokens
        self.stats = GenerationStats("")  # filled by the loop as it runs: read even when the request stops early

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _job(self) -> None:
        if self.cancelled:  # left while waiting for the draft thread: nothing to do, no cloud session to open
            self._put("error", Cancelled())
            return
        service, m = self.service, self.service.metrics
        with service._lock:
            service._running = self
        try:
            result = service.client.generate(
                self.prompt, self.params, on_tokens=self._on_tokens, on_round=m.observe_verify,
                cancelled=self._cancel.is_set, on_logprobs=self._on_logprobs, stats=self.stats, mode=self.mode,
                gamma=self.gamma,
            )
            self._put("done", result)
        except BaseException as e:
            self._put("error", e)
        finally:
            with service._lock:
                service._running = service._verifier = None

    def _on_logprobs(self, logprobs: list[TokenLogprob]) -> None:
        self._logprobs = logprobs

    def _on_tokens(self, tokens: list[int]) -> None:
        origins = self.stats.origins[len(self.stats.origins) - len(tokens):]  # the loop records them just before
        shapes, self._shapes = tuple(self.stats.shapes[self._shapes:]), len(self.stats.shapes)
        self._put("tokens", (tokens, self._logprobs, origins, shapes))
        self._logprobs = None

    def speculative_metrics(self) -> dict[str, object]:
        """This request's figures so far (a stop string may end it before the loop does)."""
        return edge_metrics(self.stats)

    async def start(self) -> None:
        """Run the request; return once its first token (or its failure: a clear status) is known."""
        self._loop.run_in_executor(self.service.executor, self._job)
        try:
            self._first = await self.ticket.bounded(self._queue.get())
        except BaseException:  # dropped (or out of time) before its first token: stop the draft thread too
            self.close()
            raise
        if self._first[0] == "error":  # the caller never sees this generation: its share ends here
            self.close()
            raise self._first[1]

    async def __aiter__(self) -> AsyncIterator[Step]:
        m = self.service.metrics
        while True:
            event = self._first
            if event is None:
                event = await self.ticket.bounded(self._queue.get())
            kind, value = event
            self._first = None
            if kind == "tokens":
                tokens, logprobs, origins, shapes = value
                if self.tokens == 0:
                    m.ttft.observe(time.perf_counter() - self._t0)
                self.tokens += len(tokens)
                m.generation_tokens.inc(len(tokens))
                yield Step(tokens, None, logprobs, origins, shapes)
            elif kind == "done":
                self.result = value
                yield Step([], value.finish_reason)
                return
            else:
                raise value

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel.set()  # the loop stops at its next token or reconnect
        self.service._abort(self)  # and the call it waits on now
        self.ticket.release()
