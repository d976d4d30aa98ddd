"""What a completion reports beyond its text: the target's logprobs in OpenAI's two shapes, and a request's
speculative figures in vLLM's shape (`metrics.speculative_decoding`), with the edge's own beside them."""

from __future__ import annotations

import itertools
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from tandem.blocks import TokenLogprob
from tandem.stats import GenerationStats


class LogprobFormat:
    """Logprobs as OpenAI answers them: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`, completions
    `{tokens, token_logprobs, top_logprobs, text_offset}`. A token's text is its own decoding."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kind: Literal["text", "chat"]) -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self.offset = 0  # completions: characters of the tokens rendered so far
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = str(self.tokenizer.decode([token]))
        return self._text[token]

    def render(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [self._entry(lp.token, lp.logprob) | {
                "top_logprobs": [self._entry(i, v) for i, v in lp.top]} for lp in logprobs]}
        offsets = []
        for lp in logprobs:
            offsets.append(self.offset)
            self.offset += len(self.text(lp.token))
        return {"tokens": [self.text(lp.token) for lp in logprobs],
                "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.text(i): v for i, v in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def speculative_counts(drafts: int, draft_tokens: int, accepted: int, per_pos: list[int]) -> dict[str, Any]:
    """vLLM's counters for one request, and what they give: tokens per round and the share of drafts accepted."""
    return {
        "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
        "num_accepted_tokens_per_pos": list(per_pos),
        "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
    }


def edge_metrics(stats: GenerationStats) -> dict[str, Any]:
    """The speculative figures of a generation through the edge, and the edge's own: its link and its choices."""
    spec = speculative_counts(stats.rounds, stats.drafted, stats.accepted, stats.accepted_per_position)
    rtt = sum(stats.rtt_ms) / len(stats.rtt_ms) if stats.rtt_ms else None
    spec["edge"] = {
        "mode": stats.mode, "rtt_ms": rtt, "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
        "stale_blocks": stats.stale, "resumes": stats.resumes, "switched_to_cloud": stats.switched_to_cloud,
        "lossy": stats.lossy, "target_passes": stats.target_passes, "draft_passes": stats.draft_passes,
    }
    return spec


def merged_metrics(gens: list[Any]) -> dict[str, Any]:
    """`{"speculative_decoding": ...}` over a request's choices: counts summed, rates recomputed; the edge's figures
    per choice (`edge`: a list when n > 1)."""
    each = [g.speculative_metrics() for g in gens]
    per_pos = [sum(at) for at in itertools.zip_longest(*(m["num_accepted_tokens_per_pos"] for m in each),
                                                        fillvalue=0)]
    out = speculative_counts(sum(m["num_drafts"] for m in each), sum(m["num_draft_tokens"] for m in each),
                             sum(m["num_accepted_tokens"] for m in each), per_pos)
    edges = [m["edge"] for m in each if "edge" in m]
    if edges:
        out["edge"] = edges[0] if len(edges) == 1 else edges
    return {"speculative_decoding": out}
