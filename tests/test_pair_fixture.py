"""The test pair (tests/fixtures/test_pair): loads offline, shares one tokenizer, and speculative greedy output equals
the target's."""

from __future__ import annotations

import pytest

from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_model
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_tools.train.data import heldout_prompts

pytestmark = pytest.mark.slow
N_PROMPTS, MAX_TOKENS = 20, 40


@pytest.fixture(scope="module")
def pair() -> tuple[LoadedModel, LoadedModel]:
    target, draft = load_model("test-target"), load_model("test-draft")
    check_pair(draft, target)
    return target, draft


@pytest.fixture(scope="module")
def prompts(pair: tuple[LoadedModel, LoadedModel]) -> list[list[int]]:
    return heldout_prompts(N_PROMPTS, 64, pair[0].tokenizer)


@pytest.fixture(scope="module")
def reference(pair: tuple[LoadedModel, LoadedModel], prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [generate_autoregressive(pair[0], p, params).tokens for p in prompts]


def test_the_pair_is_small_and_cheap(pair: tuple[LoadedModel, LoadedModel]) -> None:
    target, draft = pair
    assert 20e6 <= target.n_params <= 40e6
    assert draft.n_params <= target.n_params / 10
    assert target.fingerprint == draft.fingerprint


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_equality(
    gamma: int, pair: tuple[LoadedModel, LoadedModel], prompts: list[list[int]], reference: list[list[int]]
) -> None:
    target, draft = pair
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    assert len(prompts) == N_PROMPTS
    for i, prompt in enumerate(prompts):
        out = generate_speculative(ModelDrafter(draft), LocalVerifier(target), prompt, params, gamma)
        assert out.tokens == reference[i], f"held-out prompt {i}, gamma {gamma}"
