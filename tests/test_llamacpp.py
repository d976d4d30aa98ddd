"""The llama.cpp runtime behind the core's seam: the backend rules, rows independent of the pass's shape, rollback,
and speculation with a llama.cpp draft, or a llama.cpp target, equal to that target alone, token for token."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tandem import llamacpp
from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem.drafting import ModelDrafter
from tandem.errors import CacheRollbackError, ModelLoadError
from tandem.gguf import PARTS
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_model, pick_backend
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.openai_api.text import chat_prompt

INSTALLED = all(importlib.util.find_spec(f"{p.package}{i}") is not None
                for p in PARTS.values() for i in range(1, p.count + 1))
needs_llama = pytest.mark.skipif(not llamacpp.available() or not INSTALLED,
                                 reason='pip install "tandem[llama]" and requirements-models.txt')
QUESTION = "Write a Python function that checks whether a string is a palindrome."


def test_the_backend_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert pick_backend("torch", DEFAULT_DRAFT, cpu)[0] == "torch"
    assert pick_backend("auto", "demo-draft", cpu)[0] == "torch"  # not a GGUF file
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert pick_backend("auto", DEFAULT_DRAFT, cpu)[0] == "torch"
    with pytest.raises(ModelLoadError, match=r"tandem\[llama\]"):
        pick_backend("llama", DEFAULT_DRAFT, cpu)
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "unsafe_build", lambda: "a build with AMX kernels")
    assert pick_backend("auto", DEFAULT_DRAFT, cpu)[0] == "torch"  # a crashing build is not chosen
    with pytest.raises(ModelLoadError, match="AMX"):
        pick_backend("llama", DEFAULT_DRAFT, cpu)
    monkeypatch.setattr(llamacpp, "unsafe_build", lambda: "")
    assert pick_backend("auto", DEFAULT_DRAFT, cpu) == ("llama", "auto: llama.cpp is installed and the model is a "
                                                        "GGUF file")
    assert pick_backend("auto", "my/model.gguf", torch.device("cuda"))[0] == "torch"
    with pytest.raises(ModelLoadError, match="GGUF"):
        pick_backend("llama", "demo-draft", cpu)
    with pytest.raises(ModelLoadError, match="unknown backend"):
        pick_backend("onnx", DEFAULT_DRAFT, cpu)


@pytest.fixture(scope="module")
def llama_draft() -> LoadedModel:
    return load_model(DEFAULT_DRAFT, backend="llama", threads=2)


@needs_llama
def test_rows_match_across_pass_shapes_and_rollback_is_one_operation(llama_draft: LoadedModel) -> None:
    assert llama_draft.backend == "llama.cpp" and llama_draft.vocab_size == 151936
    assert llama_draft.model.min_rows == 1  # type: ignore[union-attr]  # a draft is not padded
    exact = load_model(DEFAULT_DRAFT, backend="llama", threads=2, exact_passes="on")  # as a target is loaded
    assert "exact passes" in exact.describe() and exact.model.min_rows >= 2  # type: ignore[union-attr]
    assert llamacpp.probe(exact.model, seed=7)  # type: ignore[arg-type]
    ids = [int(t) for t in torch.randint(100, 30000, (20,), generator=torch.Generator().manual_seed(0))]
    seq = exact.state(ids[:12])
    first = seq.forward(ids[12:])  # [9, V]
    assert first.shape == (9, 151936) and seq.cached == 20
    seq.rollback(15)
    again = seq.run(ids[15:])  # [5, V]: positions 15.. fed again, in a pass of another shape
    assert torch.equal(again, first[4:]) and seq.cached == 20
    with pytest.raises(CacheRollbackError):
        seq.rollback(21)
    seq.commit(ids[12:15], keep_cached=15)
    assert seq.tokens == ids[:15] and seq.cached == 15


@needs_llama
@pytest.mark.slow
def test_a_llama_draft_with_the_torch_target_equals_the_target_alone(llama_draft: LoadedModel) -> None:
    target = load_model(DEFAULT_TARGET, "auto", exact_passes="auto")
    check_pair(llama_draft, target)
    params = SamplingParams(max_tokens=24)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTION}])
    want = generate_autoregressive(target, prompt, params).tokens
    spec = generate_speculative(ModelDrafter(llama_draft, p_min=0.75), LocalVerifier(target), prompt, params, 12)
    assert spec.tokens == want and spec.stats.accepted > len(want) / 3


@needs_llama
@pytest.mark.slow
def test_a_llama_target_speculates_equal_to_itself_alone(llama_draft: LoadedModel) -> None:
    target = load_model(DEFAULT_TARGET, backend="llama", threads=2, exact_passes="auto")
    check_pair(llama_draft, target)
    params = SamplingParams(max_tokens=32)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTION}])
    want = generate_autoregressive(target, prompt, params).tokens
    for gamma in (4, 12):
        spec = generate_speculative(ModelDrafter(llama_draft, p_min=0.75), LocalVerifier(target), prompt, params,
                                    gamma)
        assert spec.tokens == want and spec.stats.target_passes < len(want)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=3)
    assert generate_speculative(ModelDrafter(llama_draft, q_form="sparse"), LocalVerifier(target), prompt, sampled,
                                4).tokens
