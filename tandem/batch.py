"""One forward pass over several sequences' separate KV caches: batched verification across sessions.

`forward_batch(states, extras)` returns what each state's solo `forward(x)` (a line) or `forward_tree` (a draft
tree) returns and leaves each cache as that solo pass would: the rows' feeds packed side by side, each attending to
its own cache only (docs/capacity.md), a line causally, a tree through its tree mask. No padding, no copy of any
cache, and rollback stays each state's one crop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from tandem import exact
from tandem.kv import SequenceState, pending_tail, tree_mask
from tandem.models import State

_ATTENTION = "tandem_packed"
# models whose attention goes through transformers' AttentionInterface
_SUPPORTED = ("sdpa", "eager", exact.ATTENTION, exact.ATTENTION_ALONE)
_current = threading.local()  # the packed cache of the pass running on this thread


class Tree(Protocol):
    """A block with candidates, as `SequenceState.forward_tree` takes it (`tandem.session.TreeLayout` is one)."""

    @property
    def parents(self) -> list[int]: ...
    @property
    def nodes(self) -> list[int]: ...


def forward_batch(states: list[State], extras: Sequence[list[int] | Tree]) -> list[torch.Tensor]:
    """Each state's solo pass in one model call: `s.forward(extra)` for a line of tokens, `s.forward_tree(parents,
    nodes)` for a tree (per state [1 + len(extra or nodes), V] float32 logits). The states share one model, whose
    attention implementation the pass switches while it runs; a plain, unpadded forward of the same model on another
    thread meanwhile still gets causal attention."""
    if len(states) != len(extras):
        raise ValueError(f"{len(states)} states but {len(extras)} blocks")
    if len({id(s) for s in states}) != len(states):
        raise ValueError("a state appears twice in one batch")
    torch_states = [s for s in states if isinstance(s, SequenceState)]  # llama.cpp sequences: one pass each
    if len(states) == 1 or len(torch_states) < len(states) or not _batchable(torch_states):
        return [s.forward(x) if isinstance(x, list | tuple) else s.forward_tree(x.parents, x.nodes)
                for s, x in zip(states, extras, strict=True)]
    feeds: list[list[int]] = []
    skips: list[int] = []  # rows of each feed before the one predicting the token after `tokens`
    layouts: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # positions [n_i], keys seen [n_i, L_i] (None: causal)
    for s, extra in zip(torch_states, extras, strict=True):
        pending_tail(s)  # as in `forward`: the last committed token fed again when everything is cached
        if s.exact is not None:
            s.catch_up()  # exact passes: a longer tail (a candidate's tokens) goes in first, as solo passes do
        pending, start = s.tokens[s.cached :], s.cached
        if isinstance(extra, list | tuple):
            ids, parents = list(extra), None
        else:  # a tree without nodes: a plain `forward`, as in `forward_tree`
            ids, parents = list(extra.nodes), extra.parents if extra.nodes else None
        feeds.append(pending + ids)
        if parents is None:
            layouts.append((torch.arange(start, start + len(feeds[-1])), None))
        else:
            positions, see = tree_mask(start, len(pending), parents)
            layouts.append((positions, see.to(s.device)))
        skips.append(len(pending) - 1)
    return _run_packed(torch_states, feeds, skips, layouts)


def _batchable(states: list[SequenceState]) -> bool:
    """One model with a standard attention, and caches of plain growing layers (no sliding window, no quantising)."""
    model = states[0].model
    if getattr(model.config, "_attn_implementation", None) not in _SUPPORTED:
        return False
    passes = exact.passes_of(model)
    if passes is not None and passes.fixed:  # rows change with the pass's size here: one session per pass
        return False
    return all(
        s.model is model and isinstance(s.cache, DynamicCache)
        and all(type(layer) is DynamicLayer for layer in s.cache.layers)
        for s in states
    )


class _PackedCache(DynamicCache):
    """Stands in for the batch's cache: splits each layer's new keys and values by row and appends them to the rows'
    own caches; the attention reads the rows' whole keys and values from `full`."""

    def __init__(self, states: list[SequenceState], lengths: list[int], masks: list[torch.Tensor | None],
                 config: Any) -> None:
        super().__init__(config=config)
        self.states, self.lengths, self.masks = states, lengths, masks  # masks: per row [n_i, L_i] or None (causal)
        self.full: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> per row ([1, H, L_i, D]) x 2

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, H, T, D], the rows side by side."""
        full, start = [], 0
        for s, n in zip(self.states, self.lengths, strict=True):
            end = start + n
            assert isinstance(s.cache, DynamicCache)  # `_batchable` let only these through
            full.append(s.cache.update(key_states[:, :, start:end], value_states[:, :, start:end], layer_idx))
            start = end
        self.full[layer_idx] = full
        return key_states, value_states


def _packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query: [1, Hq, T, D], the rows side by side; each row attends to its own cache (causally, or through its tree
    mask). -> [1, T, Hq, D]"""
    cache: _PackedCache | None = getattr(_current, "cache", None)
    attend = exact.attention_of(module) or _causal  # an exact model's rows attend as in its solo passes
    if cache is None:
        # the same model object running on another thread meanwhile (a plain, unpadded forward): causal over its keys
        return attend(query, key, value, scaling).transpose(1, 2).contiguous(), None
    outs, start = [], 0
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    for (k, v), n, see in zip(cache.full[layer], cache.lengths, cache.masks, strict=True):  # k, v: [1, Hkv, L, D]
        outs.append(attend(query[:, :, start : start + n], k, v, scaling, see))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
            visible: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, n, D] the last n positions of k, v: [B, Hkv, L, D]; each sees every key up to its own, or those
    `visible` [n, L] says. -> like q"""
    n, total = q.shape[-2], k.shape[-2]
    if visible is None and n > 1:
        visible = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)  # [n, L]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=gqa)


AttentionInterface.register(_ATTENTION, _packed_attention)


@torch.inference_mode()
def _run_packed(states: list[SequenceState], feeds: list[list[int]], skips: list[int],
                layouts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    model = states[0].model
    lengths = [len(f) for f in feeds]
    pasts = [s.cached for s in states]
    device = states[0].device
    ids = torch.tensor([[t for f in feeds for t in f]], dtype=torch.long, device=device)  # [1, T]
    positions = torch.cat([p for p, _ in layouts])[None].to(device)  # [1, T]
    cache = _PackedCache(states, lengths, [see for _, see in layouts], model.config)
    saved = model.config._attn_implementation
    _current.cache = cache
    model.config._attn_implementation = _ATTENTION
    try:
        out = model(input_ids=ids, position_ids=positions, use_cache=True, **{states[0].cache_kw: cache})
    except BaseException:
        _restore(states, pasts)  # a pass cut short has grown some layers of some caches: undo it
        raise
    finally:
        model.config._attn_implementation = saved
        _current.cache = None
    logits = out.logits[0].float()  # [T, V]
    rows, start = [], 0
    for n, skip in zip(lengths, skips, strict=True):
        rows.append(logits[start + skip : start + n])
        start += n
    return rows


def _restore(states: list[SequenceState], pasts: list[int]) -> None:
    for s, past in zip(states, pasts, strict=True):
        assert isinstance(s.cache, DynamicCache)
        for layer in s.cache.layers:
            extra = layer.get_seq_length() - past  # type: ignore[union-attr]
            if extra > 0:
                layer.crop(-extra)  # type: ignore[union-attr]
