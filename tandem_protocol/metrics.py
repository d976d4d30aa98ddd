"""Prometheus metrics, one registry per server instance. Speculative metrics mirror vLLM's names under `tandem_`."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        counter, gauge = functools.partial(Counter, registry=r), functools.partial(Gauge, registry=r)
        histogram = functools.partial(Histogram, registry=r, buckets=_LATENCY_BUCKETS)
        self.num_drafts = counter("tandem_spec_decode_num_drafts", "Verified draft blocks (verify rounds).")
        self.num_draft_tokens = counter("tandem_spec_decode_num_draft_tokens",
                                        "Draft tokens received for verification.")
        self.num_accepted_tokens = counter("tandem_spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted by the target.")
        self.accepted_per_pos = counter("tandem_spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by position in the block.", ["position"])
        self.requests = counter("tandem_requests", "Requests by route and status.", ["route", "status"])
        self.open_sessions = gauge("tandem_open_sessions", "Verification sessions held.")
        self.target_passes = counter(
            "tandem_target_forward_passes",
            "Target forward passes per sequence (prefills, verify blocks, completion steps); several may share one "
            "batched pass (tandem_batch_size_count).")
        self.generation_tokens = counter("tandem_generation_tokens", "Tokens emitted (sessions and completions).")
        self.verify_latency = histogram("tandem_verify_latency_seconds",
                                        "Time to verify one draft block, queueing included.")
        self.ttft = histogram("tandem_time_to_first_token_seconds", "Completion API: time to the first token.")
        self.tpot = histogram("tandem_time_per_output_token_seconds",
                              "Completion API: time per output token after the first.")
        # its _count is the number of batched target passes, its _sum the sequences they verified
        self.batch_size = histogram(
            "tandem_batch_size", "Sequences (verify blocks, completion steps) per batched target forward pass.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        # its _sum over its _count: the mean positions a pass feeds (blocks + 1 each, a completion step 1)
        self.batch_positions = histogram(
            "tandem_batch_positions", "Positions (tokens fed) per target forward pass, batched or alone.",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256))
        self.advised_gamma = histogram(
            "tandem_advised_gamma", "Load-aware speculation: the block length the cloud advised with each verdict "
            "(0: continue as a cloud-only stream).", buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16))
        self.advice_switch = counter(
            "tandem_advice_switch_to_cloud", "Load-aware speculation: verdicts advising a session to continue as a "
            "cloud-only stream, by reason: load (the aggregate gains), tpot (no block keeps the session's time per "
            "token within cloud-only's).", ["reason"])
        self.pass_cost = gauge(
            "tandem_pass_cost_seconds", "Load-aware speculation: the cloud's model of a pass over this many positions "
            "(measured at start-up, rescaled by live passes).", ["positions"])
        self.overhead = gauge(
            "tandem_overhead_seconds", "Load-aware speculation: the cloud's own time beyond the pass, measured, per "
            "cloud-stream step (kind=step) and per speculative round (kind=round).", ["kind"])
        self.pooled_acceptance = gauge(
            "tandem_pooled_acceptance", "Load-aware speculation: acceptance per block position, pooled over sessions.",
            ["position"])
        self.continued = counter("tandem_sessions_continued", "Sessions that went on as cloud-only streams from their "
                                 "cache.")
        self.sessions_closed = counter(
            "tandem_sessions_closed", "Verification sessions ended, by reason: closed, disconnected (the client's "
            "stream went away), expired (TTL), replaced (a resume under the same id), shutdown.", ["reason"])
        self.disconnects = counter("tandem_client_disconnects",
                                   "Streams the client left before their end; their work was freed.", ["route"])
        self.running = gauge("tandem_requests_running", "Requests admitted and running now.")
        self.waiting = gauge("tandem_requests_waiting", "Requests waiting in the admission queue now.")
        self.queue_wait = histogram("tandem_queue_wait_seconds",
                                    "Time a request waited in the admission queue (admitted or not).")
        self.cancelled = counter(
            "tandem_requests_cancelled", "Requests stopped before their end, by reason: client_gone (the client "
            "disconnected or cancelled), deadline (the client's gRPC deadline passed), limit (the server's wall-time "
            "or queue-wait limit), shutdown (still running at the end of the grace period).", ["reason"])
        self.rejected = counter(
            "tandem_requests_rejected", "Requests refused at admission, by reason: capacity (429), client_limit "
            "(429: the client's own concurrency cap), queue_full (429), shutdown (503).", ["reason"])
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux): memory under load

    def observe_verify(self, drafted: int, accepted: int) -> None:
        self.num_drafts.inc()
        self.num_draft_tokens.inc(drafted)
        self.num_accepted_tokens.inc(accepted)
        for pos in range(accepted):
            self.accepted_per_pos.labels(position=str(pos)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
