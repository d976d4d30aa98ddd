"""The verification rule of speculative decoding, as pure functions: no model call, no state.

Names follow the papers (Leviathan et al. 2023; Chen et al. 2023):
- p: the target model's distribution, q: the draft model's, both after the same sampling transformation;
- the draft proposes x_1..x_gamma; the target scores gamma + 1 positions in one forward pass;
- *accepted* tokens: the draft prefix kept (x_i kept with probability min(1, p(x_i) / q(x_i)));
- a *recovered* token: drawn from norm(max(0, p - q)) at the first rejection;
- a *bonus* token: drawn from p at position gamma + 1 when every draft token is accepted.
Every round therefore emits `num_accepted + 1` tokens, distributed exactly as the target alone would emit them.

Three exact forms of q reach the rule through `dense_q`: the full distribution; a sparse top-k q (exact when the
draft sampled from that truncated q); and none, read as a point mass at the drafted token (accept with p(x),
recover from p without x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tandem.errors import InvalidRequestError

TokenKind = Literal["recovered", "bonus"]


@dataclass(frozen=True)
class Verdict:
    num_accepted: int
    next_token: int
    kind: TokenKind  # "recovered": drawn at a rejection (or the target's argmax at a greedy mismatch)


def verify_greedy(
    draft_tokens: torch.Tensor,  # [gamma] int64
    target_logits: torch.Tensor,  # [gamma + 1, V]
) -> Verdict:
    """Accept while the draft token equals the target's argmax; the next token is the argmax after the last accept."""
    gamma = draft_tokens.shape[0]
    target_argmax = target_logits.argmax(-1)  # [gamma + 1]
    mismatch = (draft_tokens != target_argmax[:gamma]).nonzero()
    n = int(mismatch[0, 0]) if len(mismatch) else gamma
    return Verdict(n, int(target_argmax[n]), "bonus" if n == gamma else "recovered")


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]  # accepted node indices, root to leaf
    next_token: int
    kind: TokenKind


def verify_tree_greedy(
    parents: list[int],  # [n] node i continues node parents[i]; -1: the committed context; parents precede children
    tokens: list[int],  # [n]
    target_argmax: torch.Tensor,  # [1 + n] int64: the target's argmax after the context (row 0), after node i (i + 1)
) -> TreeVerdict:
    """Greedy over a tree of drafts: a node is accepted when its parent is and its token is the target's argmax
    after the parent. The longest accepted root path wins; among equals the one ending at the lowest node index (lay
    the main path first to prefer it). The next token is the argmax after the path's last node: a bonus when that
    node is a leaf (nothing was drafted past it), recovered otherwise (a node continuing it was rejected)."""
    argmax = target_argmax.tolist()
    depth: list[int] = []
    has_child = [False] * len(tokens)
    best = -1  # the deepest accepted node (-1: none)
    for i, (parent, tok) in enumerate(zip(parents, tokens, strict=True)):
        if parent >= 0:
            has_child[parent] = True
        ok = (parent < 0 or depth[parent] > 0) and tok == argmax[parent + 1]
        depth.append((1 if parent < 0 else depth[parent] + 1) if ok else 0)
        if ok and (best < 0 or depth[i] > depth[best]):
            best = i
    path: list[int] = []
    node = best
    while node >= 0:
        path.append(node)
        node = parents[node]
    path.reverse()
    leaf = best >= 0 and not has_child[best]
    return TreeVerdict(path, int(argmax[best + 1]), "bonus" if leaf or (best < 0 and not tokens) else "recovered")


def verify_stochastic(
    draft_tokens: torch.Tensor,  # [gamma] int64
    q: torch.Tensor,  # [gamma, V] the distributions the draft sampled x_1..x_gamma from
    p: torch.Tensor,  # [gamma + 1, V] target distributions after the same sampling transformation
    generator: torch.Generator | None,
) -> Verdict:
    gamma = draft_tokens.shape[0]
    wide = _wide(p.device)
    idx = torch.arange(gamma, device=p.device)
    p_x = p[idx, draft_tokens].to(wide)  # [gamma]
    q_x = q[idx, draft_tokens].to(wide)  # [gamma]
    if bool((q_x <= 0).any()):
        raise InvalidRequestError("q gives zero probability to a drafted token: the draft cannot have sampled it")
    r = torch.rand(gamma, generator=generator, dtype=wide, device=p.device)  # [gamma]
    rejected = (r * q_x >= p_x).nonzero()  # accept x_i iff r_i < p(x_i) / q(x_i)
    if not len(rejected):
        return Verdict(gamma, _draw(p[gamma], generator), "bonus")
    n = int(rejected[0, 0])
    residual = (p[n].to(wide) - q[n].to(wide)).clamp_min(0)  # [V]
    if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had probability ~0
        residual = p[n].to(wide)
    return Verdict(n, _draw(residual, generator), "recovered")


def dense_q(
    draft_tokens: torch.Tensor,  # [gamma] int64
    vocab_size: int,
    full: torch.Tensor | None = None,  # [gamma, V]
    sparse_ids: torch.Tensor | None = None,  # [gamma, k] int64
    sparse_probs: torch.Tensor | None = None,  # [gamma, k]
) -> torch.Tensor:
    """The q the rule needs, [gamma, V], from whichever of the three forms the draft sent."""
    gamma = draft_tokens.shape[0]
    if full is not None:
        if full.shape != (gamma, vocab_size):
            raise InvalidRequestError(f"q must have shape {(gamma, vocab_size)}, got {tuple(full.shape)}")
        return full.float()
    q = torch.zeros(gamma, vocab_size, device=draft_tokens.device)
    if sparse_ids is not None and sparse_probs is not None:
        if sparse_ids.shape != sparse_probs.shape or sparse_ids.shape[0] != gamma:
            raise InvalidRequestError("sparse q ids and probs must both be [gamma, k]")
        if bool(((sparse_ids < 0) | (sparse_ids >= vocab_size)).any()):
            raise InvalidRequestError("sparse q has an out-of-vocabulary token id")
        if bool((sparse_probs < 0).any()) or not bool(torch.isfinite(sparse_probs).all()):
            raise InvalidRequestError("sparse q has a negative or non-finite probability")
        return q.scatter_(1, sparse_ids.long(), sparse_probs.float())
    # point mass at the drafted token
    return q.scatter_(1, draft_tokens[:, None], 1.0)


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the acceptance test and the residual; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights.float(), 1, generator=generator).item())
