"""The measured cost curve, per-position acceptance and the choice of block shape, on hand-built numbers."""

from __future__ import annotations

import pytest

from tandem.adaptive import AdaptiveGamma
from tandem.costs import DEFAULT_STEP_S, Acceptance, CostCurve, Ewma, keep_nodes

# relative to one step, a CPU's pass over n positions (the shape measured on this project's CPU)
CPU = {1: 1.0, 2: 1.15, 3: 1.23, 4: 1.67, 5: 1.69, 6: 1.77, 8: 1.99}


def test_nothing_measured_and_no_prior_is_one_step_flat() -> None:
    c = CostCurve()
    assert [c.time(n) for n in (1, 2, 16)] == [DEFAULT_STEP_S] * 3
    assert c.time(5) - c.time(4) == 0


def test_measured_points_interpolate_and_the_last_segment_extrapolates() -> None:
    c = CostCurve.from_measurements({2: 2.0, 4: 3.0, 6: 6.0})
    assert c.time(1) == 2.0  # below the smallest measured: no faster than it
    assert c.time(3) == pytest.approx(2.5)
    assert c.time(5) == pytest.approx(4.5)
    assert c.time(8) == pytest.approx(9.0)  # the slope of 4 -> 6 carried on
    assert c.time(5) - c.time(4) == pytest.approx(1.5)
    assert c.as_dict(3) == pytest.approx({1: 2.0, 2: 2.0, 3: 2.5})


def test_one_measured_point_reads_flat() -> None:
    c = CostCurve.from_measurements({3: 0.02})
    assert c.time(1) == c.time(3) == c.time(10) == 0.02


def test_the_curve_never_falls() -> None:
    c = CostCurve.from_measurements({1: 1.0, 2: 3.0, 3: 2.0, 5: 2.5})  # noise: 3 positions measured cheaper than 2
    times = [c.time(n) for n in range(1, 9)]
    assert times == sorted(times)
    assert c.time(3) == c.time(4) == 3.0  # held at the largest value before, until the measurements pass it
    assert c.time(8) >= 3.0  # a falling last segment is not extrapolated downwards


def test_observations_are_an_ewma_per_position_count() -> None:
    c = CostCurve(weight=0.5)
    c.observe(4, 1.0)
    c.observe(4, 3.0)
    c.observe(0, 9.0)  # an empty pass and a zero reading carry nothing
    c.observe(2, 0.0)
    assert c.measured == {4: 2.0}
    assert c.time(4) == 2.0


def test_a_prior_is_the_curve_until_something_is_measured() -> None:
    c = CostCurve({1: 1.0, 4: 1.6, 8: 2.0})
    assert c.time(2) == pytest.approx(1.2)
    assert c.time(4) == 1.6
    assert c.time(12) == pytest.approx(2.4)  # the prior's own last slope


def test_measurements_scale_the_priors_shape() -> None:
    c = CostCurve(CPU)
    c.observe(3, 2 * 1.23)  # the live passes run at twice the start-up ones (load, overheads)
    for n, v in CPU.items():
        assert c.time(n) == pytest.approx(2 * v)  # the jump at 4 survives, scaled
    c.observe(1, 1.0)  # a ratio of 1 at n = 1, 2 at n = 3: linear between, held beyond
    assert c.time(2) == pytest.approx(1.15 * 1.5)
    assert c.time(8) == pytest.approx(2 * 1.99)


def test_a_bad_prior_is_refused() -> None:
    for bad in ({}, {0: 1.0}, {1: 0.0}):
        with pytest.raises(ValueError):
            CostCurve(bad)


def test_acceptance_per_position_and_its_gains() -> None:
    a = Acceptance(0.5)
    assert a(3) == 0.5
    a.observe(reached=4, accepted=1)  # position 0 accepted, 1 rejected, 2 and 3 never reached
    assert [e.value for e in a.positions] == [1.0, 0.0]
    assert a(5) == 0.0  # deeper than measured: as the deepest measured
    b = Acceptance(0.5, positions=[Ewma(0.8, samples=1), Ewma(0.5, samples=1)])
    assert b.gains(3, reach=0.5) == pytest.approx([0.4, 0.2, 0.1])


def test_a_flat_curve_keeps_every_node_that_adds_anything() -> None:
    flat = CostCurve.from_measurements({1: 1.0, 16: 1.0})
    assert keep_nodes(flat, 0.0, 3, 2.0, [[0.5, 0.1, 0.0], [0.2]]) == [2, 1]


def test_a_steep_curve_and_poor_nodes_keep_none() -> None:
    steep = CostCurve.from_measurements({1: 1.0, 2: 2.0})  # every position costs a whole step
    assert keep_nodes(steep, 0.0, 3, 2.0, [[0.3, 0.2], [0.1]]) == [0, 0]
    # a node pays when its tokens per extra second beat the block's: 2 tokens / 3 s < 0.9 / 1 s
    assert keep_nodes(steep, 0.0, 3, 2.0, [[0.9, 0.5], [0.1]]) == [1, 0]
    # time outside the pass (drafting, a round trip) makes the same nodes pay more
    assert keep_nodes(steep, 30.0, 3, 2.0, [[0.3, 0.2], [0.1]]) == [2, 1]


def test_the_best_nodes_go_first_and_a_chain_is_kept_as_a_prefix() -> None:
    c = CostCurve.from_measurements({1: 1.0, 2: 1.25})
    # node 1 of the first chain cannot count for more than node 0 before it: it reads as 0.2, and does not pay
    assert keep_nodes(c, 0.0, 1, 1.0, [[0.2, 0.9], [0.5, 0.4]]) == [0, 2]


def test_a_jump_in_cost_does_not_hide_the_cheap_positions_behind_it() -> None:
    jump = CostCurve.from_measurements({1: 1.0, 3: 1.0, 4: 1.5, 8: 1.5})
    # one node takes the pass from 3 to 4 positions (+50% time) for +20% tokens; four of them for +67% tokens
    assert keep_nodes(jump, 0.0, 3, 2.0, [[0.4, 0.35, 0.3, 0.3]]) == [4]


def test_a_cap_on_nodes_and_a_cost_per_token_keep_fewer() -> None:
    flat = CostCurve.from_measurements({1: 1.0, 16: 1.0})
    assert keep_nodes(flat, 0.0, 3, 2.0, [[0.5, 0.1, 0.0], [0.2]], most=2) == [1, 1]
    # a chain whose tokens each cost a second more (fed to the draft once taken): 2 / 1 s beats 2.5 / 1.5 s
    assert keep_nodes(flat, 0.0, 3, 2.0, [[0.5, 0.1], [0.2]], token_s=[1.0, 0.0]) == [0, 1]
    assert keep_nodes(flat, 0.0, 3, 2.0, [[0.5, 0.1], [0.2]], token_s=[0.1, 0.0]) == [2, 1]


def test_adaptive_gamma_reads_its_verify_time_from_the_curve() -> None:
    m = AdaptiveGamma(costs=CostCurve({n: 0.01 * v for n, v in CPU.items()}))
    assert m.verify_time(4) == pytest.approx(0.0167)
    m.observe_verify(2, 0.023)  # twice the prior at 2 positions
    assert m.verify_time(4) == pytest.approx(0.0334)
    assert m.cloud_rate() == pytest.approx(1 / 0.02)


def test_a_curve_that_jumps_keeps_adaptive_blocks_short_of_the_jump() -> None:
    def chosen(curve: dict[int, float]) -> int:
        m = AdaptiveGamma(max_gamma=8, costs=CostCurve.from_measurements(curve))
        m.acceptance.positions = [Ewma(0.7, samples=1) for _ in range(8)]
        m.observe_draft_step(0.00005)
        return m.choose()

    assert chosen({n: 0.01 * v for n, v in CPU.items()}) == 2  # 3 positions, just before the jump at 4
    assert chosen({1: 0.01, 16: 0.01}) == 8  # flat (a GPU): as long as allowed
