"""A causal LM's state over one token sequence: the ids, and the KV cache over a prefix of them.

This module alone knows the cache layout: HF's `DynamicCache`, or, for a model with the fast path on
(`tandem.fastlm`), `StaticKV`, preallocated tensors indexed by slot. Rollback is a position counter and one cache
crop, for both.
"""

from __future__ import annotations

import inspect
import time
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from tandem import exact, fastlm
from tandem.errors import CacheRollbackError


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name a model's forward takes its KV cache by: `cache` in recent transformers (where `past_key_values`
    warns, and goes in 5.40), else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (a weightless stand-in: the CPU)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


class StaticKV:
    """The fast path's cache: per layer a [kv_heads, capacity, head_dim] key and value tensor; slots [0, length) hold
    the sequence's positions in order. Capacity grows in steps of `fastlm.CACHE_STEP` (a copy), never shrinks."""

    def __init__(self, fast: fastlm.FastLM, capacity: int) -> None:
        self.fast = fast
        self.k, self.v = fast.new_cache(capacity)
        self.length = 0

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[1])

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """DynamicCache's crop: a negative `max_length` drops that many positions; here, only the length moves."""
        self.length = self.length + max_length if max_length < 0 else min(self.length, max_length)

    def reserve(self, slots: int) -> None:
        """Room for `slots` slots (plus a compiled pass's padding rows)."""
        need = slots + max(self.fast.buckets, default=1)
        if need <= self.capacity:
            return
        capacity = -(-need // fastlm.CACHE_STEP) * fastlm.CACHE_STEP
        k, v = self.fast.new_cache(capacity)
        with torch.inference_mode():
            for old, new in zip((*self.k, *self.v), (*k, *v), strict=True):
                new[:, : self.length] = old[:, : self.length]
        self.k, self.v = k, v


class SequenceState:
    """`tokens` is the committed sequence; the cache covers `tokens[:cached]` (plus, inside a forward, more)."""

    def __init__(self, model: PreTrainedModel, tokens: list[int]) -> None:
        self.model = model
        self.tokens = list(tokens)
        self.fast = fastlm.fast_path_of(model)
        self.cache: DynamicCache | StaticKV = (
            DynamicCache(config=model.config) if self.fast is None else StaticKV(self.fast, fastlm.CACHE_STEP)
        )
        self.device = model_device(model)
        self.exact = exact.passes_of(model)
        self.min_rows = exact.min_rows(model)
        self.cache_kw = cache_kwarg(model)

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Feed the uncached tail of `tokens`, then `extra` (not committed), in one pass; [1 + len(extra), V] logits:
        the row predicting the one after `tokens`, then one per extra token; the cache then holds `tokens + extra`."""
        return feed_tail(self, extra)

    def catch_up(self, bulk: int = 0) -> None:
        """Cache every committed token but the last (a prefill). Exact passes: the first `bulk` positions in one pass
        (a prompt's prefill, the same in every mode), the rest in passes of at most `exact.PREFILL_ROWS`, whose rows
        come out as in any other exact pass (a resume re-feeds the output so far)."""
        end = len(self.tokens) - 1
        if self.cached > end:
            raise CacheRollbackError("the cache runs past the committed tokens: commit or roll back first")
        if self.exact is None or self.fast is not None:
            if self.cached < end:
                self.run(self.tokens[self.cached : end])
            return
        if self.cached < min(bulk, end):
            self.run(self.tokens[self.cached : min(bulk, end)])
        while self.cached < end:
            self.run(self.tokens[self.cached : min(end, self.cached + exact.PREFILL_ROWS)])

    @torch.inference_mode()
    def run(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` at the next uncached positions; [len(ids), V] float32 logits."""
        start = self.cached
        if self.fast is not None:
            slots = torch.arange(start, start + len(ids), device=self.device)  # [n]
            return self._run_fast(ids, slots.clone(), slots, None)
        # never fewer rows than `min_rows` (exact passes: the shape whose rows match every larger one; a bfloat16 draft:
        # a faster shape than one row); padding rows come last, so no real row sees them, and their entries are dropped
        pad = max(0, self.min_rows - len(ids))
        feed = torch.tensor([ids + ids[-1:] * pad], dtype=torch.long, device=self.device)  # [1, n + pad]
        positions = torch.arange(start, start + len(ids) + pad, device=self.device)[None]  # [1, n + pad]
        out = self.model(input_ids=feed, position_ids=positions, use_cache=True, **{self.cache_kw: self.cache})
        if pad:
            self.cache.crop(-pad)
        logits: torch.Tensor = out.logits[0, : len(ids)].float()
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
        pending = pending_tail(self)
        start, p, n = self.cached, len(pending), len(nodes)
        pad = 0 if self.fast is not None else max(0, self.min_rows - p - n)
        q = p + n + pad
        positions, see = tree_mask(start, p, parents, pad)
        nodes = [*nodes, *nodes[-1:] * pad]
        if self.fast is not None:
            with torch.inference_mode():
                rows = self._run_fast(pending + list(nodes), positions.to(self.device),
                                      torch.arange(start, start + q, device=self.device), see.to(self.device))
            return rows[p - 1 :]
        dtype = next(self.model.parameters()).dtype
        # an additive float mask works for both sdpa and eager attention (a bool one only for sdpa)
        mask = torch.zeros(q, start + q, dtype=dtype).masked_fill_(~see, torch.finfo(dtype).min)[None, None]
        feed = torch.tensor([pending + list(nodes)], dtype=torch.long, device=self.device)  # [1, q]
        with torch.inference_mode():
            out = self.model(input_ids=feed, attention_mask=mask.to(self.device), use_cache=True,
                             position_ids=positions[None].to(self.device), **{self.cache_kw: self.cache})
        if pad:
            self.cache.crop(-pad)
        logits: torch.Tensor = out.logits[0, p - 1 : q - pad].float()
        return logits

    def _run_fast(self, ids: list[int], positions: torch.Tensor, slots: torch.Tensor,
                  see: torch.Tensor | None) -> torch.Tensor:
        """The fast path's pass: `ids` at `slots` (the next ones), RoPE at `positions` ([n] each); `see` [n, start + n]
        which slots each query sees (None: causal). [n, V] float32 logits; the cache then covers the new slots."""
        cache = self.cache
        assert isinstance(cache, StaticKV) and self.fast is not None
        end = cache.length + len(ids)
        cache.reserve(end)
        mask = torch.zeros(len(ids), cache.capacity, dtype=torch.bool, device=self.device)  # [n, S]
        if see is None:
            mask[:, :end] = torch.ones(len(ids), end, dtype=torch.bool, device=self.device).tril(cache.length)
        else:
            mask[:, :end] = see
        feed = torch.tensor(ids, dtype=torch.long, device=self.device)  # [n]
        logits = self.fast.run(feed, positions, slots, mask, cache.k, cache.v)
        cache.length = end
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

    def close(self) -> None:
        """Free the cache now: the state is not used again."""
        self.cache = None  # type: ignore[assignment]

    def commit(self, new_tokens: list[int], keep_cached: int) -> None:
        """Append emitted tokens and keep at most `keep_cached` cached positions (those still on the sequence)."""
        self.tokens.extend(new_tokens)
        self.rollback(min(self.cached, keep_cached))


class _Feeds(Protocol):
    tokens: list[int]

    @property
    def cached(self) -> int: ...

    def rollback(self, length: int) -> None: ...
    def run(self, ids: list[int]) -> torch.Tensor: ...


def tree_mask(start: int, pending: int, parents: list[int], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass of `pending` uncached committed tokens, then tree nodes (`parents` as in `SequenceState.forward_tree`),
    then `pad` padding rows, over `start` cached positions: (positions [q], see [q, start + q] bool: the keys each
    query sees), q = pending + nodes + pad. The tail is causal; node i sees it and its own ancestors, at position
    start + pending + depth; padding rows see everything before them."""
    n = len(parents)
    depth: list[int] = []
    allowed = torch.zeros(n, n, dtype=torch.bool)  # [n, n] node i sees node j
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}: parents must come before their children")
        depth.append(0 if parent < 0 else depth[parent] + 1)
        if parent >= 0:
            allowed[i] = allowed[parent]
        allowed[i, i] = True
    q = pending + n + pad
    see = torch.ones(q, start + q, dtype=torch.bool)  # [q, kv] everything cached is visible
    see[:, start:] = torch.ones(q, q, dtype=torch.bool).tril()
    see[pending : pending + n, start + pending : start + pending + n] = allowed
    depth += [(depth[-1] if depth else -1) + 1 + i for i in range(pad)]
    positions = torch.tensor(list(range(start, start + pending)) + [start + pending + d for d in depth])  # [q]
    return positions, see


def pending_tail(state: _Feeds) -> list[int]:
    """The uncached tail of `tokens`, never empty: where everything is cached, the last committed token is rolled back
    to be fed again (its row's logits predict the next token)."""
    if state.cached > len(state.tokens):
        raise CacheRollbackError("the cache runs past the committed tokens: commit or roll back first")
    if state.cached == len(state.tokens):
        state.rollback(state.cached - 1)
    return state.tokens[state.cached :]


def feed_tail(state: _Feeds, extra: list[int] | tuple[int, ...]) -> torch.Tensor:
    """`forward` on any runtime's state: the uncached tail of `tokens`, then `extra`, in one pass; [1 + len(extra), V]
    logits from the row after `tokens` on."""
    pending = pending_tail(state)
    return state.run(pending + list(extra))[len(pending) - 1 :]


def pad_single_rows(model: torch.nn.Module, context: int = 64, reps: int = 3) -> tuple[bool, float, float]:
    """Where a one-row pass is slower than a two-row one (bfloat16 on a CPU: the matrix-vector path), pad a drafter's
    single-token steps to two rows. Measured here on the model itself: (padded, 1-row ms, 2-row ms)."""
    kw = cache_kwarg(model)
    device = next(model.parameters()).device
    ids = torch.zeros(1, context + 2, dtype=torch.long, device=device)
    best = {1: float("inf"), 2: float("inf")}
    with torch.inference_mode():
        for _ in range(reps):
            for rows in (1, 2):
                cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
                model(input_ids=ids[:, :context], use_cache=True, **{kw: cache})
                t0 = time.perf_counter()
                model(input_ids=ids[:, context : context + rows], use_cache=True, **{kw: cache})
                best[rows] = min(best[rows], time.perf_counter() - t0)
    padded = best[2] < 0.95 * best[1]
    exact.set_min_rows(model, 2 if padded else 1)
    return padded, best[1] * 1e3, best[2] * 1e3
