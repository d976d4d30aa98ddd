"""What crosses between a drafter and a verifier, in core types: a drafted block, and the verdict on it.

Also the one statement of the pipelining rule (`pending_part`): which part of a block drafted ahead the target still
verifies once the sequence has moved on. The target session applies it; the speculative loop applies the same
function to know what the target will do with the blocks it has in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Candidate:
    """A continuation verified beside the block's main path: `tokens` follow main token `parent` (-1: they follow
    the committed context, as alternatives to the whole block). Greedy sessions only."""

    parent: int
    tokens: list[int]


@dataclass
class DraftBlock:
    tokens: list[int]  # the main path: the draft model's tokens, maybe lengthened from a phrase pool
    # under sampling, the distribution q each token was drawn from, as its top-k support (a full q: k = V); None:
    # a point mass at each token
    q_ids: torch.Tensor | None = None  # [gamma, k] int64
    q_probs: torch.Tensor | None = None  # [gamma, k]
    candidates: list[Candidate] = field(default_factory=list)
    report: EdgeReport | None = None  # what the edge knows, for the cloud's load-aware advice
    # per main-path token, where a drafter got it: "draft" (a draft-model step), "vetted" or "pool" (a pool phrase);
    # None: all the draft model's. The edge's own record: never sent
    sources: list[str] | None = None
    # per main-path token drafted by the draft model, its confidence (`tandem.drafting`); the edge's own, never sent
    confidence: list[float] = field(default_factory=list)
    # per candidate (`tandem.tree`): a sibling's conditional probability; None: a phrase pool's; the edge's own
    branch_confidence: list[float | None] = field(default_factory=list)
    alternatives: list[tuple[int, float]] = field(default_factory=list)  # per token: its second choice, q2 / (1 - q1)


@dataclass(frozen=True)
class EdgeReport:
    """Sent with a block: the edge's draft time per token, its round trip, whether it pipelines, and the block it
    would draft next on its own (the upper bound on the cloud's advice; 0: no advice wanted)."""

    draft_ms: float
    rtt_ms: float
    limit: int
    pipelined: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of an emitted token, and its `top` alternatives (id, log-probability), best
    first: from the target's raw logits at that position (before any sampling setting), as vLLM reports them."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class VerifyResult:
    """The target's answer to one block: the session's own (`TargetSession.verify`), what goes on the wire, and
    what the edge's loop reads; the server adds the fields after `logprobs`."""

    num_accepted: int
    tokens: list[int]  # emitted this round: accepted draft tokens + the target's next token, cut at a stop or length
    finish_reason: FinishReason | None
    target_tokens: list[int]  # the target's argmax from the first rejected position to the end of the block
    stale: bool = False  # a block sent ahead that no longer applies: nothing verified, nothing changed
    candidate: int | None = None  # the index of the block's candidate on the accepted path, if any
    # per candidate of the block as sent: the target's argmax after each of its tokens ([] for one not verified)
    candidate_target_tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, when the session asked for them
    seq: int = 0  # the block's number in its session
    generated: int = 0  # tokens emitted in the session so far
    server_ms: float = 0.0  # the verifier's own time on the block; the rest of the wait is the network
    queue_ms: float = 0.0  # of server_ms: waiting for the model (batching); the rest is the verification itself
    advice: int | None = None  # the block length the cloud advises next (0: continue as its stream); None: no advice

    def on_chain(self, block: DraftBlock, skipped: int = 0) -> int:
        """Of the accepted path, the tokens on the block's main chain (the rest: the taken candidate's)."""
        n = self.num_accepted
        return n if self.candidate is None else max(0, block.candidates[self.candidate].parent + 1 - skipped)

    def emitted_origins(self, block: DraftBlock, skipped: int = 0) -> str:
        """Per emitted token, where it came from: d, a draft-model token the target accepted; b, a sibling's (a
        draft tree's branch beside the chain); p, a pool phrase's or candidate's; t, the target's own (recovered or
        bonus). `block`: as proposed, its first `skipped` tokens committed before it was verified."""
        on_main = self.on_chain(block, skipped)
        sources = (block.sources or []) + ["draft"] * len(block.tokens)
        main = "".join("d" if src == "draft" else "p" for src in sources[skipped : skipped + on_main])
        off = self.num_accepted - on_main
        if off and self.candidate is not None and self.candidate < len(block.branch_confidence) and \
                block.branch_confidence[self.candidate] is not None:
            off_chain = "b" + "p" * (off - 1)  # a sibling, then its phrase's tail
        else:
            off_chain = "p" * off
        return (main + off_chain + "t")[: len(self.tokens)]


def pending_part(committed: list[int], base_len: int, block_tokens: list[int]) -> int | None:
    """How many of a block's leading tokens are already committed, or None if the block is stale.

    A block drafted ahead has its first token at position `base_len`. With len(committed) = L tokens committed it
    still applies if it starts at or before L, its first L - base_len tokens are the committed ones, and something
    remains (a block starting at L applies even when empty). Exact even when the remainder was drafted on a prefix
    that was then rejected: the rule is lossless for any q the drafted tokens were really sampled from.
    """
    done = len(committed) - base_len
    if base_len < 0 or done < 0 or (done > 0 and done >= len(block_tokens)):
        return None
    if block_tokens[:done] != committed[base_len:]:
        return None
    return done


def slice_block(block: DraftBlock, start: int, end: int, room: int | None = None) -> DraftBlock:
    """Tokens [start:end] of a block, with their q rows, and its candidates re-indexed: one branching off before
    `start` (from a token now committed) is emptied, as is any part of one beyond `room` positions. Emptied, not
    removed: a verdict reports on candidates by their index in the block as sent."""

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:end]

    cands = []
    for c in block.candidates:
        parent = c.parent - start
        keep = c.tokens if -1 <= parent < end - start else []
        if room is not None:
            keep = keep[: max(0, room - parent - 1)]
        cands.append(Candidate(parent if keep else -1, list(keep)))
    return DraftBlock(block.tokens[start:end], cut(block.q_ids), cut(block.q_probs), cands)


def cut_at_finish(
    emitted: list[int], generated: int, total: int, max_tokens: int, stop_ids: tuple[int, ...], context: int
) -> tuple[list[int], FinishReason | None]:
    """Cut a round's tokens at the first stop token, at max_tokens or at the context end.

    `generated` tokens were emitted before this round; `total` is the sequence length before it.
    """
    room = min(max_tokens - generated, context - total)
    out = []
    for tok in emitted[:room]:
        out.append(tok)
        if tok in stop_ids:
            return out, "stop"
    return out, ("length" if len(out) == room else None)
