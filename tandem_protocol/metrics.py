"""Prometheus metrics, one registry per server instance. Speculative metrics mirror vLLM's names under `tandem_`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.num_drafts = Counter("tandem_spec_decode_num_drafts", "Verified draft blocks (verify rounds).", registry=r)
        self.num_draft_tokens = Counter(
            "tandem_spec_decode_num_draft_tokens", "Draft tokens received for verification.", registry=r
        )
        self.num_accepted_tokens = Counter(
            "tandem_spec_decode_num_accepted_tokens", "Draft tokens accepted by the target.", registry=r
        )
        self.accepted_per_pos = Counter(
            "tandem_spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by position in the block.",
            ["position"], registry=r,
        )
        self.requests = Counter("tandem_requests", "Requests by route and status.", ["route", "status"], registry=r)
        self.open_sessions = Gauge("tandem_open_sessions", "Verification sessions held.", registry=r)
        self.target_passes = Counter(
            "tandem_target_forward_passes",
            "Target forward passes per sequence (prefills, verify blocks, completion steps); several may share one "
            "batched pass (tandem_batch_size_count).", registry=r,
        )
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens emitted (sessions and completions).",
                                         registry=r)
        self.verify_latency = Histogram(
            "tandem_verify_latency_seconds", "Time to verify one draft block, queueing included.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds", "Completion API: time to the first token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds", "Completion API: time per output token after the first.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # its _count is the number of batched target passes, its _sum the sequences they verified
        self.batch_size = Histogram(
            "tandem_batch_size", "Sequences (verify blocks, completion steps) per batched target forward pass.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r,
        )
        # its _sum over its _count: the mean positions a pass feeds (blocks + 1 each, a completion step 1)
        self.batch_positions = Histogram(
            "tandem_batch_positions", "Positions (tokens fed) per target forward pass, batched or alone.",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256), registry=r,
        )
        self.advised_gamma = Histogram(
            "tandem_advised_gamma", "Load-aware speculation: the block length the cloud advised with each verdict "
            "(0: continue as a cloud-only stream).", buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16), registry=r,
        )
        self.advice_switch = Counter(
            "tandem_advice_switch_to_cloud", "Load-aware speculation: verdicts advising a session to continue as a "
            "cloud-only stream, by reason: load (the aggregate gains), tpot (no block keeps the session's time per "
            "token within cloud-only's).", ["reason"], registry=r,
        )
        self.pass_cost = Gauge(
            "tandem_pass_cost_seconds", "Load-aware speculation: the cloud's model of a pass over this many positions "
            "(measured at start-up, rescaled by live passes).", ["positions"], registry=r,
        )
        self.overhead = Gauge(
            "tandem_overhead_seconds", "Load-aware speculation: the cloud's own time beyond the pass, measured, per "
            "cloud-stream step (kind=step) and per speculative round (kind=round).", ["kind"], registry=r,
        )
        self.pooled_acceptance = Gauge(
            "tandem_pooled_acceptance", "Load-aware speculation: acceptance per block position, pooled over sessions.",
            ["position"], registry=r,
        )
        self.continued = Counter(
            "tandem_sessions_continued", "Sessions that went on as cloud-only streams from their cache.", registry=r,
        )
        self.sessions_closed = Counter(
            "tandem_sessions_closed", "Verification sessions ended, by reason: closed, disconnected (the client's "
            "stream went away), expired (TTL), replaced (a resume under the same id), shutdown.", ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "tandem_client_disconnects", "Streams the client left before their end; their work was freed.",
            ["route"], registry=r,
        )
        self.running = Gauge("tandem_requests_running", "Requests admitted and running now.", registry=r)
        self.waiting = Gauge("tandem_requests_waiting", "Requests waiting in the admission queue now.", registry=r)
        self.queue_wait = Histogram(
            "tandem_queue_wait_seconds", "Time a request waited in the admission queue (admitted or not).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.cancelled = Counter(
            "tandem_requests_cancelled", "Requests stopped before their end, by reason: client_gone (the client "
            "disconnected or cancelled), deadline (the client's gRPC deadline passed), limit (the server's wall-time "
            "or queue-wait limit), shutdown (still running at the end of the grace period).", ["reason"], registry=r,
        )
        self.rejected = Counter(
            "tandem_requests_rejected", "Requests refused at admission, by reason: capacity (429), client_limit "
            "(429: the client's own concurrency cap), queue_full (429), shutdown (503).", ["reason"], registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux): memory under load

    def observe_verify(self, drafted: int, accepted: int) -> None:
        self.num_drafts.inc()
        self.num_draft_tokens.inc(drafted)
        self.num_accepted_tokens.inc(accepted)
        for pos in range(accepted):
            self.accepted_per_pos.labels(position=str(pos)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
