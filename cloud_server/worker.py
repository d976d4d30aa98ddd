"""The one model worker: a single thread owns the target model; every session and completion queues on it.

Async handlers await the worker's methods; the model itself only ever runs on the worker's thread. The worker puts
together the session registry and admission (`cloud_server.registry`) and continuous batching
(`cloud_server.batcher`): open, verify and close sessions; run completions by the target alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from cloud_server.batcher import Batcher
from cloud_server.generation import Generation
from cloud_server.registry import SessionRegistry
from cloud_server.settings import ServerSettings
from tandem.advice import LoadPolicy, StreamLoad
from tandem.blocks import DraftBlock, EdgeReport, VerifyResult
from tandem.costs import CostCurve
from tandem.errors import ContextOverflowError, InvalidRequestError, SessionConflictError, TokenizerMismatchError
from tandem.messages import OpenRequest, SessionInfo
from tandem.models import LoadedModel
from tandem.pass_timing import pass_times
from tandem.sampling import SamplingParams
from tandem.session import TargetSession
from tandem_protocol.metrics import Metrics
from tandem_protocol.openai_api.limits import Gate, RequestTimeout, Ticket, within

T = TypeVar("T")
log = logging.getLogger(__name__)
PRIOR_POSITIONS = (1, 2, 4, 8, 16, 32, 64)
_PIPELINE_WAIT_S = 30.0  # how long a Draft sent ahead (seq = next + 1) may wait for its turn
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def kv_bytes_per_token(model: LoadedModel) -> int:
    cfg = model.model.config
    layers = getattr(cfg, "num_hidden_layers", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # llama.cpp keeps its cache in float16
    dtype_bytes = 2 if model.backend == "llama.cpp" else torch.empty(0, dtype=model.dtype).element_size()
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def trim_memory() -> bool:
    """glibc's malloc_trim(0): return the free parts of the heap to the system. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))


class ModelWorker:
    def __init__(self, target: LoadedModel, settings: ServerSettings, metrics: Metrics) -> None:
        self.target = target
        self.settings = settings
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-model")
        self.sessions = SessionRegistry(
            metrics, settings.max_sessions, int(settings.max_session_memory_mb * 2**20), settings.session_ttl_s,
            self.release,
        )
        self.gate = Gate(metrics, settings.max_concurrent_requests, settings.max_requests_per_key, settings.max_queue,
                         settings.max_queue_wait_s, settings.max_request_s)
        # load-aware speculation: every stream and the pass cost, to advise each session's next block
        self.policy = LoadPolicy() if settings.load_aware else None
        self.batcher = Batcher(self._executor, settings.max_batch, settings.batch_window_ms, metrics,
                               lambda: len(self.sessions) + self.batcher.streams,
                               self.policy.observe_pass if self.policy is not None else None)
        self._bytes_per_token = kv_bytes_per_token(target)
        self._trimmer: asyncio.Task[None] | None = None

    # --- lifecycle

    async def start(self) -> None:
        if self.policy is not None:  # the shape of the pass cost, before any traffic; live passes rescale it
            prior = await self._run(pass_times, self.target, PRIOR_POSITIONS, 32, 5, 1)  # median of 5
            self.policy.costs = CostCurve.from_measurements(prior)
            log.info("pass cost prior (ms by positions): %s", {n: round(s * 1e3, 1) for n, s in prior.items()})
            self._export_model(self.policy)
        self.sessions.start()
        if self.settings.trim_memory_s > 0:
            self._trimmer = asyncio.create_task(self._trim_forever(self.settings.trim_memory_s))

    async def _trim_forever(self, period_s: float) -> None:
        """Freed KV caches of every size leave the C allocator's pools full of holes: hand them back now and then
        (on the model thread, between its passes)."""
        while True:
            await asyncio.sleep(period_s)
            with contextlib.suppress(RuntimeError):  # the executor is shut down
                await self._run(trim_memory)

    @property
    def ready(self) -> bool:
        return self.sessions.accepting

    @property
    def open_sessions(self) -> int:
        return len(self.sessions)

    @property
    def inflight(self) -> int:
        return self.gate.running

    def admit(self) -> contextlib.AbstractContextManager[Ticket]:
        return self.gate.hold()

    async def shutdown(self) -> None:
        """Refuse new work, drop every session, let the model thread finish its queue."""
        if self._trimmer is not None:
            self._trimmer.cancel()
        self.gate.close()
        self.sessions.shutdown()
        await asyncio.to_thread(self._executor.shutdown, True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def release(self, session: TargetSession) -> None:
        # queued behind whatever the model thread is doing with this session
        with contextlib.suppress(RuntimeError):  # the executor is already shut down
            self._executor.submit(session.close)

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

    async def open_session(self, req: OpenRequest, key: str = "") -> SessionInfo:
        """`key`: whose request (`tandem_protocol.openai_api.limits.client_key`)."""
        async with self.gate.admit(key) as ticket:
            t = self.target
            if req.draft_fingerprint and req.draft_fingerprint != t.fingerprint:
                raise TokenizerMismatchError(req.draft_name or "draft", req.draft_fingerprint, t.name, t.fingerprint)
            resumed = req.session_id is not None
            if resumed and not _SESSION_ID.match(req.session_id or ""):
                raise InvalidRequestError("session_id must be 1-64 characters among letters, digits, '_', '.', '-'")
            self.check_request(len(req.prompt), req.params, resume=resumed)
            want = min(len(req.prompt) + req.params.max_tokens + self.settings.max_draft_tokens + 1, t.context_length)
            entry = self.sessions.add(req.session_id or uuid.uuid4().hex, want * self._bytes_per_token, req.client_id)
            t0 = time.perf_counter()
            try:
                entry.core = await ticket.bounded(self.batcher.run(self._prefill, req.prompt, req.params))
            except BaseException:
                self.sessions.forget(entry)
                raise
            entry.busy = False
            entry.last_used = time.monotonic()
            info = self.info(entry.id, len(req.prompt), resumed, (time.perf_counter() - t0) * 1e3)
            if self.policy is None or req.report is None:
                return info
            stream = self.policy.stream(entry.id, entry.last_used)
            self._take_report(stream, req.report)
            stream.gamma, stream.answered = stream.limit, entry.last_used
            return dataclasses.replace(info, advice=self._advice(entry.id, entry.last_used))

    def _prefill(self, prompt: list[int], params: SamplingParams) -> TargetSession:
        session = TargetSession(self.target, prompt, params)
        session.prefill()
        self.metrics.target_passes.inc(session.passes)
        return session

    async def verify(
        self, session_id: str, seq: int, block: DraftBlock, base_len: int | None = None, key: str = ""
    ) -> VerifyResult:
        arrived = time.monotonic()
        entry = self.sessions.get(session_id)
        if seq == entry.next_seq + 1:  # sent ahead (pipelined, maybe on another connection): wait for its turn
            try:  # before admission: a block waiting for its turn holds no slot the block before it may need
                async with entry.turn:
                    ready = entry.turn.wait_for(lambda: seq <= entry.next_seq or entry.closed)
                    await within(ready, _PIPELINE_WAIT_S)
            except asyncio.TimeoutError:
                raise SessionConflictError(f"draft seq {seq} waited in vain for seq {seq - 1}") from None
        # a session's next block is admitted work: a draining server still verifies it
        async with self.gate.admit(key, new=False) as ticket:
            entry = self.sessions.get(session_id)
            if entry.last is not None and seq == entry.last.seq:
                return entry.last  # a retried request: the same verdict again
            if entry.busy or entry.core is None:
                raise SessionConflictError(f"session {session_id!r} is busy with another request")
            if seq != entry.next_seq:
                raise SessionConflictError(f"expected draft seq {entry.next_seq}, got {seq}")
            core = entry.core
            self._check_block(block)
            entry.busy = True
            t0 = time.perf_counter()
            skipped = 0 if base_len is None else max(0, len(core.state.tokens) - base_len)
            try:
                result, queued_s, pass_s = await ticket.bounded(self.batcher.step(core, block, base_len, key))
            except (asyncio.CancelledError, RequestTimeout):
                # a pass under way may still move the session on, with no verdict to show for it: end the session
                # (its client resumes from its context if it is still there)
                self.sessions.drop(entry, "cancelled")
                raise
            finally:
                entry.busy = False
                entry.last_used = time.monotonic()
            elapsed = time.perf_counter() - t0
            if not result.stale:
                self.metrics.verify_latency.observe(elapsed)
                candidates = sum(len(c.tokens) for c in block.candidates)  # drafted too: an accepted path may end there
                self.metrics.observe_verify(len(block.tokens) - skipped + candidates, result.num_accepted)
                self.metrics.generation_tokens.inc(len(result.tokens))
            if self.policy is not None and not result.stale:  # the cloud's own time on the round, beyond its pass
                self.policy.round_overhead.update(max(0.0, elapsed - queued_s - pass_s))
            advice = None if result.stale else self._advise(session_id, block, skipped, result, arrived)
            entry.next_seq += 1
            entry.last = dataclasses.replace(result, seq=seq, generated=core.generated, server_ms=elapsed * 1e3,
                                             queue_ms=queued_s * 1e3, advice=advice)
            async with entry.turn:
                entry.turn.notify_all()
            return entry.last

    def _advise(self, session_id: str, block: DraftBlock, skipped: int, result: VerifyResult,
                arrived: float) -> int | None:
        """Learn the session's round; the block length to advise next when its edge asked (`block.report`)."""
        if self.policy is None:
            return None
        stream = self.policy.stream(session_id, arrived)
        drafted = max(0, len(block.tokens) - skipped)
        stream.arrived(arrived)
        stream.gamma = drafted
        if drafted:
            self.policy.observe_round(stream, drafted, result.num_accepted)
        report = block.report
        stream.answered = time.monotonic()
        if report is None or result.finish_reason is not None:
            stream.limit = 0
            return None
        self._take_report(stream, report)
        return self._advice(session_id, stream.answered)

    def _take_report(self, stream: StreamLoad, report: EdgeReport) -> None:
        stream.draft_s, stream.rtt_s = report.draft_ms / 1e3, report.rtt_ms / 1e3
        stream.limit, stream.pipelined = min(report.limit, self.settings.max_draft_tokens), report.pipelined

    def _advice(self, session_id: str, now: float) -> int:
        assert self.policy is not None
        advice = self.policy.advise(session_id, now)
        if log.isEnabledFor(logging.DEBUG):
            s = self.policy.streams[session_id]
            log.debug("advice %s for %s: draft %.2f ms, rtt %.2f ms, limit %d, pipelined %s, acceptance %s", advice,
                      session_id, s.draft_s * 1e3, s.rtt_s * 1e3, s.limit, s.pipelined,
                      [round(s.acceptance(i), 2) for i in range(4)])
            log.debug("  model: pass ms %s, overhead ms step %.2f round %.2f, streams %d",
                      [round(self.policy.pass_time(n) * 1e3, 1) for n in range(1, 7)],
                      self.policy.step_overhead.value * 1e3, self.policy.round_overhead.value * 1e3,
                      len(self.policy.active(now)))
        self.metrics.advised_gamma.observe(advice.gamma)
        if advice.gamma == 0:
            self.metrics.advice_switch.labels(reason=advice.reason).inc()
        return advice.gamma

    def _export_model(self, p: LoadPolicy) -> None:
        """What the advice is computed from, on /metrics (read when scraped)."""
        m = self.metrics
        for n in PRIOR_POSITIONS:
            m.pass_cost.labels(positions=str(n)).set_function(functools.partial(p.pass_time, n))
        m.overhead.labels(kind="step").set_function(lambda: p.step_overhead.value)
        m.overhead.labels(kind="round").set_function(lambda: p.round_overhead.value)
        for i in range(4):
            m.pooled_acceptance.labels(position=str(i)).set_function(functools.partial(p.pooled, i))

    async def close_session(self, session_id: str, reason: str = "closed") -> bool:
        """False for a session its client ended already."""
        if self.policy is not None:
            self.policy.drop(session_id)
        return self.sessions.close(session_id, reason)

    # --- the target alone (completion API)

    async def start_generation(self, prompt: list[int], params: SamplingParams,
                               ticket: Ticket | None = None) -> Generation:
        """Validate and prefill under `ticket` (a request's admission; none: a slot now or 429); then step with
        `Generation`. The caller must `close()` it."""
        gen = self._generation(ticket)
        try:
            self.check_request(len(prompt), params)
            gen.session = await gen.ticket.bounded(self.batcher.run(self._prefill, prompt, params))
        except BaseException:
            gen.close()
            raise
        return gen

    def _generation(self, ticket: Ticket | None) -> Generation:
        if ticket is not None:
            return Generation(ticket, self.batcher, self.metrics, self.policy, self.release)
        with self.gate.hold() as own:
            return Generation(own, self.batcher, self.metrics, self.policy, self.release)

    async def continue_generation(self, session_id: str, context: list[int],
                                  ticket: Ticket | None = None) -> Generation:
        """Session `session_id` goes on as a stream of the target alone, from its cache; `context` must be what it
        committed (the edge's prompt + output): nothing lost or repeated. The caller must `close()` it."""
        gen = self._generation(ticket)
        try:
            core = self.sessions.take(session_id)
            gen.session = core
            if core.state.tokens != context:
                raise SessionConflictError(
                    f"the context ({len(context)} tokens) is not session {session_id!r}'s committed one "
                    f"({len(core.state.tokens)} tokens)")
        except BaseException:
            gen.close()
            raise
        if self.policy is not None:
            self.policy.drop(session_id)
        self.metrics.continued.inc()
        return gen
