"""`tandem bench replay`: the figures on hand-made numbers, auto's warm start, and one small replay end to end over
real processes (cloud, netem) with tiny random-weight models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.client import edge_decoder
from edge_client.settings import EdgeSettings
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.bench_replay import ReplayConfig, run_replay
from tandem_tools.figures import percentile, percentiles
from tandem_tools.replay_summary import (
    RequestRecord,
    greedy_mismatches,
    leviathan_e,
    load_trace,
    per_kind,
    render_kinds,
    render_markdown,
    summarize,
)

# --- the figures


def test_percentiles_interpolate_like_numpy() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentiles([0.010, 0.020], scale=1e3) == pytest.approx({"p50": 15.0, "p90": 19.0, "p99": 19.9})


def test_leviathan_expected_tokens() -> None:
    assert leviathan_e(0.5, 4) == pytest.approx(1.9375)  # 1 + 1/2 + 1/4 + 1/8 + 1/16
    assert leviathan_e(0.0, 4) == 1.0
    assert leviathan_e(1.0, 4) == 5.0
    assert leviathan_e(0.8, 2) == pytest.approx(1 + 0.8 + 0.64)


def rec(mode: str, rtt: float, i: int, tokens: int, e2e: float, **kw: object) -> RequestRecord:
    r = RequestRecord(mode, rtt, i, prompt_tokens=10, max_tokens=tokens, tokens=tokens, e2e_s=e2e)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_summary_on_hand_made_requests() -> None:
    records = [
        rec("cloud", 0, 0, 100, 2.0, ttft_s=0.1, tpot_s=0.019, itl_s=[0.02, 0.02], target_passes=100,
            bytes_sent=50, bytes_received=1550, output_sha="a"),
        rec("cloud", 0, 1, 50, 1.0, ttft_s=0.3, tpot_s=0.014, itl_s=[0.01], target_passes=50, output_sha="b"),
        rec("spec", 0, 0, 100, 1.0, ttft_s=0.2, rounds=25, drafted=100, accepted=75, target_passes=25,
            rejected_rounds=20, bytes_sent=1000, bytes_received=1000, gamma_mean=4.0, itl_s=[0.04], output_sha="a"),
        rec("spec", 0, 1, 50, 1.0, rounds=20, drafted=80, accepted=40, target_passes=20, gamma_mean=4.0,
            rejected_rounds=15, output_sha="b"),
        rec("spec", 10, 0, 0, 0.5, error="RemoteError: boom"),
    ]
    rows = {(r["mode"], r["rtt_ms"]): r for r in summarize(records, ["cloud", "spec"], [0.0, 10.0])}
    cloud, spec = rows[("cloud", 0.0)], rows[("spec", 0.0)]
    assert cloud["tokens_per_s"] == pytest.approx(150 / 3.0)
    assert cloud["speedup_vs_cloud"] == pytest.approx(1.0)
    assert spec["tokens_per_s"] == pytest.approx(75.0)
    assert spec["speedup_vs_cloud"] == pytest.approx(75.0 / 50.0)
    assert spec["acceptance_rate"] == pytest.approx(115 / 180)
    assert spec["target_passes_per_token"] == pytest.approx(45 / 150)
    assert cloud["target_passes_per_token"] == 1.0
    assert spec["bytes_per_token"] == pytest.approx(2000 / 150)
    assert spec["tokens_per_round"] == pytest.approx(150 / 45)
    assert spec["alpha"] == pytest.approx(115 / (115 + 35))
    assert spec["leviathan_e"] == pytest.approx(leviathan_e(115 / 150, 4.0))
    assert cloud["ttft_ms"]["p50"] == pytest.approx(200.0) and cloud["ttft_ms"]["p90"] == pytest.approx(280.0)
    assert cloud["itl_ms"]["p50"] == pytest.approx(20.0)
    assert cloud["tokens_per_round"] is None and cloud["acceptance_rate"] is None
    failed = rows[("spec", 10.0)]
    assert failed["requests"] == 0 and failed["errors"] == 1 and failed["speedup_vs_cloud"] is None
    assert greedy_mismatches(records, {0, 1}) == []
    records.append(rec("spec", 10, 1, 50, 1.0, output_sha="c"))
    assert greedy_mismatches(records, {0, 1}) == [
        {"prompt_index": 1, "outputs": {"cloud@0ms": "b", "spec@0ms": "b", "spec@10ms": "c"}}]
    assert greedy_mismatches(records, {0}) == []  # sampled requests are not compared


def test_per_kind_on_hand_made_requests() -> None:
    """Each kind against cloud-only on its own requests, at the same RTT; cloud-only itself, a request that failed
    and a request with no kind stay out."""
    kinds = ["math", "coding", "math", None]
    records = [
        rec("cloud", 0, 0, 100, 2.0, target_passes=100, output_sha="a"),
        rec("cloud", 0, 1, 50, 1.0, target_passes=50, output_sha="b"),
        rec("cloud", 0, 2, 60, 1.2, target_passes=60, output_sha="c"),
        rec("cloud", 0, 3, 10, 0.1, target_passes=10, output_sha="d"),
        rec("spec", 0, 0, 100, 1.0, target_passes=25, output_sha="a"),
        rec("spec", 0, 1, 50, 1.25, target_passes=20, output_sha="x"),
        rec("spec", 0, 2, 60, 0.6, target_passes=15, output_sha="c"),
        rec("spec", 0, 3, 0, 0.5, error="RemoteError: boom"),
        rec("spec", 10, 0, 100, 1.0, target_passes=25, output_sha="a"),  # no cloud-only at 10 ms: no row
    ]
    (row,) = per_kind(records, kinds, ["cloud", "spec"], [0.0, 10.0], greedy={0, 1})
    assert (row["mode"], row["rtt_ms"], [k["kind"] for k in row["kinds"]]) == ("spec", 0.0, ["math", "coding"])
    math, coding = row["kinds"]
    assert math["vs_cloud"] == pytest.approx((160 / 1.6) / (160 / 3.2))  # 2.0x
    assert math["ms"] == pytest.approx(800.0) and math["cloud_ms"] == pytest.approx(1600.0)
    assert math["tokens_per_pass"] == pytest.approx(160 / 40) and math["requests"] == 2
    assert math["greedy_equal"] == "1/1"  # prompt 2 is not greedy: not compared
    assert coding["vs_cloud"] == pytest.approx(0.8) and coding["tokens_per_pass"] == pytest.approx(2.5)
    assert coding["ms"] == pytest.approx(1250.0) and coding["greedy_equal"] == "0/1"
    assert row["min_vs_cloud"] == pytest.approx(0.8) and row["lowest_kind"] == "coding"
    assert row["median_vs_cloud"] == pytest.approx(1.4)
    assert (row["at_or_above_floor"], row["kinds_compared"]) == (1, 2)
    md = "\n".join(render_kinds([row]))
    assert "| spec | 0 | coding | 1250 | 1000 | 0.80x | 2.50 | 0/1 |" in md
    assert "| spec | 0 | math | 800 | 1600 | 2.00x | 4.00 | 1/1 |" in md
    assert "lowest 0.80x (coding), median 1.40x; 1/2 kinds at or above 0.95x" in md
    assert per_kind(records, [None] * 4, ["cloud", "spec"], [0.0], {0}) == [] and render_kinds([]) == []


def test_trace_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "max_tokens": 5}\n\n{"prompt": "b", "max_tokens": 6, "temperature": 0.7, '
                    '"seed": 3, "arrival_s": 1.5}\n{"prompt": "c", "max_tokens": 7, "kind": "math"}\n')
    rows = load_trace(path)
    assert [r.prompt for r in rows] == ["a", "b", "c"] and [r.kind for r in rows] == [None, None, "math"]
    assert rows[1].temperature == 0.7 and rows[1].seed == 3 and rows[1].arrival_s == 1.5 and rows[0].arrival_s is None
    assert len(load_trace(path, limit=2)) == 2
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="max_tokens"):
        load_trace(path)
    path.write_text('{"prompt": "a", "max_tokens": 5, "kind": 3}\n')
    with pytest.raises(ValueError, match="kind"):
        load_trace(path)


# --- auto's warm start with a cloud that gives no advice: once the edge decided for the cloud, later requests skip
# the session (and its prefill)

PROMPT = [10, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    settings = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0,
                              max_prompt_tokens=64, max_draft_tokens=16, max_tokens_limit=64, shutdown_grace_s=0.5,
                              load_aware=False)
    with BackgroundServer(settings, tiny_target) as handle:
        yield handle


def test_auto_goes_straight_to_the_cloud_once_it_decided(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel
) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = generate_autoregressive(tiny_target, PROMPT, params).tokens
    # a margin no speculation can meet: auto must decide for the cloud after its probe rounds
    settings = EdgeSettings(cloud=f"127.0.0.1:{server.grpc_port}", mode="auto", gamma=3, auto_margin=1000.0,
                            timeout_s=10, retries=0)
    client = edge_decoder(settings, tiny_draft)
    first = client.generate(PROMPT, params)
    assert first.tokens == expected
    assert first.stats.switched_to_cloud and first.stats.rounds >= settings.auto_probe_rounds
    for _ in range(7):
        again = client.generate(PROMPT, params)
        assert again.tokens == expected
        assert again.stats.switched_to_cloud and again.stats.rounds == 0  # no session, no probe
    reprobe = client.generate(PROMPT, params)  # the 8th after the decision measures again
    assert reprobe.tokens == expected and reprobe.stats.rounds >= settings.auto_probe_rounds


# --- end to end: a cloud process, a netem process per RTT, the edge here


def test_replay_end_to_end(tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    for model, name in ((tiny_target, "target"), (tiny_draft, "draft")):
        model.model.save_pretrained(tmp_path / name)
        model.tokenizer.save_pretrained(tmp_path / name)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"prompt": p, "max_tokens": 16, "kind": k}) + "\n" for p, k in (
        ("def add(a, b):", "def"), ("for i in range(10):", "loop"), ("unused: beyond --prompts", "unused"))))
    out = tmp_path / "out"
    cfg = ReplayConfig(trace=trace, out=out, rtts=[0.0, 10.0], modes=["cloud", "spec-pipelined", "spec-pool"],
                       target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), gamma=4, limit=2,
                       timeout_s=30.0)
    results = run_replay(cfg)

    assert {p.name for p in out.iterdir()} >= {"results.json", "summary.md", "speedup_vs_rtt.png"}
    assert (out / "speedup_vs_rtt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(results))
    meta = data["meta"]
    for key in ("target", "draft", "settings", "machine", "git_revision", "threads", "prompts", "target_step_ms"):
        assert key in meta
    assert meta["prompts"] == 2 and meta["threads"]["edge"] == 1 and meta["threads"]["cloud"] == 1
    modes = ["cloud", "spec-pipelined", "spec-pool"]
    assert meta["modes"] == modes
    assert len(data["requests"]) == 2 * 2 * len(modes)
    assert all(r["error"] is None and r["tokens"] > 0 for r in data["requests"])
    assert data["greedy_mismatches"] == []
    assert len(data["summary"]) == 2 * len(modes)
    for row in data["summary"]:
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(row[key]) == {"p50", "p90", "p99"}
        assert row["tokens_per_s"] > 0 and row["speedup_vs_cloud"] > 0 and row["bytes_per_token"] > 0
    spec = {r["rtt_ms"]: r for r in data["summary"] if r["mode"] == "spec-pipelined"}
    assert 0 < spec[0.0]["target_passes_per_token"] <= 1.0 and spec[0.0]["tokens_per_round"] >= 1.0
    # the emulated network is real: the edge's round trips grow by ~10 ms, and so does cloud-only's TTFT (the
    # connection's handshake and the request each cross it)
    assert spec[10.0]["measured_rtt_ms"] >= max(9.0, spec[0.0]["measured_rtt_ms"] + 5.0)
    cloud = {r["rtt_ms"]: r for r in data["summary"] if r["mode"] == "cloud"}
    assert cloud[10.0]["ttft_ms"]["p50"] >= cloud[0.0]["ttft_ms"]["p50"] + 8.0
    md = (out / "summary.md").read_text()
    assert md == render_markdown(data) and "| spec-pipelined | 10 |" in md and "Speedup vs cloud" in md
    assert [(p["rtt_ms"], p["mode"]) for p in data["per_kind"]] == [(t, m) for t in (0.0, 10.0) for m in modes[1:]]
    assert all([k["kind"] for k in p["kinds"]] == ["def", "loop"] and p["kinds_compared"] == 2
               and all(k["greedy_equal"] == "1/1" for k in p["kinds"]) for p in data["per_kind"])
    assert "| spec-pipelined | 10 | loop |" in md


def test_open_loop_arrivals(tmp_path: Path, tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    """With `arrival_s`, requests start at their arrival times and overlap, each with its own edge client."""
    for model, name in ((tiny_target, "target"), (tiny_draft, "draft")):
        model.model.save_pretrained(tmp_path / name)
        model.tokenizer.save_pretrained(tmp_path / name)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"prompt": p, "max_tokens": 24, "arrival_s": t}) + "\n"
                             for p, t in (("class A:", 0.0), ("import os", 0.02), ("class A:", 0.04))))
    cfg = ReplayConfig(trace=trace, out=tmp_path / "out", rtts=[5.0], modes=["cloud", "spec-pipelined"],
                       target=str(tmp_path / "target"), draft=str(tmp_path / "draft"), gamma=3, timeout_s=30.0)
    results = run_replay(cfg)
    assert results["meta"]["open_loop"] is True and results["greedy_mismatches"] == []
    requests = results["requests"]
    assert len(requests) == 6 and all(r["error"] is None and r["tokens"] > 0 for r in requests)
    for mode in ("cloud", "spec-pipelined"):
        mine = sorted((r for r in requests if r["mode"] == mode), key=lambda r: r["start_s"])
        assert [r["prompt_index"] for r in mine] == [0, 1, 2]
        assert mine[1]["start_s"] >= 0.02 and mine[2]["start_s"] >= 0.04
        assert mine[1]["start_s"] < mine[0]["start_s"] + mine[0]["e2e_s"]  # in flight together
    same = [r["output_sha"] for r in requests if r["prompt_index"] in (0, 2)]
    assert len(set(same)) == 1  # the same prompt, concurrently and in both modes: the same greedy output


def test_the_compose_bench_command_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose.yml's `bench` service runs this command: its arguments must mean what it says."""
    import re

    import yaml
    from typer.testing import CliRunner

    import tandem_tools.bench_replay
    from tandem_tools.cli import app

    root = Path(__file__).resolve().parents[1]
    command = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["bench"]["command"]
    args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(a)) for a in command]
    seen: list[ReplayConfig] = []
    monkeypatch.setattr(tandem_tools.bench_replay, "run_replay", lambda cfg: seen.append(cfg))
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.cloud == "cloud:50051" and cfg.out == Path("/results") and cfg.rtts == [0, 10, 20, 50, 100]
    assert cfg.modes == ["cloud", "spec", "spec-pipelined", "auto"] and cfg.gamma == 4
