"""Tests of the round planning of Algorithm 1 (flwr_distreal.training.schedule).

Every budget here is recomputed by hand from the policy's formula (module docstring of
``schedule``): ``paper``: ``r(t) * T * b_j / N``; ``deadline``:
``(time left) * r(t) * b_j / (samples left)``; the expected vector is the LUT entry with the
most MACs not above ``budget / (3 * b_j)`` (forward MACs per sample), else the cheapest.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_distreal.core.lut import LUT
from flwr_distreal.models import build_model
from flwr_distreal.core.resources import (
    DEADLINE_RTOL,
    ConstantResources,
    ResourceTrace,
    RoundClock,
    TimeVaryingResources,
    TraceResources,
    step_macs,
)
from flwr_distreal.training.schedule import (
    POLICIES,
    RoundPlan,
    batch_sizes,
    plan_distreal_round,
    plan_fixed_round,
    select_vector,
)

FACTOR = 3.0


@pytest.fixture(scope="module")
def lut() -> LUT:
    """Uniform LUT of femnist_cnn: rates 0, 0.05, ..., 0.5 (11 vectors)."""
    return LUT.uniform(build_model("femnist_cnn"))


def _r_max(full_macs: int, sizes: list[int], duration: float) -> float:
    """Availability at which the full model's round takes exactly ``duration`` seconds."""
    return sum(FACTOR * b * full_macs for b in sizes) / duration


def _best_fit(lut_macs: list[int], fwd_budget: float) -> int:
    """Index of the LUT entry with the most MACs <= budget; the cheapest if none fits."""
    fitting = [i for i, m in enumerate(lut_macs) if m <= fwd_budget]
    return fitting[-1] if fitting else 0


def _reference(
    trace: ResourceTrace, start: float, duration: float, lut: LUT, sizes: list[int], policy: str
) -> tuple[list[int], list[float], float]:
    """Hand-computed plan: chosen LUT indices, the budgets (step MACs) and the finish time."""
    lut_macs = [int(m) for m in lut.macs]
    deadline = start + duration
    total = float(sum(sizes))
    left = total
    now = start
    chosen: list[int] = []
    budgets: list[float] = []
    for b in sizes:
        r = trace.rate_at(now)
        if policy == "paper":
            budget = r * duration * b / total
        else:
            budget = max(0.0, deadline - now) * r * b / left
        left -= b
        fwd_budget = budget / (FACTOR * b)
        # a budget within rounding of a LUT entry would make this check depend on the last ulp
        # (see test_r_max_gives_full_model_in_every_batch); scenarios here avoid such ties
        assert not any(abs(m - fwd_budget) <= 1e-9 * m for m in lut_macs), "near-tie: change the scenario"
        i = _best_fit(lut_macs, fwd_budget)
        chosen.append(i)
        budgets.append(budget)
        now = trace.advance(now, FACTOR * b * lut_macs[i])
    return chosen, budgets, now


def _lut_index(lut: LUT, vector: np.ndarray | None, macs: int) -> int:
    """Index of a plan's vector in the LUT, checking that the plan's MACs are that entry's."""
    assert vector is not None
    hits = [i for i in range(len(lut)) if np.array_equal(lut.vectors[i], vector)]
    assert len(hits) == 1, f"vector {vector} is not (uniquely) in the LUT"
    assert int(lut.macs[hits[0]]) == macs
    return hits[0]


def _check_plan_against_reference(plan: RoundPlan, lut: LUT, sizes: list[int], chosen: list[int]) -> None:
    used = [_lut_index(lut, v, m) for v, m in zip(plan.vectors, plan.forward_macs)]
    assert used == chosen
    # c of Algorithm 1 is the sum of the LUT MACs of the vectors used
    assert plan.macs == sum(int(lut.macs[i]) for i in chosen)
    # the clock advanced by exactly the training steps of those vectors
    expected_steps = [step_macs(int(lut.macs[i]), b, FACTOR) for i, b in zip(chosen, sizes)]
    assert plan.result.step_macs == pytest.approx(tuple(expected_steps), rel=1e-12)
    assert plan.result.spent_macs == pytest.approx(sum(expected_steps), rel=1e-12)


# ----------------------------------------------------------------------- batch_sizes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((100, 32), [32, 32, 32, 4]),
        ((100, 32, 1, True), [32, 32, 32]),
        ((64, 32), [32, 32]),
        ((64, 32, 1, True), [32, 32]),
        ((5, 32), [5]),
        ((5, 32, 1, True), []),
        ((0, 32), []),
        ((70, 32, 2), [32, 32, 6, 32, 32, 6]),
        ((70, 32, 3, True), [32, 32] * 3),
        ((3, 1), [1, 1, 1]),
    ],
)
def test_batch_sizes(args, expected) -> None:
    assert batch_sizes(*args) == expected


@pytest.mark.parametrize("args", [(-1, 32), (10, 0), (10, -3), (10, 32, 0)])
def test_batch_sizes_refuses_bad_arguments(args) -> None:
    with pytest.raises(ValueError, match="need num_samples >= 0, batch_size >= 1, local_epochs >= 1"):
        batch_sizes(*args)


# ------------------------------------------------------------------ per-batch selection


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fraction", [0.31, 0.45, 0.6, 0.77, 0.93])
def test_selection_constant_resources_matches_hand_budget(lut, policy, fraction) -> None:
    sizes = batch_sizes(100, 16)  # six batches of 16 and a partial batch of 4
    duration, server_round = 2.0, 3
    start = (server_round - 1) * duration
    rate = fraction * _r_max(lut.max_macs, sizes, duration)
    trace = ConstantResources(rate)
    plan = plan_distreal_round(RoundClock(trace, start, start + duration), lut, sizes, policy, FACTOR)
    chosen, budgets, finish = _reference(trace, start, duration, lut, sizes, policy)
    _check_plan_against_reference(plan, lut, sizes, chosen)
    assert plan.result.finish_time == pytest.approx(finish, rel=1e-12)
    assert plan.planned_batches == len(sizes) and plan.incomplete == 0
    assert plan.batch_sizes == sizes
    # every chosen step fits its budget (some vector always fits above the cheapest rate)
    for i, b, budget in zip(chosen, sizes, budgets):
        assert step_macs(int(lut.macs[i]), b, FACTOR) <= budget * (1 + 1e-12)
    assert not plan.straggler
    if policy == "paper":
        # the paper's D[r]: with constant r, the same vector every (equal-size) batch
        assert len(set(chosen[:-1])) == 1


def test_paper_budget_scales_a_partial_last_batch_by_its_samples(lut) -> None:
    """A 4-sample batch gets 4/100 of r*T: the same per-sample budget as the full batches."""
    sizes = [32, 32, 32, 4]
    rate = 0.5 * _r_max(lut.max_macs, sizes, 1.0)
    plan = plan_distreal_round(RoundClock(ConstantResources(rate), 0.0, 1.0), lut, sizes, "paper", FACTOR)
    # per-sample forward budget = r*T*b/N/(3b) = r*T/(3N), equal for all batches
    expected = _best_fit([int(m) for m in lut.macs], rate * 1.0 / (FACTOR * 100))
    assert [_lut_index(lut, v, m) for v, m in zip(plan.vectors, plan.forward_macs)] == [expected] * 4


@pytest.mark.parametrize("policy", POLICIES)
def test_selection_with_mid_round_drop_matches_hand_budget(lut, policy) -> None:
    sizes = [32] * 10
    duration = 1.0
    r_max = _r_max(lut.max_macs, sizes, duration)
    # round 2: [1, 2]; the level drops from 0.9 r_max to r_max / 2.5 at t = 1.25 (in the 3rd batch)
    trace = TraceResources([0.0, 1.25], [0.9 * r_max, r_max / 2.5])
    chosen, _, _ = _reference(trace, 1.0, duration, lut, sizes, policy)
    plan = plan_distreal_round(RoundClock(trace, 1.0, 2.0), lut, sizes, policy, FACTOR, stop_at_deadline=False)
    _check_plan_against_reference(plan, lut, sizes, chosen)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", POLICIES)
def test_selection_on_time_varying_traces_matches_hand_budget(lut, policy, seed) -> None:
    sizes = batch_sizes(150, 20)
    duration = 5.0
    trace = TimeVaryingResources(_r_max(lut.max_macs, sizes, duration), 3.0, 4.0, duration, seed, 7)
    start = 2 * duration
    chosen, _, finish = _reference(trace, start, duration, lut, sizes, policy)
    plan = plan_distreal_round(RoundClock(trace, start, start + duration), lut, sizes, policy, FACTOR)
    _check_plan_against_reference(plan, lut, sizes, chosen)
    assert plan.result.finish_time == pytest.approx(finish, rel=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_select_vector_is_one_step_of_the_plan_and_reads_the_clock_only(lut, policy) -> None:
    """select_vector (what DistrealRound calls batch by batch) picks the hand-computed vector for
    the clock's state, returns its MACs and the step's cost, and does not advance the clock."""
    sizes = batch_sizes(150, 20)  # a partial last batch of 10
    duration = 5.0
    trace = TimeVaryingResources(_r_max(lut.max_macs, sizes, duration), 3.0, 4.0, duration, 3, 7)
    chosen, _, _ = _reference(trace, 0.0, duration, lut, sizes, policy)
    clock = RoundClock(trace, 0.0, duration)
    total = left = float(sum(sizes))
    for b, i in zip(sizes, chosen):
        now = clock.now
        vector, fwd, cost = select_vector(clock, lut, b, policy, total, left, FACTOR)
        assert clock.now == now and clock.steps_done == len(clock.result().step_macs)
        assert np.array_equal(vector, lut.vectors[i]) and fwd == int(lut.macs[i])
        assert cost == step_macs(fwd, b, FACTOR)
        clock.step(cost)
        left -= b
    plan = plan_distreal_round(RoundClock(trace, 0.0, duration), lut, sizes, policy, FACTOR)
    assert plan.result == clock.result(len(sizes))


# ------------------------------------------------------------------- corner resources


def test_r_max_gives_full_model_in_every_batch(lut) -> None:
    wrong = []
    for policy in POLICIES:
        for num_samples, batch in [(100, 32), (320, 32), (57, 10), (500, 64)]:
            sizes = batch_sizes(num_samples, batch)
            for duration in (1.0, 0.3, 0.1, 7.0, 3.3):
                for server_round in (1, 2, 5):
                    start, deadline = (server_round - 1) * duration, server_round * duration
                    trace = ConstantResources(_r_max(lut.max_macs, sizes, duration))
                    plan = plan_distreal_round(RoundClock(trace, start, deadline), lut, sizes, policy, FACTOR)
                    if plan.forward_macs != [lut.max_macs] * len(sizes):
                        wrong.append((policy, num_samples, batch, duration, server_round, plan.forward_macs))
    assert not wrong, f"{len(wrong)} cases do not train the full model, e.g. {wrong[:3]}"


@pytest.mark.parametrize("policy", POLICIES)
def test_r_max_finishes_exactly_at_the_deadline(lut, policy) -> None:
    # T = 0.5 and N = 128 are powers of two: the budget arithmetic is exact here
    sizes = [32] * 4
    duration = 0.5
    trace = ConstantResources(_r_max(lut.max_macs, sizes, duration))
    plan = plan_distreal_round(RoundClock(trace, 0.0, duration), lut, sizes, policy, FACTOR)
    assert plan.forward_macs == [lut.max_macs] * 4
    assert all(v is not None and not np.any(v) for v in plan.vectors)
    assert plan.mean_dropout == 0.0
    assert not plan.straggler
    assert plan.result.finish_time == pytest.approx(duration, rel=DEADLINE_RTOL)
    assert plan.result.utilisation == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("stop", [False, True])
def test_a_third_of_r_max_uses_the_cheapest_vectors_and_does_not_straggle(lut, policy, stop) -> None:
    sizes = batch_sizes(100, 10)
    duration = 1.0
    r_max = _r_max(lut.max_macs, sizes, duration)
    # femnist_cnn's cheapest uniform vector needs 29.8% of the full MACs, the next 35.5%:
    # at r_max / 3 the paper's budget is 33.3% of the full model, between the two
    assert lut.macs[0] / lut.max_macs < 1 / 3 < lut.macs[1] / lut.max_macs
    plan = plan_distreal_round(
        RoundClock(ConstantResources(r_max / 3), 0.0, duration), lut, sizes, policy, FACTOR, stop_at_deadline=stop
    )
    assert not plan.straggler and plan.incomplete == 0 and len(plan.vectors) == len(sizes)
    assert plan.forward_macs[0] == lut.min_macs
    assert plan.result.finish_time <= duration
    if policy == "paper":
        assert plan.forward_macs == [lut.min_macs] * len(sizes)
        np.testing.assert_array_equal(np.stack(plan.vectors), np.full((len(sizes), 2), 0.5))
        assert plan.mean_dropout == pytest.approx(0.5)
    else:
        # the deadline policy spends what the cheapest vector saved, but never overspends
        assert plan.macs >= len(sizes) * lut.min_macs
        assert plan.result.utilisation <= 1.0 + 1e-12


def test_below_the_cheapest_vector_falls_back_to_it_and_straggles(lut) -> None:
    sizes = [32] * 4
    r_max = _r_max(lut.max_macs, sizes, 1.0)
    plan = plan_distreal_round(
        RoundClock(ConstantResources(r_max / 5), 0.0, 1.0), lut, sizes, "paper", FACTOR, stop_at_deadline=False
    )
    assert plan.forward_macs == [lut.min_macs] * 4
    assert plan.straggler and plan.result.finish_time > 1.0


# ---------------------------------------------------------------------- mid-round drop


def _drop_trace(lut: LUT, sizes: list[int]) -> tuple[TraceResources, float]:
    """r_max until t = 0.25, then r_max / 2.5 (round [0, 1])."""
    r_max = _r_max(lut.max_macs, sizes, 1.0)
    return TraceResources([0.0, 0.25], [r_max, r_max / 2.5]), r_max


def test_mid_round_drop_deadline_policy_catches_up_where_paper_does_not(lut) -> None:
    sizes = [32] * 10
    trace, _ = _drop_trace(lut, sizes)
    paper = plan_distreal_round(RoundClock(trace, 0.0, 1.0), lut, sizes, "paper", FACTOR, stop_at_deadline=False)
    deadline = plan_distreal_round(
        RoundClock(trace, 0.0, 1.0), lut, sizes, "deadline", FACTOR, stop_at_deadline=False
    )
    # identical before the drop: the full model at r_max (first two batches end at 0.1, 0.2)
    assert paper.forward_macs[:3] == deadline.forward_macs[:3] == [lut.max_macs] * 3
    # after the drop the paper's budget only follows r(t); the deadline policy also pays back
    # the time the third batch lost, so it selects cheaper vectors (higher dropout rates)
    after = slice(3, None)
    assert all(d <= p for d, p in zip(deadline.forward_macs[after], paper.forward_macs[after]))
    assert sum(deadline.forward_macs[after]) < sum(paper.forward_macs[after])
    assert np.mean([np.mean(v) for v in deadline.vectors[after]]) > np.mean([np.mean(v) for v in paper.vectors[after]])
    assert paper.straggler and paper.result.finish_time > 1.0
    assert not deadline.straggler and deadline.result.finish_time <= 1.0
    assert deadline.result.steps_done == deadline.result.steps_total == 10


def test_stop_at_deadline_reports_incomplete_batches_and_counts_completed_steps(lut) -> None:
    sizes = [32] * 10
    trace, _ = _drop_trace(lut, sizes)
    late = plan_distreal_round(RoundClock(trace, 0.0, 1.0), lut, sizes, "paper", FACTOR, stop_at_deadline=False)
    stopped = plan_distreal_round(RoundClock(trace, 0.0, 1.0), lut, sizes, "paper", FACTOR, stop_at_deadline=True)
    assert late.straggler and late.incomplete == 0
    assert not stopped.straggler
    done = len(stopped.vectors)
    assert 0 < done < len(sizes)
    assert stopped.incomplete == len(sizes) - done
    assert stopped.planned_batches == len(sizes)
    assert stopped.batch_sizes == sizes[:done]
    # the completed steps are the same as without stopping, and c counts only those
    assert stopped.forward_macs == late.forward_macs[:done]
    assert stopped.macs == sum(late.forward_macs[:done]) < late.macs
    assert stopped.result.steps_done == stopped.result.steps_total == done
    assert stopped.result.spent_macs == pytest.approx(sum(late.result.step_macs[:done]))
    assert stopped.result.finish_time <= 1.0
    # the abandoned step would have ended after the deadline
    assert late.result.step_macs[done] > trace.macs_between(stopped.result.finish_time, 1.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_stop_at_deadline_never_straggles(lut, policy) -> None:
    sizes = batch_sizes(90, 16)
    duration = 1.0
    r_max = _r_max(lut.max_macs, sizes, duration)
    stopped_somewhere = 0
    for device in range(40):
        trace = TimeVaryingResources(r_max, 4.0, 4.0, duration, 11, device)
        for server_round in (1, 2, 3):
            start = (server_round - 1) * duration
            plan = plan_distreal_round(
                RoundClock(trace, start, start + duration), lut, sizes, policy, FACTOR, stop_at_deadline=True
            )
            assert not plan.straggler
            assert plan.result.finish_time <= start + duration * (1 + DEADLINE_RTOL)
            assert len(plan.vectors) + plan.incomplete == len(sizes)
            assert plan.macs == sum(plan.forward_macs)
            stopped_somewhere += plan.incomplete > 0
            # without stopping, the same device either finishes the same plan or straggles
            late = plan_distreal_round(
                RoundClock(trace, start, start + duration), lut, sizes, policy, FACTOR, stop_at_deadline=False
            )
            assert late.forward_macs[: len(plan.forward_macs)] == plan.forward_macs
            assert late.straggler == (plan.incomplete > 0)
    # the paper's policy cannot see drops coming: with 4 changes per round some devices stop
    if policy == "paper":
        assert stopped_somewhere > 0


def test_stop_at_deadline_with_nothing_affordable_sends_no_steps(lut) -> None:
    sizes = [32] * 3
    r_max = _r_max(lut.max_macs, sizes, 1.0)
    # the first step at the cheapest vector needs 0.3 s at r_max, the device has 0.01 s of it
    trace = TraceResources([0.0, 0.01], [r_max, 0.0])
    plan = plan_distreal_round(RoundClock(trace, 0.0, 1.0), lut, sizes, "deadline", FACTOR, stop_at_deadline=True)
    assert plan.vectors == [] and plan.macs == 0 and plan.incomplete == 3
    assert not plan.straggler and plan.mean_dropout == 0.0


def test_unknown_policy_is_refused(lut) -> None:
    clock = RoundClock(ConstantResources(1e9), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"unknown selection policy 'fast'.*paper.*deadline"):
        plan_distreal_round(clock, lut, [32], "fast")  # type: ignore[arg-type]
    assert clock.steps_done == 0


# --------------------------------------------------------------------- fixed rounds


def test_fixed_round_straggles_when_the_trace_drops_mid_round(lut) -> None:
    sizes = [32] * 10
    trace, r_max = _drop_trace(lut, sizes)
    plan = plan_fixed_round(RoundClock(trace, 0.0, 1.0), lut.max_macs, sizes, FACTOR)
    assert plan.straggler
    assert plan.vectors == [None] * 10 and plan.forward_macs == [lut.max_macs] * 10
    assert plan.macs == 10 * lut.max_macs and plan.mean_dropout == 0.0
    # 0.25 s at r_max does 2.5 batches; the other 7.5 at r_max / 2.5 take 7.5 * 0.25 s
    assert plan.result.finish_time == pytest.approx(0.25 + 7.5 * 0.25)
    # the same submodel at constant r_max finishes on time
    steady = plan_fixed_round(RoundClock(ConstantResources(r_max), 0.0, 1.0), lut.max_macs, sizes, FACTOR)
    assert not steady.straggler
    # a submodel chosen for r_max / 2.5 at round start also straggles if the trace drops further
    sub = int(lut.macs[0])
    trace2 = TraceResources([0.0, 0.5], [r_max / 2.5, r_max / 10])
    assert plan_fixed_round(RoundClock(trace2, 0.0, 1.0), sub, sizes, FACTOR).straggler


def test_fixed_round_without_clock_never_straggles() -> None:
    sizes = batch_sizes(1000, 32, 3)
    plan = plan_fixed_round(None, 4_015_616, sizes, FACTOR)
    assert not plan.straggler and plan.incomplete == 0
    assert plan.macs == 4_015_616 * len(sizes)
    assert plan.result.steps_done == plan.result.steps_total == len(sizes)
    assert plan.result.spent_macs == pytest.approx(sum(step_macs(4_015_616, b, FACTOR) for b in sizes))
    assert plan.result.utilisation == pytest.approx(1.0)
    assert plan.batch_sizes == sizes
    assert math.isfinite(plan.result.finish_time)


# ------------------------------------------------------- fixed model vs per-batch selection


def _step_drop_trace(lut: LUT, after: float) -> tuple[TraceResources, float]:
    """One full-model step of one sample takes 1 s until t = 5, then the level is r_max * after."""
    m = step_macs(lut.max_macs, 1, FACTOR)
    return TraceResources([0.0, 5.0], [m, m * after]), m


def test_fixed_model_straggles_when_resources_drop_mid_round(lut) -> None:
    trace, m = _step_drop_trace(lut, 0.25)
    fixed = plan_fixed_round(RoundClock(trace, 0.0, 10.0), lut.max_macs, [1] * 10, FACTOR)
    assert fixed.straggler and fixed.result.steps_done == 10
    assert fixed.result.finish_time == pytest.approx(5.0 + 5 * 4.0)
    assert fixed.result.spent_macs == pytest.approx(10 * m)


def test_full_model_only_lut_stops_at_the_deadline_with_the_steps_that_fit(lut) -> None:
    # A LUT holding only the full model trains a fixed model; stopping at the deadline keeps the
    # steps done by then: 5 steps of 1 s, a 6th of 4 s (t = 9), the 7th would end at 13.
    full_only = LUT.from_vectors(build_model("femnist_cnn"), [[0.0, 0.0]])
    assert full_only.max_macs == full_only.min_macs == lut.max_macs
    trace, m = _step_drop_trace(lut, 0.25)
    stopped = plan_distreal_round(RoundClock(trace, 0.0, 10.0), full_only, [1] * 10, "paper", FACTOR, True)
    assert stopped.forward_macs == [lut.max_macs] * 6 and stopped.incomplete == 4
    assert stopped.result.finish_time == pytest.approx(9.0)
    assert stopped.result.spent_macs == pytest.approx(6 * m)
    assert not stopped.straggler  # the completed steps are sent, on time
    late = plan_distreal_round(RoundClock(trace, 0.0, 10.0), full_only, [1] * 10, "paper", FACTOR, False)
    assert late.straggler and late.result.finish_time == pytest.approx(25.0)


@pytest.mark.parametrize("policy", POLICIES)
def test_selection_reads_the_drop_before_each_batch_and_does_not_straggle(lut, policy) -> None:
    trace, m = _step_drop_trace(lut, 0.5)
    assert plan_fixed_round(RoundClock(trace, 0.0, 10.0), lut.max_macs, [1] * 10, FACTOR).straggler
    plan = plan_distreal_round(RoundClock(trace, 0.0, 10.0), lut, [1] * 10, policy, FACTOR, stop_at_deadline=False)
    assert plan.forward_macs[:5] == [lut.max_macs] * 5  # full resources: the full model
    assert plan.forward_macs[5] <= lut.max_macs / 2  # the first batch after the drop adapts
    if policy == "paper":  # D[r]: the budget follows r(t) only
        assert all(f <= lut.max_macs / 2 for f in plan.forward_macs[5:])
    assert not plan.straggler and plan.result.steps_done == 10
    assert plan.result.available_macs == pytest.approx(5 * m + 5 * m / 2)
    assert plan.result.spent_macs <= plan.result.available_macs * (1 + 1e-12)
    assert 0.9 < plan.result.utilisation <= 1.0 + 1e-12
