"""Load-aware speculation: the block length the cloud advises each stream, its load and the network in view
(docs/capacity.md). A small queueing model (`predict`) gives, for any choice of block lengths, each stream's time per
output token and the aggregate tokens per second; `LoadPolicy.advise` picks a stream's block (0: continue as a
cloud-only stream). The model, per stream i with block g_i (0: a cloud stream), p_i = g_i + 1 positions and E_i tokens
a round:
- edge part e_i = g_i d_i + rtt_i (a cloud stream: none); pipelined, only the rounds whose block sent ahead missed;
- round T_i = e_i + w_i + tau, w_i = rho_-i tau / 2: half a pass, while other streams keep the cloud busy (a cloud
  stream re-queues as its pass ends: no wait);
- the cloud's busy share rho = 1 - prod_i (e_i / T_i); stream i is in a share x_i = min(1, tau / (rho T_i)) of the
  passes, a pass feeds P = sum_i p_i x_i positions, and tau = C(P), solved by fixed-point iteration.
Aggregate tokens per second: sum_i E_i / T_i. Pure numpy; no model, no transport.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tandem.costs import Acceptance, CostCurve, Ewma

STREAM_GAP_S = 0.0005  # prior of the cloud's time outside a pass, per step or round, until measured
# a switch to the cloud stream is for the rest of the request: worth it by this share of the stream's own rate (not
# of the aggregate: with N streams one switch moves the aggregate by about 1/N of what all of them switching would)
SWITCH_MARGIN = 0.05


@dataclass
class StreamLoad:
    """What the cloud knows of one stream."""

    acceptance: Acceptance = field(default_factory=lambda: Acceptance(prior=0.6))
    draft_s: float = 0.0  # the edge's seconds per draft token
    rtt_s: float = 0.0  # the edge's round trip
    pipelined: bool = False
    limit: int = 0  # the edge's own upper bound on its next block (0: it wants no advice)
    gamma: int = 0  # what it does: its last block's drafted tokens (0: a cloud stream)
    gap: Ewma = field(default_factory=lambda: Ewma(0.0))  # verdict sent -> next block in, as the cloud sees it
    seen: float = 0.0  # when it last sent (monotonic seconds)
    answered: float | None = None  # when its last verdict went out

    def arrived(self, now: float) -> None:
        """A block came in: the gap since the last verdict is the edge's part (0 for a block sent ahead)."""
        if self.answered is not None:
            self.gap.update(max(0.0, now - self.answered))
        self.seen = now

    def edge_s(self, g: int) -> float:
        if self.draft_s or self.rtt_s:
            return g * self.draft_s + self.rtt_s
        return self.gap.value  # an edge that reports nothing: what the cloud measured

    def reach(self, n: int) -> np.ndarray:
        """[n]: the chance that drafted positions 0..i are all accepted, for each i < n."""
        out: np.ndarray = np.cumprod([self.acceptance(i) for i in range(n)])
        return out

    def expected(self, g: int) -> float:
        """Tokens a round of block g emits: 1 + a_0 + a_0 a_1 + ..."""
        return 1.0 + float(self.reach(g).sum())

    def hit(self, g: int) -> float:
        """A block sent ahead applies: the whole block and the guessed bonus accepted."""
        return float(self.reach(g + 1)[-1])


@dataclass(frozen=True)
class Prediction:
    aggregate: np.ndarray  # [K] tokens per second, one per candidate
    tpot: np.ndarray  # [K, N] seconds per output token of each stream
    positions: np.ndarray  # [K] positions a pass feeds


def predict(costs: Sequence[float], gammas: np.ndarray, expected: np.ndarray, edge: np.ndarray,
            exposed: np.ndarray, iters: int = 30) -> Prediction:
    """K candidate choices for N streams at once.

    costs[P - 1]: a pass over P positions (read linearly between, the last slope beyond); gammas, expected, edge:
    [K, N] block lengths, tokens per round and edge seconds per round (pipelining already counted in); exposed:
    [K, N] the share of rounds whose block arrives at a random moment and may wait for a pass under way (0: a cloud
    stream, queued again as its pass ends; a pipelined session: the rounds whose block sent ahead missed).
    """
    table = np.asarray(costs, dtype=np.float64)  # [Pmax]
    top = len(table)
    slope = table[-1] - table[-2] if top > 1 else 0.0

    def cost(p: np.ndarray) -> np.ndarray:
        inside = np.interp(p, np.arange(1, top + 1), table)
        out: np.ndarray = np.where(p > top, table[-1] + slope * (p - top), inside)
        return out

    pos = gammas + 1.0  # [K, N]
    tau = cost(pos.sum(axis=1))  # [K]: everyone in every pass, to start
    for _ in range(iters):
        t_round, rho = _rounds(tau, edge, exposed)
        share = np.minimum(1.0, tau[:, None] / (rho[:, None] * t_round))  # [K, N]
        new = cost(np.maximum((pos * share).sum(axis=1), 1.0))
        done = float(np.max(np.abs(new - tau) / tau)) < 1e-3
        tau = 0.5 * tau + 0.5 * new  # damped: the pass and the shares pull each other
        if done:
            break
    t_round, rho = _rounds(tau, edge, exposed)
    share = np.minimum(1.0, tau[:, None] / (rho[:, None] * t_round))
    return Prediction((expected / t_round).sum(axis=1), t_round / expected, (pos * share).sum(axis=1))


def _rounds(tau: np.ndarray, edge: np.ndarray, exposed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Given the pass time [K] (edge: [K, N] > 0): each stream's round [K, N] and the cloud's busy share [K]."""
    away = edge / (edge + tau[:, None])  # [K, N]: the share of its time a stream is at its edge, if it never waited
    # the cloud busy with the others when one arrives: unless all the others are at their edges
    others_away = np.prod(away, axis=1, keepdims=True) / away
    wait = exposed * (1.0 - others_away) * tau[:, None] / 2
    t_round = edge + wait + tau[:, None]
    rho = 1.0 - np.prod(edge / t_round, axis=1)
    return t_round, np.maximum(rho, 1e-6)


@dataclass
class Advice:
    gamma: int  # the block length to use next; 0: continue as a cloud-only stream
    reason: str  # "best" | "tpot" (no block keeps the stream's time per token within cloud-only's) | "load"
    aggregate: float  # the predicted aggregate tokens/s with it
    speculate: float  # the predicted aggregate with the best block > 0 (0.0: none allowed)


class LoadPolicy:
    """The cloud's streams and its pass cost; `advise` answers for one stream at a time (at its verdict).

    Streams silent for `idle_s` (an edge between requests, a client gone) are left out of the model until they send
    again. The pass cost table is rebuilt from the curve at most every `refresh_s`.
    """

    def __init__(self, costs: CostCurve | None = None, max_positions: int = 1024, idle_s: float = 2.0,
                 refresh_s: float = 0.05, forget_s: float = 60.0) -> None:
        self.costs = costs or CostCurve()  # the shape of C(P)
        self.scale = Ewma(1.0, 0.05, 1)  # live passes over the shape's times (clipped to [1/3, 3])
        self.max_positions = max_positions
        self.idle_s = idle_s
        self.refresh_s = refresh_s
        self.forget_s = forget_s  # a stream silent this long is forgotten (one never closed: a client gone)
        self.streams: dict[str, StreamLoad] = {}
        # every session's rounds pooled: where a new stream's acceptance starts (before its first verdict)
        self.pooled = Acceptance(prior=0.6, weight=0.05)
        # the prior counts as a sample: a first round (a warm-up's) moves it by the weight, not to 0 or 1
        self.pooled.positions = [Ewma(self.pooled.prior, self.pooled.weight, 1) for _ in range(16)]
        self.stream_weight = 0.1  # a stream's own rounds move its acceptance slowly: a switch is for good
        # the cloud's own time outside the pass, measured: per step of a cloud stream (its event-loop hops and the
        # stream's write, the batch window) and per speculative round (checking the block, the verification math)
        self.step_overhead = Ewma(STREAM_GAP_S, 0.05)
        self.round_overhead = Ewma(STREAM_GAP_S, 0.05)
        self._lock = threading.Lock()  # the curve: passes observed on the model thread, read on the event loop
        self._table: list[float] = []
        self._table_at = -float("inf")
        self._pruned_at = 0.0

    def stream(self, key: str, now: float) -> StreamLoad:
        """Stream `key`, created if new, seen now."""
        if now - self._pruned_at > self.forget_s:
            self._pruned_at = now
            for k in [k for k, s in self.streams.items() if now - s.seen > self.forget_s]:
                del self.streams[k]
        s = self.streams.get(key)
        if s is None:
            w = self.stream_weight
            start = Acceptance(self.pooled.prior, w, positions=[Ewma(e.value, w, 1) for e in self.pooled.positions])
            s = self.streams[key] = StreamLoad(acceptance=start)
        s.seen = now
        return s

    def observe_round(self, stream: StreamLoad, drafted: int, accepted: int) -> None:
        stream.acceptance.observe(drafted, accepted)
        self.pooled.observe(drafted, accepted)

    def drop(self, key: str) -> None:
        self.streams.pop(key, None)

    def observe_pass(self, positions: int, seconds: float) -> None:
        with self._lock:
            if positions >= 1 and seconds > 0:
                self.scale.update(min(3.0, max(1 / 3, seconds / self.costs.time(positions))))

    def active(self, now: float) -> list[str]:
        return [k for k, s in self.streams.items() if now - s.seen <= self.idle_s]

    def pass_time(self, positions: int) -> float:
        with self._lock:
            return self.costs.time(positions) * self.scale.value

    def _costs(self, top: int, now: float) -> list[float]:
        if len(self._table) < top or now - self._table_at > self.refresh_s:
            with self._lock:
                self._table = [self.costs.time(p) * self.scale.value for p in range(1, max(top, 2) + 1)]
            self._table_at = now
        return self._table

    def _arrays(self, keys: list[str], gammas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens a round, edge seconds a round and the exposed share (see `predict`) for [K, N] gammas."""
        top = int(gammas.max()) + 1
        g = gammas.astype(np.int64)  # [K, N]
        # per stream: the chance of reaching past position i (cumulative acceptance), its draft and round trip
        reach = np.array([self.streams[k].reach(top) for k in keys]).T  # [top, N]
        gains = np.vstack([np.zeros(len(keys)), np.cumsum(reach, axis=0)])  # [top + 1, N]: accepted tokens by g
        cols = np.arange(len(keys))
        expected = 1.0 + gains[g, cols]  # [K, N]
        hit = reach[g, cols]  # the whole block and the guessed bonus accepted
        pipelined = np.array([self.streams[k].pipelined for k in keys])
        miss = np.where(pipelined[None, :], 1.0 - hit, 1.0)
        draft = np.array([self.streams[k].draft_s for k in keys])
        rtt = np.array([self.streams[k].rtt_s for k in keys])
        gap = np.array([self.streams[k].gap.value for k in keys])
        reported = (draft > 0) | (rtt > 0)
        edge_s = np.where(reported[None, :], g * draft[None, :] + rtt[None, :], gap[None, :])  # see `edge_s`
        spec = g > 0
        edge = np.where(spec, miss * edge_s + self.round_overhead.value, self.step_overhead.value)
        exposed = np.where(spec, miss, 0.0)
        return np.where(spec, expected, 1.0), edge, exposed

    def advise(self, key: str, now: float) -> Advice:
        """The block length for stream `key`'s next round (at most its own limit), the others as they are."""
        me = self.streams[key]
        keys = [k for k in self.active(now) if k != key] + [key]
        current = np.array([self.streams[k].gamma for k in keys], dtype=np.float64)
        candidates = list(range(0, me.limit + 1))
        gammas = np.tile(current, (len(candidates), 1))  # [K, N]
        gammas[:, -1] = candidates
        expected, edge, exposed = self._arrays(keys, gammas)
        top = int(min(self.max_positions, (gammas + 1).sum(axis=1).max() + 1))
        pred = predict(self._costs(top, now), gammas, expected, edge, exposed)
        # what cloud-only would give this stream: every stream cloud-only, a token a pass of N positions
        cloud_tpot = self.pass_time(len(keys)) + self.step_overhead.value
        allowed = [k for k in range(1, len(candidates)) if pred.tpot[k, -1] <= cloud_tpot]
        if not allowed:
            return Advice(0, "tpot", float(pred.aggregate[0]), 0.0)
        best = max(allowed, key=lambda k: pred.aggregate[k])
        spec = float(pred.aggregate[best])
        own = 1.0 / pred.tpot[0, -1]  # this stream's rate as a cloud stream
        if pred.aggregate[0] > spec + SWITCH_MARGIN * own:
            return Advice(0, "load", float(pred.aggregate[0]), spec)
        return Advice(candidates[best], "best", spec, spec)
