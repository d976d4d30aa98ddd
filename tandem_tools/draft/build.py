"""Choose the K head tokens by frequency, and build an FR-Spec draft initialised from the target's embedding.

Initialisation (the layers keep transformers' random init):
- input embedding: a truncated SVD of the target's embedding E [V, D] = U S Vt: `embed_low` = U_r S_r [V, r], and
  `embed_up` maps the r coordinates into the draft's hidden space, whose basis is the top `hidden` right singular
  vectors P = Vt[:hidden] (zero-padded past D);
- head: the target's tied rows of the K tokens, times its final norm weight g, projected: (E[ids] * g) P^T [K, hidden]
  (the target's logits are (norm(h) * g) . E[y]); the draft's final norm weight scales that down so that the
  random-layer draft starts with logits of unit scale, and the bias starts at the tokens' log unigram frequency
  (the untrained draft is then a unigram model, not a confident random one).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from tandem.frspec import FRSpecDraft, draft_config
from tandem_tools.draft.data import Row

log = logging.getLogger("draft.build")
COVERAGE_KS = (1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768)


def token_counts(rows: Sequence[Row], prompts: bool = True) -> Counter[int]:
    """Occurrences of each id over the rows' outputs (and prompts)."""
    counts: Counter[int] = Counter()
    for r in rows:
        counts.update(r.output_ids.tolist())
        if prompts:
            counts.update(r.prompt_ids.tolist())
    return counts


def rank_tokens(counts: Counter[int], vocab: int, always: Sequence[int] = ()) -> torch.Tensor:
    """[V] int64: every id, `always` first, then by count (descending), ties (unseen ids too) by id: a BPE's low ids
    are its early, frequent merges, the best guess where the data says nothing."""
    cnt = np.zeros(vocab, dtype=np.int64)
    for t, c in counts.items():
        cnt[t] = c
    cnt[list(always)] = np.iinfo(np.int64).max
    order = np.lexsort((np.arange(vocab), -cnt))  # the last key sorts first
    return torch.from_numpy(order.astype(np.int64))


def coverage_table(ranked: torch.Tensor, rows: Sequence[Row], ks: Sequence[int] = COVERAGE_KS) -> dict[int, float]:
    """K -> fraction of the rows' generated tokens inside the first K ranked ids."""
    gen = np.concatenate([r.output_ids for r in rows]) if rows else np.zeros(0, np.int64)
    rank_of = np.empty(len(ranked), dtype=np.int64)
    rank_of[ranked.numpy()] = np.arange(len(ranked))
    ranks = rank_of[gen]
    return {k: float((ranks < k).mean()) if len(gen) else 0.0 for k in ks if k <= len(ranked)}


def _basis(vt: torch.Tensor, hidden: int) -> torch.Tensor:
    """[hidden, D]: the top `hidden` right singular vectors, zero rows past D."""
    d = vt.shape[1]
    p = torch.zeros(hidden, d)  # [hidden, D]
    n = min(hidden, vt.shape[0])
    p[:n] = vt[:n]
    return p


@torch.no_grad()
def build_draft(
    target: PreTrainedModel,
    token_ids: torch.Tensor,  # [K]
    layers: int,
    hidden: int,
    rank: int,
    intermediate: int | None = None,
    seed: int = 0,
    counts: torch.Tensor | None = None,  # [K] occurrences of the head tokens in the data, for the bias
) -> tuple[FRSpecDraft, dict[str, float]]:
    """The draft, and how much of the target's embedding the rank-r SVD keeps (energy fraction)."""
    tcfg = target.config
    torch.manual_seed(seed)
    cfg = draft_config(
        int(tcfg.vocab_size), hidden, layers, intermediate=intermediate,
        max_positions=int(tcfg.max_position_embeddings),
        rope_theta=float((getattr(tcfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        rms_norm_eps=float(tcfg.rms_norm_eps), bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
        pad_token_id=tcfg.pad_token_id,
    )
    model = FRSpecDraft(cfg, rank, token_ids)
    hf: Any = target  # transformers' accessors are untyped here
    emb = hf.get_input_embeddings().weight.detach().float()  # [V, D]
    u, s, vt = torch.linalg.svd(emb, full_matrices=False)  # [V, D], [D], [D, D]
    r = min(rank, len(s))
    p = _basis(vt, hidden)  # [hidden, D]
    model.embed_low.weight.zero_()
    model.embed_low.weight[:, :r] = u[:, :r] * s[:r]
    model.embed_up.weight.zero_()
    model.embed_up.weight[:, :r] = p @ vt[:r].T  # [hidden, r]
    norm = getattr(getattr(target, "model", target), "norm", None)
    g = norm.weight.detach().float() if norm is not None else torch.ones(emb.shape[1])  # [D]
    out_emb = hf.get_output_embeddings()
    out = out_emb.weight.detach().float() if out_emb is not None else emb  # [V, D]
    head = (out[token_ids] * g) @ p.T  # [K, hidden]
    model.lm_head.weight.copy_(head)
    model.backbone.norm.weight.fill_(1.0 / float(head.norm(dim=-1).mean()))
    model.lm_head.bias.zero_()
    if counts is not None:
        prior = (counts.double() + 0.5).log()  # [K]
        model.lm_head.bias.copy_(prior - prior.mean())
    energy = (s**2).cumsum(0) / (s**2).sum()  # [D]
    info = {"svd_energy_rank": float(energy[r - 1]), "svd_energy_hidden": float(energy[min(hidden, len(s)) - 1])}
    return model, info
