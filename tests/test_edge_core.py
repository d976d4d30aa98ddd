"""Transport-free pieces of the edge: the pipelined-block rule in TargetSession, adaptive gamma, the edge drafter."""

from __future__ import annotations

import random

import pytest
from conftest import bigram, chain_table

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import DraftBlock, pending_part
from tandem.costs import Ewma
from tandem.drafting import ModelDrafter
from tandem.models import LoadedModel
from tandem.rounds import BlockPlan
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive

PROMPT = [3, 4, 5]


@pytest.fixture
def chain() -> LoadedModel:
    return bigram(chain_table(16), "chain")  # greedy: t -> t + 1


# --- TargetSession: blocks sent ahead (base_len)


def test_a_block_sent_ahead_is_verified_from_the_committed_position(chain: LoadedModel) -> None:
    s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=20))
    first = s.verify(DraftBlock([6, 7]), base_len=3)  # all accepted, bonus 8
    assert first.tokens == [6, 7, 8] and not first.stale
    passes = s.passes
    # drafted ahead as [guess=8, 9, 10] from position 5: the guess is committed already, [9, 10] remain
    ahead = s.verify(DraftBlock([8, 9, 10]), base_len=5)
    assert ahead.num_accepted == 2 and ahead.tokens == [9, 10, 11] and not ahead.stale
    assert s.passes == passes + 1
    assert s.state.tokens == [*PROMPT, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize(("block", "base_len", "why"), [
    ([9, 10], 5, "the guessed bonus token was wrong"),
    ([8, 9], 7, "it starts past the committed position"),
    ([6], 3, "nothing remains after the committed overlap"),
])
def test_stale_blocks_change_nothing(chain: LoadedModel, block: list[int], base_len: int, why: str) -> None:
    s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=20))
    s.verify(DraftBlock([6, 7]), base_len=3)  # committed: 3 4 5 6 7 8
    tokens, passes = list(s.state.tokens), s.passes
    result = s.verify(DraftBlock(block), base_len=base_len)
    assert result.stale and result.tokens == [], why
    assert s.state.tokens == tokens and s.passes == passes  # no forward pass, no state change


def test_the_loop_and_the_target_apply_one_pipelining_rule(chain: LoadedModel) -> None:
    """What the loop predicts (`pending_part`, which it applies to the blocks in flight) is what the target does."""
    rng = random.Random(0)
    for _ in range(300):
        s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=20))
        s.verify(DraftBlock([6, 7]), base_len=3)  # committed: 3 4 5 6 7 8
        committed = list(s.state.tokens)
        base = rng.randint(0, len(committed) + 2)
        block = [rng.choice([committed[base + i] if base + i < len(committed) else 9, 9, 10, 11])
                 for i in range(rng.randint(0, 4))]
        predicted = pending_part(committed, base, block)
        result = s.verify(DraftBlock(block), base_len=base)
        assert result.stale == (predicted is None), (base, block)
        if predicted is not None:  # verified from the committed position on: the overlap is skipped
            assert s.state.tokens[: len(committed)] == committed and len(s.state.tokens) > len(committed)


def test_zero_overlap_and_unset_base_len_verify_as_before(chain: LoadedModel) -> None:
    s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=20))
    assert s.verify(DraftBlock([6, 9]), base_len=3).tokens == [6, 7]  # rejected at 9, recovered 7
    assert s.verify(DraftBlock([8, 9])).tokens == [8, 9, 10]  # old clients: the current position


def test_a_block_sent_ahead_after_the_end_is_stale(chain: LoadedModel) -> None:
    s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=3))
    assert s.verify(DraftBlock([6, 7]), base_len=3).finish_reason == "length"
    late = s.verify(DraftBlock([8, 9]), base_len=5)
    assert late.stale and late.finish_reason == "length"


def test_sampled_remainder_slices_q_rows(chain: LoadedModel) -> None:
    import torch

    s = TargetSession(chain, PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=0))
    s.verify(DraftBlock([]), base_len=3)
    committed = s.state.tokens[3]
    # q for three tokens; the first is the committed one and is dropped with its row
    ids = torch.tensor([[committed, 1], [committed + 1, 1], [committed + 2, 1]])  # [3, 2]
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]])  # [3, 2]
    result = s.verify(DraftBlock([committed, committed + 1, committed + 2], q_ids=ids, q_probs=probs), base_len=3)
    assert not result.stale and len(result.tokens) >= 1


# --- adaptive gamma on hand-made measurements


def measured(alpha: float, draft_ms: float, rtt_ms: float, verify_ms: tuple[float, float]) -> AdaptiveGamma:
    """verify_ms: (fixed, per position)."""
    m = AdaptiveGamma(max_gamma=16)
    m.acceptance.positions = [Ewma(alpha, samples=1) for _ in range(16)]
    m.observe_draft_step(draft_ms / 1e3)
    m.observe_rtt(rtt_ms / 1e3)
    for n in (1, 3, 5, 9):
        m.observe_verify(n, (verify_ms[0] + verify_ms[1] * n) / 1e3)
    return m


def test_expected_tokens_is_the_closed_form_with_one_alpha() -> None:
    m = measured(0.7, 1, 0, (10, 1))
    for g in (0, 1, 4, 9):
        assert m.expected_tokens(g) == pytest.approx((1 - 0.7 ** (g + 1)) / (1 - 0.7))


def test_long_blocks_when_acceptance_is_high_and_the_network_slow() -> None:
    slow = measured(0.9, 1, 100, (10, 1))
    fast = measured(0.9, 1, 0, (10, 1))
    poor = measured(0.2, 1, 0, (10, 1))
    assert slow.choose() >= 10
    assert poor.choose() <= 2
    assert slow.choose() > fast.choose() >= poor.choose()
    assert slow.chosen == [slow.chosen[0]] * 2


def test_expensive_drafting_shortens_blocks() -> None:
    assert measured(0.8, 20, 5, (10, 1)).choose() < measured(0.8, 0.5, 5, (10, 1)).choose()


def test_pipelining_hides_the_round_trip() -> None:
    m = measured(0.9, 1, 50, (10, 1))
    g = m.choose(pipelined=True)
    assert m.rate(g, pipelined=True) > m.rate(g, pipelined=False)


def test_acceptance_per_position_learns_only_positions_reached() -> None:
    m = AdaptiveGamma(prior_acceptance=0.5)
    m.observe_round(drafted=4, accepted=1)  # position 0 accepted, 1 rejected, 2 and 3 never reached
    assert [round(a.value, 3) for a in m.acceptance.positions] == [1.0, 0.0]
    m.observe_round(drafted=4, accepted=4)
    assert len(m.acceptance.positions) == 4 and m.acceptance(0) == 1.0 and 0 < m.acceptance(1) < 1


def test_cloud_rate_is_one_target_step_per_token() -> None:
    m = measured(0.5, 1, 200, (10, 1))
    m.observe_verify(1, 0.011)
    assert m.cloud_rate() == pytest.approx(1 / 0.011)
    assert m.best_rate() < m.cloud_rate()  # 200 ms a round cannot beat a token every 11 ms


# --- the edge drafter


def test_drafter_reset_keeps_the_common_prefix_cached(tiny_target: LoadedModel) -> None:
    params = SamplingParams(max_tokens=16)
    d = ModelDrafter(tiny_target, q_top_k=8)
    d.start([10, 20, 30], params)
    first = d.propose([10, 20, 30], 4).tokens
    reference = generate_autoregressive(tiny_target, [10, 20, 30], SamplingParams(max_tokens=4, ignore_eos=True))
    assert first == reference.tokens  # the drafter's greedy tokens are the model's own
    d.reset([10, 20, 30, first[0], 77])
    assert d.state.cached <= 4
    again = d.draft_tokens(2).tokens
    fresh = ModelDrafter(tiny_target, q_top_k=8)
    fresh.start([10, 20, 30, first[0], 77], params)
    assert again == fresh.draft_tokens(2).tokens


def test_by_value_the_clouds_advice_switches_but_does_not_cap() -> None:
    """A fixed or adaptive gamma takes the advice as a cap; blocks ended by value take only its switch (0) to the
    cloud stream: the value rule already prices positions at the measured pass cost."""
    capped = BlockPlan(gamma="adaptive", policy=AdaptiveGamma(max_gamma=8), pipelined=False, auto=True, advised=2)
    assert capped.size(room=10)[0] == 2
    by_value = BlockPlan(gamma="adaptive", policy=AdaptiveGamma(max_gamma=8), pipelined=False, auto=True,
                         by_value=True, advised=2)
    assert by_value.size(room=10) == (8, 8)
    by_value.advised = 0
    assert by_value.size(room=10)[0] == 0
