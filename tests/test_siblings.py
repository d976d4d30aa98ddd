"""Draft trees (the draft's second choices beside the chain): which are kept on which cost curve, what a verdict
teaches, and greedy output equal to the target alone with them."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FixedCurve, bigram

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.costs import CostCurve, Ewma
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem.tree import PoolBranches, siblings
from tandem.value import BlockValue, Calibration

ALTERNATIVES = [(11, 0.5), (12, 0.0), (13, 0.4)]  # position 1: no second choice


def taken_chain(curve: dict[int, float], confidence: list[float]) -> BlockValue:
    value = BlockValue(AdaptiveGamma(draft_s=Ewma(0.01), costs=CostCurve(curve)), Calibration(), pipelined=False)
    for c in confidence:
        value.take(c)
    return value


def test_on_a_flat_curve_every_sibling_with_a_chance_is_kept() -> None:
    value = taken_chain({1: 0.1, 64: 0.1}, [0.6, 0.9, 0.5])
    cands, conf = siblings(value, Calibration(), [0.6, 0.9, 0.5], ALTERNATIVES)
    assert cands == [Candidate(-1, [11]), Candidate(1, [13])] and conf == [0.5, 0.4]


def test_on_a_curve_that_grows_with_positions_no_sibling_pays() -> None:
    value = taken_chain({1: 0.1, 2: 0.2, 64: 6.4}, [0.6, 0.9, 0.5])
    assert siblings(value, Calibration(), [0.6, 0.9, 0.5], ALTERNATIVES) == ([], [])


def test_a_sure_draft_gets_no_sibling_where_a_position_costs_a_little() -> None:
    curve = {1: 0.1, 4: 0.1, 5: 0.103, 64: 0.3}  # one position more: 3 %
    value = taken_chain(curve, [0.95, 0.95, 0.3])
    cands, _ = siblings(value, Calibration(), [0.95, 0.95, 0.3], [(11, 0.3), (12, 0.3), (13, 0.8)])
    assert cands == [Candidate(1, [13])]  # only where the main token is likely rejected and the sibling likely


def test_a_verdict_teaches_only_the_sibling_at_the_first_rejection(tiny_draft: LoadedModel) -> None:
    drafter = ModelDrafter(tiny_draft, value=taken_chain({1: 0.1, 64: 0.1}, []), tree=True)
    block = DraftBlock([5, 6, 7], candidates=[Candidate(-1, [11]), Candidate(1, [13])], confidence=[0.9] * 3)
    block.branch_confidence = [0.55, 0.45]
    drafter.learn([], block, VerifyResult(3, [5, 6, 13, 2], None, [], candidate=1))  # main rejected at 2, sibling taken
    branch = drafter.branch
    assert branch.seen[4] == Calibration().seen[4] + 1 and branch(0.45) > Calibration()(0.45)
    assert branch.seen[5] == Calibration().seen[5]  # position 0's main token was accepted: its sibling untaught
    drafter.learn([], block, VerifyResult(0, [9], None, []))  # rejected at 0, and the target chose another
    assert branch(0.55) < Calibration()(0.55)


def test_trees_keep_greedy_output_equal_to_the_target_alone(tiny_target: LoadedModel,
                                                            tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rng = random.Random(2)
    drafter = ModelDrafter(tiny_draft, value=taken_chain({1: 0.1, 64: 0.1}, []), tree=True)
    for _ in range(4):
        prompt = [rng.randrange(2, 96) for _ in range(rng.randint(3, 60))]
        want = generate_autoregressive(tiny_target, prompt, params).tokens
        got = generate_speculative(drafter, LocalVerifier(tiny_target), prompt, params, 16)
        assert got.tokens == want
    assert sum(drafter.branch.seen) > sum(Calibration().seen)  # siblings were sent and judged
    assert sum(drafter.branch.accepted) > sum(Calibration().accepted)  # and some taken


class SeededTreeDrafter(ModelDrafter):
    """Trees for a seeded sample too (a real drafter keeps such a request to the floor): the test's curve is fixed."""

    def start(self, context: list[int], params: SamplingParams) -> None:
        super().start(context, params)
        self.sizer = self.value


@pytest.mark.parametrize("phrases", [False, True], ids=["siblings", "siblings-and-pool"])
def test_sampled_trees_keep_the_target_law(phrases: bool) -> None:
    """Siblings drawn without replacement under sampling, end to end through the session: the first token follows
    the target's p, and the second its p after the first, whichever branch was taken. With a phrase pool, blocks
    of one drafted token are lengthened by the pool's (point-mass rows), which the target often takes."""
    vocab, trials = 6, 3000
    torch.manual_seed(0)
    target, draft = bigram(torch.randn(vocab, vocab), "rand-target"), bigram(torch.randn(vocab, vocab), "rand-draft")
    value = BlockValue(AdaptiveGamma(draft_s=Ewma(0.01), costs=FixedCurve({1: 0.1, 64: 0.1})), Calibration(), False)
    pool = PhrasePool()
    pool.feed([3, 0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5, 1, 4, 0, 3])
    drafter = SeededTreeDrafter(draft, q_top_k=vocab, value=value, tree=True,
                                pool=PoolBranches(pool) if phrases else None)
    from_pool = 0
    first, second = torch.zeros(vocab), torch.zeros(vocab, vocab)
    for seed in range(trials):
        # room for a block of one drafted token and a pool token after it, then the target's
        params = SamplingParams(max_tokens=3 if phrases else 2, temperature=1.0, seed=seed, ignore_eos=True)
        got = generate_speculative(drafter, LocalVerifier(target), [3], params, 1 if phrases else 2)
        out = got.tokens
        from_pool += got.stats.origins.count("p")
        first[out[0]] += 1
        second[out[0], out[1]] += 1
    assert sum(drafter.branches[False].accepted) > sum(Calibration().accepted) + 100  # siblings were often taken
    assert from_pool > 300 if phrases else from_pool == 0
    p = torch.softmax(target.model.table, -1)  # [V, V]: the law after each token
    for counts, law in [(first, p[3]), *zip(second, p, strict=True)]:
        expected = law * counts.sum()
        assert float(((counts - expected) ** 2 / expected).sum()) < 20.5  # df = 5, p = 0.001
