"""Bad input raises a clear, typed error before any model call."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer, wrap

from tandem.drafting import ModelDrafter
from tandem.errors import ContextOverflowError, InvalidRequestError, TokenizerMismatchError
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, tokenizer_fingerprint
from tandem.sampling import SamplingParams
from tandem.session import TargetSession
from tandem.speculate import generate_speculative


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -0.1}, {"temperature": float("nan")},
     {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"temperature": 1e-9}],
)
def test_bad_sampling_params(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_empty_prompt(tiny_target: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        TargetSession(tiny_target, [], SamplingParams())


def test_prompt_longer_than_context(tiny_target: LoadedModel) -> None:
    with pytest.raises(ContextOverflowError):
        TargetSession(tiny_target, [5] * tiny_target.context_length, SamplingParams())


def test_out_of_vocabulary_prompt(tiny_target: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        TargetSession(tiny_target, [5, tiny_target.vocab_size], SamplingParams())


def test_negative_gamma(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError):
        generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), [5], SamplingParams(), -1)


def test_mismatched_tokenizers_name_both_fingerprints(tiny_target: LoadedModel) -> None:
    other = wrap(tiny_target.model, "other-draft", tiny_tokenizer(extra="x"))
    assert other.fingerprint != tiny_target.fingerprint
    with pytest.raises(TokenizerMismatchError) as err:
        check_pair(other, tiny_target)
    assert other.fingerprint in str(err.value) and tiny_target.fingerprint in str(err.value)


def test_fingerprint_is_stable() -> None:
    assert tokenizer_fingerprint(tiny_tokenizer()) == tokenizer_fingerprint(tiny_tokenizer())


def test_generation_near_the_context_end(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    prompt = [5] * (tiny_target.context_length - 3)
    result = generate_speculative(
        ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, SamplingParams(max_tokens=50, ignore_eos=True), 8
    )
    assert result.finish_reason == "length" and len(result.tokens) == 3


def test_a_tiny_top_p_keeps_the_top_token() -> None:
    from tandem.sampling import logits_to_probs

    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3  # [4, V]
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=9.1e-129))
    assert not probs.isnan().any()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.allclose(probs.max(-1).values, torch.ones(4))
