"""`tandem bench load`: its figures on hand-made numbers, and a short real run against a cloud process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servers import BackgroundServer
from typer.testing import CliRunner

from cloud_server.settings import ServerSettings
from tandem.models import LoadedModel
from tandem_tools.bench_load import compare, parse_metrics, slope, summarize, vm_rss_mib
from tandem_tools.cli import app
from tandem_tools.figures import percentile


def test_slope_is_least_squares() -> None:
    assert slope([0, 1, 2, 3], [10, 12, 14, 16]) == pytest.approx((2.0, 0.0))
    assert slope([0, 1, 2, 3], [5, 7, 5, 7]) == pytest.approx((0.4, (3.2 / 2 / 5) ** 0.5))  # residuals +-0.4, +-1.2
    assert slope([1], [3]) == slope([2, 2], [1, 5]) == slope([], []) == (None, None)
    assert slope([0, 1], [3, 5]) == (2.0, None)  # no error from two points


def test_compare_counts_lost_and_duplicated_tokens() -> None:
    ref = [1, 2, 3, 4]
    assert compare([1, 2, 3, 4], ref) == (0, 0)
    assert compare([1, 2], ref) == (2, 0)  # lost the tail
    assert compare([1, 9, 3, 4], ref) == (3, 0)  # wrong from position 1 on
    assert compare([1, 2, 3, 4, 4], ref) == (0, 1)  # one streamed twice
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)


def test_parse_metrics_reads_labelled_and_plain_samples() -> None:
    text = ('# HELP tandem_open_sessions x\n# TYPE tandem_open_sessions gauge\ntandem_open_sessions 3.0\n'
            'tandem_sessions_closed_total{reason="expired"} 2.0\nprocess_resident_memory_bytes 1.048576e+08\n')
    m = parse_metrics(text)
    assert m == {"tandem_open_sessions": 3.0, 'tandem_sessions_closed_total{reason="expired"}': 2.0,
                 "process_resident_memory_bytes": 104857600.0}
    rss = vm_rss_mib(__import__("os").getpid())
    assert rss is not None and rss > 10


def test_summarize_reports_the_slope_after_warm_up_only() -> None:
    from tandem_tools.bench_load import RequestRecord, Sample

    samples = [Sample(t, 0, 0, 0, 0.0, 0.0, rss, 0.0, None) for t, rss in
               [(0, 100.0), (30, 400.0), (60, 500.0), (120, 502.0), (180, 504.0)]]
    records = [RequestRecord(0, 0, 0.0, e2e_s=1.0, tokens=10, matches=True),
               RequestRecord(1, 0, 0.0, error="RemoteError: gone")]
    s = summarize(records, samples, wall_s=200.0, warmup_s=60.0)
    assert s["memory_slope_mib_per_min"] == pytest.approx(2.0)  # the warm-up's climb left out
    assert s["failed"] == 1 and s["mismatched"] == 0 and s["tokens"] == 10 and s["tokens_per_s"] == 0.05


def test_bench_load_runs_sessions_checks_outputs_and_frees_them(
    tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel
) -> None:
    # a running cloud (--cloud): its memory comes from its /metrics; the draft from a folder, as a user passes one
    draft_dir = tmp_path / "draft"
    tiny_draft.model.save_pretrained(draft_dir)
    tiny_draft.tokenizer.save_pretrained(draft_dir)
    settings = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, max_prompt_tokens=64,
                              max_draft_tokens=16, max_tokens_limit=64, shutdown_grace_s=0.5)
    out = tmp_path / "load"
    with BackgroundServer(settings, tiny_target) as h:
        result = CliRunner().invoke(app, [
            "bench", "load", "--cloud", f"127.0.0.1:{h.grpc_port}", "--metrics",
            f"http://127.0.0.1:{h.http_port}/metrics", "--draft", str(draft_dir), "--sessions", "2", "--duration",
            "6", "--prompts", "3", "--prompt-tokens", "48", "--max-tokens", "16", "--sample-s", "1", "--warmup", "1",
            # spec: sessions stay open while they run (under auto the cloud may advise them on as streams at once)
            "--mode", "spec", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "load.json").read_text())
    s = data["summary"]
    assert s["requests"] >= 4 and s["failed"] == 0 and s["mismatched"] == 0
    assert s["lost_tokens"] == s["duplicated_tokens"] == 0
    assert s["sessions_freed"] and s["open_sessions_at_end"] == 0 and s["stuck_sessions"] == 0
    assert {r["session"] for r in data["requests"]} == {0, 1}
    assert len(data["references"]) == 3 and all(len(ref) == 16 for ref in data["references"])
    samples = data["samples"]
    assert len(samples) >= 4 and all(x["rss_mib"] and x["rss_mib"] > 50 for x in samples)
    assert max(x["open_sessions"] for x in samples) >= 1  # the sessions were open while it ran
    assert s["memory_slope_mib_per_min"] is not None and s["e2e_s"]["p50"] > 0 and s["evicted"] == 0
    assert "0 mismatched, 0 lost, 0 duplicated" in result.output and "all freed" in result.output
