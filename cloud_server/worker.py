"""The one model worker: a single thread owns the target model; every session and completion queues on it.

Async handlers await the worker's methods; the model itself only ever runs on the worker's thread. The session
registry (TTL eviction, a session count and a KV-memory bound) is touched only from the event loop.

Continuous batching: verify blocks and completion steps queue as jobs; the model thread takes everything waiting (up
to `max_batch`, waiting at most `batch_window_ms` for more), checks each (`prepare`: errors and stale blocks resolve
their own job), runs one batched forward pass over the sessions' separate caches (`tandem.batch.forward_batch`) and
finishes each. A session has at most one job in flight (seq order), so a batch never holds a session twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cloud_server.errors import ShuttingDownError
from cloud_server.metrics import Metrics
from cloud_server.settings import ServerSettings
from tandem.batch import forward_batch
from tandem.engine import DraftBlock, PreparedBlock, TargetSession, VerifyResult
from tandem.errors import (
    CapacityError,
    ContextOverflowError,
    InvalidRequestError,
    SessionNotFoundError,
    TokenizerMismatchError,
)
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_PIPELINE_WAIT_S = 30.0  # how long a Draft sent ahead (seq = next + 1) may wait for its turn
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class OpenRequest:
    prompt: list[int]  # the full context: original prompt + tokens already emitted when resuming
    params: SamplingParams
    draft_fingerprint: str = ""
    draft_name: str = ""
    client_id: str = ""
    session_id: str | None = None  # resume under this id


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    target_name: str
    target_fingerprint: str
    vocab_size: int
    context_length: int
    prompt_tokens: int
    max_draft_tokens: int
    resumed: bool
    eos_token_ids: tuple[int, ...]
    server_ms: float = 0.0


@dataclass(frozen=True)
class SessionVerdict:
    seq: int
    result: VerifyResult
    generated: int  # tokens emitted in the session so far
    server_ms: float = 0.0


@dataclass
class _Session:
    id: str
    reserved_bytes: int
    client_id: str
    last_used: float
    core: TargetSession | None = None  # None while prefilling
    next_seq: int = 0
    last: SessionVerdict | None = None
    busy: bool = True
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified when next_seq moves or on close
    closed: bool = False


@dataclass(eq=False)  # compared by identity: a block's q tensors have no truth value
class _Job:
    """One block (or completion step) waiting for the model thread."""

    core: TargetSession
    block: DraftBlock
    base_len: int | None
    future: Future[VerifyResult] = field(default_factory=Future)


def kv_bytes_per_token(model: LoadedModel) -> int:
    cfg = model.model.config
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype_bytes = next(model.model.parameters(), torch.empty(0)).element_size()
    return 2 * layers * kv_heads * head_dim * dtype_bytes


async def _wake(entry: _Session) -> None:
    async with entry.turn:
        entry.turn.notify_all()


class ModelWorker:
    def __init__(self, target: LoadedModel, settings: ServerSettings, metrics: Metrics) -> None:
        self.target = target
        self.settings = settings
        self.metrics = metrics
        self.accepting = True
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-model")
        self._sessions: dict[str, _Session] = {}
        self._inflight = 0
        self._bytes_per_token = kv_bytes_per_token(target)
        self._sweeper: asyncio.Task[None] | None = None
        self._wakers: set[asyncio.Task[None]] = set()
        self._pending: list[_Job] = []  # guarded by _queued
        self._queued = threading.Condition()
        self._generations = 0  # completion streams running: with the sessions, the jobs a batch may wait for

    # --- lifecycle

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    @property
    def ready(self) -> bool:
        return self.accepting

    async def shutdown(self) -> None:
        """Refuse new work, drop every session, let the model thread finish its queue."""
        self.accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        for entry in list(self._sessions.values()):
            self._drop(entry, "shutdown")
        await asyncio.to_thread(self._executor.shutdown, True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _submit_close(self, session: TargetSession) -> None:
        # queued behind whatever the model thread is doing with this session
        with contextlib.suppress(RuntimeError):  # the executor is already shut down
            self._executor.submit(session.close)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Admission control: a bounded number of requests at once; over it, 429 at once rather than a queue."""
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down")
        if self._inflight >= self.settings.max_concurrent_requests:
            raise CapacityError(f"over capacity: {self._inflight} requests in flight; retry later")
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    # --- checks

    def check_request(self, prompt_len: int, params: SamplingParams, resume: bool = False) -> None:
        s = self.settings
        limit = s.max_prompt_tokens + (s.max_tokens_limit if resume else 0)
        if prompt_len > limit:
            raise ContextOverflowError(f"the prompt has {prompt_len} tokens; this server takes at most {limit}")
        if params.max_tokens > s.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {params.max_tokens}; this server allows at most {s.max_tokens_limit}"
            )

    def _check_block(self, block: DraftBlock) -> None:
        """The server's own limit; the core checks ids and q before its forward pass."""
        n, limit = len(block.tokens), self.settings.max_draft_tokens
        if n > limit:
            raise InvalidRequestError(f"the draft has {n} tokens; this server takes at most {limit}")
        extra = sum(len(c.tokens) for c in block.candidates)  # candidates: at most as many tokens again
        if extra > limit:
            raise InvalidRequestError(f"the candidates have {extra} tokens; this server takes at most {limit}")

    # --- sessions

    def info(self, session_id: str, prompt_tokens: int, resumed: bool, server_ms: float = 0.0) -> SessionInfo:
        t = self.target
        return SessionInfo(
            session_id, t.name, t.fingerprint, t.vocab_size, t.context_length, prompt_tokens,
            self.settings.max_draft_tokens, resumed, t.eos_token_ids, server_ms,
        )

    async def open_session(self, req: OpenRequest) -> SessionInfo:
        with self.admit():
            t = self.target
            if req.draft_fingerprint and req.draft_fingerprint != t.fingerprint:
                raise TokenizerMismatchError(req.draft_name or "draft", req.draft_fingerprint, t.name, t.fingerprint)
            resumed = req.session_id is not None
            if resumed and not _SESSION_ID.match(req.session_id or ""):
                raise InvalidRequestError("session_id must be 1-64 characters among letters, digits, '_', '.', '-'")
            self.check_request(len(req.prompt), req.params, resume=resumed)
            self._evict_expired()
            sid = req.session_id or uuid.uuid4().hex
            if sid in self._sessions:
                self._drop(self._sessions[sid], "replaced")
            if len(self._sessions) >= self.settings.max_sessions:
                raise CapacityError(f"over capacity: {len(self._sessions)} sessions open; retry later")
            want = min(len(req.prompt) + req.params.max_tokens + self.settings.max_draft_tokens + 1, t.context_length)
            reserve = want * self._bytes_per_token
            used = sum(e.reserved_bytes for e in self._sessions.values())
            limit = int(self.settings.max_session_memory_mb * 2**20)
            if used + reserve > limit:
                raise CapacityError(
                    f"over capacity: sessions hold {used / 2**20:.1f} MiB of {limit / 2**20:.1f} MiB KV memory; "
                    f"this one needs {reserve / 2**20:.1f} MiB"
                )
            # registered before the prefill so that concurrent opens count it
            entry = _Session(sid, reserve, req.client_id, time.monotonic())
            self._sessions[sid] = entry
            self.metrics.open_sessions.set(len(self._sessions))
            t0 = time.perf_counter()
            try:
                entry.core = await self._run(self._prefill, req.prompt, req.params)
            except BaseException:
                self._forget(entry)
                raise
            entry.busy = False
            entry.last_used = time.monotonic()
            return self.info(sid, len(req.prompt), resumed, (time.perf_counter() - t0) * 1e3)

    def _prefill(self, prompt: list[int], params: SamplingParams) -> TargetSession:
        session = TargetSession(self.target, prompt, params)
        session.prefill()
        self.metrics.target_passes.inc(session.passes)
        return session

    def _get(self, session_id: str) -> _Session:
        self._evict_expired()
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFoundError(f"unknown or expired session {session_id!r}")
        return entry

    async def verify(
        self, session_id: str, seq: int, block: DraftBlock, base_len: int | None = None
    ) -> SessionVerdict:
        with self.admit():
            entry = self._get(session_id)
            if seq == entry.next_seq + 1:  # sent ahead (pipelined, maybe on another connection): wait for its turn
                try:
                    async with entry.turn:
                        ready = entry.turn.wait_for(lambda: seq <= entry.next_seq or entry.closed)
                        await asyncio.wait_for(ready, _PIPELINE_WAIT_S)
                except asyncio.TimeoutError:
                    raise InvalidRequestError(f"draft seq {seq} waited in vain for seq {seq - 1}") from None
                entry = self._get(session_id)
            if entry.last is not None and seq == entry.last.seq:
                return entry.last  # a retried request: the same verdict again
            if entry.busy or entry.core is None:
                raise InvalidRequestError(f"session {session_id!r} is busy with another request")
            if seq != entry.next_seq:
                raise InvalidRequestError(f"expected draft seq {entry.next_seq}, got {seq}")
            core = entry.core
            self._check_block(block)
            entry.busy = True
            t0 = time.perf_counter()
            skipped = 0 if base_len is None else max(0, len(core.state.tokens) - base_len)
            try:
                result = await self._step(core, block, base_len)
            finally:
                entry.busy = False
                entry.last_used = time.monotonic()
            elapsed = time.perf_counter() - t0
            if not result.stale:
                self.metrics.verify_latency.observe(elapsed)
                candidates = sum(len(c.tokens) for c in block.candidates)  # drafted too: an accepted path may end there
                self.metrics.observe_verify(len(block.tokens) - skipped + candidates, result.num_accepted)
                self.metrics.generation_tokens.inc(len(result.tokens))
            entry.next_seq += 1
            entry.last = SessionVerdict(seq, result, core.generated, elapsed * 1e3)
            async with entry.turn:
                entry.turn.notify_all()
            return entry.last

    # --- continuous batching on the model thread

    async def _step(self, core: TargetSession, block: DraftBlock, base_len: int | None = None) -> VerifyResult:
        """Verify one block (an empty one: the target's next token) in the next batch the model thread runs."""
        job = _Job(core, block, base_len)
        with self._queued:
            self._pending.append(job)
            self._queued.notify()
        try:
            self._executor.submit(self._drain)  # one drain per job: a drain that finds nothing returns at once
        except RuntimeError:  # the executor is shut down
            with self._queued:
                if job in self._pending:
                    self._pending.remove(job)
            raise ShuttingDownError("the server is shutting down") from None
        return await asyncio.wrap_future(job.future)

    def _drain(self) -> None:
        """On the model thread: take what is waiting (waiting up to the window for the rest), run it as one batch."""
        limit = self.settings.max_batch
        with self._queued:
            if not self._pending:
                return
            deadline = time.monotonic() + self.settings.batch_window_ms / 1e3
            # wait only while some stream that may send soon has not (sessions + completions, read racily: a hint)
            while len(self._pending) < min(limit, len(self._sessions) + self._generations):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._queued.wait(left)
            jobs, seen = [], set()
            for job in self._pending:
                if len(jobs) < limit and id(job.core) not in seen:
                    seen.add(id(job.core))
                    jobs.append(job)
            self._pending = [job for job in self._pending if job not in jobs]
        # a job whose caller went away (its future cancelled) is dropped unverified: its session is unchanged
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        try:
            self._run_batch(jobs)
        except BaseException as e:  # never leave a caller waiting
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            raise

    def _run_batch(self, jobs: list[_Job]) -> None:
        ready: list[tuple[_Job, PreparedBlock]] = []
        for job in jobs:
            try:
                prepared = job.core.prepare(job.block, job.base_len)
            except BaseException as e:
                job.future.set_exception(e)
                continue
            if isinstance(prepared, VerifyResult):  # stale: nothing verified
                job.future.set_result(prepared)
            elif prepared.tree is not None:  # candidates need their own tree mask: verified alone
                self.metrics.batch_size.observe(1)
                self._finish(job, prepared, lambda j=job, p=prepared: j.core.forward(p))
            else:
                ready.append((job, prepared))
        if not ready:
            return
        self.metrics.batch_size.observe(len(ready))
        try:
            logits = forward_batch([job.core.state for job, _ in ready], [p.tokens for _, p in ready])
        except BaseException as e:
            for job, _ in ready:
                job.future.set_exception(e)
            return
        for (job, prepared), rows in zip(ready, logits, strict=True):
            self._finish(job, prepared, lambda r=rows: r)

    def _finish(self, job: _Job, prepared: PreparedBlock, logits: Callable[[], torch.Tensor]) -> None:
        passes = job.core.passes
        try:
            job.future.set_result(job.core.finish(prepared, logits()))
        except BaseException as e:
            job.future.set_exception(e)
        finally:
            self.metrics.target_passes.inc(job.core.passes - passes)

    async def close_session(self, session_id: str, reason: str = "closed") -> None:
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFoundError(f"unknown or expired session {session_id!r}")
        self._drop(entry, reason)

    def _forget(self, entry: _Session) -> None:
        if self._sessions.get(entry.id) is entry:
            del self._sessions[entry.id]
        self.metrics.open_sessions.set(len(self._sessions))

    def _drop(self, entry: _Session, reason: str = "closed") -> None:
        self._forget(entry)
        entry.closed = True  # a Draft sent ahead and waiting for its turn gets session_not_found at once
        with contextlib.suppress(RuntimeError):  # no running event loop: nobody can be waiting
            task = asyncio.get_running_loop().create_task(_wake(entry))
            self._wakers.add(task)
            task.add_done_callback(self._wakers.discard)
        self.metrics.sessions_closed.labels(reason=reason).inc()
        if entry.core is not None:
            self._submit_close(entry.core)

    def _evict_expired(self) -> None:
        deadline = time.monotonic() - self.settings.session_ttl_s
        for entry in list(self._sessions.values()):
            if not entry.busy and entry.last_used < deadline:
                log.info("session %s expired", entry.id)
                self._drop(entry, "expired")

    async def _sweep_forever(self) -> None:
        period = min(self.settings.session_ttl_s / 2, 5.0)
        while True:
            await asyncio.sleep(period)
            self._evict_expired()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- the target alone (completion API)

    async def start_generation(self, prompt: list[int], params: SamplingParams) -> Generation:
        """Admit, validate and prefill; then step with `Generation`. The caller must `close()` it."""
        gen = Generation(self)
        try:
            self.check_request(len(prompt), params)
            gen.session = await self._run(self._prefill, prompt, params)
        except BaseException:
            gen.close()
            raise
        return gen


class Generation:
    """One completion run by the target alone, a token per step, holding one admission slot until closed."""

    def __init__(self, worker: ModelWorker) -> None:
        self._admission = worker.admit()
        self._admission.__enter__()
        self.worker = worker
        self.session: TargetSession | None = None
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._t_first: float | None = None
        self._t_last = self._t0
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[VerifyResult]:
        session = self.session
        assert session is not None
        self.worker._generations += 1
        try:
            while session.finish_reason is None:
                # a zero-length block: the target's own next token, batched with whatever else is waiting
                result = await self.worker._step(session, DraftBlock([]))
                now = time.perf_counter()
                if self._t_first is None and result.tokens:
                    self._t_first = now
                    self.worker.metrics.ttft.observe(now - self._t0)
                self._t_last = now
                self.tokens += len(result.tokens)
                self.worker.metrics.generation_tokens.inc(len(result.tokens))
                yield result
        finally:
            self.worker._generations -= 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._admission.__exit__(None, None, None)
        if self.session is not None:
            self.worker._submit_close(self.session)
        if self._t_first is not None and self.tokens > 1:
            self.worker.metrics.tpot.observe((self._t_last - self._t_first) / (self.tokens - 1))
