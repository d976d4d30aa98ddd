"""The sequence-dependent part of the sampling transformation (penalties, logit bias, grammar) and the target's
logprobs: hand-built logits, the distribution test for each form of q, greedy equality with the target alone."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from conftest import tiny_model, tree_drafter, wrap

from tandem.blocks import DraftBlock
from tandem.drafting import ModelDrafter
from tandem.errors import InvalidRequestError
from tandem.grammar import Grammar, GrammarState
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams, logits_to_probs
from tandem.session import TargetSession, generate_autoregressive
from tandem.shaping import Shaper, line_paths, tree_paths
from tandem.speculate import generate_speculative

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
PROMPTS = [[(7 * i + 3 * j) % 90 + 2 for j in range(5 + i % 7)] for i in range(8)]


def ids(model: LoadedModel, text: str) -> list[int]:
    return [int(i) for i in model.tokenizer.encode(text, add_special_tokens=False)]


def test_penalties_and_bias_on_hand_built_logits() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                            logit_bias=((4, 3.0),))
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0, 3.0]] * 2)
    # prompt [5], output [2]; row 1 follows one more 2
    out = Shaper(params, vocab_size=6).shape(logits, [5, 2], 1, [[], [2]])
    # token 2: 2 - 0.5 - 0.25 * count, then / 2 (seen, positive); token 5: prompt only, 3 / 2; token 4: + 3
    assert out[0].tolist() == pytest.approx([1.0, -1.0, 0.625, 0.5, 3.0, 1.5])
    assert out[1].tolist() == pytest.approx([1.0, -1.0, 0.5, 0.5, 3.0, 1.5])
    negative = Shaper(SamplingParams(repetition_penalty=2.0), 3).shape(torch.tensor([[-1.0, -1.0, 1.0]]), [0], 1, [[]])
    assert negative[0].tolist() == [-2.0, -1.0, 1.0]  # a negative logit of a seen token is multiplied
    assert not Shaper(SamplingParams(), 6).active


def test_min_p_keeps_tokens_near_the_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))  # the floor: 0.2 * 0.5 = 0.1
    assert probs[0].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"presence_penalty": 3.0}, {"repetition_penalty": 0.001}, {"min_p": 1.5}, {"logprobs": 21},
                   {"logit_bias": ((1, 200.0),)}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        Shaper(SamplingParams(logit_bias=((10, 1.0),)), vocab_size=6)


def test_grammar_masks_each_row_of_a_block(tiny_target: LoadedModel) -> None:
    tok = tiny_target.tokenizer
    params = SamplingParams(grammar=Grammar("choice", json.dumps(["yes", "no"])))
    shaper = Shaper(params, tiny_target.vocab_size, tok, tiny_target.eos_token_ids)
    y, e, x = ids(tiny_target, "yex")
    rows = shaper.shape(torch.zeros(4, tiny_target.vocab_size), [9], 1, line_paths([y, e, x]))
    allowed = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in rows]
    assert allowed[0] == set(ids(tiny_target, "yn")) and allowed[1] == {e}
    assert allowed[2] == set(ids(tiny_target, "s"))
    assert len(allowed[3]) == tiny_target.vocab_size  # after a refused token: no verdict reaches it, left as is
    tree = tree_paths([-1, -1, 0], [y, ids(tiny_target, "n")[0], e])
    assert tree == [[], [y], [ids(tiny_target, "n")[0]], [y, e]]


def test_grammar_state_rolls_back_with_the_sequence(tiny_target: LoadedModel) -> None:
    state = GrammarState(Grammar("json_schema", json.dumps(SCHEMA)), tiny_target.tokenizer, tiny_target.vocab_size,
                         tiny_target.eos_token_ids)
    text = ids(tiny_target, '{"ok":true,"n":7}')  # compact JSON: no free whitespace
    assert state.sync(text) and state.allowed().nonzero().flatten().tolist() == [0]  # complete: only the end
    assert state.sync(text[:3]) and state.tokens == text[:3]  # rolled back
    assert not state.sync([*text[:3], ids(tiny_target, "x")[0]])
    assert state.sync(text)


def test_unknown_grammars_and_bad_specs_are_invalid_requests(tiny_target: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError):
        Grammar("yaml", "")  # type: ignore[arg-type]
    for g in (Grammar("regex", "[a-"), Grammar("json_schema", "{not json"), Grammar("choice", "[]")):
        with pytest.raises(InvalidRequestError):
            GrammarState(g, tiny_target.tokenizer, tiny_target.vocab_size, (0,))


# --- the distribution test, for each form of q, under penalties, bias, min-p and a grammar


def _pair_law(target: LoadedModel, prompt: list[int], params: SamplingParams, first: int,
              allowed: list[int]) -> dict[tuple[int, int], float]:
    """The target alone's exact law of its second and third tokens after a forced first one, written out here
    (not with `Shaper`): bias, penalties over the output so far, repetition over prompt and output, the grammar's
    letters only, temperature, min-p."""
    p = params
    bias = torch.zeros(target.vocab_size)
    for t, b in p.logit_bias:
        bias[t] += b

    def law(logits: torch.Tensor, output: list[int]) -> torch.Tensor:  # [V] -> [V]
        x = logits.float() + bias
        for t in set(output):
            x[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
        for t in set(prompt + output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        masked = torch.full_like(x, float("-inf"))
        masked[allowed] = x[allowed] / p.temperature
        masked[masked < masked.max() + math.log(p.min_p)] = float("-inf")
        return masked.softmax(-1)

    out = {}
    for t2 in allowed:
        logits = target.model(torch.tensor([[*prompt, first, t2]])).logits[0, -2:]  # [2, V]
        second, third = law(logits[0], [first]), law(logits[1], [first, t2])
        for t3 in allowed:
            out[(t2, t3)] = float(second[t2] * third[t3])
    return out


@pytest.mark.parametrize("q_form", ["sparse", "none"])
def test_sampling_with_shaping_follows_the_target(q_form: str, tiny_target: LoadedModel) -> None:
    """The grammar forces the first token (drafted without a draft step, q a point mass), then leaves 4 x 4 pairs."""
    draft = wrap(tiny_model(5, layers=2), "other-draft", tiny_target.tokenizer)  # disagrees often: rejections
    letters = ids(tiny_target, "abcd")
    x = ids(tiny_target, "x")[0]
    params = SamplingParams(max_tokens=3, temperature=2.0, min_p=0.02, presence_penalty=0.7, frequency_penalty=0.6,
                            repetition_penalty=1.5, logit_bias=((letters[2], 1.5),),
                            grammar=Grammar("regex", "x[a-d][a-d]"), ignore_eos=True)
    prompt = ids(tiny_target, "cab")
    law = _pair_law(tiny_target, prompt, params, x, letters)
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-4)  # the grammar leaves only these 16 pairs
    trials = 2400
    counts = dict.fromkeys(law, 0)
    verifier = LocalVerifier(tiny_target)
    drafted = steps = 0
    for seed in range(trials):
        drafter = ModelDrafter(draft, q_form=q_form, q_top_k=3)  # type: ignore[arg-type]
        out = generate_speculative(drafter, verifier, prompt, SamplingParams(**{**params.__dict__, "seed": seed}), 2)
        assert out.tokens[0] == x
        counts[(out.tokens[1], out.tokens[2])] += 1
        drafted, steps = drafted + out.stats.drafted, steps + drafter.steps
    assert steps < drafted  # the forced tokens took no draft step
    # cells expected under 8 pooled, so that chi-square holds
    small = [k for k in law if law[k] * trials < 8]
    cells = [([k], law[k]) for k in law if k not in small] + ([(small, sum(law[k] for k in small))] if small else [])
    chi2 = sum((sum(counts[k] for k in ks) - p * trials) ** 2 / (p * trials) for ks, p in cells)
    df = len(cells) - 1
    crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # p = 0.001 (Wilson-Hilferty)
    assert chi2 < crit, f"{q_form} q: chi2 {chi2:.1f} over {df} df"


# --- greedy: equal to the target alone, tokens and logprobs


@pytest.mark.parametrize("shaping", ["penalties", "json_schema", "choice"])
def test_greedy_speculative_with_shaping_equals_target_alone(shaping: str, tiny_target: LoadedModel,
                                                             tiny_draft: LoadedModel) -> None:
    extra: dict = {
        "penalties": {"presence_penalty": 0.4, "frequency_penalty": 0.3, "repetition_penalty": 1.2,
                      "logit_bias": ((ids(tiny_target, "e")[0], 2.0),)},
        "json_schema": {"grammar": Grammar("json_schema", json.dumps(SCHEMA))},
        "choice": {"grammar": Grammar("choice", json.dumps(["alpha", "beta", "gamma"]))},
    }[shaping]
    params = SamplingParams(max_tokens=32, logprobs=3, **extra)
    for prompt in PROMPTS[:5]:
        alone = generate_autoregressive(tiny_target, prompt, params)
        for gamma in (2, 5):
            spec = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, gamma)
            assert spec.tokens == alone.tokens
            assert spec.logprobs is not None and alone.logprobs is not None
            assert [lp.token for lp in spec.logprobs] == spec.tokens == [lp.token for lp in alone.logprobs]
            assert [lp.logprob for lp in spec.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs],
                                                                         abs=1e-4)
        text = tiny_target.tokenizer.decode(alone.tokens, skip_special_tokens=True)
        if shaping == "json_schema":
            assert alone.finish_reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)
        if shaping == "choice":
            assert text in ("alpha", "beta", "gamma")


def test_logprobs_are_the_target_alones(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=24, logprobs=4, ignore_eos=True)
    prompt = PROMPTS[2]
    session = TargetSession(tiny_target, prompt, params)
    reference = []
    while session.finish_reason is None:
        result = session.verify(DraftBlock([]))
        assert result.logprobs is not None
        reference.extend(result.logprobs)
    spec = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, 4)
    assert spec.logprobs is not None and [lp.token for lp in spec.logprobs] == [lp.token for lp in reference]
    for a, b in zip(spec.logprobs, reference, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
        assert a.top[0][1] >= a.logprob - 1e-6  # the top alternative is at least the chosen one (greedy: it)
    # the raw distribution's: log_softmax of the target's logits at that position
    logits = tiny_target.model(torch.tensor([prompt + spec.tokens[:1]])).logits[0, -2]
    assert spec.logprobs[0].logprob == pytest.approx(float(logits.log_softmax(-1)[spec.tokens[0]]), abs=1e-4)


def test_a_resumed_session_counts_its_emitted_tokens(tiny_target: LoadedModel) -> None:
    """Penalties and the grammar follow the output across a resume (`emitted`): the rest is the same."""
    params = SamplingParams(max_tokens=20, frequency_penalty=1.5, grammar=Grammar("regex", "[a-z ]{20}"),
                            ignore_eos=True)
    whole = generate_autoregressive(tiny_target, PROMPTS[0], params).tokens
    k = 7
    rest = generate_autoregressive(tiny_target, PROMPTS[0] + whole[:k],
                                   SamplingParams(**{**params.__dict__, "max_tokens": 20 - k, "emitted": k})).tokens
    assert rest == whole[k:]
    wrong = generate_autoregressive(tiny_target, PROMPTS[0] + whole[:k],
                                    SamplingParams(**{**params.__dict__, "max_tokens": 20 - k})).tokens
    assert wrong != whole[k:]  # without it the penalty forgets the first k tokens: this test can fail


def test_trees_and_the_pool_under_shaping_stay_exact(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    for extra in ({"frequency_penalty": 0.5}, {"grammar": Grammar("json_schema", json.dumps(SCHEMA))}):
        params = SamplingParams(max_tokens=30, **extra)  # type: ignore[arg-type]
        for prompt in PROMPTS[:4]:
            alone = generate_autoregressive(tiny_target, prompt, params).tokens
            pool = PhrasePool()
            pool.feed(prompt + alone)  # phrases the target would take: under a penalty or grammar, still exact
            drafter = tree_drafter(tiny_draft, pool)
            assert generate_speculative(drafter, LocalVerifier(tiny_target), prompt, params, 3).tokens == alone
