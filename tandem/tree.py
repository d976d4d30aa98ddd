"""Draft trees in their cheapest shape: beside a block's main chain, a sibling where the draft is unsure, verified in
the same target pass. Greedy: the draft's second choice (`tandem.verify.verify_tree_greedy`); sampling: a draw from
the main token's q without it, placed by the second choice's odds before it is drawn, since a sibling kept for its
own value would not follow q (`tandem.verify.verify_tree_stochastic`). Where main token i is rejected, a
sibling the target agrees with adds one more token from the same pass, without a draft step. It is worth
reach(i) * (1 - a_i) * s_i tokens (a_i: main token i's calibrated acceptance; s_i: the sibling's, calibrated over
q2 / (1 - q1)) and costs a position of the pass: `tandem.costs.keep_nodes` keeps those that pay on the measured cost
curve (on a curve that grows with positions, none).
"""

from __future__ import annotations

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.costs import keep_nodes
from tandem.value import BlockValue, Calibration


def siblings(value: BlockValue, branch: Calibration, confidence: list[float],
             alternatives: list[tuple[int, float]]) -> tuple[list[Candidate], list[float]]:
    """The siblings worth their positions, and each one's conditional probability; `confidence[i]` and
    `alternatives[i]` (token, q2 / (1 - q1); 0: none) describe main position i, `value` has taken the chain."""
    reach, chains = 1.0, []
    for c, (_, s) in zip(confidence, alternatives, strict=True):
        a = value.calibration(c)
        chains.append([reach * (1 - a) * branch(s) if s > 0 else 0.0])
        reach *= a
    policy, n = value.policy, len(confidence)
    keep = keep_nodes(policy.costs, n * policy.draft_s.value + policy.rtt_s.value, n + 1, value.expected, chains)
    picked = [i for i, k in enumerate(keep) if k]
    return [Candidate(i - 1, [alternatives[i][0]]) for i in picked], [alternatives[i][1] for i in picked]



def calibrate(chain: Calibration, branch: Calibration, block: DraftBlock, result: VerifyResult,
              skipped: int = 0) -> None:
    """A verdict on `block` (as proposed; its first `skipped` tokens committed before it was verified) teaches the
    main chain's calibration, and the sibling's at the first rejection: did the target choose it?"""
    if not block.confidence or result.stale:
        return
    taken = result.candidate  # a sibling taken: the main chain was rejected where it branches off
    on_main = result.num_accepted if taken is None else block.candidates[taken].parent + 1 - skipped
    chain.observe(block.confidence[skipped:], on_main)
    for k, (c, s) in enumerate(zip(block.candidates, block.branch_confidence, strict=False)):
        if c.parent + 1 - skipped == on_main:
            branch.observe([s], int(k == taken))
