"""`tandem bench capacity` with tiny models: replay edges (the draft's recorded proposals) against a real draft, and
the benchmark end to end (a real cloud process, edge processes, three modes side by side, JSON and plot)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import noisy_copy, tiny_model, tiny_tokenizer
from rich.console import Console

from tandem.adaptive import AdaptiveGamma
from tandem.blocks import VerifyResult
from tandem.config import SpeculationSettings
from tandem.costs import CostCurve, Ewma
from tandem.drafting import ModelDrafter
from tandem.errors import InvalidRequestError
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import SpeculativeDecoder, generate_speculative
from tandem.value import BlockValue, Calibration
from tandem_tools.bench_capacity import CapacityConfig, run_bench_capacity
from tandem_tools.capacity_figures import bucket_counts, histogram_buckets, parse_metrics, percentile
from tandem_tools.replay_edge import TABLE_FILE, ReplayDrafter, ReplayTable, ensure_table, record_table

PROMPTS = [[(7 * i + 3 * j) % 90 + 2 for j in range(16 + 9 * i)] for i in range(2)]  # different lengths
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_percentile_and_metrics_parsing() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == 1.99
    text = '# HELP x\nx_total 3.0\ny_count{a="1"} 2.0\ny_count{a="2"} 5.0\n'
    assert parse_metrics(text) == {"x_total": 3.0, "y_count": 7.0}
    before = histogram_buckets('g_bucket{le="0.0"} 1.0\ng_bucket{le="4.0"} 2.0\ng_bucket{le="+Inf"} 2.0\n', "g")
    after = histogram_buckets('g_bucket{le="0.0"} 2.0\ng_bucket{le="4.0"} 6.0\ng_bucket{le="+Inf"} 7.0\n', "g")
    assert bucket_counts(before, after) == {"0.0": 1, "4.0": 3, "+Inf": 1}


@pytest.fixture(scope="module")
def table(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> ReplayTable:
    return record_table(tiny_target, tiny_draft, PROMPTS, max_tokens=12, max_gamma=4)


def test_replay_proposals_are_the_drafts(table: ReplayTable, tiny_draft: LoadedModel) -> None:
    assert table.draft_step_s > 0 and len(table.outputs[0]) > 12 and table.width == 5
    slept: list[float] = []
    rng = random.Random(0)
    steps = 0
    for prompt, out in zip(PROMPTS, table.outputs, strict=True):
        real, replay = ModelDrafter(tiny_draft, "sparse"), ReplayDrafter(table, tiny_draft, slept.append)
        real.start(prompt, GREEDY)
        replay.start(prompt, GREEDY)
        for k in rng.sample(range(13), 13):  # any order: the real draft's cache crops and grows back
            n = rng.randint(1, table.width)
            assert replay.propose(prompt + out[:k], n).tokens == real.propose(prompt + out[:k], n).tokens, (k, n)
        assert replay.misses == 0
        steps += replay.steps
    assert sum(slept) == pytest.approx(steps * table.draft_step_s)  # the recorded time per step, slept
    # off the table (a block sent ahead on a wrong guess): still n tokens, and the draft's time
    wrong = PROMPTS[1] + table.outputs[1][:2] + [(table.outputs[1][2] + 1) % 90 + 2]
    assert replay.propose(wrong, 3).tokens == table.continuations[1][2][:3] and replay.misses == 1
    assert slept[-1] == pytest.approx(3 * table.draft_step_s)
    with pytest.raises(ValueError, match="max_gamma"):
        replay.propose(PROMPTS[0], table.width + 1)
    with pytest.raises(InvalidRequestError, match="greedy"):
        replay.start(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.8))
    with pytest.raises(InvalidRequestError, match="no prompt"):
        replay.start([3, 4, 5], GREEDY)


def _flat_value() -> BlockValue:
    return BlockValue(AdaptiveGamma(draft_s=Ewma(0.001), costs=CostCurve({1: 0.1, 64: 0.1})), Calibration(), False)


def test_replay_by_value_with_trees_is_the_drafts(table: ReplayTable, tiny_draft: LoadedModel) -> None:
    """Blocks ended by value and siblings beside them, from the recorded confidences: the real draft's own."""
    prompt, out = PROMPTS[1], table.outputs[1]
    real = ModelDrafter(tiny_draft, "sparse", value=_flat_value(), tree=True)
    replay = ReplayDrafter(table, tiny_draft, lambda s: None, value=_flat_value(), tree=True)
    real.start(prompt, GREEDY)
    replay.start(prompt, GREEDY)
    shapes = set()
    for k in range(13):
        a, b = real.propose(prompt + out[:k], table.width), replay.propose(prompt + out[:k], table.width)
        assert (b.tokens, b.candidates, b.confidence) == (a.tokens, a.candidates, a.confidence), k
        result = VerifyResult(min(1, len(a.tokens)), out[k : k + 2], None, [])
        real.learn(prompt + out[:k], a, result)
        replay.learn(prompt + out[:k], b, result)
        shapes.add((len(b.tokens), len(b.candidates)))
    assert replay.steps == real.steps and len(shapes) > 1 and any(c for _, c in shapes)


@pytest.mark.parametrize("how", ["sync", "pipelined-spec", "pipelined-auto", "pipelined-tree"])
def test_replay_generation_is_the_targets(how: str, table: ReplayTable, tiny_target: LoadedModel,
                                          tiny_draft: LoadedModel) -> None:
    for prompt in PROMPTS:
        alone = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        drafter = ReplayDrafter(table, tiny_draft, lambda s: None, value=_flat_value() if "tree" in how else None,
                                tree="tree" in how)
        if how == "sync":
            result = generate_speculative(drafter, LocalVerifier(tiny_target), prompt, GREEDY, gamma=3)
        else:
            mode = how.split("-")[1].replace("tree", "spec")
            settings = SpeculationSettings(mode=mode, gamma="adaptive" if mode == "auto" else 4, max_gamma=4,
                                           pipeline=True, retries=0)
            decoder = SpeculativeDecoder(settings, tiny_draft, lambda: LocalVerifier(tiny_target))
            result = decoder.generate(prompt, GREEDY, drafter=drafter)
        assert result.tokens == alone == table.outputs[PROMPTS.index(prompt)][:12]
        assert result.stats.accepted > 0 or result.stats.switched_to_cloud


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pair")
    target = tiny_model(0, layers=3)
    for name, model in (("target", target), ("draft", noisy_copy(target, 0.05, seed=1))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return {"target": str(root / "target"), "draft": str(root / "draft")}


def test_bench_capacity_three_modes_with_replay_edges(pair: dict[str, str], tmp_path: Path) -> None:
    cfg = CapacityConfig(clients=(1, 2), target=pair["target"], draft=pair["draft"], gamma="3", max_gamma=4,
                         max_tokens=8, prompt_tokens=16, requests=1, batch_window_ms=5.0)
    out = tmp_path / "out"
    report = run_bench_capacity(cfg, out, Console(width=250, record=True), PROMPTS)
    phases = report["phases"]
    # the order of the modes rotates between concurrencies
    assert [(p["clients"], p["mode"]) for p in phases] == [
        (1, "cloud"), (1, "spec"), (1, "auto"), (2, "spec"), (2, "auto"), (2, "cloud")]
    for p in phases:
        assert p["tokens"] == 8 * p["clients"] and p["outputs_identical"] and p["outputs_match_table"], p
        assert p["aggregate_tokens_per_s"] > 0 and p["tpot_p99_ms"] > 0 and p["tpot_p50_ms"] > 0
        assert p["target_passes_per_token"] is not None and 0 <= p["switched_to_cloud_share"] <= 1
        assert p["aggregate_vs_cloud"] == pytest.approx(p["aggregate_tokens_per_s"] / next(
            q["aggregate_tokens_per_s"] for q in phases if q["clients"] == p["clients"] and q["mode"] == "cloud"))
        if p["mode"] == "cloud":
            assert p["target_passes_per_token"] >= 1.0 and p["aggregate_vs_cloud"] == 1.0
            assert p["draft_passes"] == 0  # nothing drafted: the replay edge's clock is not wound either
        if p["mode"] == "spec":
            assert p["acceptance_rate"] is not None and p["draft_passes"] > 0
    assert [g["clients"] for g in report["goals"]] == [1, 2]
    assert set(report["ratios"]["2"]) == {"cloud", "spec", "auto"}
    saved = json.loads((out / "capacity.json").read_text())
    assert saved["phases"] == json.loads(json.dumps(phases)) and "no CPU" in saved["note"]
    assert saved["settings"]["edges"] == "replay" and saved["replay"]["draft_step_s"] > 0
    assert not saved["replay"]["reused"]
    assert (out / "capacity.png").stat().st_size > 10_000
    # resumable: the same table is reused, a different one recorded again
    again, reused = ensure_table(out / TABLE_FILE, pair["target"], pair["draft"], PROMPTS, 8, 4)
    assert reused and again.outputs == ReplayTable.load(out / TABLE_FILE).outputs
    assert not ensure_table(out / TABLE_FILE, pair["target"], pair["draft"], PROMPTS, 8, 3)[1]


def test_bench_capacity_with_real_edges(pair: dict[str, str], tmp_path: Path) -> None:
    cfg = CapacityConfig(clients=(2,), target=pair["target"], draft=pair["draft"], gamma="3", modes=("spec", "cloud"),
                         edges="real", max_tokens=8, prompt_tokens=16, requests=1, batch_window_ms=5.0)
    report = run_bench_capacity(cfg, tmp_path / "out", Console(width=250, record=True), PROMPTS)
    assert [p["mode"] for p in report["phases"]] == ["spec", "cloud"] and report["replay"] is None
    assert all(p["outputs_identical"] and p["tokens"] == 16 for p in report["phases"])
    assert "compete" in report["note"] and report["goals"] == []
    with pytest.raises(ValueError, match="max_gamma"):
        CapacityConfig(gamma="9").check()
