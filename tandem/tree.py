"""Draft trees in their cheapest shape: beside a block's main chain, a sibling where the draft is unsure, verified in
the same target pass. Greedy: the draft's second choice (`tandem.verify.verify_tree_greedy`); sampling: a draw from
the main token's q without it, placed by the second choice's odds before it is drawn, since a sibling kept for its
own value would not follow q (`tandem.verify.verify_tree_stochastic`). Where main token i is rejected, a
sibling the target agrees with adds one more token from the same pass, without a draft step. It is worth
reach(i) * (1 - a_i) * s_i tokens (a_i: main token i's calibrated acceptance; s_i: the sibling's, calibrated over
q2 / (1 - q1)) and costs a position of the pass.

Greedy, with a phrase pool (`tandem.pool.PhrasePool`: the prompt's n-grams, the output's, the target's corrections),
the same tree takes the pool's chains too, each node scored like the draft's by an acceptance measured from verdicts
(`PoolShape`): a phrase continuing the main chain past its last draft token, or a sibling; and a phrase branching
off the chain where it and the draft part, worth its tokens where the draft's token there is rejected. None of
them costs a draft step. `tandem.costs.keep_nodes` keeps the nodes that pay on the measured cost curve (on a curve
that grows with positions, few or none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.blocks import Candidate, DraftBlock, VerifyResult, slice_block
from tandem.costs import Acceptance, keep_nodes
from tandem.pool import PhrasePool
from tandem.pool import learn as file_verdict
from tandem.value import BlockValue, Calibration


@dataclass
class PoolShape:
    """Per position of a pool chain, the chance its token is accepted once reached, learnt from verdicts: a phrase
    that follows an accepted token (`follow`: the chain's end, a sibling), or one that branches off the chain where
    the draft's token is rejected (`branch`); under sampling, the chain's end (`sampled`)."""

    follow: Acceptance = field(default_factory=lambda: Acceptance(0.5))
    branch: Acceptance = field(default_factory=lambda: Acceptance(0.3))
    sampled: Acceptance = field(default_factory=lambda: Acceptance(0.3))  # `follow` under sampling: accepted w.p. p(x)


@dataclass
class PoolBranches:
    """A phrase pool as the tree's source of chains; `extend`: tokens of a phrase, at most. Every `explore_every`-th
    block keeps each pool chain's first node, so that an acceptance measured low is measured again."""

    pool: PhrasePool
    shape: PoolShape = field(default_factory=PoolShape)
    extend: int = 8
    explore_every: int = 16
    blocks: int = 0

    def learn(self, context: list[int], block: DraftBlock, result: VerifyResult, skipped: int = 0,
              greedy: bool = True) -> None:
        """A verdict on `block` (as proposed, its first `skipped` tokens committed before it was verified; `context`:
        the committed sequence before the rest): into the pool, and each pool chain it reached into `shape`."""
        if result.stale:
            return
        sent = slice_block(block, skipped, len(block.tokens)) if skipped else block
        file_verdict(self.pool, context, sent, result)
        on_main = result.on_chain(block, skipped)
        own = sum(s != "pool" for s in block.sources[skipped:]) if block.sources else len(sent.tokens)
        if on_main >= own and len(sent.tokens) > own:
            (self.shape.follow if greedy else self.shape.sampled).observe(len(sent.tokens) - own, on_main - own)
        for k, (c, s) in enumerate(zip(sent.candidates, block.branch_confidence, strict=False)):
            if not c.tokens or c.parent + 1 != on_main:
                continue  # not reached, or not needed: the chain's own token there was accepted
            m = result.num_accepted - on_main if k == result.candidate else 0
            if s is None:
                self.shape.branch.observe(len(c.tokens), m)
            elif m and len(c.tokens) > 1:  # a sibling taken, then its pool tail
                self.shape.follow.observe(len(c.tokens) - 1, m - 1)


@dataclass
class Tree:
    """What a block adds to its chain: candidates (siblings, pool phrases), per candidate the sibling's conditional
    probability (None: a pool phrase), and pool tokens lengthening the chain."""

    candidates: list[Candidate] = field(default_factory=list)
    branch_confidence: list[float | None] = field(default_factory=list)
    lengthen: list[int] = field(default_factory=list)


def grow(value: BlockValue, branch: Calibration, confidence: list[float], alternatives: list[tuple[int, float]],
         pool: PoolBranches | None = None, context: list[int] | None = None, tokens: list[int] | None = None,
         room: int = 0, greedy: bool = True) -> Tree:
    """The nodes worth their positions beside a chain `value` has taken: `confidence[i]` and `alternatives[i]`
    (token, q2 / (1 - q1); 0: none) describe main position i. With `pool`, its chains too (under sampling only the
    chain's lengthening: a branch would need q rows of its own): `context` is the sequence before the chain `tokens`
    (its last `key_len` tokens suffice: the pool's keys reach no further),
    `room` the block's tokens allowed in all (a candidate's reach included; the candidates' tokens together, a
    server's limit too)."""
    n = len(confidence)
    accept = [value.calibration(c) for c in confidence]
    reach = [1.0]  # reach[i]: main tokens 0 .. i - 1 all accepted
    for a in accept:
        reach.append(reach[-1] * a)
    cands: list[Candidate] = []
    sibling: list[float | None] = []
    chains: list[list[float]] = []  # chains[k]: cands[k]'s nodes; with a pool, last: the chain's lengthening
    phrases = pool is not None and context is not None and tokens is not None

    def lookup(after: list[int], limit: int) -> list[int]:
        assert pool is not None and context is not None
        found = pool.pool.lookup([*context, *after], min(pool.extend, limit)) if limit > 0 else []
        return found[0] if found else []

    for i, (alt, s) in enumerate(alternatives):
        if s <= 0:
            continue
        gain = reach[i] * (1 - accept[i]) * branch(s)
        tail = lookup([*tokens[:i], alt], room - i - 1) if phrases and greedy and tokens is not None else []
        cands.append(Candidate(i - 1, [alt, *tail]))
        sibling.append(s)
        chains.append([gain, *(gain * g for g in pool.shape.follow.gains(len(tail)))] if pool and tail else [gain])
    lengthen: list[int] = []
    if phrases and pool is not None and tokens is not None:
        for i in range(n if greedy else 0):  # a phrase after main token i - 1 that the draft's token i parts from
            phrase = lookup(tokens[:i], room - i)
            if phrase and phrase[0] != tokens[i] and not any(c.parent == i - 1 and c.tokens[0] == phrase[0]
                                                             for c in cands):
                cands.append(Candidate(i - 1, phrase))
                sibling.append(None)
                chains.append(pool.shape.branch.gains(len(phrase), reach[i] * (1 - accept[i])))
        lengthen = lookup(tokens, room - n)
        chains.append((pool.shape.follow if greedy else pool.shape.sampled).gains(len(lengthen), reach[n]))
    policy = value.policy
    # a pool token taken is fed to the draft model afterwards, about a draft step each (a llama.cpp pass grows with
    # its rows): a chain with pool tokens is charged for all it adds
    feed = [policy.draft_s.value if b is None or len(c.tokens) > 1 else 0.0 for c, b in zip(cands, sibling,
                                                                                            strict=True)]
    feed += [policy.draft_s.value] * phrases
    keep = keep_nodes(policy.costs, n * policy.draft_s.value + policy.rtt_s.value, n + 1, value.expected, chains,
                      most=room if phrases else None, token_s=feed if phrases else None)
    if phrases and pool is not None:
        if pool.explore_every and pool.blocks % pool.explore_every == 0:
            spare = room - sum(keep[:-1])  # the candidates' tokens stay within the room
            for j, b in enumerate(sibling):
                if b is None and not keep[j] and spare > 0:
                    keep[j], spare = 1, spare - 1
            keep[-1] = max(keep[-1], min(1, len(lengthen)))
        pool.blocks += 1
    tree = Tree(lengthen=lengthen[: keep[-1]] if phrases else [])
    for c, b, k in zip(cands, sibling, keep, strict=False):
        if k:
            tree.candidates.append(Candidate(c.parent, c.tokens[:k]))
            tree.branch_confidence.append(b)
    return tree


def siblings(value: BlockValue, branch: Calibration, confidence: list[float],
             alternatives: list[tuple[int, float]]) -> tuple[list[Candidate], list[float | None]]:
    """`grow` without a pool: the siblings worth their positions, and each one's conditional probability."""
    tree = grow(value, branch, confidence, alternatives)
    return tree.candidates, tree.branch_confidence


def calibrate(chain: Calibration, branch: Calibration, block: DraftBlock, result: VerifyResult,
              skipped: int = 0) -> None:
    """A verdict on `block` (as proposed; its first `skipped` tokens committed before it was verified) teaches the
    main chain's calibration, and the sibling's at the first rejection: did the target choose it?"""
    if not block.confidence or result.stale:
        return
    taken = result.candidate  # a candidate taken: the main chain was rejected where it branches off
    on_main = result.num_accepted if taken is None else block.candidates[taken].parent + 1 - skipped
    chain.observe(block.confidence[skipped:], on_main)
    for k, (c, s) in enumerate(zip(block.candidates, block.branch_confidence, strict=False)):
        if s is not None and c.parent + 1 - skipped == on_main:
            branch.observe([s], int(k == taken))
