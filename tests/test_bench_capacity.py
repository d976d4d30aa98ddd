"""`tandem bench capacity` end to end with tiny models: a real cloud process, real edge processes, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import noisy_copy, tiny_model, tiny_tokenizer
from rich.console import Console

from tandem_tools.bench_capacity import CapacityConfig, parse_metrics, percentile, run_bench_capacity


def test_percentile_and_metrics_parsing() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == 1.99
    text = '# HELP x\nx_total 3.0\ny_count{a="1"} 2.0\ny_count{a="2"} 5.0\n'
    assert parse_metrics(text) == {"x_total": 3.0, "y_count": 7.0}


def test_bench_capacity_runs_both_modes_side_by_side(tmp_path: Path) -> None:
    target = tiny_model(0, layers=3)
    folders = {"target": tmp_path / "target", "draft": tmp_path / "draft"}
    for name, model in (("target", target), ("draft", noisy_copy(target, 0.05, seed=1))):
        model.save_pretrained(folders[name])
        tiny_tokenizer().save_pretrained(folders[name])
    cfg = CapacityConfig(clients=(1, 2), target=str(folders["target"]), draft=str(folders["draft"]), gamma="3",
                         max_tokens=8, prompt_tokens=16, requests=1, batch_window_ms=5.0)
    out = tmp_path / "out"
    prompts = [[(7 * i + 3 * j) % 90 + 2 for j in range(16 + 9 * i)] for i in range(2)]  # different lengths
    report = run_bench_capacity(cfg, out, Console(width=200, record=True), prompts)
    phases = report["phases"]
    assert [(p["clients"], p["mode"]) for p in phases] == [(1, "spec"), (1, "cloud"), (2, "cloud"), (2, "spec")]
    for p in phases:
        assert p["tokens"] == 8 * p["clients"] and p["outputs_identical"], p
        assert p["aggregate_tokens_per_s"] > 0 and p["tpot_p99_ms"] > 0
        assert p["target_passes_per_token"] is not None and p["batched_passes_per_token"] is not None
    spec = [p for p in phases if p["mode"] == "spec"]
    cloud = [p for p in phases if p["mode"] == "cloud"]
    # cloud-only: one pass per token (+ the prefill); speculative: fewer once anything is accepted
    assert all(p["target_passes_per_token"] >= 1.0 for p in cloud)
    assert all(p["acceptance_rate"] is not None for p in spec)
    saved = json.loads((out / "capacity.json").read_text())
    assert saved["phases"] == json.loads(json.dumps(phases)) and "compete" in saved["note"]
    assert (out / "capacity.png").stat().st_size > 10_000
