"""Choosing the draft length from live measurements.

A round drafts gamma tokens (gamma draft steps of `draft_s` each), sends them (a round trip `rtt_s`) and has the
target verify gamma + 1 positions in one pass (`verify_time(gamma + 1)`, read from `costs`: a `tandem.costs.CostCurve`
of what the server reports per position count, not a line: a pass's cost is not linear in its positions). It
emits E(gamma) = 1 + a_0 + a_0 a_1 + ... + a_0...a_{gamma-1} tokens, a_i being the chance that position i is accepted
once reached (an EWMA per position; with one alpha everywhere this is (1 - alpha^(gamma+1)) / (1 - alpha)).

Synchronous rounds cost sync = gamma * draft_s + rtt_s + verify_time(gamma + 1). Pipelined rounds (one block sent
ahead) cost max(verify_time(gamma + 1), sync / 2) while blocks keep being accepted whole; a rejection flushes the
pipeline and that round costs a synchronous one.

The cloud alone streams a token per target step: `cloud_rate()` = 1 / verify_time(1); its round trip is paid once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.costs import CostCurve, Ewma


@dataclass
class AdaptiveGamma:
    max_gamma: int = 16
    prior_acceptance: float = 0.6
    draft_s: Ewma = field(default_factory=lambda: Ewma(0.002))
    rtt_s: Ewma = field(default_factory=lambda: Ewma(0.0))
    # the target's pass time by positions; pass `CostCurve(prior)` to start from a curve measured at start-up, and
    # share it with an `OuroborosDrafter(costs=...)` so that both learn from the same passes
    costs: CostCurve = field(default_factory=CostCurve)
    acceptance: list[Ewma] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)

    # --- measurements

    def observe_round(self, drafted: int, accepted: int) -> None:
        """A verified block: positions 0..accepted-1 accepted, position `accepted` rejected (if it was drafted)."""
        for i in range(min(accepted + 1, drafted)):
            while len(self.acceptance) <= i:
                self.acceptance.append(Ewma(self.prior_acceptance))
            self.acceptance[i].update(1.0 if i < accepted else 0.0)

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_s.update(seconds)

    def observe_verify(self, positions: int, seconds: float) -> None:
        """The server's time for a pass over `positions`: the block's tokens + 1 (+ its candidates' tokens)."""
        self.costs.observe(positions, seconds)

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_s.update(max(0.0, seconds))

    # --- the model

    def alpha(self, i: int) -> float:
        return self.acceptance[i].value if i < len(self.acceptance) else self._tail()

    def _tail(self) -> float:
        # positions never reached yet: as good as the deepest one measured (or the prior)
        return self.acceptance[-1].value if self.acceptance else self.prior_acceptance

    def expected_tokens(self, gamma: int) -> float:
        """E(gamma): tokens a round emits (accepted + the one the target adds)."""
        total, reach = 1.0, 1.0
        for i in range(gamma):
            reach *= self.alpha(i)
            total += reach
        return total

    def p_all(self, gamma: int) -> float:
        p = 1.0
        for i in range(gamma):
            p *= self.alpha(i)
        return p

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
