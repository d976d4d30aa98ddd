"""The one speculative loop: draft a block, have the target verify it, learn the verdict; repeat.

Synchronous and single-threaded (the draft model runs on the caller's thread). It talks to a `tandem.messages.
Verifier`: the cloud through the edge's remote verifiers, or the target in this process (`tandem.local`), the same
code either way. Modes: `spec` (speculate), `cloud` (the target alone, streamed), `edge` (the draft alone: lossy),
`auto` (load-aware: block lengths as the cloud advises with each verdict, at most the edge's own choice; advice 0, or
with a cloud that gives none the edge's own estimate that the cloud alone is faster, and the session goes on as a
cloud-only stream from the cloud's cache, nothing lost or repeated). Faults: reconnect with backoff and resume from
the context, or fall back to the draft alone.

Pipelined rounds: every block carries `base_len`, the sequence position of its first token. While block k is being
verified, block k+1 = [guess, y_1..y_g] is drafted as if block k will be accepted whole with the draft's own guess as
the bonus token, and sent ahead with base_len = base_k + len(block k). The target applies the core's rule
(`tandem.blocks.pending_part`): the block is verified from the committed position on if its overlap matches, or
answered `stale` with nothing changed. The loop applies the same rule to know what the target will do.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import DraftBlock, EdgeReport, FinishReason, TokenLogprob, cut_at_finish, pending_part
from tandem.config import Gamma, SpeculationSettings
from tandem.costs import CostCurve, Ewma
from tandem.drafting import Drafter, ModelDrafter
from tandem.errors import InvalidRequestError, RemoteError
from tandem.messages import Step, Verifier, VerifierSession
from tandem.models import LoadedModel
from tandem.ouroboros import OuroborosDrafter
from tandem.pool import OuroborosConfig, PoolRegistry
from tandem.sampling import SamplingParams
from tandem.session import validate_prompt
from tandem.stats import GenerationResult, GenerationStats, OnLogprobs, OnTokens

log = logging.getLogger(__name__)
OnRound = Callable[[int, int], None]  # (drafted, accepted) per verified block
_AUTO_REPROBE_EVERY = 8  # auto, after deciding for the cloud: every 8th request speculates (and measures) again
# failures worth reconnecting for; anything else (bad input, a tokenizer mismatch, a bad key) is final
RETRYABLE = {"unavailable", "deadline_exceeded", "session_not_found", "internal_error", "over_capacity"}


class Cancelled(Exception):
    """The caller stopped the generation (the edge endpoint's client went away)."""


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

    def __init__(self, settings: SpeculationSettings, draft: LoadedModel, connect: Callable[[], Verifier]) -> None:
        self.settings = settings
        self.draft = draft
        self.connect = connect
        # live measurements (acceptance, draft and verify times, RTT); kept across requests: a warm start
        self.gamma_policy = AdaptiveGamma(max_gamma=settings.max_gamma)
        self._on_round: OnRound | None = None
        # Ouroboros: one phrase pool per client id, kept across requests (a warm start)
        self.pools = PoolRegistry(settings.pool_max_clients, settings.pool_max_tokens)
        self.ouroboros = OuroborosConfig(extend=settings.ouroboros_extend, candidates=settings.ouroboros_candidates,
                                         candidate_len=settings.ouroboros_candidate_len)
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
        if not s.ouroboros:
            return ModelDrafter(self.draft, "sparse", s.q_top_k, s.draft_p_min)
        # blocks sized on the cost curve the loop measures (one object: the drafter reads what the loop observes)
        return OuroborosDrafter(self.draft, self.pools.get(s.client_id), self.ouroboros, "sparse", s.q_top_k,
                                costs=self.gamma_policy.costs, p_min=s.draft_p_min)

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
                run.stats.bytes_sent += verifier.bytes_sent
                run.stats.bytes_received += verifier.bytes_received
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
        s, stats = self.settings, run.stats
        t_open = time.perf_counter()
        policy = self.gamma_policy
        # auto: what the cloud needs to advise even the first block (the edge's own bound: its largest)
        bound = s.max_gamma if run.gamma == "adaptive" else max(1, int(run.gamma))
        report = EdgeReport(policy.draft_s.value * 1e3, policy.rtt_s.value * 1e3, bound, s.pipeline) if auto else None
        session: VerifierSession = verifier.open(run.ctx, self._resume_params(run), session_id=run.session_id,
                                                 affinity_key=run.affinity_key, report=report)
        run.session_id = session.session_id
        opened = session.opened
        max_draft, context = opened.max_draft_tokens, opened.context_length
        if not policy.rtt_s.samples:  # connection set-up included: an upper bound, only until a round measures it
            policy.observe_rtt(time.perf_counter() - t_open - opened.server_ms / 1e3)
            self._rtt_from_open = True
        drafter = self._drafter
        drafter.start(run.ctx, self._resume_params(run))
        pipelined = s.pipeline
        inflight: deque[_Sent] = deque()
        advised = opened.advice if auto else None  # auto: the cloud's last advice
        if advised is not None:
            self._cloud_advises = True
            stats.advice.append(advised)
        # auto with a cloud that gives no advice: a first empty block measures one target step, the cloud's pace
        probe = auto and stats.rounds == 0 and not self._cloud_advises
        measure = True  # the session's first block goes alone: a clean round-trip sample before pipelining
        alone = advised == 0  # auto: no more blocks; once those in flight are answered, the session goes on as a stream
        try:
            while run.finish is None:
                if alone and not inflight:
                    self._continue_alone(run, session)
                    return
                # 1. fill the pipeline: one block at the committed position, and (pipelined) one sent ahead of it
                live = [e for e in inflight if e.live]
                while not alone and len(live) < (2 if pipelined else 1):
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
                    elif run.gamma == "adaptive":
                        g = policy.choose(pipelined, limit=max(room, 1))
                    else:
                        g = int(run.gamma)
                    own = max(1, min(g, room))  # the edge's own choice: the bound on the cloud's advice
                    if advised is not None:
                        g = min(g, advised)
                    g = max(0, min(g, room))
                    n = g + (tail is not None)  # a block sent ahead starts with the guessed bonus token
                    spec_ctx = run.ctx if tail is None else run.ctx[: live[0].base] + [
                        t for e in live for t in e.block.tokens]
                    t0, steps = time.perf_counter(), drafter.steps
                    # a probe's empty block measures one target step
                    block = DraftBlock([]) if probe else drafter.propose(spec_ctx, n, max(n, room + (tail is not None)),
                                                                         at_least=min(n, 1 + (tail is not None)))
                    spent, steps = time.perf_counter() - t0, drafter.steps - steps
                    g = min(g, len(block.tokens) - (tail is not None))  # a drafter may end a block early (p-min)
                    if auto and not probe:  # load-aware: what the cloud needs to advise the next block
                        block.report = EdgeReport(policy.draft_s.value * 1e3, policy.rtt_s.value * 1e3, own, pipelined)
                    for e in inflight:
                        e.clean = False
                    if steps:
                        policy.observe_draft_step(spent / steps)
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
                candidates = sum(len(c.tokens) for c in sent.block.candidates)
                # 3. learn: acceptance, the server's time, the round trip; the drafter learns the verdict
                stats.count_round(drafted + candidates, result.num_accepted)
                policy.observe_round(drafted, result.num_accepted)
                # the pass's cost over all its positions (candidates' too), without its wait for the model thread
                # (other sessions' batches)
                policy.observe_verify(drafted + 1 + candidates, (reply.server_ms - reply.queue_ms) / 1e3)
                if sent.clean:
                    rtt = time.perf_counter() - sent.t_sent - reply.server_ms / 1e3
                    if self._rtt_from_open:  # the first round trip measured replaces the open's upper bound
                        policy.rtt_s = Ewma(0.0, policy.rtt_s.weight)
                        self._rtt_from_open = False
                    policy.observe_rtt(rtt)
                    stats.rtt_ms.append(rtt * 1e3)
                if self._on_round is not None:
                    self._on_round(drafted, result.num_accepted)
                drafter.learn(run.ctx, sent.block, result, skipped)
                origins = result.emitted_origins(sent.block, skipped)
                run.emit(result.tokens, result.finish_reason, result.logprobs, origins)
                # 4. what the target will make of the blocks still in flight (the rule it applies itself)
                for e in inflight:
                    e.live = e.live and run.finish is None and pending_part(run.ctx, e.base, e.block.tokens) is not None
                if not auto or run.finish is not None:
                    continue
                if reply.advice is not None:  # the cloud decides, with every stream it serves in view
                    self._cloud_advises = True
                    advised = reply.advice
                    stats.advice.append(reply.advice)
                    alone = advised == 0
                elif stats.rounds >= s.auto_probe_rounds:  # a cloud that gives no advice: the edge's own estimate
                    self._cloud_advises = False
                    self._auto_cloud = alone = policy.best_rate(pipelined) < policy.cloud_rate() * s.auto_margin
                if alone:  # the edge's own view at the switch, for the record
                    stats.estimate = {"spec_tok_s": policy.best_rate(pipelined), "cloud_tok_s": policy.cloud_rate(),
                                      "rtt_ms": policy.rtt_s.value * 1e3}
        finally:
            stats.bytes_sent += session.bytes_sent
            stats.bytes_received += session.bytes_received
            try:
                session.close()
            except RemoteError as e:
                log.debug("closing the session failed: %s", e)

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


class _Borrowed:
    """A caller's verifier, used for one generation and left open."""

    def __init__(self, verifier: Verifier) -> None:
        self.inner = verifier
        self.bytes_sent = self.bytes_received = 0

    def open(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
             affinity_key: str | None = None, report: EdgeReport | None = None) -> VerifierSession:
        return self.inner.open(prompt, params, session_id, affinity_key, report)

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[Step]:
        return self.inner.generate(prompt, params)

    def close(self) -> None:
        pass


def generate_speculative(drafter: Drafter, verifier: Verifier, prompt: list[int], params: SamplingParams, gamma: int,
                         on_tokens: OnTokens | None = None) -> GenerationResult:
    """One request through the loop with a fixed block length, synchronous rounds and no retries."""
    if gamma < 0:
        raise InvalidRequestError(f"gamma must be >= 0, got {gamma}")
    # built field by field, not from the environment: the caller's drafter and gamma say it all
    settings = SpeculationSettings.model_construct(mode="spec", gamma=gamma, pipeline=False, retries=0)
    decoder = SpeculativeDecoder(settings, drafter.draft, lambda: _Borrowed(verifier))
    costs = getattr(drafter, "costs", None)
    if isinstance(costs, CostCurve):
        decoder.gamma_policy.costs = costs  # the loop feeds the curve the drafter sizes its blocks by
    return decoder.generate(prompt, params, on_tokens, drafter=drafter)
