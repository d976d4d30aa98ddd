"""What the speculative round consults: the blocks in flight (`Pipeline`) and how long the next block is (`BlockPlan`).

Pipelined rounds: every block carries `base`, the sequence position of its first token. While block k is being
verified, block k+1 = [guess, y_1..y_g] is drafted as if block k will be accepted whole with the draft's own guess as
the bonus token, and sent ahead with base = base_k + len(block k). The target applies the core's rule
(`tandem.blocks.pending_part`): the block is verified from the committed position on if its overlap matches, or
answered `stale` with nothing changed. The pipeline applies the same rule to know what the target will do.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import DraftBlock, EdgeReport, VerifyResult, pending_part
from tandem.config import Gamma
from tandem.stats import GenerationStats


@dataclass
class Sent:
    base: int  # position of block.tokens[0]
    block: DraftBlock
    live: bool = True  # the server will verify (part of) it; False: it will come back stale
    t_sent: float = field(default_factory=time.perf_counter)
    # its wait minus the server's time is the round trip if nothing was queued ahead of it at the server and the
    # edge did not draft meanwhile (the verdict may then have waited unread)
    clean: bool = True


@dataclass(frozen=True)
class Slot:
    """Where the next block goes: `base`, after `ahead_of` (a block sent ahead, starting with the guessed bonus
    token) or at the committed position (None); `room`: the draft tokens it may hold."""

    base: int
    ahead_of: Sent | None
    room: int


class Pipeline:
    """The blocks in flight, oldest first: one at the committed position and, pipelined, one sent ahead of it."""

    def __init__(self, pipelined: bool, max_draft: int, context: int) -> None:
        self.pipelined, self.max_draft, self.context = pipelined, max_draft, context
        self.inflight: deque[Sent] = deque()

    def live(self) -> list[Sent]:
        return [e for e in self.inflight if e.live]

    def slot(self, committed: list[int], wanted_end: int) -> Slot | None:
        """The next block's place, or None while the pipeline is full. `wanted_end`: the position where the
        generation ends (prompt + max_tokens)."""
        live = self.live()
        if len(live) >= (2 if self.pipelined else 1):
            return None
        tail = live[-1] if live else None
        base = len(committed) if tail is None else tail.base + len(tail.block.tokens)
        # the tokens still wanted after `base`, less the one the target adds (for a block sent ahead: less the bonus
        # it assumes too)
        room = min(wanted_end - base - 1, self.context - base - 2, self.max_draft - (tail is not None))
        if tail is not None and room < 1:
            return None
        return Slot(base, tail, room)

    def draft_context(self, committed: list[int], slot: Slot) -> list[int]:
        """What the block continues: the committed sequence, or it and the live blocks as if accepted whole."""
        live = self.live()
        if slot.ahead_of is None:
            return committed
        return committed[: live[0].base] + [t for e in live for t in e.block.tokens]

    def sent(self, slot: Slot, block: DraftBlock) -> None:
        for e in self.inflight:
            e.clean = False  # the edge drafted while it was in flight
        self.inflight.append(Sent(slot.base, block, clean=not self.live()))

    def settle(self, committed: list[int], finished: bool) -> None:
        """After a verdict: which blocks still in flight the target will verify (the rule it applies itself)."""
        for e in self.inflight:
            e.live = e.live and not finished and pending_part(committed, e.base, e.block.tokens) is not None


@dataclass
class BlockPlan:
    """How long the next block is: a fixed gamma or the adaptive policy's choice, at most the room left and the
    cloud's advice (auto). In auto mode with a cloud that gives no advice, a first empty block (`probe`) measures
    one target step, the cloud's pace; the session's first block goes alone (`measure`), a clean round-trip sample
    before pipelining. `alone`: auto decided for the cloud; no more blocks. `by_value`: the drafter ends blocks by
    value (`tandem.value`); adaptive gamma gives it room up to `max_gamma`."""

    gamma: Gamma
    policy: AdaptiveGamma
    pipelined: bool
    auto: bool
    by_value: bool = False
    advised: int | None = None
    probe: bool = False
    measure: bool = True
    alone: bool = False

    def size(self, room: int) -> tuple[int, int]:
        """(draft tokens for the block, the edge's own choice: the bound it reports for the cloud's advice)."""
        if self.probe:
            g = 0
        elif self.gamma == "adaptive":
            g = self.policy.max_gamma if self.by_value else self.policy.choose(self.pipelined, limit=max(room, 1))
        else:
            g = int(self.gamma)
        own = max(1, min(g, room))
        # by value the edge already prices positions at the measured pass cost, the crowd's batches included: of the
        # cloud's advice it takes the switch to the cloud stream (0), not a cap on the block
        if self.advised is not None and not (self.by_value and self.advised > 0):
            g = min(g, self.advised)
        return max(0, min(g, room)), own

    def report(self, limit: int) -> EdgeReport:
        p = self.policy
        return EdgeReport(p.draft_s.value * 1e3, p.rtt_s.value * 1e3, limit, self.pipelined)

    def last_of_fill(self, g: int) -> bool:
        """Whether the pipeline takes no more blocks before the next verdict."""
        return self.probe or g == 0 or self.measure

    def advise(self, reply: VerifyResult, stats: GenerationStats, probe_rounds: int, margin: float) -> str | None:
        """Auto, after a verdict: the cloud's advice, or with a cloud that gives none (after `probe_rounds`) the
        edge's own estimate of whether the cloud alone is faster. Returns who decided: "cloud", "edge" or None."""
        p, decided = self.policy, None
        if reply.advice is not None:  # the cloud decides, with every stream it serves in view
            self.advised, decided = reply.advice, "cloud"
            stats.advice.append(reply.advice)
            self.alone = reply.advice == 0
        elif stats.rounds >= probe_rounds:
            self.alone, decided = p.best_rate(self.pipelined) < p.cloud_rate() * margin, "edge"
        if self.alone:  # the edge's own view at the switch, for the record
            stats.estimate = {"spec_tok_s": p.best_rate(self.pipelined), "cloud_tok_s": p.cloud_rate(),
                              "rtt_ms": p.rtt_s.value * 1e3}
        return decided
