"""What one generation reports: its tokens, why it finished, and its figures (speculative and network)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from tandem.blocks import FinishReason, TokenLogprob

OnTokens = Callable[[list[int]], None]
OnLogprobs = Callable[[list[TokenLogprob]], None]  # called with a step's logprobs just before its tokens


class RoundShape(NamedTuple):
    """A verified block as sent and judged: nodes (main chain + candidate tokens; pipelined: past what was already
    committed), the chain's, the accepted path's length, of it off the chain (a taken candidate's), tokens emitted."""

    nodes: int
    chain: int
    accepted: int
    branch: int
    tokens: int


@dataclass
class GenerationStats:
    mode: str
    gamma: int = 0  # the fixed block length asked for (0: adaptive, or the target alone)
    rounds: int = 0  # verified blocks (stale ones not counted)
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    target_passes: int = 0
    draft_passes: int = 0
    tokens: int = 0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_ms: list[float] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)
    stale: int = 0
    resumes: int = 0
    lossy: bool = False
    switched_to_cloud: bool = False
    edge_tokens: int = 0  # tokens from the draft alone (mode edge, or the fallback): not the target's
    estimate: dict[str, float] = field(default_factory=dict)  # auto mode's decision figures
    advice: list[int] = field(default_factory=list)  # auto: the block lengths the cloud advised, verdict by verdict
    switched_at: int | None = None  # auto: the tokens emitted when the session went on as a cloud stream
    # per emitted token, where it came from: d a draft-model token the target accepted, b a sibling's (a draft tree's
    # branch), p a pool phrase's (or a candidate's) token it accepted, t the target's own (recovered, bonus,
    # or the target alone), e the draft alone
    origins: str = ""
    shapes: list[RoundShape] = field(default_factory=list)  # per verified block, in order

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_target_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def count_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.target_passes += 1
        self.drafted += drafted
        self.accepted += accepted
        per_pos = self.accepted_per_position
        per_pos.extend([0] * (accepted - len(per_pos)))  # blocks lengthened beyond gamma
        for i in range(accepted):
            per_pos[i] += 1

    def as_dict(self) -> dict[str, object]:
        lists = ("rtt_ms", "gammas", "origins", "shapes")
        d: dict[str, object] = {k: v for k, v in self.__dict__.items() if k not in lists}
        d.update(
            acceptance_rate=self.acceptance_rate, mean_acceptance_length=self.mean_acceptance_length,
            tokens_per_target_pass=self.tokens_per_target_pass, tokens_per_s=self.tokens_per_s,
            rtt_ms_mean=sum(self.rtt_ms) / len(self.rtt_ms) if self.rtt_ms else None,
            gamma_mean=sum(self.gammas) / len(self.gammas) if self.gammas else None,
            gamma_last=self.gammas[-1] if self.gammas else None,
        )
        return d


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # the target's, one per token, when asked for
