"""The verification rule of speculative decoding, as pure functions: no model call, no state.

Names follow the papers (Leviathan et al. 2023; Chen et al. 2023):
- p: the target model's distribution, q: the draft model's, both after the same sampling transformation;
- the draft proposes x_1..x_gamma; the target scores gamma + 1 positions in one forward pass;
- *accepted* tokens: the draft prefix kept (x_i kept with probability min(1, p(x_i) / q(x_i)));
- a *recovered* token: drawn from norm(max(0, p - q)) at the first rejection;
- a *bonus* token: drawn from p at position gamma + 1 when every draft token is accepted.
Every round therefore emits `num_accepted + 1` tokens, distributed exactly as the target alone would emit them.

q reaches the rule sparse (`SparseQ`: the top-k support the draft sampled from, exact for that truncated q; a full
q is k = V) or as none, a point mass at the drafted token (accept with p(x), recover from p without x). Only a
rejection's residual needs a dense row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tandem.errors import InvalidRequestError

TokenKind = Literal["recovered", "bonus"]
UNSAMPLED = "q gives zero probability to a drafted token: the draft cannot have sampled it"


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


def verify_tree_stochastic(
    parents: list[int],  # [n] as in `verify_tree_greedy`; siblings in the order they were drawn
    tokens: list[int],  # [n]
    q: SparseQ | None,  # [n, k]: row i, the q node i was drawn from (siblings share it); None: point masses
    p: torch.Tensor,  # [1 + n, V]: the target after the context (row 0), after node i (row i + 1)
    generator: torch.Generator | None,
) -> TreeVerdict:
    """Multi-candidate speculative sampling (SpecInfer; Sequoia's form for siblings drawn without replacement): at
    each node its children are tried in order, child x kept with probability min(1, r(x) / q(x)); after a rejection
    r <- norm(max(0, r - q)) and x leaves q (q <- norm(q without x)). The path descends into the kept child; where
    none is kept the next token is drawn from r (recovered), where a node has no children from p (bonus). Each
    emitted token follows p given the ones before it, whatever the tree."""
    vocab, wide = p.shape[-1], _wide(p.device)
    children = check_siblings(parents, tokens, q)
    path: list[int] = []
    node = -1
    while kids := children.get(node):
        r = p[node + 1].to(wide)  # [V] the target's law here, less what rejected children took
        q_row = None if q is None else q.row(kids[0], vocab).to(wide)  # [V]
        for child in kids:
            x = tokens[child]
            q_x = torch.nn.functional.one_hot(torch.tensor(x, device=p.device), vocab).to(wide) \
                if q_row is None else q_row  # [V]
            if float(torch.rand((), generator=generator, dtype=wide, device=p.device)) * float(q_x[x]) < float(r[x]):
                path.append(child)
                node = child
                break
            residual = (r - q_x).clamp_min(0)
            if float(residual.sum()) > 0:  # else p == q up to rounding: the rejection had probability ~0
                r = residual / residual.sum()
            if q_row is not None:
                q_row = q_row.clone()
                q_row[x] = 0
                q_row = q_row / q_row.sum().clamp_min(torch.finfo(wide).tiny)
        else:
            return TreeVerdict(path, _draw(r, generator), "recovered")
    return TreeVerdict(path, _draw(p[node + 1], generator), "bonus")


def check_siblings(parents: list[int], tokens: list[int], q: SparseQ | None) -> dict[int, list[int]]:
    """Each node's children (node indices, by parent; -1: the context's). Raises InvalidRequestError unless the
    children of each node are distinct tokens, each in their q's support: siblings drawn without replacement."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    for kids in children.values():
        xs = torch.tensor([tokens[c] for c in kids])
        if len(set(xs.tolist())) < len(kids) or (
                q is not None and bool((SparseQ(q.ids[kids].cpu(), q.probs[kids].cpu()).at(xs) <= 0).any())):
            raise InvalidRequestError(UNSAMPLED)
    return children


@dataclass(frozen=True)
class SparseQ:
    """q by its support: at position i, token ids[i, j] has probability probs[i, j], every other token 0. A full q
    is the case k = V. (In place of a SparseQ, None reads as a point mass at each drafted token.)"""

    ids: torch.Tensor  # [gamma, k] int64
    probs: torch.Tensor  # [gamma, k]

    def at(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [gamma] -> [gamma]
        return (self.probs * (self.ids == tokens[:, None])).sum(-1)

    def row(self, i: int, vocab_size: int) -> torch.Tensor:  # [V]: the one dense row, for a residual
        return torch.zeros(vocab_size, dtype=self.probs.dtype, device=self.probs.device).scatter_add_(
            0, self.ids[i], self.probs[i])


def verify_stochastic(
    draft_tokens: torch.Tensor,  # [gamma] int64
    q: SparseQ | None,  # the distributions the draft sampled x_1..x_gamma from; None: point masses
    p: torch.Tensor,  # [gamma + 1, V] target distributions after the same sampling transformation
    generator: torch.Generator | None,
) -> Verdict:
    gamma, vocab = draft_tokens.shape[0], p.shape[-1]
    wide = _wide(p.device)
    p_x = p[torch.arange(gamma, device=p.device), draft_tokens].to(wide)  # [gamma]
    q_x = torch.ones_like(p_x) if q is None else q.at(draft_tokens).to(wide)  # [gamma]
    if bool((q_x <= 0).any()):
        raise InvalidRequestError(UNSAMPLED)
    r = torch.rand(gamma, generator=generator, dtype=wide, device=p.device)  # [gamma]
    rejected = (r * q_x >= p_x).nonzero()  # accept x_i iff r_i < p(x_i) / q(x_i)
    if not len(rejected):
        return Verdict(gamma, _draw(p[gamma], generator), "bonus")
    n = int(rejected[0, 0])
    q_n = torch.nn.functional.one_hot(draft_tokens[n], vocab) if q is None else q.row(n, vocab)  # [V]
    residual = (p[n].to(wide) - q_n.to(wide)).clamp_min(0)  # [V]
    if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had probability ~0
        residual = p[n].to(wide)
    return Verdict(n, _draw(residual, generator), "recovered")


def checked_q(
    draft_tokens: torch.Tensor,  # [gamma] int64
    vocab_size: int,
    ids: torch.Tensor | None,  # [gamma, k] int64
    probs: torch.Tensor | None,  # [gamma, k]
) -> SparseQ | None:
    """The q a block sent, checked and each row normalised (the draft's copy of the sampling transformation
    rounds differently); None for a point mass. Raises InvalidRequestError for a q the draft cannot have sampled
    its tokens from."""
    if ids is None or probs is None:
        return None
    gamma = draft_tokens.shape[0]
    if ids.shape != probs.shape or ids.dim() != 2 or ids.shape[0] != gamma:
        raise InvalidRequestError("sparse q ids and probs must both be [gamma, k]")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise InvalidRequestError("sparse q has an out-of-vocabulary token id")
    if bool((probs < 0).any()) or not bool(torch.isfinite(probs).all()):
        raise InvalidRequestError("sparse q has a negative or non-finite probability")
    q = SparseQ(ids.long(), probs.float())
    if gamma and bool((q.at(draft_tokens) <= 0).any()):
        raise InvalidRequestError(UNSAMPLED)
    return SparseQ(q.ids, q.probs / q.probs.sum(-1, keepdim=True))


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the acceptance test and the residual; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights.float(), 1, generator=generator).item())
