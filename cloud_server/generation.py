"""A completion run by the target alone (the OpenAI API, gRPC `Generate`, a session continued as a stream)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cloud_server.batcher import Batcher
from tandem.advice import LoadPolicy
from tandem.blocks import DraftBlock, VerifyResult
from tandem.session import TargetSession
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.figures import speculative_counts
from tandem_protocol.openai_api.limits import Ticket


class Generation:
    """One completion run by the target alone, a token per step, holding its request's admission until closed.
    Each step is bounded by the request's wall-time limit; a closed generation schedules nothing more."""

    def __init__(self, ticket: Ticket, batcher: Batcher, metrics: Metrics, policy: LoadPolicy | None,
                 release: Callable[[TargetSession], None]) -> None:
        ticket.share()
        self.ticket = ticket
        self.batcher, self.metrics, self.policy, self.release = batcher, metrics, policy, release
        self.session: TargetSession | None = None
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._t_first: float | None = None
        self._t_last = self._t0
        self._closed = False

    def speculative_metrics(self) -> dict[str, Any]:
        """The target alone: no drafts; a round per token."""
        return speculative_counts(0, 0, 0, [])

    async def __aiter__(self) -> AsyncIterator[VerifyResult]:
        session = self.session
        assert session is not None
        metrics = self.metrics
        policy, key = self.policy, f"stream-{id(self)}"
        last: float | None = None
        with self.batcher.stream():
            while session.finish_reason is None:
                if policy is not None:
                    policy.stream(key, time.monotonic())  # a cloud stream: a token a pass
                # a zero-length block: the target's own next token, batched with whatever else is waiting
                step = self.batcher.step(session, DraftBlock([]), key=self.ticket.key)
                result, queued_s, pass_s = await self.ticket.bounded(step)
                now = time.perf_counter()
                if policy is not None and last is not None:  # a step's time beyond its wait and its pass
                    policy.step_overhead.update(max(0.0, now - last - queued_s - pass_s))
                last = now
                if self._t_first is None and result.tokens:
                    self._t_first = now
                    metrics.ttft.observe(now - self._t0)
                self._t_last = now
                self.tokens += len(result.tokens)
                metrics.generation_tokens.inc(len(result.tokens))
                yield result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.policy is not None:
            self.policy.drop(f"stream-{id(self)}")
        self.ticket.release()
        if self.session is not None:
            self.release(self.session)
        if self._t_first is not None and self.tokens > 1:
            self.metrics.tpot.observe((self._t_last - self._t_first) / (self.tokens - 1))
