"""A causal LM's state over one token sequence: the ids, and the KV cache over a prefix of them.

This module alone knows the cache layout. Rollback is a position counter and one cache crop.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from tandem.errors import CacheRollbackError


class SequenceState:
    """`tokens` is the committed sequence; the cache covers `tokens[:cached]` (plus, inside a forward, more)."""

    def __init__(self, model: PreTrainedModel, tokens: list[int]) -> None:
        self.model = model
        self.tokens = list(tokens)
        self.cache = DynamicCache(config=model.config)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Feed the uncached tail of `tokens`, then `extra` (not committed), in one pass.

        Returns [1 + len(extra), V] logits: the row predicting the token after `tokens`, then one row per extra token.
        The cache afterwards covers `tokens + extra`.
        """
        if self.cached > len(self.tokens):
            raise CacheRollbackError("the cache runs past the committed tokens: commit or roll back first")
        if self.cached == len(self.tokens):
            # everything is cached already: re-feed the last committed token to get its logits
            self.rollback(self.cached - 1)
        pending = self.tokens[self.cached :]
        return self.run(pending + list(extra))[len(pending) - 1 :]

    @torch.inference_mode()
    def run(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` at the next uncached positions; [len(ids), V] float32 logits."""
        start = self.cached
        feed = torch.tensor([ids], dtype=torch.long)  # [1, n]
        positions = torch.arange(start, start + len(ids))[None]  # [1, n]
        out = self.model(input_ids=feed, past_key_values=self.cache, position_ids=positions, use_cache=True)
        logits: torch.Tensor = out.logits[0].float()
        return logits

    def forward_tree(self, parents: list[int], nodes: list[int]) -> torch.Tensor:
        """Feed the uncached tail of `tokens`, then a tree of draft nodes (not committed), in one pass.

        Node i holds token `nodes[i]` and continues node `parents[i]` (-1: right after `tokens`); parents come before
        their children. Each node attends to the committed sequence and its own ancestors only, at position
        len(tokens) + depth. Returns [1 + len(nodes), V] logits: the row predicting the token after `tokens`, then the
        row after each node. The cache afterwards holds `tokens` + the nodes in order; only a prefix of it is ever
        kept (the caller lays a path it may keep first).
        """
        if not nodes:
            return self.forward()
        if self.cached > len(self.tokens):
            raise CacheRollbackError("the cache runs past the committed tokens: commit or roll back first")
        if self.cached == len(self.tokens):
            self.rollback(self.cached - 1)
        start, pending = self.cached, self.tokens[self.cached :]
        p, n = len(pending), len(nodes)
        depth: list[int] = []
        allowed = torch.zeros(n, n, dtype=torch.bool)  # [n, n] node i sees node j
        for i, parent in enumerate(parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: parents must come before their children")
            depth.append(0 if parent < 0 else depth[parent] + 1)
            if parent >= 0:
                allowed[i] = allowed[parent]
            allowed[i, i] = True
        q = p + n
        see = torch.ones(q, start + q, dtype=torch.bool)  # [q, kv] everything cached is visible
        see[:, start:] = torch.ones(q, q, dtype=torch.bool).tril()  # the pending tail is causal; nodes see all of it
        see[p:, start + p :] = allowed
        dtype = next(self.model.parameters()).dtype
        # an additive float mask works for both sdpa and eager attention (a bool one only for sdpa)
        mask = torch.zeros(q, start + q, dtype=dtype).masked_fill_(~see, torch.finfo(dtype).min)[None, None]
        positions = torch.tensor(list(range(start, start + p)) + [start + p + d for d in depth])[None]  # [1, q]
        feed = torch.tensor([pending + list(nodes)], dtype=torch.long)  # [1, q]
        with torch.inference_mode():
            out = self.model(input_ids=feed, attention_mask=mask, past_key_values=self.cache, position_ids=positions,
                             use_cache=True)
        logits: torch.Tensor = out.logits[0, p - 1 :].float()
        return logits

    def rollback(self, length: int) -> None:
        """Forget cached positions from `length` on."""
        drop = self.cached - length
        if drop < 0:
            raise CacheRollbackError(f"cannot roll back to {length}: only {self.cached} positions cached")
        if drop:
            self.cache.crop(-drop)
        if self.cached != length:
            raise CacheRollbackError(f"cache holds {self.cached} positions after a crop to {length}")

    def commit(self, new_tokens: list[int], keep_cached: int) -> None:
        """Append emitted tokens and keep at most `keep_cached` cached positions (those still on the sequence)."""
        self.tokens.extend(new_tokens)
        self.rollback(min(self.cached, keep_cached))
