"""The one speculative loop: draft a block, have the target verify it, learn the verdict; repeat.

Synchronous and single-threaded (the draft model runs on the caller's thread). It talks to a `tandem.messages.
Verifier`: the cloud through the edge's remote verifiers, or the target in this process (`tandem.local`), the same
code either way. Modes: `spec` (speculate), `cloud` (the target alone, streamed), `edge` (the draft alone: lossy),
`auto` (load-aware: block lengths as the cloud advises with each verdict, at most the edge's own choice; advice 0, or
with a cloud that gives none the edge's own estimate that the cloud alone is faster, and the session goes on as a
cloud-only stream from the cloud's cache, nothing lost or repeated). Faults: reconnect with backoff and resume from
the context, or fall back to the draft alone.

Pipelined rounds and block sizes: `tandem.rounds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import DraftBlock, FinishReason, TokenLogprob, VerifyResult, cut_at_finish
from tandem.config import Gamma, SpeculationSettings
from tandem.costs import Ewma
from tandem.drafting import Drafter, ModelDrafter
from tandem.errors import InvalidRequestError, RemoteError
from tandem.messages import Verifier, VerifierSession
from tandem.models import LoadedModel
from tandem.pool import PoolRegistry
from tandem.rounds import BlockPlan, Pipeline, Sent, Slot
from tandem.sampling import SamplingParams
from tandem.session import validate_prompt
from tandem.stats import GenerationResult, GenerationStats, OnLogprobs, OnTokens, RoundShape
from tandem.tree import PoolBranches, PoolShape
from tandem.value import BlockValue, Calibration

log = logging.getLogger(__name__)
OnRound = Callable[[int, int], None]  # (drafted, accepted) per verified block
_AUTO_REPROBE_EVERY = 8  # auto, after deciding for the cloud: every 8th request speculates (and measures) again
# failures worth reconnecting for; anything else (bad input, a tokenizer mismatch, a bad key) is final
RETRYABLE = {"unavailable", "deadline_exceeded", "session_not_found", "internal_error", "over_capacity"}


class Cancelled(Exception):
    """The caller stopped the generation (the edge endpoint's client went away)."""


@dataclass
class _Run:
    prompt: list[int]
    params: SamplingParams
    stats: GenerationStats
    on_tokens: OnTokens | None
    cancelled: Callable[[], bool]
    t0: float
    on_logprobs: OnLogprobs | None = None
    gamma: Gamma = "adaptive"
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # the target's, as the verdicts bring them (when asked for)
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

    def emit(self, tokens: list[int], finish: FinishReason | None, logprobs: list[TokenLogprob] | None = None,
             origins: str = "") -> None:
        """`origins`: per token, where it came from (`GenerationStats.origins`); empty: the target's own."""
        if self.cancelled():
            raise Cancelled
        if tokens:
            self.stats.origins += origins or "t" * len(tokens)
            if not self.out:
                self.stats.ttft_s = time.perf_counter() - self.t0
            if self.params.logprobs is not None and logprobs is not None:  # the draft alone (lossy) has none
                self.logprobs = self.logprobs or []
                self.logprobs.extend(logprobs)
                if self.on_logprobs is not None:
                    self.on_logprobs(logprobs)
            self.out.extend(tokens)
            if self.on_tokens is not None:
                self.on_tokens(tokens)
        self.finish = finish


class SpeculativeDecoder:
    """A draft model and a way to reach the target (`connect` makes a verifier). `generate` is the whole request;
    what it learns (acceptance, timings, phrase pools, auto's decision) carries over to the next one."""

    def __init__(self, settings: SpeculationSettings, draft: LoadedModel, connect: Callable[[], Verifier],
                 owns: bool = True) -> None:
        """`owns`: each verifier `connect` makes is closed after its attempt (False: the caller's, left open)."""
        self.settings = settings
        self.draft = draft
        self.connect = connect
        self.owns = owns
        # live measurements (acceptance, draft and verify times, RTT); kept across requests: a warm start
        self.gamma_policy = AdaptiveGamma(max_gamma=settings.max_gamma)
        self.calibration = Calibration()  # the draft's confidence against the verdicts, likewise kept
        self._on_round: OnRound | None = None
        # one phrase pool per client id, kept across requests (a warm start), and its chains' acceptance likewise
        self.pools = PoolRegistry(settings.pool_max_clients, settings.pool_max_tokens)
        self.pool_shape = PoolShape()
        # auto's warm start: once measured rounds said "cloud", later requests go straight to the cloud's stream
        # (a switch mid-request pays a second prefill), re-measuring every _AUTO_REPROBE_EVERY requests
        self._auto_cloud = False
        self._auto_skips = 0
        self._cloud_advises = False  # auto: the cloud answered with advice (then no probe, no estimate of its own)
        self._rtt_from_open = False  # the round trip known so far is an open's, connection set-up included

    def generate(
        self, prompt: list[int], params: SamplingParams, on_tokens: OnTokens | None = None,
        on_round: OnRound | None = None, cancelled: Callable[[], bool] = lambda: False, mode: str | None = None,
        drafter: Drafter | None = None, on_logprobs: OnLogprobs | None = None, stats: GenerationStats | None = None,
        gamma: Gamma | None = None,
    ) -> GenerationResult:
        """`drafter`, `mode`, `gamma`: this request's (default: the settings')."""
        mode = mode or self.settings.mode
        validate_prompt(prompt, self.draft.vocab_size, self.draft.context_length)
        gamma = self.settings.gamma if gamma is None else gamma
        fixed = gamma if isinstance(gamma, int) else 0
        stats = stats or GenerationStats(mode)  # a caller's: readable while it runs, and after it stops early
        stats.mode, stats.gamma, stats.accepted_per_position = mode, fixed, [0] * fixed
        run = _Run(list(prompt), params, stats, on_tokens, cancelled, time.perf_counter(), on_logprobs, gamma)
        self._on_round = on_round
        self._drafter = drafter or self._make_drafter()
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
        run.stats.draft_passes = self._drafter.steps
        assert run.finish is not None
        return GenerationResult(run.out, run.finish, run.stats, run.logprobs)

    def _make_drafter(self) -> Drafter:
        s = self.settings
        value = BlockValue(self.gamma_policy, self.calibration, s.pipeline) if s.block_value else None
        pool = PoolBranches(self.pools.get(s.client_id), self.pool_shape, s.pool_extend) if s.draft_pool else None
        return ModelDrafter(self.draft, "sparse", s.q_top_k, s.draft_p_min, value, s.draft_tree, pool)

    def _auto_prefers_cloud(self) -> bool:
        if not self._auto_cloud:
            return False
        self._auto_skips += 1
        if self._auto_skips >= _AUTO_REPROBE_EVERY:  # speculate again: the network or the load may have changed
            self._auto_skips = 0
            return False
        return True

    # --- faults: reconnect with backoff and resume from the context; or fall back to the draft alone

    def _with_retries(self, run: _Run, body: Callable[[_Run, Verifier], None]) -> None:
        s = self.settings
        attempt = 0
        while run.finish is None:
            verifier = self.connect()
            sent, received = verifier.bytes_sent, verifier.bytes_received  # of its `generate` calls
            try:
                body(run, verifier)
                attempt = 0
            except RemoteError as e:
                if e.code not in RETRYABLE:
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
                run.stats.bytes_sent += verifier.bytes_sent - sent
                run.stats.bytes_received += verifier.bytes_received - received
                if self.owns:
                    verifier.close()

    def _resume_params(self, run: _Run) -> SamplingParams:
        """For a session over the context so far: what is still wanted; the output in the context marked as such."""
        return dataclasses.replace(run.params, max_tokens=run.remaining, emitted=run.params.emitted + len(run.out))

    # --- the draft alone (lossy)

    def _edge_alone(self, run: _Run) -> None:
        run.stats.lossy = True
        params = self._resume_params(run)
        drafter = ModelDrafter(self.draft, "sparse", self.settings.q_top_k)
        drafter.start(run.ctx, params)
        stop = () if params.ignore_eos else tuple(set(params.stop_token_ids) | set(self.draft.eos_token_ids))
        while run.finish is None:
            total = len(run.ctx)
            tokens = drafter.draft_tokens(1).tokens
            emitted, finish = cut_at_finish(tokens, len(run.out), total, run.params.max_tokens, stop,
                                            self.draft.context_length)
            run.stats.edge_tokens += len(emitted)
            run.emit(emitted, finish, origins="e" * len(emitted))

    # --- the cloud alone (the baseline)

    def _cloud(self, run: _Run, verifier: Verifier) -> None:
        for step in verifier.generate(run.ctx, self._resume_params(run)):
            run.stats.target_passes += bool(step.tokens)  # the SSE stream ends with a chunk of no tokens
            run.emit(step.tokens, step.finish_reason, step.logprobs)
            if run.finish is not None:
                return
        if run.finish is None:
            raise RemoteError("unavailable", "the cloud's stream ended before the generation did", "OK")

    # --- speculative rounds

    def _speculate(self, run: _Run, verifier: Verifier, auto: bool) -> None:
        """Rounds: draft a block (and, pipelined, one ahead of it), send, take the oldest verdict, emit what it
        accepted (the drafter and the policies learn it), know which blocks in flight still apply; repeat."""
        s, stats, drafter = self.settings, run.stats, self._drafter
        by_value = getattr(drafter, "value", None) is not None  # the drafter ends its blocks by value
        plan = BlockPlan(run.gamma, self.gamma_policy, s.pipeline, auto, by_value)
        with ThreadPoolExecutor(1) as io:  # the cloud prefills the prompt while the draft does (`start`), here
            opening = io.submit(self._open, run, verifier, plan)
            try:
                drafter.start(run.ctx, self._resume_params(run))
            except BaseException:
                with contextlib.suppress(Exception):
                    opening.result().close()
                raise
            session = opening.result()
        opened = session.opened
        pipe = Pipeline(s.pipeline, opened.max_draft_tokens, opened.context_length)
        try:
            while run.finish is None:
                if plan.alone and not pipe.inflight:
                    return self._continue_alone(run, session)
                while not plan.alone and (slot := pipe.slot(run.ctx, len(run.prompt) + run.params.max_tokens)):
                    g = self._draft_and_send(run, session, pipe, plan, slot)
                    if plan.last_of_fill(g):
                        break
                plan.probe = plan.measure = False
                sent, committed = pipe.inflight.popleft(), len(run.ctx)
                reply = session.recv()
                if reply.stale:
                    stats.stale += 1
                    continue
                skipped = max(0, committed - sent.base) if s.pipeline else 0
                self._learn(run, sent, reply, skipped)
                drafter.learn(run.ctx, sent.block, reply, skipped)
                run.emit(reply.tokens, reply.finish_reason, reply.logprobs, reply.emitted_origins(sent.block, skipped))
                pipe.settle(run.ctx, run.finish is not None)
                if auto and run.finish is None:
                    decided = plan.advise(reply, stats, s.auto_probe_rounds, s.auto_margin)
                    if decided is not None:
                        self._cloud_advises = decided == "cloud"
                    if decided == "edge":
                        self._auto_cloud = plan.alone
        finally:
            stats.bytes_sent += session.bytes_sent
            stats.bytes_received += session.bytes_received
            try:
                session.close()
            except RemoteError as e:
                log.debug("closing the session failed: %s", e)

    def _open(self, run: _Run, verifier: Verifier, plan: BlockPlan) -> VerifierSession:
        """The session over the context so far; in auto, with what the cloud needs to advise even the first block
        (the edge's own bound: its largest)."""
        s, policy = self.settings, self.gamma_policy
        t_open = time.perf_counter()
        bound = s.max_gamma if run.gamma == "adaptive" else max(1, int(run.gamma))
        session = verifier.open(run.ctx, self._resume_params(run), session_id=run.session_id,
                                affinity_key=run.affinity_key, report=plan.report(bound) if plan.auto else None)
        run.session_id = session.session_id
        if not policy.rtt_s.samples:  # connection set-up included: an upper bound, only until a round measures it
            policy.observe_rtt(time.perf_counter() - t_open - session.opened.server_ms / 1e3)
            self._rtt_from_open = True
        if plan.auto and session.opened.advice is not None:
            self._cloud_advises = True
            plan.advised = session.opened.advice
            run.stats.advice.append(plan.advised)
        plan.alone = plan.advised == 0
        plan.probe = plan.auto and run.stats.rounds == 0 and not self._cloud_advises
        return session

    def _draft_and_send(self, run: _Run, session: VerifierSession, pipe: Pipeline, plan: BlockPlan,
                        slot: Slot) -> int:
        """Draft the block for `slot` and send it; returns its draft tokens (a block sent ahead: past its guess)."""
        ahead = slot.ahead_of is not None
        g, own = plan.size(slot.room)
        n = g + ahead  # a block sent ahead starts with the guessed bonus token
        t0, steps = time.perf_counter(), self._drafter.steps
        if plan.probe:  # an empty block measures one target step
            block = DraftBlock([])
        else:
            block = self._drafter.propose(pipe.draft_context(run.ctx, slot), n, max(n, slot.room + ahead),
                                          at_least=min(n, 1 + ahead))
        spent, steps = time.perf_counter() - t0, self._drafter.steps - steps
        g = min(g, len(block.tokens) - ahead)  # a drafter may end a block early (p-min)
        if plan.auto and not plan.probe:  # load-aware: what the cloud needs to advise the next block
            block.report = plan.report(own)
        if steps:
            self.gamma_policy.observe_draft_step(spent / steps)
        run.stats.gammas.append(g)
        session.send(block, slot.base if pipe.pipelined else None)
        pipe.sent(slot, block)
        return g

    def _learn(self, run: _Run, sent: Sent, reply: VerifyResult, skipped: int) -> None:
        """Acceptance, the server's time and the round trip, into the stats and the adaptive policy."""
        policy = self.gamma_policy
        drafted = len(sent.block.tokens) - skipped
        candidates = sum(len(c.tokens) for c in sent.block.candidates)
        run.stats.count_round(drafted + candidates, reply.num_accepted)
        off = reply.num_accepted - reply.on_chain(sent.block, skipped)
        run.stats.shapes.append(RoundShape(drafted + candidates, drafted, reply.num_accepted, off, len(reply.tokens)))
        policy.observe_round(drafted, reply.num_accepted)
        # the pass's cost over all its positions (candidates' too), without its wait for the model thread (other
        # sessions' batches)
        policy.observe_verify(drafted + 1 + candidates, (reply.server_ms - reply.queue_ms) / 1e3)
        if sent.clean:
            rtt = time.perf_counter() - sent.t_sent - reply.server_ms / 1e3
            if self._rtt_from_open:  # the first round trip measured replaces the open's upper bound
                policy.rtt_s = Ewma(0.0, policy.rtt_s.weight)
                self._rtt_from_open = False
            policy.observe_rtt(rtt)
            run.stats.rtt_ms.append(rtt * 1e3)
        if self._on_round is not None:
            self._on_round(drafted, reply.num_accepted)

    def _continue_alone(self, run: _Run, session: VerifierSession) -> None:
        """The session goes on as a cloud-only stream from the cloud's cache: nothing re-fed, lost or repeated."""
        run.stats.switched_to_cloud = True
        run.stats.switched_at = len(run.out)
        for step in session.continue_alone(run.ctx):
            run.stats.target_passes += bool(step.tokens)
            run.emit(step.tokens, step.finish_reason, step.logprobs)
            if run.finish is not None:
                return
        raise RemoteError("unavailable", "the cloud's stream ended before the generation did", "OK")


def generate_speculative(drafter: Drafter, verifier: Verifier, prompt: list[int], params: SamplingParams, gamma: int,
                         on_tokens: OnTokens | None = None) -> GenerationResult:
    """One request through the loop with a fixed block length, synchronous rounds and no retries."""
    if gamma < 0:
        raise InvalidRequestError(f"gamma must be >= 0, got {gamma}")
    # built field by field, not from the environment: the caller's drafter and gamma say it all
    settings = SpeculationSettings.model_construct(mode="spec", gamma=gamma, pipeline=False, retries=0)
    decoder = SpeculativeDecoder(settings, drafter.draft, lambda: verifier, owns=False)
    if (value := getattr(drafter, "value", None)) is not None:
        decoder.gamma_policy = value.policy  # the loop feeds the policy the drafter values its blocks by
    return decoder.generate(prompt, params, on_tokens, drafter=drafter)
