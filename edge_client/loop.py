"""The edge's generation: draft here, verify in the cloud; pipelined rounds, adaptive gamma, auto, resume, fallback.

Synchronous and single-threaded (the draft model runs on the caller's thread): the CLI calls it directly, the edge
endpoint from its one model thread. Remote sessions answer `send`/`recv` in order (edge_client.remote).

Pipelined rounds: every block carries `base_len`, the sequence position of its first token. While block k is being
verified, block k+1 = [guess, y_1..y_g] is drafted as if block k will be accepted whole with the draft's own guess as
the bonus token, and sent ahead with base_len = base_k + len(block k). The server applies the core's rule
(`TargetSession.align`): the block is verified from the committed position on if its overlap matches, or answered
`stale` with nothing changed. The edge applies the same rule to know what the server will do.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_client.remote import GrpcVerifier, HttpVerifier, RemoteError, Reply
from edge_client.settings import EdgeSettings
from tandem.adaptive import AdaptiveGamma
from tandem.engine import (
    DraftBlock,
    DraftRow,
    FinishReason,
    cut_at_finish,
    draft_block,
    draw_draft_token,
    slice_block,
    validate_prompt,
)
from tandem.errors import InvalidRequestError
from tandem.kv import SequenceState
from tandem.models import LoadedModel
from tandem.pool import OuroborosConfig, PhrasePool, PoolRegistry, draft_greedy, learn, ouroboros_block
from tandem.sampling import SamplingParams, make_generator

log = logging.getLogger(__name__)
OnTokens = Callable[[list[int]], None]
OnRound = Callable[[int, int], None]  # (drafted, accepted) per verified block
_AUTO_REPROBE_EVERY = 8  # auto, after deciding for the cloud: every 8th request speculates (and measures) again
# failures worth reconnecting for; anything else (bad input, a tokenizer mismatch, a bad key) is final
_RETRYABLE = {"unavailable", "deadline_exceeded", "session_not_found", "internal_error", "over_capacity"}


class Session(Protocol):
    opened: Any
    session_id: str
    bytes_sent: int
    bytes_received: int

    def send(self, block: DraftBlock, base_len: int | None = None) -> None: ...

    def recv(self) -> Reply: ...

    def close(self) -> None: ...


class Cancelled(Exception):
    """The caller stopped the generation (the edge endpoint's client went away)."""


class Drafter:
    """The draft model over one growing context, which may run ahead of what the cloud has committed.

    `reset(context)` moves it to another context, keeping the cache over the common prefix (one crop).
    """

    def __init__(self, draft: LoadedModel, params: SamplingParams, context: list[int], q_top_k: int) -> None:
        self.params = params
        self.q_top_k = q_top_k
        self.state = SequenceState(draft.model, context)
        self.generator = make_generator(None if params.seed is None else params.seed + 1)
        self.steps = 0

    def reset(self, context: list[int]) -> None:
        old = self.state.tokens
        common = 0
        for a, b in zip(old, context, strict=False):
            if a != b:
                break
            common += 1
        self.state.tokens = list(context)
        self.state.rollback(min(self.state.cached, common))

    def draft(self, n: int) -> DraftBlock:
        """n tokens continuing the context (which grows by them); under sampling, from the top-k q that is sent."""
        tokens: list[int] = []
        rows: list[DraftRow] = []
        for _ in range(n):
            logits = self.state.forward()[-1]  # [V]
            tok, row = draw_draft_token(logits, self.params, "sparse", self.q_top_k, self.generator)
            tokens.append(tok)
            rows.append(row)
            self.state.tokens.append(tok)
            self.steps += 1
        return draft_block(tokens, rows)

    def draft_ouroboros(self, n: int, pool: PhrasePool, cfg: OuroborosConfig, room: int, vocab: int) -> DraftBlock:
        """n draft-model passes made an Ouroboros block (tandem.pool): under greedy the passes read pool phrases
        and may go further; the block is lengthened from the pool and (greedy) carries candidates. `room`: the
        block's tokens allowed in all. The context grows by the draft model's tokens only."""
        context = list(self.state.tokens)
        if not self.params.greedy:
            return ouroboros_block(pool, context, self.draft(n), [], cfg, False, room, vocab)
        tokens, _, parted, passes = draft_greedy(self.state, pool, n, min(max(n, cfg.max_draft), room))
        self.state.tokens.extend(tokens)
        self.steps += passes
        return ouroboros_block(pool, context, DraftBlock(tokens), parted, cfg, True, room, vocab)


@dataclass
class EdgeStats:
    mode: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: int = 0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_ms: list[float] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)
    stale: int = 0
    resumes: int = 0
    lossy: bool = False
    switched_to_cloud: bool = False
    edge_tokens: int = 0  # tokens from the draft alone (mode edge, or the fallback): not the target's
    estimate: dict[str, float] = field(default_factory=dict)  # auto mode's decision figures

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {k: v for k, v in self.__dict__.items() if k not in ("rtt_ms", "gammas")}
        d.update(
            acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
            tokens_per_s=self.tokens / self.wall_s if self.wall_s else 0.0,
            rtt_ms_mean=sum(self.rtt_ms) / len(self.rtt_ms) if self.rtt_ms else None,
            gamma_mean=sum(self.gammas) / len(self.gammas) if self.gammas else None,
            gamma_last=self.gammas[-1] if self.gammas else None,
        )
        return d


@dataclass
class EdgeResult:
    tokens: list[int]
    finish_reason: FinishReason
    stats: EdgeStats


@dataclass
class _Sent:
    base: int  # position of block.tokens[0]
    block: DraftBlock
    live: bool  # the server will verify (part of) it; False: it will come back stale
    t_sent: float
    # its wait minus the server's time is the round trip if nothing was queued ahead of it at the server and the
    # edge did not draft meanwhile (the verdict may then have waited unread)
    clean: bool = True


@dataclass
class _Run:
    prompt: list[int]
    params: SamplingParams
    stats: EdgeStats
    on_tokens: OnTokens | None
    cancelled: Callable[[], bool]
    t0: float
    out: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    session_id: str | None = None  # the cloud's id for this generation; a resume reopens under it
    # sent with every call of the generation's sessions, resumes included: a load balancer hashing it keeps the
    # generation on one replica, and moves it whole when that replica is gone
    affinity_key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def ctx(self) -> list[int]:
        return self.prompt + self.out

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.out)

    def emit(self, tokens: list[int], finish: FinishReason | None) -> None:
        if self.cancelled():
            raise Cancelled
        if tokens:
            if not self.out:
                self.stats.ttft_s = time.perf_counter() - self.t0
            self.out.extend(tokens)
            if self.on_tokens is not None:
                self.on_tokens(tokens)
        self.finish = finish


class _SwitchToCloud(Exception):
    pass


class EdgeClient:
    """One edge: a draft model and a way to reach the cloud. `generate` is the whole request."""

    def __init__(self, settings: EdgeSettings, draft: LoadedModel,
                 connect: Callable[[], GrpcVerifier | HttpVerifier] | None = None) -> None:
        self.settings = settings
        self.draft = draft
        self.connect = connect or (lambda: make_verifier(settings, draft))
        # live measurements (acceptance, draft and verify times, RTT); kept across requests: a warm start
        self.model = AdaptiveGamma(max_gamma=settings.max_gamma)
        self._on_round: OnRound | None = None
        # Ouroboros: one phrase pool per client id, kept across requests (a warm start)
        self.pools = PoolRegistry(settings.pool_max_clients, settings.pool_max_tokens)
        self.ouroboros = OuroborosConfig(extend=settings.ouroboros_extend, candidates=settings.ouroboros_candidates,
                                         candidate_len=settings.ouroboros_candidate_len)
        # auto's warm start: once measured rounds said "cloud", later requests go straight to the cloud's stream
        # (a switch mid-request pays a second prefill), re-measuring every _AUTO_REPROBE_EVERY requests
        self._auto_cloud = False
        self._auto_skips = 0

    def generate(
        self, prompt: list[int], params: SamplingParams, on_tokens: OnTokens | None = None,
        on_round: OnRound | None = None, cancelled: Callable[[], bool] = lambda: False, mode: str | None = None,
    ) -> EdgeResult:
        mode = mode or self.settings.mode
        validate_prompt(prompt, self.draft.vocab_size, self.draft.context_length)
        run = _Run(list(prompt), params, EdgeStats(mode=mode), on_tokens, cancelled, time.perf_counter())
        self._on_round = on_round
        if mode == "edge":
            self._edge_alone(run)
        elif mode == "cloud":
            self._with_retries(run, self._cloud)
        elif mode == "auto" and self._auto_prefers_cloud():
            run.stats.switched_to_cloud = True
            self._with_retries(run, self._cloud)
        elif mode in ("spec", "auto"):
            self._with_retries(run, lambda r, v: self._speculate(r, v, auto=mode == "auto"))
        else:
            raise InvalidRequestError(f"unknown mode {mode!r}")
        run.stats.tokens = len(run.out)
        run.stats.wall_s = time.perf_counter() - run.t0
        assert run.finish is not None
        return EdgeResult(run.out, run.finish, run.stats)

    def _auto_prefers_cloud(self) -> bool:
        if not self._auto_cloud:
            return False
        self._auto_skips += 1
        if self._auto_skips >= _AUTO_REPROBE_EVERY:  # speculate again: the network or the load may have changed
            self._auto_skips = 0
            return False
        return True

    # --- faults: reconnect with backoff and resume from the context; or fall back to the draft alone

    def _with_retries(self, run: _Run, body: Callable[[_Run, GrpcVerifier | HttpVerifier], None]) -> None:
        s = self.settings
        attempt = 0
        while run.finish is None:
            verifier = self.connect()
            try:
                body(run, verifier)
                attempt = 0
            except _SwitchToCloud:
                run.stats.switched_to_cloud = True
                body = self._cloud
                continue
            except RemoteError as e:
                if e.code not in _RETRYABLE:
                    raise
                if attempt >= s.retries:
                    if s.fallback == "edge":
                        log.warning("the cloud is unreachable (%s): continuing with the draft alone (lossy)", e)
                        self._edge_alone(run)
                        return
                    raise RemoteError(e.code, f"the cloud at {s.cloud} is unreachable after {attempt + 1} "
                                      f"attempts: {e}; use --fallback edge to continue with the draft alone "
                                      "(lossy)", e.status) from None
                delay = min(s.backoff_s * 2**attempt, s.backoff_max_s)
                attempt += 1
                if run.out:
                    run.stats.resumes += 1
                log.info("cloud call failed (%s); reconnecting in %.2f s (attempt %d)", e, delay, attempt)
                time.sleep(delay)
            finally:
                run.stats.bytes_sent += verifier.bytes_sent
                run.stats.bytes_received += verifier.bytes_received
                verifier.close()

    def _resume_params(self, run: _Run) -> SamplingParams:
        return dataclasses.replace(run.params, max_tokens=run.remaining)

    # --- the draft alone (lossy)

    def _edge_alone(self, run: _Run) -> None:
        run.stats.lossy = True
        params = self._resume_params(run)
        drafter = Drafter(self.draft, params, run.ctx, self.settings.q_top_k)
        stop = () if params.ignore_eos else tuple(set(params.stop_token_ids) | set(self.draft.eos_token_ids))
        while run.finish is None:
            total = len(run.ctx)
            tokens = drafter.draft(1).tokens
            emitted, finish = cut_at_finish(tokens, len(run.out), total, run.params, stop,
                                            self.draft.context_length)
            run.stats.edge_tokens += len(emitted)
            run.emit(emitted, finish)

    # --- the cloud alone (the baseline)

    def _cloud(self, run: _Run, verifier: GrpcVerifier | HttpVerifier) -> None:
        for step in verifier.generate(run.ctx, self._resume_params(run)):
            run.stats.target_passes += bool(step.tokens)  # the SSE stream ends with a chunk of no tokens
            run.emit(step.tokens, step.finish_reason)
            if run.finish is not None:
                return
        if run.finish is None:
            raise RemoteError("unavailable", "the cloud's stream ended before the generation did", "OK")

    # --- speculative rounds

    def _speculate(self, run: _Run, verifier: GrpcVerifier | HttpVerifier, auto: bool) -> None:
        s, stats = self.settings, run.stats
        t_open = time.perf_counter()
        session: Session = verifier.open(run.ctx, self._resume_params(run), session_id=run.session_id,
                                         affinity_key=run.affinity_key)
        run.session_id = session.session_id
        opened = session.opened
        server_ms = float(opened["server_ms"] if isinstance(opened, dict) else opened.server_ms)
        max_draft = int(opened["max_draft_tokens"] if isinstance(opened, dict) else opened.max_draft_tokens)
        context = int(opened["context_length"] if isinstance(opened, dict) else opened.context_length)
        model = self.model
        if not model.rtt_s.samples:  # connection set-up included: an upper bound, only until better samples come
            model.observe_rtt(time.perf_counter() - t_open - server_ms / 1e3)
        drafter = Drafter(self.draft, run.params, run.ctx, s.q_top_k)
        pool = self.pools.get(s.client_id) if s.ouroboros else None
        if pool is not None and stats.rounds == 0:
            pool.feed(run.prompt, origin="prompt")
        pipelined = s.pipeline
        inflight: deque[_Sent] = deque()
        probe = auto and stats.rounds == 0  # a first empty block measures one target step: the cloud's own pace
        measure = True  # the session's first block goes alone: a clean round-trip sample before pipelining
        try:
            while run.finish is None:
                # 1. fill the pipeline: one block at the committed position, and (pipelined) one sent ahead of it
                live = [e for e in inflight if e.live]
                while len(live) < (2 if pipelined else 1):
                    tail = live[-1] if live else None
                    base = len(run.ctx) if tail is None else tail.base + len(tail.block.tokens)
                    # the tokens still wanted after `base`, less the one the target adds (for a block sent ahead:
                    # less the bonus it assumes too)
                    room = run.params.max_tokens - (base - len(run.prompt)) - 1
                    room = min(room, context - base - 2, max_draft - (tail is not None))
                    if tail is not None and room < 1:
                        break
                    if probe:
                        g = 0
                    elif s.gamma == "adaptive":
                        g = model.choose(pipelined, limit=max(room, 1))
                    else:
                        g = int(s.gamma)
                    g = max(0, min(g, room))
                    n = g + (tail is not None)  # a block sent ahead starts with the guessed bonus token
                    spec_ctx = run.ctx if tail is None else run.ctx[: live[0].base] + [
                        t for e in live for t in e.block.tokens]
                    drafter.reset(spec_ctx)
                    t0 = time.perf_counter()
                    if pool is not None and n:  # Ouroboros: pool phrases read in the draft's passes, more appended
                        block = drafter.draft_ouroboros(n, pool, self.ouroboros, max(n, room + (tail is not None)),
                                                        self.draft.vocab_size)
                    else:
                        block = drafter.draft(n)
                    spent = time.perf_counter() - t0
                    for e in inflight:
                        e.clean = False
                    if n:
                        model.observe_draft_step(spent / n)
                    stats.gammas.append(g)
                    session.send(block, base if pipelined else None)
                    sent = _Sent(base, block, True, time.perf_counter(), clean=not any(e.live for e in inflight))
                    inflight.append(sent)
                    live.append(sent)
                    if probe or g == 0 or measure:
                        break
                probe = measure = False
                # 2. the oldest answer
                sent = inflight.popleft()
                committed = len(run.ctx)
                reply = session.recv()
                result = reply.result
                if result.stale:
                    stats.stale += 1
                    continue
                skipped = max(0, committed - sent.base) if pipelined else 0
                drafted = len(sent.block.tokens) - skipped
                # 3. learn: acceptance, the server's time, the round trip
                stats.rounds += 1
                stats.target_passes += 1
                stats.drafted += drafted
                stats.accepted += result.num_accepted
                model.observe_round(drafted, result.num_accepted)
                model.observe_verify(drafted + 1, reply.server_ms / 1e3)
                if sent.clean:
                    rtt = time.perf_counter() - sent.t_sent - reply.server_ms / 1e3
                    model.observe_rtt(rtt)
                    stats.rtt_ms.append(rtt * 1e3)
                if self._on_round is not None:
                    self._on_round(drafted, result.num_accepted)
                if pool is not None:  # the verdict concerns the block as the server aligned it
                    learn(pool, run.ctx, slice_block(sent.block, skipped, len(sent.block.tokens)), result)
                run.emit(result.tokens, result.finish_reason)
                # 4. what the server will make of the blocks still in flight (the same rule as the core's)
                for e in inflight:
                    e.live = e.live and run.finish is None and _applies(e, run.ctx)
                if auto and run.finish is None and stats.rounds >= s.auto_probe_rounds:
                    spec_rate, cloud_rate = model.best_rate(pipelined), model.cloud_rate()
                    stats.estimate = {"spec_tok_s": spec_rate, "cloud_tok_s": cloud_rate,
                                      "rtt_ms": model.rtt_s.value * 1e3}
                    self._auto_cloud = spec_rate < cloud_rate * s.auto_margin
                    if self._auto_cloud:
                        raise _SwitchToCloud
        finally:
            stats.bytes_sent += session.bytes_sent
            stats.bytes_received += session.bytes_received
            try:
                session.close()
            except RemoteError as e:
                log.debug("closing the session failed: %s", e)


def _applies(e: _Sent, ctx: list[int]) -> bool:
    """TargetSession.align's rule, seen from the edge: will the server verify (part of) this block?"""
    done = len(ctx) - e.base
    if done < 0 or (done > 0 and done >= len(e.block.tokens)):
        return False
    return e.block.tokens[:done] == ctx[e.base:]


def make_verifier(settings: EdgeSettings, draft: LoadedModel) -> GrpcVerifier | HttpVerifier:
    s = settings
    ca = None if s.tls_ca_file is None else str(s.tls_ca_file)
    common: dict[str, Any] = dict(timeout_s=s.timeout_s, api_key=s.api_key, draft_fingerprint=draft.fingerprint,
                                  draft_name=draft.name, client_id=s.client_id, tls_ca_file=ca)
    if s.transport == "http":
        scheme = "https" if s.cloud_tls else "http"
        url = s.cloud if s.cloud.startswith(("http://", "https://")) else f"{scheme}://{s.cloud}"
        return HttpVerifier(url, **common)
    return GrpcVerifier(s.cloud, streaming=s.transport == "grpc", tls=s.cloud_tls, **common)
