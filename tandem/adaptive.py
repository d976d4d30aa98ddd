"""Choosing the draft length from live measurements (adaptive gamma).

A round of gamma drafted tokens emits E(gamma) = 1 + a_0 + a_0 a_1 + ... tokens (a_i: the chance position i is
accepted once reached). Synchronous rounds cost gamma * draft_s + rtt_s + verify_time(gamma + 1) (`costs`, a
`tandem.costs.CostCurve`); pipelined rounds cost max(verify_time(gamma + 1), sync / 2) while blocks are accepted
whole, a synchronous round after a rejection. The cloud alone streams a token per target step: `cloud_rate()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.costs import Acceptance, CostCurve, Ewma


@dataclass
class AdaptiveGamma:
    max_gamma: int = 16
    prior_acceptance: float = 0.6
    draft_s: Ewma = field(default_factory=lambda: Ewma(0.002))
    rtt_s: Ewma = field(default_factory=lambda: Ewma(0.0))
    # the target's pass time by positions; pass `CostCurve(prior)` to start from a curve measured at start-up
    costs: CostCurve = field(default_factory=CostCurve)
    acceptance: Acceptance = field(init=False)  # per position; deeper than any measured: the deepest (or the prior)
    chosen: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.acceptance = Acceptance(self.prior_acceptance, weight=0.3)

    # --- measurements

    def observe_round(self, drafted: int, accepted: int) -> None:
        """A verified block: positions 0..accepted-1 accepted, position `accepted` rejected (if it was drafted)."""
        self.acceptance.observe(drafted, accepted)

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_s.update(seconds)

    def observe_verify(self, positions: int, seconds: float) -> None:
        """The server's time for a pass over `positions`: the block's tokens + 1 (+ its candidates' tokens)."""
        self.costs.observe(positions, seconds)

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_s.update(max(0.0, seconds))

    # --- the model

    def expected_tokens(self, gamma: int) -> float:
        """E(gamma): tokens a round emits (accepted + the one the target adds)."""
        return sum(self.acceptance.gains(gamma), 1.0)

    def p_all(self, gamma: int) -> float:
        return math.prod(self.acceptance(i) for i in range(gamma))

    def verify_time(self, positions: int) -> float:
        return self.costs.time(positions)

    def round_time(self, gamma: int, pipelined: bool) -> float:
        sync = gamma * self.draft_s.value + self.rtt_s.value + self.verify_time(gamma + 1)
        if not pipelined:
            return sync
        # whole-block acceptance also needs the guessed bonus token to be right
        hit = self.p_all(gamma + 1)
        # two blocks in flight: the server is the bottleneck, or the synchronous cycle is shared by two rounds
        steady = max(self.verify_time(gamma + 1), sync / 2)
        return hit * steady + (1 - hit) * sync

    def rate(self, gamma: int, pipelined: bool = False) -> float:
        """Expected tokens per second with blocks of `gamma`."""
        return self.expected_tokens(gamma) / self.round_time(gamma, pipelined)

    def choose(self, pipelined: bool = False, limit: int | None = None) -> int:
        """The gamma in [1, min(max_gamma, limit)] with the best expected rate; recorded in `chosen`."""
        top = max(1, min(self.max_gamma, self.max_gamma if limit is None else limit))
        best = max(range(1, top + 1), key=lambda g: self.rate(g, pipelined))
        self.chosen.append(best)
        return best

    def best_rate(self, pipelined: bool = False) -> float:
        return max(self.rate(g, pipelined) for g in range(1, self.max_gamma + 1))

    def cloud_rate(self) -> float:
        """Tokens per second of the cloud streaming alone: one target step per token."""
        return 1.0 / self.verify_time(1)
