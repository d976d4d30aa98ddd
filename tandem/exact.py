"""Exact passes: a position's logits and keys independent of how many positions share its pass (batch invariance).

Below float32 a pass's shape moves its rows' logits (matmul paths for one row, SDPA's blocking), so speculative greedy
output would drift from the target alone's. `probe` checks both at start-up; `attend` is the shape-independent
attention. The why and the measurements: docs/exactness.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

log = logging.getLogger(__name__)
ATTENTION = "tandem_exact"
ATTENTION_ALONE = "tandem_exact_alone"
_ATTR = "_tandem_exact"
_PAD_ATTR = "_tandem_min_rows"
CHUNK = 64  # keys per step of the exact attention
ROWS = 8  # queries per step of the exact attention
FIXED_ROWS = 18  # the one pass shape when rows vary with the pass's size: a block of 16 plus one re-fed token
# a longer causal pass is a prefill (the same in every mode): its queries attend together, as SDPA blocks them
PREFILL_ROWS = 64


@dataclass(frozen=True)
class ExactPasses:
    """`min_rows`: no pass over fewer rows (short feeds are padded). `fixed`: every pass (but a prefill) runs at
    exactly `min_rows` rows, and cross-session batching is off. `alone`: each query attends through SDPA alone
    (`attend_alone`), where `attend` failed the probe. `why`: what start-up prints."""

    min_rows: int
    fixed: bool
    alone: bool
    why: str

    @property
    def attention(self) -> str:
        return ATTENTION_ALONE if self.alone else ATTENTION


def passes_of(model: torch.nn.Module) -> ExactPasses | None:
    return getattr(model, _ATTR, None)


def min_rows(model: torch.nn.Module) -> int:
    """The fewest rows a pass of `model` runs on: its exact passes', else `pad_single_rows`'s choice, else 1."""
    passes = passes_of(model)
    return passes.min_rows if passes is not None else int(getattr(model, _PAD_ATTR, 1))


def set_min_rows(model: torch.nn.Module, rows: int) -> None:
    """Pad `model`'s passes to at least `rows` rows (`tandem.kv.pad_single_rows` chooses, from a measurement)."""
    object.__setattr__(model, _PAD_ATTR, rows)


def enable(model: Any, passes: ExactPasses | None = None) -> ExactPasses:
    """Exact passes on a loaded HF causal LM (its attention replaced by `attend`); `passes`: else probed here."""
    passes = passes or probe(model)
    for m in (model, *(m for m in model.modules() if hasattr(m, "layer_idx"))):  # the model and its attention layers
        object.__setattr__(m, _ATTR, passes)
    model.config._attn_implementation = passes.attention
    return passes


def disable(model: Any, attention: str = "sdpa") -> None:
    """Plain passes again (a copy of an exact model made for float32, say): `attention` is transformers' own."""
    for m in (model, *(m for m in model.modules() if hasattr(m, "layer_idx"))):
        m.__dict__.pop(_ATTR, None)
    model.__dict__.pop(_PAD_ATTR, None)
    model.config._attn_implementation = attention


def probe(model: torch.nn.Module, max_rows: int = FIXED_ROWS) -> ExactPasses:
    """On this machine, with the model's dtype and shapes: does a row's matmul result change with the number of rows
    (1..max_rows), and does `attend` give a query the same result in every pass that holds it?"""
    first = next(model.parameters())
    varying = _linear_rows_vary(model, max_rows)
    cfg: Any = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 4))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    dim = int(getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 64 * heads) // heads)
    alone = not _attend_invariant(heads, kv_heads, dim, first.dtype, first.device, max_rows)
    attention = "each query alone through SDPA (the chunked attention failed its probe)" if alone else \
        "chunked float32 attention"
    if varying:
        return ExactPasses(max_rows, True, alone, f"matmul rows change with the pass's size here: every pass runs at "
                           f"{max_rows} rows, no cross-session batching; {attention}")
    return ExactPasses(2, False, alone, f"matmul rows match across pass sizes of 2 and more here: passes of 2 rows "
                       f"or more; {attention}")


def _linear_rows_vary(model: torch.nn.Module, max_rows: int) -> bool:
    linears = sorted((m for m in model.modules() if isinstance(m, torch.nn.Linear)),
                     key=lambda m: m.weight.numel(), reverse=True)
    gen = torch.Generator().manual_seed(0)
    shapes = list(dict.fromkeys((m.in_features, m.out_features) for m in linears))[:4]
    for lin in (next(m for m in linears if (m.in_features, m.out_features) == s) for s in shapes):
        x = torch.randn(max_rows + 1, lin.in_features, generator=gen).to(lin.weight)
        with torch.inference_mode():
            ref = lin(x[:max_rows])  # [max_rows, out]
            for m in range(2, max_rows):
                if not torch.equal(lin(x[:m]), ref[:m]) or not torch.equal(lin(x[1 : m + 1])[: m - 1], ref[1:m]):
                    return True
    return False


def _attend_invariant(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device,
                      max_rows: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    length = 2 * CHUNK + max_rows + 3
    q, k, v = (torch.randn(1, h, length, dim, generator=gen).to(dtype=dtype, device=device)
               for h in (heads, kv_heads, kv_heads))
    with torch.inference_mode():
        for t in (CHUNK - 1, CHUNK + 5, 2 * CHUNK + 1):
            ref = attend(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], None)[:, :, 0]
            for n, off in ((2, 1), (max_rows // 2, 3), (max_rows, max_rows - 1), (max_rows, 0)):
                start = t - off
                got = attend(q[:, :, start : start + n], k[:, :, : start + n], v[:, :, : start + n], None)
                if not torch.equal(got[:, :, off], ref):
                    return False
    return True


def attention_of(module: torch.nn.Module) -> Callable[..., torch.Tensor] | None:
    """The exact attention an attention layer uses (None: not exact)."""
    passes = passes_of(module)
    return None if passes is None else attend_alone if passes.alone else attend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
           visible: torch.Tensor | None = None) -> torch.Tensor:
    """q: [1, Hq, n, D]; k, v: [1, Hkv, L, D]; `visible` [n, L] bool, or None: the last n positions of k, causal.
    -> [1, Hq, n, D]. Every matmul and reduction here has one shape whatever n and L are, so a query's result depends
    only on its own values and the keys it sees: queries go in groups of `ROWS` (padded), keys in chunks of `CHUNK`
    (padded; masked keys weigh exactly 0), each (group, chunk) pair is one fixed-shape float32 matmul, and the
    softmax's sums and the weighted sum add the chunks in order."""
    n, total = q.shape[-2], k.shape[-2]
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    if visible is None and n > PREFILL_ROWS:
        causal = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)  # [n, L]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scaling,
                                              enable_gqa=kv_heads != heads)
    group = heads // kv_heads
    groups, chunks = -(-n // ROWS), -(-total // CHUNK)
    rows, keys = groups * ROWS, chunks * CHUNK
    if visible is None:
        visible = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    see = F.pad(visible, (0, keys - total, 0, rows - n))  # [R*, P]
    see[n:, 0] = True  # padding rows see one key: no empty softmax
    # [groups, Hkv, G*ROWS, D]: kv head j's G query heads, each over the group's ROWS queries
    qf = F.pad(q[0].float(), (0, 0, 0, rows - n)).view(kv_heads, group, groups, ROWS, dim)
    qf = qf.permute(2, 0, 1, 3, 4).reshape(groups, 1, kv_heads, group * ROWS, dim)
    kc = F.pad(k[0].float(), (0, 0, 0, keys - total)).view(kv_heads, chunks, CHUNK, dim).transpose(0, 1)
    vc = F.pad(v[0].float(), (0, 0, 0, keys - total)).view(kv_heads, chunks, CHUNK, dim).transpose(0, 1)
    scale = dim**-0.5 if scaling is None else scaling
    # [groups, chunks, Hkv, G*ROWS, CHUNK]
    scores = torch.matmul(qf, kc.contiguous().transpose(-1, -2)[None]) * scale
    mask = see.view(groups, ROWS, chunks, CHUNK).permute(0, 2, 1, 3)[:, :, None, None]  # [groups, chunks, 1, 1, R, C]
    scores = scores.view(groups, chunks, kv_heads, group, ROWS, CHUNK).masked_fill_(~mask, float("-inf"))
    top = scores.amax(dim=(1, -1), keepdim=True)  # [groups, 1, Hkv, G, ROWS, 1]
    weights = (scores - top).exp_().view(groups, chunks, kv_heads, group * ROWS, CHUNK)
    sums = weights.sum(-1)  # [groups, chunks, Hkv, G*ROWS]
    parts = torch.matmul(weights, vc.contiguous()[None])  # [groups, chunks, Hkv, G*ROWS, D]
    total_w, acc = sums[:, 0], parts[:, 0]
    for c in range(1, chunks):  # in order: chunks past a query's keys add exact zeros
        total_w, acc = total_w + sums[:, c], acc + parts[:, c]
    out = (acc / total_w[..., None]).view(groups, kv_heads, group, ROWS, dim)  # [groups, Hkv, G, ROWS, D]
    out = out.permute(1, 2, 0, 3, 4).reshape(1, heads, rows, dim)[:, :, :n]
    return out.to(q.dtype)


def attend_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                 visible: torch.Tensor | None = None) -> torch.Tensor:
    """`attend` the slow sure way, for a machine where `attend` fails the probe: each query through SDPA alone, over
    exactly the keys it sees (the same tensors in, the same result out)."""
    n, total = q.shape[-2], k.shape[-2]
    outs = []
    for i in range(n):
        idx = (torch.arange(total - n + i + 1, device=q.device) if visible is None
               else visible[i].nonzero()[:, 0])  # [m]
        outs.append(F.scaled_dot_product_attention(q[:, :, i : i + 1], k.index_select(2, idx), v.index_select(2, idx),
                                                   scale=scaling, enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outs, dim=2)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention seam, for both names: the layer's own exact attention (`attention_of`). The mask is None
    (no mask function is registered for these names: causal over the last n keys) or a caller's 4D one (a tree:
    additive, 0 where visible, or bool)."""
    visible = None
    if attention_mask is not None:
        mask = attention_mask[0, 0]  # [n, L]
        visible = mask if mask.dtype == torch.bool else mask == 0
    how = attention_of(module) or attend
    return how(query, key, value, scaling, visible).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)
AttentionInterface.register(ATTENTION_ALONE, _attention)
