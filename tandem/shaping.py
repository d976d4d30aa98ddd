"""The part of the one sampling transformation that depends on the sequence: penalties, logit bias and the grammar
mask, with the same `Shaper` rules for the target's p and the draft's q (vLLM's and OpenAI's; docs/api.md, "One
transformation for p and q"), before `tandem.sampling.logits_to_probs`.
"""

from __future__ import annotations

from typing import Any

import torch

from tandem.errors import InvalidRequestError
from tandem.grammar import GrammarState
from tandem.sampling import SamplingParams


class Shaper:
    """Shapes rows of logits, row r following `context + paths[r]`. `prompt_len`: where the output starts in the
    context (a resumed session's prompt holds output already: `params.emitted`)."""

    def __init__(self, params: SamplingParams, vocab_size: int, tokenizer: Any = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.params = params
        self.vocab_size = vocab_size
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        self.bias: torch.Tensor | None = None  # [V]
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for t, b in params.logit_bias:
                self.bias[t] += b
        self.grammar: GrammarState | None = None
        if params.grammar is not None:
            if tokenizer is None:
                raise InvalidRequestError("structured output needs the model's tokenizer, and this model has none")
            self.grammar = GrammarState(params.grammar, tokenizer, vocab_size, eos_token_ids)
        p = params
        self.counts = bool(p.presence_penalty or p.frequency_penalty)
        self.active = self.counts or p.repetition_penalty != 1.0 or self.bias is not None or self.grammar is not None

    def shape(self, logits: torch.Tensor, context: list[int], prompt_len: int,
              paths: list[list[int]]) -> torch.Tensor:
        """[R, V] logits -> [R, V] float32 shaped; row r follows context + paths[r]. A row after a token the grammar
        refuses is left unmasked: no verdict can reach it."""
        if not self.active:
            return logits
        out = logits.float().clone()  # [R, V]
        p, dev = self.params, logits.device
        if self.bias is not None:
            out += self.bias.to(dev)
        output = context[prompt_len:]
        # counted once over the committed sequence; each row adds only its own path
        in_output = self._count(output, dev)  # [V]
        in_context = self._count(context[:prompt_len], dev) + in_output  # [V]
        for r, path in enumerate(paths):
            row = out[r]  # [V] (a view)
            on_path = self._count(path, dev)  # [V]
            if self.counts:
                n = in_output + on_path
                row -= p.presence_penalty * (n > 0) + p.frequency_penalty * n
            if p.repetition_penalty != 1.0:
                penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where((in_context + on_path) > 0, penalised, row))
            if self.grammar is not None and self.grammar.sync(output + path):
                row.masked_fill_(~self.grammar.allowed().to(dev), float("-inf"))
        return out

    def _count(self, tokens: list[int], device: torch.device) -> torch.Tensor:
        """[V] float32: how often each token occurs in `tokens`."""
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=self.vocab_size)
        return counts[: self.vocab_size].to(device, torch.float32)

    def forced(self, context: list[int], prompt_len: int) -> list[int]:
        """The tokens the grammar forces after `context` ([] without a grammar)."""
        if self.grammar is None or not self.grammar.sync(context[prompt_len:]):
            return []
        return self.grammar.forced()


def line_paths(tokens: list[int]) -> list[list[int]]:
    """The rows of a verification pass over a block: after the context, then after each of its tokens."""
    return [tokens[:i] for i in range(len(tokens) + 1)]


def tree_paths(parents: list[int], nodes: list[int]) -> list[list[int]]:
    """The rows of a pass over a tree: after the context, then after each node's root path."""
    paths: list[list[int]] = [[]]
    for parent, tok in zip(parents, nodes, strict=True):
        paths.append([*(paths[parent + 1]), tok])
    return paths
