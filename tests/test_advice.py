"""Load-aware speculation: the cloud's model of its streams and the advice it gives (`tandem.advice`)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cloud_server.settings import ServerSettings
from cloud_server.worker import ModelWorker
from tandem.advice import STREAM_GAP_S, LoadPolicy, StreamLoad, predict
from tandem.blocks import DraftBlock, EdgeReport, VerifyResult
from tandem.costs import CostCurve, Ewma
from tandem.messages import OpenRequest, SessionInfo
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem_protocol import bodies
from tandem_protocol import pb as wire
from tandem_protocol.metrics import Metrics

NOW = 1000.0


def linear(a: float, b: float) -> CostCurve:
    """A compute-bound target: every position costs b on top of a fixed a."""
    return CostCurve.from_measurements({p: a + b * p for p in (1, 2, 4, 8, 16, 32, 64, 128)})


def policy(curve: CostCurve, n: int, alphas: tuple[float, ...] = (0.6, 0.5, 0.4, 0.3), draft_ms: float = 5.0,
           rtt_ms: float = 0.5, gamma: int = 3, limit: int = 6, pipelined: bool = False) -> LoadPolicy:
    pol = LoadPolicy(curve)
    for i in range(n):
        s = pol.stream(f"s{i}", NOW)
        s.draft_s, s.rtt_s, s.limit, s.gamma, s.pipelined = draft_ms / 1e3, rtt_ms / 1e3, limit, gamma, pipelined
        s.acceptance.positions = [Ewma(a) for a in alphas]
    return pol


def test_one_stream_is_the_edges_own_rule() -> None:
    """Alone, a stream's rate is E(g) / (edge + C(g + 1)), and a cloud stream's 1 / C(1) (+ the re-queue hop)."""
    costs = [0.03 + 0.002 * p for p in range(1, 20)]
    s = StreamLoad(draft_s=0.005, rtt_s=0.01)
    s.acceptance.positions = [Ewma(0.7), Ewma(0.5)]
    gammas = np.array([[0.0], [1.0], [2.0]])
    expected = np.array([[1.0], [s.expected(1)], [s.expected(2)]])
    edge = np.array([[STREAM_GAP_S], [s.edge_s(1)], [s.edge_s(2)]])
    exposed = np.array([[0.0], [1.0], [1.0]])
    pred = predict(costs, gammas, expected, edge, exposed)
    assert pred.aggregate[0] == pytest.approx(1 / (STREAM_GAP_S + costs[0]), rel=1e-6)
    for k, g in ((1, 1), (2, 2)):
        assert pred.aggregate[k] == pytest.approx(s.expected(g) / (s.edge_s(g) + costs[g]), rel=1e-6)
        assert pred.positions[k] == pytest.approx(g + 1)
    assert s.expected(2) == pytest.approx(1 + 0.7 + 0.35)


def test_alone_a_cheap_draft_speculates_and_a_long_round_trip_does_not() -> None:
    curve = linear(0.030, 0.0025)
    near = policy(curve, 1).advise("s0", NOW)
    assert near.gamma > 0 and near.reason == "best"
    far = policy(curve, 1, rtt_ms=250).advise("s0", NOW)
    assert far.gamma == 0 and far.reason == "tpot"


def test_advice_never_exceeds_the_edges_own_bound() -> None:
    flat = linear(0.030, 0.00001)
    for limit in (1, 2, 5):
        advice = policy(flat, 1, alphas=(0.95,) * 8, draft_ms=0.1, limit=limit).advise("s0", NOW)
        assert 1 <= advice.gamma <= limit


def test_a_compute_bound_cloud_steps_aside_under_load_and_a_flat_one_does_not() -> None:
    """C(P) = a + bP: a crowded cloud gets more from a token per position; C flat: blocks stay worth it."""
    steep = linear(0.030, 0.0025)
    assert policy(steep, 1).advise("s0", NOW).gamma > 0
    crowded = policy(steep, 16).advise("s0", NOW)
    assert crowded.gamma == 0
    flat = linear(0.030, 0.00002)
    assert policy(flat, 16, alphas=(0.8, 0.75, 0.7, 0.65)).advise("s0", NOW).gamma > 0


def test_streams_that_follow_the_advice_settle_on_a_steep_curve() -> None:
    """Every stream advised in turn (as verdicts come): few streams keep speculating, many end as cloud streams."""
    steep = linear(0.030, 0.0025)
    speculating = []
    for n in (1, 2, 4, 8, 16):
        pol = policy(steep, n, alphas=(0.7, 0.6, 0.5, 0.4))
        for _ in range(4):
            for key in list(pol.streams):
                s = pol.streams[key]
                if s.gamma:  # a stream advised 0 stays a cloud stream
                    s.gamma = pol.advise(key, NOW).gamma
        speculating.append(sum(s.gamma > 0 for s in pol.streams.values()) / n)
    assert speculating[0] == 1 and speculating[-1] == 0
    assert speculating == sorted(speculating, reverse=True)


def test_cloud_streams_count_as_load() -> None:
    """Cloud-only streams (a token a pass) crowd the cloud as speculative sessions do."""
    steep = linear(0.030, 0.0025)
    pol = policy(steep, 1, alphas=(0.7, 0.6, 0.5, 0.4))
    assert pol.advise("s0", NOW).gamma > 0
    for i in range(15):
        pol.stream(f"stream-{i}", NOW)  # gamma 0, no report: a cloud stream
    assert pol.advise("s0", NOW).gamma == 0


def test_pipelining_hides_the_edge_part_of_rounds_that_hit() -> None:
    s = StreamLoad(draft_s=0.01, rtt_s=0.02, pipelined=True)
    s.acceptance.positions = [Ewma(0.9)] * 4
    assert s.hit(2) == pytest.approx(0.9**3)
    curve = linear(0.030, 0.0025)
    sync = policy(curve, 1, alphas=(0.9,) * 4, draft_ms=10, rtt_ms=20).advise("s0", NOW)
    piped = policy(curve, 1, alphas=(0.9,) * 4, draft_ms=10, rtt_ms=20, pipelined=True).advise("s0", NOW)
    assert piped.aggregate > sync.aggregate


def test_idle_streams_are_left_out_and_then_forgotten() -> None:
    steep = linear(0.030, 0.0025)
    pol = policy(steep, 16, alphas=(0.7, 0.6, 0.5, 0.4))
    assert pol.advise("s0", NOW).gamma == 0
    later = NOW + pol.idle_s + 1  # the others went quiet (their edges between requests)
    pol.stream("s0", later)
    assert pol.active(later) == ["s0"] and pol.advise("s0", later).gamma > 0
    pol.stream("s0", NOW + pol.forget_s + 10)
    assert list(pol.streams) == ["s0"]


def test_an_edge_that_reports_nothing_is_modelled_from_the_gap_the_cloud_sees() -> None:
    s = StreamLoad()
    s.answered = NOW
    s.arrived(NOW + 0.04)
    assert s.edge_s(3) == pytest.approx(0.04)
    s.answered = NOW + 1
    s.arrived(NOW + 0.5)  # a block sent ahead came in before the verdict went out
    assert s.gap.samples == 2 and s.edge_s(3) < 0.04


def test_the_report_and_the_advice_cross_both_wires() -> None:
    block = DraftBlock([5, 6, 7])
    block.report = EdgeReport(4.5, 12.0, 5, True)
    assert wire.block_from_pb(wire.block_to_pb(block, 3)).report == block.report
    body = bodies.DraftBody.model_validate(bodies.draft_to_json(block, 3, None))
    assert bodies.draft_from_body(body).report == block.report
    assert wire.block_from_pb(wire.block_to_pb(DraftBlock([5]), 0)).report is None
    report = EdgeReport(2.0, 30.0, 8, False)
    req = OpenRequest([1, 2, 3], SamplingParams(max_tokens=4), report=report)
    assert wire.open_from_pb(wire.open_to_pb(req)).report == report
    assert bodies.open_from_body(bodies.OpenBody.model_validate(bodies.open_to_json(req))).report == report
    plain = bodies.open_to_json(OpenRequest([1], SamplingParams(max_tokens=4)))
    assert "report" not in plain  # a server without load-aware advice refuses the field
    info = SessionInfo("s", "t", "f", 100, 512, 3, 16, False, (0,), 1.0, 0)
    assert wire.opened_from_pb(wire.opened_to_pb(info)).advice == 0
    assert bodies.opened_from_json(bodies.opened_to_body(info).model_dump()).advice == 0
    for advice in (None, 0, 4):
        verdict = VerifyResult(1, [5, 9], None, [9], seq=3, generated=7, server_ms=1.0, queue_ms=0.5, advice=advice)
        assert wire.verdict_from_pb(wire.verdict_to_pb(verdict)).advice == advice
        assert bodies.verdict_from_json(bodies.verdict_to_body(verdict).model_dump()).advice == advice


def test_live_passes_rescale_the_start_up_shape_and_an_outlier_cannot_run_away() -> None:
    pol = LoadPolicy(linear(0.010, 0.001))
    assert pol.pass_time(4) == pytest.approx(0.014)
    for _ in range(200):
        pol.observe_pass(8, 2 * 0.018)  # the machine under load: every pass twice the quiet one
    assert pol.pass_time(4) == pytest.approx(0.028, rel=0.01)  # the level follows, the shape stays
    assert pol.pass_time(16) / pol.pass_time(1) == pytest.approx(0.026 / 0.011, rel=1e-6)
    pol.observe_pass(2, 100.0)  # one absurd pass moves the level by at most the clip
    assert pol.pass_time(4) < 0.028 * 1.1


def test_the_models_inputs_are_on_the_metrics(tiny_target: LoadedModel) -> None:
    """What the advice is computed from can be read on /metrics: the pass cost, the overheads, the pooled acceptance."""
    worker = ModelWorker(tiny_target, ServerSettings(target="tiny-target"), Metrics())

    async def start() -> None:
        await worker.start()
        await worker.shutdown()

    asyncio.run(start())
    assert worker.policy is not None
    text = worker.metrics.render().decode()
    assert f'tandem_pass_cost_seconds{{positions="4"}} {worker.policy.pass_time(4)}' in text
    assert 'tandem_overhead_seconds{kind="step"}' in text and 'tandem_pooled_acceptance{position="0"} 0.6' in text
