"""`tandem bench agreement`: the replay of chains over ranks (hand-made), and its passes equal to the real loop's."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tandem.costs import CostCurve
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_tools.bench_agreement import Answer, passes, ranks_of, summarize
from tests.conftest import TINY_VOCAB


def test_a_pass_takes_the_agreeing_run_up_to_gamma_and_adds_the_targets_token() -> None:
    assert passes([0] * 10, 4) == 2  # 4 + 1, 4 + 1
    assert passes([0] * 10, 0) == 1  # unbounded: the whole answer in one pass
    assert passes([0] * 10, 9) == 1
    assert passes([1, 1, 1, 1], 4) == 4  # every draft token missed: the target's token only
    assert passes([0, 5, 0, 0, 0], 8) == 2  # 1 + the target's at 1; then 3 more in a second pass
    assert passes([], 4) == 0


def test_a_sibling_takes_a_miss_it_ranks_and_the_token_after_it() -> None:
    assert passes([1, 1, 1, 1], 4, siblings=1) == 2  # each pass: the sibling and the target's token after it
    assert passes([3, 3, 3, 3], 4, siblings=1) == 4  # ranked third: not among one sibling
    assert passes([3, 3, 3, 3], 4, siblings=3) == 2
    # the miss lies past the block: no sibling drafted there
    assert passes([0, 0, 1, 0], 2) == passes([0, 0, 1, 0], 2, siblings=1) == 2


def test_summary_counts_ranks_and_chains() -> None:
    answers = [Answer(5, [0, 0, 1, 0]), Answer(7, [2, 0, 0, 0])]
    s = summarize(answers)
    assert s["tokens"] == 8
    assert s["agreement"] == pytest.approx(6 / 8)
    assert s["top2"] == pytest.approx(7 / 8) and s["top4"] == 1.0
    assert s["agreement_per_request"] == [0.75, 0.75]
    chains = s["chains"]
    assert isinstance(chains, dict)
    assert chains["2"]["tokens_per_pass"] == pytest.approx(8 / (passes([0, 0, 1, 0], 2) + passes([2, 0, 0, 0], 2)))
    assert chains["unbounded"]["with_siblings"] >= chains["unbounded"]["tokens_per_pass"]
    assert chains["2"]["speedup"] is None  # nothing timed
    json.dumps(s)  # the report is JSON


def test_timed_blocks_pay_for_their_draft_steps_and_positions() -> None:
    answers = [Answer(5, [0] * 9 + [1])]
    free = summarize(answers, CostCurve({1: 0.2, 64: 0.2}), 0.0)["chains"]
    assert isinstance(free, dict)
    for row in free.values():  # a flat pass and free drafting: the speedup is the tokens a pass
        if row["speedup"] is not None:
            assert row["speedup"] == pytest.approx(row["tokens_per_pass"])
            assert row["speedup_with_siblings"] == pytest.approx(row["with_siblings"])
    assert free["unbounded"]["speedup"] is None  # no fixed block to time
    # gamma 4: 10 tokens in passes of 5, 5; a pass over 5 positions 0.3 s, four draft steps of 0.05 s
    timed = summarize(answers, CostCurve({1: 0.2, 5: 0.3, 9: 0.4}), 0.05)["chains"]
    assert isinstance(timed, dict)
    assert timed["4"]["speedup"] == pytest.approx(0.2 / ((4 * 0.05 + 0.3) / 5))
    assert timed["4"]["speedup_with_siblings"] == pytest.approx(0.2 / ((4 * 0.05 + 0.4) / 5))


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_the_replayed_passes_are_the_loops_own(tiny_target: LoadedModel, tiny_draft: LoadedModel,
                                                gamma: int) -> None:
    """Fixed blocks of gamma greedy draft tokens, no tree: the loop takes exactly the passes the ranks say."""
    rng = random.Random(gamma)
    for _ in range(3):
        prompt = [rng.randrange(2, TINY_VOCAB) for _ in range(12)]
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        answer = generate_autoregressive(tiny_target, prompt, params).tokens
        ranks = ranks_of(tiny_draft, prompt, answer)
        assert len(ranks) == len(answer) == 40
        assert 0 < sum(r == 0 for r in ranks) < len(ranks)  # the pair agrees, not always
        spec = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, gamma)
        assert spec.tokens == answer
        assert spec.stats.target_passes == passes(ranks, gamma)


def test_the_command_on_the_test_pair_writes_its_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem_tools.cli import app

    out = tmp_path / "agreement.json"
    result = CliRunner().invoke(app, ["bench", "agreement", "--target", "test-target", "--draft", "test-draft",
                                      "--prompts", "2", "--max-tokens", "12", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["requests"] == 2
    lengths = [len(r["ranks"]) for r in report["requests"]]
    assert all(1 <= n <= 12 for n in lengths) and report["summary"]["tokens"] == sum(lengths)
    assert "tokens per target pass" in result.output
