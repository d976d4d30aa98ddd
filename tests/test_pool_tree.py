"""A phrase pool's chains in the draft tree: which are grown on which cost curve, what a verdict teaches, and greedy
output equal to the target alone with them, through the loop with the edge's default settings."""

from __future__ import annotations

import random

import torch
from conftest import FixedCurve, FixedTimes, bigram

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.config import SpeculationSettings
from tandem.costs import CostCurve, Ewma
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import SpeculativeDecoder
from tandem.tree import PoolBranches, grow
from tandem.value import BlockValue, Calibration

FLAT = {1: 0.1, 64: 0.1}
STEEP = {1: 0.1, 2: 0.2, 64: 6.4}
NONE = [(0, 0.0), (0, 0.0)]  # no second choices


def chain(curve: dict[int, float], confidence: list[float]) -> BlockValue:
    value = BlockValue(AdaptiveGamma(draft_s=Ewma(0.01), costs=CostCurve(curve)), Calibration(), pipelined=False)
    for c in confidence:
        value.take(c)
    return value


def pool_of(*phrases: list[int], explore: int = 0) -> PoolBranches:
    pool = PhrasePool()
    for p in phrases:
        pool.feed(p)
    return PoolBranches(pool, extend=4, explore_every=explore)


def test_a_phrase_continues_the_chain_where_positions_are_cheap() -> None:
    pool = pool_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    tree = grow(chain(FLAT, [0.9, 0.9]), Calibration(), [0.9, 0.9], NONE, pool, [1, 2], [3, 4], room=16)
    assert tree.lengthen == [5, 6, 7, 8] and tree.candidates == []  # `extend` tokens at most


def test_the_room_bounds_every_chain() -> None:
    pool = pool_of([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9, 9, 9, 9])
    tree = grow(chain(FLAT, [0.9, 0.9]), Calibration(), [0.9, 0.9], NONE, pool, [1, 2], [3, 4], room=3)
    assert tree.lengthen == [5]
    assert all(c.parent + len(c.tokens) < 3 for c in tree.candidates)


def test_on_a_curve_that_grows_with_positions_no_phrase_pays() -> None:
    pool = pool_of([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9, 9, 9])
    tree = grow(chain(STEEP, [0.9, 0.9]), Calibration(), [0.9, 0.9], NONE, pool, [1, 2], [3, 4], room=16)
    assert tree.lengthen == [] and tree.candidates == []
    explored = pool_of([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9, 9, 9], explore=16)
    tree = grow(chain(STEEP, [0.9, 0.9]), Calibration(), [0.9, 0.9], NONE, explored, [1, 2], [3, 4], room=16)
    assert tree.lengthen == [5] and tree.candidates == [Candidate(0, [9])]  # the first block measures each again


def test_a_phrase_the_draft_parts_from_becomes_a_branch() -> None:
    pool = pool_of([1, 2, 3, 9, 8, 7])
    tree = grow(chain(FLAT, [0.9, 0.5]), Calibration(), [0.9, 0.5], NONE, pool, [1, 2], [3, 4], room=16)
    assert tree.candidates == [Candidate(0, [9, 8, 7])] and tree.branch_confidence == [None]


def test_a_sibling_is_continued_by_the_pool_and_not_repeated_as_a_branch() -> None:
    pool = pool_of([1, 2, 3, 9, 8, 7])
    alternatives = [(0, 0.0), (9, 0.6)]
    tree = grow(chain(FLAT, [0.9, 0.5]), Calibration(), [0.9, 0.5], alternatives, pool, [1, 2], [3, 4], room=16)
    assert tree.candidates == [Candidate(0, [9, 8, 7])] and tree.branch_confidence == [0.6]


def test_a_verdict_teaches_the_pool_and_its_chains() -> None:
    pool = pool_of()
    block = DraftBlock([3, 4, 5, 6], candidates=[Candidate(0, [9, 8])], sources=["draft", "draft", "pool", "pool"])
    block.branch_confidence = [None]
    pool.learn([1, 2], block, VerifyResult(4, [3, 4, 5, 6, 7], None, [7]))  # the whole lengthening accepted
    assert [pool.shape.follow(i) > 0.5 for i in (0, 1)] == [True, True]
    assert pool.shape.branch.positions == []  # the chain's token was accepted where the branch parts: not needed
    assert pool.pool.lookup([1, 2, 3, 4], 3) == [[5, 6, 7]]  # the output, filed
    pool.learn([1, 2], block, VerifyResult(3, [3, 9, 8, 1], None, [1], candidate=0,
                                           candidate_target_tokens=[[8, 1]]))
    assert pool.shape.branch(0) > 0.3 and pool.shape.branch(1) > 0.3  # the branch taken whole


def decoder_with_defaults(target: LoadedModel, draft: LoadedModel) -> SpeculativeDecoder:
    settings = SpeculationSettings.model_construct(mode="spec", gamma="adaptive", max_gamma=8, pipeline=True,
                                                   retries=0, draft_pool=True)
    assert settings.draft_tree and settings.block_value  # the edge's defaults, and the pool
    decoder = SpeculativeDecoder(settings, draft, lambda: LocalVerifier(target))
    decoder.gamma_policy = FixedTimes(max_gamma=8, draft_s=Ewma(0.01), costs=FixedCurve(FLAT))
    return decoder


def test_pool_trees_keep_greedy_output_equal_to_the_target_alone(tiny_target: LoadedModel,
                                                                 tiny_draft: LoadedModel) -> None:
    decoder = decoder_with_defaults(tiny_target, tiny_draft)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rng = random.Random(3)
    for _ in range(4):
        phrase = [rng.randrange(2, 96) for _ in range(rng.randint(3, 12))]
        prompt = phrase * 4  # the pool has phrases to offer
        assert decoder.generate(prompt, params).tokens == generate_autoregressive(tiny_target, prompt, params).tokens
    assert decoder.pools.get(decoder.settings.client_id).size  # fed


def count_up_pair() -> tuple[LoadedModel, LoadedModel]:
    """A target that counts up (t -> t + 1 mod 12) and a draft unsure of everything."""
    vocab = 12
    count_up = torch.full((vocab, vocab), -10.0)
    count_up[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = 10.0
    torch.manual_seed(0)
    return bigram(count_up, "count-up"), bigram(torch.randn(vocab, vocab) * 0.3, "unsure")


def test_the_pool_lengthens_blocks_where_the_draft_is_unsure() -> None:
    """The prompt's own phrases carry the blocks, the target takes them, and the output is the target's."""
    target, draft = count_up_pair()
    decoder = decoder_with_defaults(target, draft)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = list(range(12)) * 2
    got = decoder.generate(prompt, params)
    assert got.tokens == generate_autoregressive(target, prompt, params).tokens
    assert got.stats.origins.count("p") > got.stats.origins.count("d")  # the pool's tokens, mostly
    assert got.stats.target_passes * 3 < len(got.tokens)  # several tokens a pass
    assert decoder.pool_shape.follow(0) > 0.5  # measured as accepted


def test_a_warm_pool_beats_a_cold_one() -> None:
    """A prompt that shows only the start of the count: a cold pool learns the rest as it is emitted, a pool kept
    from an earlier request knows it from the first block."""
    target, draft = count_up_pair()
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = [0, 1, 2]
    want = generate_autoregressive(target, prompt, params).tokens
    warm = decoder_with_defaults(target, draft)
    warm.generate(prompt, params)
    cold = decoder_with_defaults(target, draft)
    runs = {"warm": warm.generate(prompt, params), "cold": cold.generate(prompt, params)}
    assert runs["warm"].tokens == runs["cold"].tokens == want
    assert runs["warm"].stats.target_passes < runs["cold"].stats.target_passes
