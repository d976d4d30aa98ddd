"""Blocks sized by what their next token is worth: keep drafting while the expected extra accepted tokens pay for
the draft step and the longer target pass they cost.

- `Calibration`: how often a drafted token is accepted, by the draft's own confidence in it (its most likely token's
  probability), learned online from the verdicts: the draft's probabilities as they really translate into accepted
  tokens for this pair and this kind of text.
- `BlockValue`: the stopping rule, consulted before each draft step of a block. With the block at n tokens, E
  expected tokens a round (1 + the reach of each drafted token) and T(n) the round's expected time
  (`AdaptiveGamma.round_time`: the measured draft step, round trip and target cost curve, pipelining included),
  the next token, reached with probability reach * a (a: its calibrated acceptance), is worth drafting iff
  (E + reach * a) / T(n + 1) > E / T(n): it raises the expected tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.adaptive import AdaptiveGamma


@dataclass
class Calibration:
    """Acceptance by confidence, in `bins` equal bins of [0, 1]: counts started at the bin's centre with the weight
    of `prior` verdicts (a confidence of 0.9 is taken at its word until the verdicts say otherwise)."""

    bins: int = 10
    prior: float = 2.0
    accepted: list[float] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.seen:
            self.seen = [self.prior] * self.bins
            self.accepted = [self.prior * (b + 0.5) / self.bins for b in range(self.bins)]

    def _bin(self, confidence: float) -> int:
        return min(self.bins - 1, max(0, int(confidence * self.bins)))

    def __call__(self, confidence: float) -> float:
        b = self._bin(confidence)
        return self.accepted[b] / self.seen[b]

    def observe(self, confidences: list[float], accepted: int) -> None:
        """A verdict on a chain of drafted tokens with these confidences: the first `accepted` were accepted, the
        next (if drafted) rejected; tokens past it were never reached and say nothing."""
        for i, c in enumerate(confidences[: accepted + 1]):
            b = self._bin(c)
            self.seen[b] += 1
            self.accepted[b] += i < accepted


class BlockValue:
    """The stopping rule of one block at a time: `start`, then before each draft step `worth`; `take` counts the
    token drafted (a token a block must have, `worth` or not, is taken too)."""

    def __init__(self, policy: AdaptiveGamma, calibration: Calibration, pipelined: bool) -> None:
        self.policy, self.calibration, self.pipelined = policy, calibration, pipelined
        self.start()

    def start(self) -> None:
        self.n, self.reach, self.expected = 0, 1.0, 1.0

    def _gain(self, confidence: float) -> float:
        return self.reach * self.calibration(confidence)

    def worth(self, confidence: float) -> bool:
        """Whether drafting the next token (the draft's confidence in it: `confidence`) raises the expected tokens
        per second of the round."""
        now = self.policy.round_time(self.n, self.pipelined)
        longer = self.policy.round_time(self.n + 1, self.pipelined)
        return (self.expected + self._gain(confidence)) * now > self.expected * longer

    def take(self, confidence: float) -> None:
        gain = self._gain(confidence)
        self.n, self.reach, self.expected = self.n + 1, gain, self.expected + gain
