"""Ouroboros blocks sized by the cost curve: what the drafter learns from verdicts, the shapes it chooses at the
extremes, and greedy output still equal to the target alone."""

from __future__ import annotations

import pytest

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.config import SpeculationSettings
from tandem.costs import Acceptance, CostCurve, Ewma
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.ouroboros import OuroborosDrafter, ShapeStats
from tandem.pool import OuroborosConfig, PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import SpeculativeDecoder, generate_speculative

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 9, 14, 3, 22, 40, 41, 5, 9, 14], [33] * 6 + [34, 35]]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
WIDE = OuroborosConfig(extend=4, candidates=3, candidate_len=3, max_draft=6)
CPU = CostCurve({1: 0.010, 2: 0.0115, 3: 0.0123, 4: 0.0167, 5: 0.0169, 6: 0.0177, 8: 0.0199})


def frozen(p: float) -> Acceptance:
    """An acceptance that verdicts do not move."""
    return Acceptance(p, weight=0.0, positions=[Ewma(p, 0.0, samples=1) for _ in range(32)])


class Recording(OuroborosDrafter):
    blocks: list[DraftBlock]

    def propose(self, context: list[int], n: int, room: int | None = None, at_least: int = 1) -> DraftBlock:
        block = super().propose(context, n, room, at_least)
        self.__dict__.setdefault("blocks", []).append(block)
        return block


def known_pool(tiny_target: LoadedModel, prompt: list[int]) -> PhrasePool:
    """A pool holding the target's own continuation and a wrong one: lengthenings and candidates to offer."""
    pool = PhrasePool()
    pool.feed(prompt + generate_autoregressive(tiny_target, prompt, GREEDY).tokens)
    pool.feed(prompt + [(t * 7 + 1) % 50 for t in range(40)])
    return pool


def test_the_drafter_learns_acceptance_per_chain_from_a_verdict() -> None:
    # main [1, 2 | 3, 4]: the draft model's two, the pool's two; a candidate after main[1]
    block = DraftBlock([1, 2, 3, 4], candidates=[Candidate(1, [7, 8, 9]), Candidate(0, [6])])
    # main accepted to 2, the candidate's 7 and 8 too (the target's 5 after them), 9 not reached
    result = VerifyResult(4, [1, 2, 7, 8, 5], None, [7, 0, 0], candidate=0,
                          candidate_target_tokens=[[8, 5, 1], [2]])
    s = ShapeStats()
    s.learn(block, own=2, on_main=2, result=result)
    assert [e.value for e in s.main.positions] == [1.0, 1.0]
    assert [e.value for e in s.pool.positions] == [0.0]  # reached, rejected
    assert [e.value for e in s.candidate.positions] == [1.0, 1.0, 0.0]  # the second candidate: main[1] was accepted


def test_what_each_chain_adds() -> None:
    s = ShapeStats(main=frozen(0.5), pool=frozen(0.8), candidate=frozen(0.25))
    block = DraftBlock([1, 2, 3, 4], candidates=[Candidate(0, [7, 8]), Candidate(1, [9])])
    tokens, chains = s.chains(block, own=2)
    assert tokens == pytest.approx(1 + 0.5 + 0.25)
    assert chains[0] == pytest.approx([0.25 * 0.8, 0.25 * 0.64])  # the pool's, once both own tokens are accepted
    assert chains[1] == pytest.approx([0.5 * 0.5 * 0.25, 0.5 * 0.5 * 0.0625])  # main[1] rejected with 0.5
    assert chains[2] == pytest.approx([0.25 * 0.2 * 0.25])  # main[2], the pool's, rejected with 0.2


def test_steep_costs_and_poor_pool_acceptance_send_the_draft_models_tokens_alone(
    tiny_target: LoadedModel, tiny_draft: LoadedModel
) -> None:
    prompt = PROMPTS[1]
    steep = CostCurve.from_measurements({1: 0.01, 2: 0.02, 8: 0.08})  # a whole step per position
    # held steep: the loop feeds the drafter's curve with the real passes, which are flat for this tiny target
    steep.observe = lambda n, seconds: None  # type: ignore[method-assign]
    d = Recording(tiny_draft, known_pool(tiny_target, prompt), WIDE, costs=steep)
    d.shape.pool, d.shape.candidate, d.explore_every = frozen(0.02), frozen(0.02), 0
    got = generate_speculative(d, LocalVerifier(tiny_target), prompt, GREEDY, 2)
    assert got.tokens == generate_autoregressive(tiny_target, prompt, GREEDY).tokens
    assert d.sources.drafted["pool"] == d.sources.drafted["candidate"] == 0
    assert all(not b.candidates for b in d.blocks)
    # the same pool without costs: lengthenings and candidates on offer
    plain = Recording(tiny_draft, known_pool(tiny_target, prompt), WIDE)
    generate_speculative(plain, LocalVerifier(tiny_target), prompt, GREEDY, 2)
    assert plain.sources.drafted["pool"] > 0 and plain.sources.drafted["candidate"] > 0


def test_flat_costs_and_high_acceptance_use_the_configs_budgets(tiny_target: LoadedModel,
                                                                tiny_draft: LoadedModel) -> None:
    prompt = PROMPTS[1]
    runs = []
    flat = CostCurve.from_measurements({1: 0.01, 16: 0.01})
    # held flat: the loop would feed it the real passes, whose times vary with the machine's load
    flat.observe = lambda n, seconds: None  # type: ignore[method-assign]
    for costs in (None, flat):
        d = Recording(tiny_draft, known_pool(tiny_target, prompt), WIDE, costs=costs)
        d.shape = ShapeStats(main=frozen(0.9), pool=frozen(0.9), candidate=frozen(0.9))
        generate_speculative(d, LocalVerifier(tiny_target), prompt, GREEDY, 2)
        runs.append([(b.tokens, b.candidates) for b in d.blocks])
    assert runs[0] == runs[1]
    assert any(len(cands) == WIDE.candidates for _, cands in runs[0])
    assert any(len(tokens) > 2 for tokens, _ in runs[0])


@pytest.mark.parametrize("cfg", [OuroborosConfig(), WIDE], ids=["default", "wide"])
def test_greedy_equals_the_target_alone_with_costs(tiny_target: LoadedModel, tiny_draft: LoadedModel,
                                                   cfg: OuroborosConfig) -> None:
    for prompt in PROMPTS:
        want = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        for gamma in (0, 3):
            d = OuroborosDrafter(tiny_draft, cfg=cfg, costs=CPU, overhead_s=0.005)
            got = generate_speculative(d, LocalVerifier(tiny_target), prompt, GREEDY, gamma)
            assert got.tokens == want
            assert sum(d.sources.accepted.values()) == got.stats.accepted


def test_pipelined_with_a_shared_curve_equals_the_target_alone(tiny_target: LoadedModel,
                                                               tiny_draft: LoadedModel) -> None:
    settings = SpeculationSettings.model_construct(mode="spec", gamma="adaptive", max_gamma=6, pipeline=True,
                                                   retries=0)
    decoder = SpeculativeDecoder(settings, tiny_draft, lambda: LocalVerifier(tiny_target))
    decoder.gamma_policy.costs = CostCurve(CPU.as_dict(16))
    d = OuroborosDrafter(tiny_draft, cfg=WIDE, costs=decoder.gamma_policy.costs)
    for prompt in PROMPTS:
        want = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        assert decoder.generate(prompt, GREEDY, drafter=d).tokens == want
    assert decoder.gamma_policy.costs.measured  # the loop's passes reached the curve the drafter reads
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=2, ignore_eos=True)
    runs = [decoder.generate(PROMPTS[2], sampled, drafter=OuroborosDrafter(tiny_draft, costs=CPU)).tokens
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 16
