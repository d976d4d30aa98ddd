"""What a target pass costs, and which block shape is worth it (pure Python: no model, no torch).

`CostCurve`: the seconds of one target pass over n positions, measured (far from linear in n: blocks are sized by it,
not by a fitted line); `Acceptance`: per position of a drafted chain, the chance it is accepted once reached;
`keep_nodes`: how many optional nodes of each chain a block keeps for the most expected tokens per second.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_STEP_S = 0.01  # no prior, nothing measured: every pass costs one step of this, whatever its length


@dataclass
class Ewma:
    value: float
    weight: float = 0.3
    samples: int = 0

    def update(self, x: float) -> None:
        self.value = x if self.samples == 0 else (1 - self.weight) * self.value + self.weight * x
        self.samples += 1


def _line(points: Sequence[tuple[int, float]], n: int, slope_beyond: bool = True) -> float:
    """Through sorted (n, value) points: linear between neighbours, the first value below them, beyond them the last
    segment's slope (`slope_beyond`, and two points at least) or the last value."""
    ns = [p[0] for p in points]
    i = bisect.bisect_left(ns, n)
    if i < len(points) and ns[i] == n:
        return points[i][1]
    if i == 0:
        return points[0][1]
    if i == len(points):
        if not slope_beyond or i == 1:
            return points[-1][1]
        i -= 1  # extend the last segment
    (n0, v0), (n1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (n - n0) / (n1 - n0)


def _grow(table: list[float], n: int, raw: Callable[[int], float]) -> float:
    """table[m - 1] = max(raw(1..m)), extended to n; returns its value at n."""
    while len(table) < n:
        v = raw(len(table) + 1)
        table.append(max(v, table[-1]) if table else v)
    return table[n - 1]


class CostCurve:
    """Seconds of one target pass over n positions (n >= 1), an EWMA per measured n. `time(n)`, made non-decreasing
    in n: nothing measured, the prior (default: `DEFAULT_STEP_S` flat; a prior's points are read linearly between,
    the last slope beyond); no prior, the measurements read that way; else the prior's shape scaled to the
    measurements (the ratio measured / prior linear between measured n's, held beyond): live passes may carry
    overheads the start-up ones did not, but the prior still knows where the cost jumps."""

    def __init__(self, prior: Mapping[int, float] | None = None, weight: float = 0.3) -> None:
        if prior is not None and (not prior or min(prior) < 1 or min(prior.values()) <= 0):
            raise ValueError("a prior cost curve needs positive seconds at position counts >= 1")
        self.weight = weight
        self.has_prior = prior is not None
        self._prior = sorted(prior.items()) if prior is not None else [(1, DEFAULT_STEP_S)]
        self._measured: dict[int, Ewma] = {}
        self._table: list[float] = []  # time(n) at index n - 1, built on demand; cleared by `observe`
        self._prior_table: list[float] = []

    @classmethod
    def from_measurements(cls, seconds: Mapping[int, float], weight: float = 0.3) -> CostCurve:
        """A curve with these passes measured (one sample each; later observations average in)."""
        curve = cls(weight=weight)
        for n, s in seconds.items():
            curve.observe(n, s)
        return curve

    def observe(self, n: int, seconds: float) -> None:
        """A pass over n positions took `seconds`."""
        if n < 1 or seconds <= 0:
            return  # an empty pass, or a clock that measured nothing: no information
        self._measured.setdefault(n, Ewma(seconds, self.weight)).update(seconds)
        self._table.clear()

    @property
    def measured(self) -> dict[int, float]:
        """The EWMA per measured position count."""
        return {n: e.value for n, e in sorted(self._measured.items())}

    def time(self, n: int) -> float:
        return _grow(self._table, max(1, n), self._raw)

    def as_dict(self, max_n: int) -> dict[int, float]:
        """time(n) for n = 1..max_n: to log, or to hand another curve as its prior."""
        return {n: self.time(n) for n in range(1, max_n + 1)}

    def _prior_time(self, n: int) -> float:
        return _grow(self._prior_table, n, lambda m: max(_line(self._prior, m), 1e-9))

    def _raw(self, n: int) -> float:
        points = [(m, e.value) for m, e in sorted(self._measured.items())]
        if not points:
            return self._prior_time(n)
        if not self.has_prior:
            return _line(points, n)
        ratios = [(m, v / self._prior_time(m)) for m, v in points]
        return self._prior_time(n) * _line(ratios, n, slope_beyond=False)


@dataclass
class Acceptance:
    """Per position of a chain of drafted tokens (a block's main path, a pool lengthening, a candidate branch): the
    chance the token is accepted once every token before it in the chain was. Positions deeper than any measured
    read as the deepest measured (or the prior)."""

    prior: float
    weight: float = 0.2
    positions: list[Ewma] = field(default_factory=list)

    def __call__(self, i: int) -> float:
        if i < len(self.positions):
            return self.positions[i].value
        return self.positions[-1].value if self.positions else self.prior

    def observe(self, reached: int, accepted: int) -> None:
        """A verdict on a chain of which `reached` tokens were reached: the first `accepted` of them accepted, the
        next one (if reached) rejected."""
        for i in range(min(accepted + 1, reached)):
            while len(self.positions) <= i:
                self.positions.append(Ewma(self.prior, self.weight))
            self.positions[i].update(1.0 if i < accepted else 0.0)

    def gains(self, length: int, reach: float = 1.0) -> list[float]:
        """Expected accepted tokens each of the chain's first `length` tokens adds, the chain reached with
        probability `reach`."""
        out = []
        for i in range(length):
            reach *= self(i)
            out.append(reach)
        return out


def keep_nodes(costs: CostCurve, fixed_s: float, positions: int, tokens: float,
               chains: Sequence[Sequence[float]], most: int | None = None,
               token_s: Sequence[float] | None = None) -> list[int]:
    """How many leading nodes of each chain to add to a block for the most expected tokens per second.

    The block without them: `positions` in its target pass, `tokens` expected from it (accepted + the target's
    own), `fixed_s` seconds outside the pass (draft steps, a round trip). `chains[c][k]`: the expected tokens node
    k of chain c adds (taken non-increasing along a chain: a node counts only if the ones before it do). Every node
    costs one position, so for each count m the best m nodes are the m with the largest gains; the count is chosen
    over all m (the curve may jump and then stay flat, so stopping at the first node that does not pay would miss
    cheap ones behind it). `most`: nodes kept in all, at most. `token_s[c]`: seconds each expected token of chain c
    costs besides its position (a phrase pool's token, once taken, still has to be fed to the draft model): such a
    node ranks by what it adds net of that time at the block's own rate, and a chain whose tokens cost more than
    they add at that rate is never kept.
    """
    base_rate = tokens / (fixed_s + costs.time(positions))
    nodes: list[tuple[float, float, int]] = []  # (rank, gain, chain)
    for c, gains in enumerate(chains):
        net = 1.0 - base_rate * (token_s[c] if token_s is not None else 0.0)
        cap = float("inf")
        for g in gains if net > 0 else ():
            cap = min(cap, max(0.0, g))
            nodes.append((cap * net, cap, c))
    nodes.sort(key=lambda node: -node[0])  # stable: a chain's equal gains keep their order
    best_m, best_rate = 0, base_rate
    total, extra_s = tokens, 0.0
    for m, (_, gain, c) in enumerate(nodes[:most], start=1):
        total += gain
        extra_s += gain * token_s[c] if token_s is not None else 0.0
        rate = total / (fixed_s + extra_s + costs.time(positions + m))
        if rate > best_rate * (1 + 1e-9):
            best_m, best_rate = m, rate
    counts = [0] * len(chains)
    for _, _, c in nodes[:best_m]:
        counts[c] += 1
    return counts
