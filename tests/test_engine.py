"""The generation loops on tiny random-weight models and hand-built bigram models."""

from __future__ import annotations

import pytest
import torch
from conftest import bigram, chain_table

from tandem.blocks import DraftBlock
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive
from tandem.speculate import generate_speculative

PROMPTS = [[(7 * i + 3 * j) % 90 + 2 for j in range(5 + i % 7)] for i in range(20)]


@pytest.fixture(scope="module")
def reference(tiny_target: LoadedModel) -> dict[int, list[int]]:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    return {i: generate_autoregressive(tiny_target, p, params).tokens for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_speculative_equals_target_alone(
    gamma: int, tiny_target: LoadedModel, tiny_draft: LoadedModel, reference: dict[int, list[int]]
) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    accepted = 0
    for i, prompt in enumerate(PROMPTS):
        result = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, gamma)
        assert result.tokens == reference[i], f"prompt {i}, gamma {gamma}"
        accepted += result.stats.accepted
    assert accepted > 0, "the noisy draft should agree with the target sometimes, or this test proves little"


def test_greedy_equality_holds_with_eos(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=60, stop_token_ids=(17, 23, 40))
    for prompt in PROMPTS[:10]:
        ar = generate_autoregressive(tiny_target, prompt, params)
        spec = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, 4)
        assert (spec.tokens, spec.finish_reason) == (ar.tokens, ar.finish_reason)


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_draft_equal_to_target_accepts_everything(gamma: int, tiny_target: LoadedModel) -> None:
    rounds = 5
    params = SamplingParams(max_tokens=rounds * (gamma + 1), ignore_eos=True)
    result = generate_speculative(ModelDrafter(tiny_target), LocalVerifier(tiny_target), PROMPTS[0], params, gamma)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.rounds == rounds
    assert result.stats.tokens_per_target_pass == gamma + 1
    assert result.stats.accepted_per_position == [rounds] * gamma


def test_hand_built_chain_all_accepted_then_eos() -> None:
    # target: 5 -> 6 -> 7 -> 0 (EOS); the draft agrees on everything
    target = bigram(chain_table(12, {7: 0}), "chain-target")
    draft = bigram(chain_table(12, {7: 0}), "chain-draft")
    result = generate_speculative(
        ModelDrafter(draft), LocalVerifier(target), [4, 5], SamplingParams(max_tokens=20), gamma=4
    )
    assert result.tokens == [6, 7, 0] and result.finish_reason == "stop"
    assert result.stats.rounds == 1


def test_hand_built_first_token_rejected_every_round() -> None:
    target = bigram(chain_table(12), "chain-target")
    draft = bigram(chain_table(12, {t: (t + 2) % 12 for t in range(12)}), "skip-draft")  # always wrong
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    result = generate_speculative(ModelDrafter(draft), LocalVerifier(target), [3], params, gamma=3)
    assert result.tokens == [4, 5, 6, 7, 8, 9]
    assert result.stats.accepted == 0 and result.stats.rounds == 6


def test_hand_built_max_tokens_mid_block() -> None:
    target = bigram(chain_table(12), "chain-target")
    session = TargetSession(target, [2], SamplingParams(max_tokens=2, ignore_eos=True))
    result = session.verify(DraftBlock([3, 4, 5, 6]))
    assert result.num_accepted == 4 and result.tokens == [3, 4] and result.finish_reason == "length"


def test_target_tokens_over_the_rejected_tail() -> None:
    target = bigram(chain_table(12), "chain-target")
    session = TargetSession(target, [2], SamplingParams(max_tokens=10, ignore_eos=True))
    result = session.verify(DraftBlock([3, 9, 1]))  # 3 accepted, 9 rejected (target says 4)
    assert (result.num_accepted, result.tokens) == (1, [3, 4])
    assert result.target_tokens == [4, 10, 2]  # the target's argmax after 3, after 9, after 1


@pytest.mark.parametrize("q_form", ["sparse", "none"])
def test_seeded_sampling_is_deterministic(q_form: str, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        drafter = ModelDrafter(tiny_draft, q_form=q_form)
        return generate_speculative(drafter, LocalVerifier(tiny_target), PROMPTS[1], params, 4).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampled_speculative_matches_target_distribution() -> None:
    """Sampling end to end through the loop: the first generated token follows the target's p."""
    vocab = 6
    torch.manual_seed(0)
    target = bigram(torch.randn(vocab, vocab), "rand-target")
    draft = bigram(torch.randn(vocab, vocab), "rand-draft")
    p = torch.softmax(target.model.table[3], -1)
    counts = torch.zeros(vocab)
    trials = 3000
    for seed in range(trials):
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
        drafter = ModelDrafter(draft, q_form="sparse", q_top_k=vocab)  # the whole q: k = V
        counts[generate_speculative(drafter, LocalVerifier(target), [3], params, 2).tokens[0]] += 1
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p = 0.001
