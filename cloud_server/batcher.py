"""Continuous batching on the model thread.

Verify blocks and completion steps queue as jobs; the model thread takes everything waiting (up to `max_batch`, in
turn across clients when there is more, waiting at most `batch_window_ms` for more), checks each (`prepare`: errors
and stale blocks resolve their own job), runs one batched forward pass over the sessions' separate caches
(`tandem.batch.forward_batch`) and finishes each.
A session has at most one job in flight (seq order), so a batch never holds a session twice. Prefills (`run`) go
ahead of the next batch, one per drain: a new request's first token does not wait behind a queue of others' steps.
A job whose caller went away before the model thread took it is dropped unrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from tandem.batch import forward_batch
from tandem.blocks import DraftBlock, VerifyResult
from tandem.session import PreparedBlock, TargetSession
from tandem_protocol.errors import ShuttingDownError
from tandem_protocol.metrics import Metrics

T = TypeVar("T")

@dataclass(eq=False)  # compared by identity: a block's q tensors have no truth value
class _Job:
    """One block (or completion step) waiting for the model thread."""

    core: TargetSession
    block: DraftBlock
    base_len: int | None
    key: str = ""  # whose request: a full queue is batched in turn across clients
    future: Future[VerifyResult] = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when the model thread took it
    pass_s: float = 0.0  # the forward pass it was in


def _fair_take(pending: list[_Job], limit: int) -> list[_Job]:
    """Up to `limit` jobs, a session at most once, taken in turn across clients (each client's in arrival order)."""
    by_key: dict[str, deque[_Job]] = {}
    seen: set[int] = set()
    for job in pending:
        if id(job.core) not in seen:
            seen.add(id(job.core))
            by_key.setdefault(job.key, deque()).append(job)
    jobs: list[_Job] = []
    while by_key and len(jobs) < limit:
        for key in list(by_key):
            if len(jobs) == limit:
                break
            jobs.append(by_key[key].popleft())
            if not by_key[key]:
                del by_key[key]
    return jobs


class Batcher:
    """`step` queues a job and awaits its verdict; the model thread (`executor`, one worker) drains the queue.

    `expected` says how many streams may send soon (open sessions + running completions): a batch waits for them
    within the window, never longer.
    """

    def __init__(self, executor: ThreadPoolExecutor, max_batch: int, window_ms: float, metrics: Metrics,
                 expected: Callable[[], int], on_pass: Callable[[int, float], None] | None = None) -> None:
        self._executor = executor
        self.max_batch = max_batch
        self.window_s = window_ms / 1e3
        self.metrics = metrics
        self._expected = expected
        self._pending: list[_Job] = []  # guarded by _queued
        self._solo: deque[tuple[Future[Any], Callable[[], Any]]] = deque()  # prefills, ahead of the next batch
        self._queued = threading.Condition()
        self.streams = 0  # completion streams running, counted in `expected` by the worker
        self._on_pass = on_pass  # (positions fed, seconds) of every target pass, on the model thread

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """A completion stream is running: its next steps are worth waiting for."""
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    async def step(self, core: TargetSession, block: DraftBlock, base_len: int | None = None,
                   key: str = "") -> tuple[VerifyResult, float, float]:
        """Verify one block (an empty one: the target's next token) in the next batch the model thread runs.
        Returns the verdict, the seconds it waited for the model thread and those of its forward pass."""
        job = _Job(core, block, base_len, key)
        with self._queued:
            self._pending.append(job)
            self._queued.notify()
        self._submit(lambda: self._pending.remove(job) if job in self._pending else None)
        result = await asyncio.wrap_future(job.future)
        return result, (job.started or job.queued) - job.queued, job.pass_s

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the model thread ahead of the next batch (a prefill)."""
        future: Future[T] = Future()
        with self._queued:
            self._solo.append((future, functools.partial(fn, *args)))
        self._submit(lambda: None)
        return await asyncio.wrap_future(future)

    def _submit(self, undo: Callable[[], object]) -> None:
        try:
            self._executor.submit(self._drain)  # one drain per job: a drain that finds nothing returns at once
        except RuntimeError:  # the executor is shut down
            with self._queued:
                undo()
            raise ShuttingDownError("the server is shutting down") from None

    def _run_solo(self) -> None:
        with self._queued:
            if not self._solo:
                return
            future, fn = self._solo.popleft()
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    def _drain(self) -> None:
        """On the model thread: take what is waiting (waiting up to the window for the rest), run it as one batch."""
        self._run_solo()
        limit = self.max_batch
        with self._queued:
            if not self._pending:
                return
            deadline = time.monotonic() + self.window_s
            # wait only while some stream that may send soon has not (read racily: a hint)
            while len(self._pending) < min(limit, self._expected()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._queued.wait(left)
            jobs = _fair_take(self._pending, limit)
            self._pending = [job for job in self._pending if job not in jobs]
        # a job whose caller went away (its future cancelled) is dropped unverified: its session is unchanged
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        try:
            self._run_batch(jobs)
        except BaseException as e:  # never leave a caller waiting
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            raise

    def _run_batch(self, jobs: list[_Job]) -> None:
        ready: list[tuple[_Job, PreparedBlock, int]] = []  # and the session's pass count before its pass
        for job in jobs:
            passes = job.core.passes
            try:
                prepared = job.core.prepare(job.block, job.base_len)
                if not isinstance(prepared, VerifyResult) and job.core.state.exact is not None:
                    job.core.prefill()  # as `TargetSession.forward` does: what falls back to its solo pass matches
            except BaseException as e:
                job.future.set_exception(e)
                continue
            if isinstance(prepared, VerifyResult):  # stale: nothing verified
                job.future.set_result(prepared)
            else:  # lines and trees (blocks with candidates) alike
                ready.append((job, prepared, passes))
        if not ready:
            return
        self.metrics.batch_size.observe(len(ready))
        t0 = time.perf_counter()
        try:
            logits = forward_batch([job.core.state for job, _, _ in ready],
                                   [p.tokens if p.tree is None else p.tree for _, p, _ in ready])
        except BaseException as e:
            for job, _, _ in ready:
                job.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self._observe(sum(len(p.tokens if p.tree is None else p.tree.nodes) + 1 for _, p, _ in ready), seconds)
        for (job, prepared, passes), rows in zip(ready, logits, strict=True):
            job.pass_s = seconds
            self._finish(job, prepared, rows, passes)

    def _observe(self, positions: int, seconds: float) -> None:
        self.metrics.batch_positions.observe(positions)
        if self._on_pass is not None:
            self._on_pass(positions, seconds)

    def _finish(self, job: _Job, prepared: PreparedBlock, logits: torch.Tensor, passes: int) -> None:
        """`passes`: the session's count before its pass (and a prefill before it)."""
        try:
            job.future.set_result(job.core.finish(prepared, logits))
        except BaseException as e:
            job.future.set_exception(e)
        finally:
            self.metrics.target_passes.inc(job.core.passes - passes)
