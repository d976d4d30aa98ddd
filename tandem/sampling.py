"""Sampling parameters and the one transformation (temperature, top-k, top-p, min-p) applied alike to p and q; its
sequence-dependent part (penalties, logit bias, grammar) is `tandem.shaping`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tandem.errors import InvalidRequestError
from tandem.grammar import Grammar

MIN_TEMPERATURE = 1e-4
MAX_LOGPROBS = 20
MIN_REPETITION_PENALTY = 0.01  # a seen token's logit is scaled by at most 100: float32 stays finite


@dataclass(frozen=True)
class SamplingParams:
    """`temperature == 0` means greedy. `seed` makes a sampled request reproducible."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability (after temperature); 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: Grammar | None = None  # structured output
    logprobs: int | None = None  # the target's log-probability of each token and its top-k alternatives; None: off
    emitted: int = 0  # a resumed session: the prompt's last `emitted` tokens (all, if more) are output already

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow float32
            raise InvalidRequestError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1) or math.isnan(self.top_p):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            raise InvalidRequestError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 10], got "
                                      f"{self.repetition_penalty!r}")
        if any(not math.isfinite(b) or abs(b) > 100 for _, b in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.emitted < 0:
            raise InvalidRequestError(f"emitted must be >= 0, got {self.emitted!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shaped(self) -> bool:
        """Whether the logits depend on the sequence (penalties, bias, grammar): see `tandem.shaping`."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.grammar is not None)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k, top-p and min-p (in that order).

    The same function must produce both p (target) and q (draft): applying a setting to one side only breaks
    the lossless guarantee.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False  # rounding can leave the mass before it a hair above a tiny top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        # log p(x) < log(min_p) + log p_max, in logits: the softmax's normaliser cancels
        floor = logits.max(-1, keepdim=True).values + math.log(params.min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from [V] probabilities."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (where the probabilities it draws from live); a seed gives one stream per device kind."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
