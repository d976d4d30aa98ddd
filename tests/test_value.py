"""Blocks sized by value: the calibration of the draft's confidence, and the stopping rule, on hand-set figures."""

from __future__ import annotations

import random

import pytest

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import VerifyResult
from tandem.costs import CostCurve, Ewma
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem.value import BlockValue, Calibration


def policy(draft_s: float, rtt_s: float, pass_s: float) -> AdaptiveGamma:
    """A policy that measured these figures, with a flat target cost curve."""
    return AdaptiveGamma(draft_s=Ewma(draft_s), rtt_s=Ewma(rtt_s), costs=CostCurve({1: pass_s, 64: pass_s}))


def test_the_prior_takes_the_draft_at_its_word_and_the_verdicts_correct_it() -> None:
    cal = Calibration()
    assert cal(0.95) == pytest.approx(0.95) and cal(0.05) == pytest.approx(0.05)
    for _ in range(200):  # an overconfident draft: at 0.9 it is accepted one time in two
        cal.observe([0.92, 0.92], 1)
    assert cal(0.92) == pytest.approx(0.5, abs=0.02)
    assert cal(0.05) == pytest.approx(0.05)  # other bins untouched


def test_tokens_past_the_first_rejection_say_nothing() -> None:
    cal = Calibration()
    cal.observe([0.15, 0.95, 0.95, 0.95], 0)  # the first rejected: the rest were never reached
    assert cal(0.95) == pytest.approx(0.95)
    assert cal(0.15) < 0.15


def test_calibration_converges_to_the_true_acceptance() -> None:
    rng, cal = random.Random(0), Calibration()
    for _ in range(3000):
        c = rng.random()
        truth = c**2  # a draft whose confidence overstates its acceptance
        cal.observe([c], int(rng.random() < truth))
    for c in (0.15, 0.55, 0.95):
        assert cal(c) == pytest.approx(c**2, abs=0.06)


def test_a_token_is_worth_drafting_only_when_it_raises_tokens_per_second() -> None:
    # a round: n draft steps of 10 ms, no round trip, a 100 ms pass. The first token (from E=1 at 100 ms) pays iff
    # (1 + a) * 0.1 > 0.11: a > 0.1
    v = BlockValue(policy(0.01, 0.0, 0.1), Calibration(), pipelined=False)
    assert v.worth(0.15) and not v.worth(0.05)
    # an expensive draft (100 ms a step): a token would have to be accepted more than certainly
    assert not BlockValue(policy(0.1, 0.0, 0.1), Calibration(), pipelined=False).worth(0.99)


def test_a_long_round_trip_makes_long_blocks_pay() -> None:
    near = BlockValue(policy(0.03, 0.0, 0.1), Calibration(), pipelined=False)
    far = BlockValue(policy(0.03, 0.2, 0.1), Calibration(), pipelined=False)

    def length(v: BlockValue, confidence: float) -> int:
        v.start()
        while v.n < 16 and v.worth(confidence):
            v.take(confidence)
        return v.n

    assert 0 < length(near, 0.85) < length(far, 0.85)
    assert length(near, 0.25) == 0 and length(far, 0.25) > 0


def test_taking_tokens_compounds_their_reach() -> None:
    v = BlockValue(policy(0.0, 0.0, 0.1), Calibration(), pipelined=False)
    v.take(0.55)
    v.take(0.55)
    assert v.n == 2 and v.reach == pytest.approx(0.55**2) and v.expected == pytest.approx(1 + 0.55 + 0.55**2)
    v.start()
    assert (v.n, v.reach, v.expected) == (0, 1.0, 1.0)


def test_the_drafter_ends_blocks_by_value_and_its_verdicts_calibrate_it(tiny_draft: LoadedModel) -> None:
    prompt, params = list(range(2, 40)), SamplingParams(max_tokens=8)
    free = ModelDrafter(tiny_draft, value=BlockValue(policy(0.0, 0.0, 0.1), Calibration(), pipelined=False))
    free.start(prompt, params)  # a free draft step and a flat pass: every token with a chance pays
    assert len(free.propose(prompt, 8).tokens) == 8 and free.cut == 0
    cal = Calibration()
    dear = ModelDrafter(tiny_draft, value=BlockValue(policy(0.1, 0.0, 0.1), cal, pipelined=False))
    dear.start(prompt, params)
    block = dear.propose(prompt, 8, at_least=1)  # no token pays: the block is the one it must have
    assert len(block.tokens) == 1 and dear.cut == 1 and len(block.confidence) == 1
    seen = sum(cal.seen)
    dear.learn(prompt, block, VerifyResult(0, [5], None, [5]))
    assert sum(cal.seen) == seen + 1 and cal(block.confidence[0]) < Calibration()(block.confidence[0])


def test_blocks_by_value_keep_greedy_output_equal_to_the_target_alone(tiny_target: LoadedModel,
                                                                      tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rng, value = random.Random(1), BlockValue(policy(0.02, 0.05, 0.1), Calibration(), pipelined=False)
    for _ in range(3):
        prompt = [rng.randrange(2, 96) for _ in range(rng.randint(3, 60))]
        want = generate_autoregressive(tiny_target, prompt, params).tokens
        got = generate_speculative(ModelDrafter(tiny_draft, value=value), LocalVerifier(tiny_target), prompt,
                                   params, 16)
        assert got.tokens == want and got.stats.accepted > 0


def test_a_seeded_sample_reproduces_whatever_the_timings(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    params, prompt = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True), list(range(3, 30))
    outs = []
    for draft_s in (0.0, 0.1):  # a free draft step drafts long blocks by value, a dear one single tokens
        value = BlockValue(policy(draft_s, 0.0, 0.1), Calibration(), pipelined=False)
        drafter = ModelDrafter(tiny_draft, p_min=0.5, value=value)
        outs.append(generate_speculative(drafter, LocalVerifier(tiny_target), prompt, params, 8).tokens)
        assert drafter.sizer is None
    assert outs[0] == outs[1]
