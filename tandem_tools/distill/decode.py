"""Batched decoding with a KV cache, per-row greedy or seeded sampling, and the target's top-k log-probabilities.

A hand-written loop rather than `model.generate` because it (a) seeds every row with its own `torch.Generator`,
so a sampled answer depends (up to float rounding) on its prompt id, not on its batch, (b) mixes greedy and
sampled rows (and different temperatures) in one batch, (c) drops finished rows from the batch and the KV cache,
which `generate` does not, and (d) writes into a preallocated KV cache (no per-step `torch.cat`).
Measured with 1 thread (SmolLM2-135M, fp32): synthetic, 64 new tokens, sampling, batch 16/32/64: own loop
96/138/158 tok/s vs `generate` 79/101/121. Real prompt mix, 256 new tokens, stop at EOS: batch 32/64 -> 95/98 tok/s
(with `DynamicCache`: 83/77; batch 128: 45). Greedy rows matched unbatched `generate` token for token in our checks.
Log-probabilities are the target's *untempered* distribution (`log_softmax` of the raw logits that produced each
token), the quantity a KL term is trained against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

TOP_K = 32


@dataclass(frozen=True)
class RowSpec:
    """One prompt to decode and how to choose its tokens."""

    prompt_ids: list[int]
    mode: str = "greedy"  # "greedy" | "sample"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class RowResult:
    """A decoded answer: its tokens, why it stopped, and the target's top-k (ids, log-probs) at every position."""

    output_ids: list[int]
    finish: str  # "eos" | "length"
    top_ids: np.ndarray  # [n, TOP_K] int32
    top_logprobs: np.ndarray  # [n, TOP_K] float16


class PreallocLayer(DynamicLayer):
    """A KV-cache layer with room for `capacity` positions allocated up front.

    `DynamicLayer` grows by `torch.cat` at every step, copying the whole cache; at batch 64 and a few hundred
    positions that copy was ~35% of a decode step on CPU. Here each step writes in place and returns a view.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0
        self._k = self._v = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((batch, heads, self.capacity, dim))
        self._v = value_states.new_empty((batch, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def prealloc_cache(model: PreTrainedModel, capacity: int) -> Cache:
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocLayer(capacity) for _ in range(layers)])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for a list of token id lists."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' `TopPLogitsWarper` does it (keeps at least one token)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def sample_row(scores: torch.Tensor, top_p: float, gen: torch.Generator | None, shortlist: int = 1024) -> int:
    """Seeded nucleus sample from one row of tempered scores.

    The nucleus is found among the `shortlist` most likely tokens (a partial sort), falling back to the full
    sort of `top_p_filter` when those do not hold `top_p` of the mass; same distribution either way.
    """
    probs = scores.softmax(dim=-1)
    top_probs, top_idx = probs.topk(min(shortlist, probs.shape[-1]))
    cum = top_probs.cumsum(dim=-1)
    if top_p < 1.0 and cum[-1] >= top_p:
        keep = int((cum - top_probs < top_p).sum())  # the tokens before the mass reaches top_p, plus the one crossing
        choice = torch.multinomial(top_probs[:keep], 1, generator=gen)
        return int(top_idx[choice])
    return int(torch.multinomial(top_p_filter(scores, top_p).softmax(dim=-1), 1, generator=gen))


def choose_tokens(logits: torch.Tensor, specs: list[RowSpec], gens: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, seeded nucleus sampling for the others."""
    nxt = logits.argmax(dim=-1)
    for row, (spec, gen) in enumerate(zip(specs, gens, strict=True)):
        if spec.mode == "sample":
            nxt[row] = sample_row(logits[row] / max(spec.temperature, 1e-5), spec.top_p, gen)
    return nxt


@torch.inference_mode()
def decode_batch(
    model: PreTrainedModel,
    specs: list[RowSpec],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    ignore_eos: bool = False,
    top_k: int = TOP_K,
) -> list[RowResult]:
    """Decode all rows together (left padding, shared KV cache), dropping rows from the batch once they end."""
    ids, mask = left_pad([s.prompt_ids for s in specs], pad_id)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    gens: list[torch.Generator | None] = []
    for spec in specs:
        gens.append(torch.Generator().manual_seed(spec.seed) if spec.mode == "sample" else None)
    outputs: list[list[int]] = [[] for _ in specs]
    tops_i: list[list[torch.Tensor]] = [[] for _ in specs]
    tops_l: list[list[torch.Tensor]] = [[] for _ in specs]
    finish = ["length"] * len(specs)
    alive = list(range(len(specs)))  # original row index of every row still in the batch
    cache = prealloc_cache(model, ids.shape[1] + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    last_pos = positions[:, -1:]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        top_vals, top_idx = logits.topk(top_k, dim=-1)
        top_vals = top_vals - torch.logsumexp(logits, dim=-1, keepdim=True)  # log-probs of the untempered softmax
        nxt = choose_tokens(logits, [specs[r] for r in alive], [gens[r] for r in alive])
        keep: list[int] = []
        for i, row in enumerate(alive):
            token = int(nxt[i])
            outputs[row].append(token)
            tops_i[row].append(top_idx[i])
            tops_l[row].append(top_vals[i])
            if token in eos_ids and not ignore_eos:
                finish[row] = "eos"
            else:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, dtype=torch.long)
            cache.batch_select_indices(sel)
            mask, last_pos, nxt = mask[sel], last_pos[sel], nxt[sel]
            alive = [alive[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=-1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos, cache=cache, logits_to_keep=1)
    results = []
    for row in range(len(specs)):
        results.append(
            RowResult(
                output_ids=outputs[row],
                finish=finish[row],
                top_ids=torch.stack(tops_i[row]).to(torch.int32).numpy(),
                top_logprobs=torch.stack(tops_l[row]).to(torch.float16).numpy(),
            )
        )
    return results
