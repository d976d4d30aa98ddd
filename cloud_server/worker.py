"""The one model worker: a single thread owns the target model; every session and completion queues on it.

Async handlers await the worker's methods; the model itself only ever runs on the worker's thread. The session
registry (TTL eviction, a session count and a KV-memory bound) is touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cloud_server.errors import ShuttingDownError
from cloud_server.metrics import Metrics
from cloud_server.settings import ServerSettings
from tandem.engine import DraftBlock, TargetSession, VerifyResult
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
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)  # notified when next_seq moves


def kv_bytes_per_token(model: LoadedModel) -> int:
    cfg = model.model.config
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype_bytes = next(model.model.parameters(), torch.empty(0)).element_size()
    return 2 * layers * kv_heads * head_dim * dtype_bytes


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
            self._drop(entry)
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
                self._drop(self._sessions[sid])
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
                        await asyncio.wait_for(entry.turn.wait_for(lambda: seq <= entry.next_seq), _PIPELINE_WAIT_S)
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
                result = await self._run(self._verify, core, block, base_len)
            finally:
                entry.busy = False
                entry.last_used = time.monotonic()
            elapsed = time.perf_counter() - t0
            if not result.stale:
                self.metrics.verify_latency.observe(elapsed)
                self.metrics.observe_verify(len(block.tokens) - skipped, result.num_accepted)
                self.metrics.generation_tokens.inc(len(result.tokens))
            entry.next_seq += 1
            entry.last = SessionVerdict(seq, result, core.generated, elapsed * 1e3)
            async with entry.turn:
                entry.turn.notify_all()
            return entry.last

    def _verify(self, core: TargetSession, block: DraftBlock, base_len: int | None = None) -> VerifyResult:
        passes = core.passes
        try:
            return core.verify(block, base_len)
        finally:
            self.metrics.target_passes.inc(core.passes - passes)

    async def close_session(self, session_id: str) -> None:
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionNotFoundError(f"unknown or expired session {session_id!r}")
        self._drop(entry)

    def _forget(self, entry: _Session) -> None:
        if self._sessions.get(entry.id) is entry:
            del self._sessions[entry.id]
        self.metrics.open_sessions.set(len(self._sessions))

    def _drop(self, entry: _Session) -> None:
        self._forget(entry)
        if entry.core is not None:
            self._submit_close(entry.core)

    def _evict_expired(self) -> None:
        deadline = time.monotonic() - self.settings.session_ttl_s
        for entry in list(self._sessions.values()):
            if not entry.busy and entry.last_used < deadline:
                log.info("session %s expired", entry.id)
                self._drop(entry)

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
        while session.finish_reason is None:
            # a zero-length block: the target's own next token
            result = await self.worker._run(self.worker._verify, session, DraftBlock([]))
            now = time.perf_counter()
            if self._t_first is None and result.tokens:
                self._t_first = now
                self.worker.metrics.ttft.observe(now - self._t0)
            self._t_last = now
            self.tokens += len(result.tokens)
            self.worker.metrics.generation_tokens.inc(len(result.tokens))
            yield result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._admission.__exit__(None, None, None)
        if self.session is not None:
            self.worker._submit_close(self.session)
        if self._t_first is not None and self.tokens > 1:
            self.worker.metrics.tpot.observe((self._t_last - self._t_first) / (self.tokens - 1))
