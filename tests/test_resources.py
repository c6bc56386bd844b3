"""Tests of the resource model and simulated clock (flwr_distreal.core.resources)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from flwr_distreal.core.resources import (
    DEADLINE_RTOL,
    ConstantResources,
    ResourceError,
    ResourceModel,
    RoundClock,
    TimeVaryingResources,
    TraceFileError,
    TraceResources,
    forward_macs_budget,
    load_trace_csv,
    r_max_for,
    size_resources,
    step_macs,
)
from flwr_distreal.training.schedule import batch_sizes, plan_fixed_round

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- step costs


def test_step_macs_and_inverse() -> None:
    assert step_macs(4_000_000, 64) == 3.0 * 64 * 4_000_000
    assert step_macs(10, 2, step_macs_factor=2.0) == 40.0
    budget = step_macs(1234.5, 32)
    assert forward_macs_budget(budget, 32) == pytest.approx(1234.5, rel=1e-15)
    assert forward_macs_budget(math.inf, 32) == math.inf
    with pytest.raises(ResourceError, match="batch_size"):
        step_macs(1.0, 0)
    with pytest.raises(ResourceError, match="step_macs_factor"):
        step_macs(1.0, 4, step_macs_factor=0.0)
    with pytest.raises(ResourceError, match="step_budget"):
        forward_macs_budget(float("nan"), 4)


def test_round_steps_of_a_fixed_model_follow_batches_epochs_and_drop_last() -> None:
    # the steps the clients' clock advances by: step_macs of each mini-batch of batch_sizes
    plan = plan_fixed_round(None, 100, batch_sizes(10, 4, local_epochs=2))
    assert plan.result.step_macs == (1200.0, 1200.0, 600.0) * 2
    assert plan_fixed_round(None, 100, batch_sizes(10, 4, drop_last=True)).result.step_macs == (1200.0, 1200.0)
    assert plan_fixed_round(None, 100, batch_sizes(0, 4)).result.step_macs == ()
    with pytest.raises(ValueError, match="local_epochs"):
        batch_sizes(10, 4, local_epochs=0)


def test_r_max_lets_full_model_finish_exactly_at_deadline() -> None:
    # as the experiment derives a device's r_max and the baseline clients plan their round
    sizes = batch_sizes(181, 10)
    deadline = 60.0
    r_max = r_max_for(sum(step_macs(4_020_000, b) for b in sizes), deadline)
    model = ResourceModel("full", deadline=deadline, r_max=r_max)
    result = plan_fixed_round(model.clock(7, 5), 4_020_000, sizes).result
    assert result.finish_time == pytest.approx(5 * deadline, rel=1e-12)
    assert result.finished and not result.straggler
    assert result.utilisation == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ResourceError, match="deadline"):
        r_max_for(1.0, 0.0)
    with pytest.raises(ResourceError, match="full_step_macs_total"):
        r_max_for(-1.0, 1.0)


# --------------------------------------------------------------------------- clock integration


def test_piecewise_integration_hand_computed() -> None:
    # 10 MACs/s on [0, 2), nothing on [2, 5), 4 MACs/s from 5 on.
    trace = TraceResources(times=[0.0, 2.0, 5.0], levels=[10.0, 0.0, 4.0])
    assert trace.rate_at(0.0) == 10.0
    assert trace.rate_at(1.999) == 10.0
    assert trace.rate_at(2.0) == 0.0  # right-continuous
    assert trace.rate_at(5.0) == 4.0
    assert trace.rate_at(1e9) == 4.0
    # From t=1: 10 MACs until 2, idle until 5, then 20 MACs at 4/s take 5 s.
    assert trace.advance(1.0, 30.0) == 10.0
    assert trace.advance(0.0, 20.0) == 2.0  # ends exactly on a boundary
    assert trace.advance(2.5, 0.0) == 2.5
    assert trace.advance(3.0, 8.0) == 7.0
    assert trace.macs_between(1.0, 10.0) == 30.0
    assert trace.macs_between(2.0, 5.0) == 0.0
    assert trace.macs_between(4.0, 4.0) == 0.0
    assert trace.change_points(0.0, 10.0) == [2.0, 5.0]
    assert trace.change_points(2.0, 5.0) == []  # open interval
    assert trace.change_points(1.0, 2.5) == [2.0]
    # advance and macs_between are inverse of each other
    for t0, m in [(0.3, 7.0), (1.5, 5.0), (4.0, 3.0), (0.0, 123.0)]:
        t1 = trace.advance(t0, m)
        assert trace.macs_between(t0, t1) == pytest.approx(m, rel=1e-12)


def test_advance_into_permanent_outage_is_infinite() -> None:
    trace = TraceResources(times=[0.0, 1.0], levels=[3.0, 0.0])
    assert trace.advance(0.0, 3.0) == 1.0
    assert trace.advance(0.0, 3.5) == math.inf
    result = plan_fixed_round(RoundClock(trace, 0.0, 10.0), 2, [1, 1], step_macs_factor=1.0).result
    assert result.straggler and result.finish_time == math.inf


def test_trace_before_first_time_uses_first_level() -> None:
    trace = TraceResources(times=[2.0, 4.0], levels=[5.0, 1.0])
    assert trace.rate_at(0.0) == 5.0
    assert trace.advance(0.0, 10.0) == 2.0
    assert trace.change_points(0.0, 5.0) == [2.0, 4.0]


def test_time_queries_refused() -> None:
    trace = ConstantResources(2.0)
    with pytest.raises(ResourceError, match="t"):
        trace.rate_at(-1.0)
    with pytest.raises(ResourceError, match="t1 must be >= t0"):
        trace.macs_between(3.0, 2.0)
    with pytest.raises(ResourceError, match="macs"):
        trace.advance(0.0, -5.0)
    with pytest.raises(ResourceError, match="macs"):
        trace.advance(0.0, float("nan"))
    with pytest.raises(ResourceError, match="level"):
        ConstantResources(0.0)
    with pytest.raises(ResourceError, match="strictly increasing"):
        TraceResources([0.0, 0.0], [1.0, 2.0])


# --------------------------------------------------------------------------- constant & time-varying


def test_constant_levels_within_range_and_deterministic() -> None:
    r_max, v = 1000.0, 3.0
    levels = np.array([ConstantResources.draw(r_max, v, seed=11, device_id=d).level for d in range(2000)])
    assert levels.min() >= r_max / v and levels.max() <= r_max
    # uniform over the range: mean in the middle, spread close to uniform's
    assert levels.mean() == pytest.approx((r_max / v + r_max) / 2, rel=0.02)
    assert stats.kstest(levels, stats.uniform(loc=r_max / v, scale=r_max - r_max / v).cdf).pvalue > 1e-3
    again = ConstantResources.draw(r_max, v, seed=11, device_id=5).level
    assert again == levels[5]
    assert ConstantResources.draw(r_max, v, seed=12, device_id=5).level != levels[5]
    model = ResourceModel("constant", deadline=10.0, r_max=r_max, variability=v, seed=11)
    assert model.trace(5).rate_at(123.0) == levels[5]
    assert model.trace(5).change_points(0.0, 1e6) == []


def test_full_kind_gives_r_max_everywhere() -> None:
    model = ResourceModel("full", deadline=10.0, r_max=77.0)
    assert [model.trace(d).rate_at(3.0) for d in range(5)] == [77.0] * 5


def test_exponential_change_statistics() -> None:
    deadline, lam, rounds = 10.0, 2.0, 50
    horizon = rounds * deadline
    waits: list[float] = []
    changes_per_device: list[int] = []
    rounds_with_change = 0
    levels: list[float] = []
    for dev in range(400):
        trace = TimeVaryingResources(
            r_max=100.0, variability=4.0, lam=lam, round_duration=deadline, seed=3, device_id=dev
        )
        points = trace.change_points(0.0, horizon)
        changes_per_device.append(len(points))
        waits.extend(np.diff([0.0, *points]).tolist())
        levels.extend(trace.rate_at(t) for t in [0.0, *points])
        rounds_with_change += sum(1 for r in range(rounds) if trace.change_points(r * deadline, (r + 1) * deadline))
    waits_arr = np.asarray(waits)
    assert waits_arr.mean() == pytest.approx(deadline / lam, rel=0.03)
    assert stats.kstest(waits_arr, stats.expon(scale=deadline / lam).cdf).pvalue > 1e-3
    # changes per round duration ~ lam
    assert np.mean(changes_per_device) / rounds == pytest.approx(lam, rel=0.03)
    # changes happen inside rounds: P(at least one change in a round) = 1 - exp(-lam)
    assert rounds_with_change / (400 * rounds) == pytest.approx(1 - math.exp(-lam), abs=0.02)
    lv = np.asarray(levels)
    assert lv.min() >= 25.0 and lv.max() <= 100.0
    assert lv.mean() == pytest.approx(62.5, rel=0.02)


def test_time_varying_mean_wait_and_lam_zero() -> None:
    trace = TimeVaryingResources(100.0, 4.0, lam=4.0, round_duration=8.0, seed=0, device_id=0)
    assert trace.mean_wait == 2.0
    flat = TimeVaryingResources(100.0, 4.0, lam=0.0, round_duration=8.0, seed=0, device_id=0)
    assert flat.change_points(0.0, 1e9) == []
    # initial level equals the constant draw of the same device
    assert flat.rate_at(0.0) == ConstantResources.draw(100.0, 4.0, seed=0, device_id=0).level
    assert trace.rate_at(0.0) == flat.rate_at(0.0)


def test_time_varying_is_independent_of_query_order() -> None:
    def make() -> TimeVaryingResources:
        return TimeVaryingResources(50.0, 3.0, lam=1.0, round_duration=5.0, seed=9, device_id=4)

    forward, backward = make(), make()
    times = np.linspace(0.0, 200.0, 401)
    late_first = [backward.rate_at(t) for t in times[::-1]][::-1]
    assert [forward.rate_at(t) for t in times] == late_first
    assert forward.change_points(0.0, 200.0) == backward.change_points(0.0, 200.0)
    other = TimeVaryingResources(50.0, 3.0, lam=1.0, round_duration=5.0, seed=9, device_id=5)
    assert other.change_points(0.0, 200.0) != forward.change_points(0.0, 200.0)


_SUBPROCESS_CODE = """
import json, sys
from flwr_distreal.resources import ResourceModel
m = ResourceModel("timevarying", deadline=10.0, r_max=100.0, variability=4.0, lam=2.0, seed=21)
out = {}
for dev in (0, 3, 17):
    tr = m.trace(dev)
    pts = tr.change_points(0.0, 300.0)
    out[dev] = [pts, [tr.rate_at(t) for t in [0.0, *pts]], tr.advance(55.5, 12345.0)]
print(json.dumps(out))
"""


def test_trace_is_deterministic_across_processes() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_CODE], capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=120
    )
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    model = ResourceModel("timevarying", deadline=10.0, r_max=100.0, variability=4.0, lam=2.0, seed=21)
    for dev in (17, 0, 3):  # a different order than the child's
        tr = model.trace(dev)
        pts = tr.change_points(0.0, 300.0)
        mine = [pts, [tr.rate_at(t) for t in [0.0, *pts]], tr.advance(55.5, 12345.0)]
        assert other[str(dev)] == mine  # floats survive json exactly (repr round-trip)
        assert len(pts) > 20


# --------------------------------------------------------------------------- round timing & stragglers


def test_round_window_and_continuity() -> None:
    model = ResourceModel("timevarying", deadline=10.0, r_max=100.0, lam=4.0, seed=1)
    assert model.round_window(1) == (0.0, 10.0)
    assert model.round_window(3) == (20.0, 30.0)
    clock = model.clock(2, 3)
    assert clock.now == 20.0 and clock.deadline == 30.0
    # the round-3 clock sees the same trace as the device's global trace at t=20
    assert clock.rate() == model.trace(2).rate_at(20.0)
    with pytest.raises(ResourceError, match="server_round"):
        model.round_start(0)


def test_straggler_decision_at_the_boundary() -> None:
    # 30 steps of 0.1 MACs (1 MAC per sample, factor 0.1) at 3 MACs/s: exactly 1 s, with float
    # rounding in the sum
    on_time = plan_fixed_round(RoundClock(ConstantResources(3.0), 4.0, 5.0), 1, [1] * 30, 0.1).result
    assert on_time.finish_time == pytest.approx(5.0, abs=1e-12)
    assert not on_time.straggler and on_time.steps_done == 30
    # a relative excess well beyond the tolerance makes it late
    late = plan_fixed_round(RoundClock(ConstantResources(3.0), 4.0, 5.0), 1, [1] * 30, 0.1 * (1 + 50 * DEADLINE_RTOL))
    assert late.straggler and late.result.steps_done == 30
    # exact powers of two: finishing exactly at the deadline is on time, a bit more work is not
    exact = plan_fixed_round(RoundClock(ConstantResources(4.0), 0.0, 2.0), 4, [1, 1], 1.0).result
    assert exact.finish_time == 2.0 and exact.finished
    over = plan_fixed_round(RoundClock(ConstantResources(4.0), 0.0, 2.0), 4, [1, 1], 1.0 + 4 * DEADLINE_RTOL)
    assert over.straggler


def test_round_clock_step_by_step() -> None:
    clock = RoundClock(TraceResources([0.0, 3.0], [2.0, 1.0]), start=0.0, deadline=6.0)
    assert clock.rate() == 2.0 and clock.remaining_time() == 6.0
    assert clock.remaining_macs() == 9.0
    assert clock.fits(9.0) and not clock.fits(9.5)
    assert clock.step(4.0) and clock.now == 2.0
    assert clock.step(3.0) and clock.now == 4.0  # 2 MACs at 2/s then 1 MAC at 1/s
    assert clock.rate() == 1.0
    assert not clock.step(3.0) and clock.now == 7.0
    res = clock.result(steps_total=3)
    assert res.straggler and res.spent_macs == 10.0 and res.available_macs == 9.0
    with pytest.raises(ResourceError, match="steps_total"):
        clock.result(steps_total=2)
    with pytest.raises(ResourceError, match="deadline must be after start"):
        RoundClock(ConstantResources(1.0), start=5.0, deadline=5.0)


def test_round_with_invalid_step_macs_is_refused() -> None:
    clock = RoundClock(ConstantResources(1.0), 0.0, 10.0)
    with pytest.raises(ResourceError, match="forward_macs_per_sample must be >= 0"):
        plan_fixed_round(clock, -1, [1, 1])
    with pytest.raises(ResourceError, match="forward_macs_per_sample must be finite"):
        plan_fixed_round(None, float("nan"), [1])  # type: ignore[arg-type]
    with pytest.raises(ResourceError, match="batch_size"):
        plan_fixed_round(clock, 1, [0])
    assert clock.steps_done == 0
    with pytest.raises(ResourceError, match="macs"):
        clock.step(-1.0)


# --------------------------------------------------------------------------- resource model config


def test_resource_model_refusals(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="unknown resource kind 'bogus'.*timevarying"):
        ResourceModel("bogus", deadline=1.0, r_max=1.0)
    with pytest.raises(ResourceError, match="needs r_max"):
        ResourceModel("constant", deadline=1.0)
    with pytest.raises(ResourceError, match="variability"):
        ResourceModel("constant", deadline=1.0, r_max=1.0, variability=0.5)
    with pytest.raises(ResourceError, match="lam"):
        ResourceModel("timevarying", deadline=1.0, r_max=1.0, lam=-1.0)
    with pytest.raises(ResourceError, match="deadline"):
        ResourceModel("timevarying", deadline=0.0, r_max=1.0)
    with pytest.raises(ResourceError, match="seed"):
        ResourceModel("constant", deadline=1.0, r_max=1.0, seed=-3)
    with pytest.raises(ResourceError, match="needs trace_path"):
        ResourceModel("trace", deadline=1.0)
    with pytest.raises(ResourceError, match="device_id"):
        ResourceModel("constant", deadline=1.0, r_max=1.0).trace(-1)


def test_per_device_r_max_override_scales_levels() -> None:
    model = ResourceModel("timevarying", deadline=10.0, r_max=100.0, lam=1.0, seed=2)
    base, scaled = model.trace(3), model.trace(3, r_max=300.0)
    assert base.change_points(0.0, 100.0) == scaled.change_points(0.0, 100.0)
    for t in (0.0, 17.0, 55.0):
        assert scaled.rate_at(t) == pytest.approx(3 * base.rate_at(t), rel=1e-12)


# --------------------------------------------------------------------------- CSV replay


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_replay(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "trace.csv",
        "device,time,macs_per_s,comment\n0,0,10,a\n1,0,5,b\n0,2,0,c\n0,5,4,d\n1,1.5,7.5,e\n",
    )
    traces = load_trace_csv(csv_path)
    assert sorted(traces) == [0, 1]
    assert traces[0].times == [0.0, 2.0, 5.0] and traces[0].levels == [10.0, 0.0, 4.0]
    assert traces[0].advance(1.0, 30.0) == 10.0
    assert traces[1].macs_between(0.0, 2.5) == 5.0 * 1.5 + 7.5 * 1.0
    model = ResourceModel("trace", deadline=5.0, trace_path=csv_path)
    assert model.devices_in_file == [0, 1]
    res = plan_fixed_round(model.clock(0, 2), 8, [1], 1.0).result  # round 2 = [5, 10]: 4 MACs/s
    assert res.finish_time == 7.0 and res.finished and res.available_macs == 20.0
    with pytest.raises(TraceFileError, match="no rows for device 2"):
        model.trace(2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("device,time\n0,0\n", r"missing column\(s\) \['macs_per_s'\]"),
        ("", "missing column"),
        ("device,time,macs_per_s\n", "no rows"),
        ("device,time,macs_per_s\n0,0,abc\n", "line 2: not a number"),
        ("device,time,macs_per_s\n0,0,1\n0,1,nan\n", "line 3: macs_per_s must be finite"),
        ("device,time,macs_per_s\n0,0,-1\n", "macs_per_s must be finite and >= 0"),
        ("device,time,macs_per_s\n0,0,inf\n", "macs_per_s must be finite"),
        ("device,time,macs_per_s\n0,-1,1\n", "time must be finite and >= 0"),
        ("device,time,macs_per_s\n0,nan,1\n", "time must be finite"),
        ("device,time,macs_per_s\n0,2,1\n0,1,1\n", "line 3: times of device 0 must be strictly increasing"),
        ("device,time,macs_per_s\n0,1,1\n0,1,2\n", "strictly increasing"),
        ("device,time,macs_per_s\n1.5,0,1\n", "device must be an integer"),
        ("device,time,macs_per_s\n-1,0,1\n", "device must be an integer >= 0"),
        ("device,time,macs_per_s\n0,,1\n", "not a number"),
    ],
)
def test_csv_refusals(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(TraceFileError, match=match) as info:
        load_trace_csv(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        np.arange(64, dtype=np.float64).tobytes(),  # NUL bytes (a .npy, a spreadsheet, ...)
        bytes(range(128, 256)) * 4,  # not UTF-8
        "device,time,macs_per_s\n0,0,1\n".encode("utf-16"),  # text, but not UTF-8
    ],
)
def test_binary_trace_file_is_not_a_csv_text_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trace.csv"
    path.write_bytes(content)
    with pytest.raises(TraceFileError, match="is not a CSV text file") as info:
        load_trace_csv(path)
    assert str(path) in str(info.value) and "device,time,macs_per_s" in str(info.value)
    with pytest.raises(TraceFileError, match="is not a CSV text file"):
        ResourceModel("trace", deadline=1.0, trace_path=path)


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceFileError, match="does not exist"):
        load_trace_csv(tmp_path / "nope.csv")
    with pytest.raises(TraceFileError, match="does not exist"):
        ResourceModel("trace", deadline=1.0, trace_path=tmp_path / "nope.csv")


def test_model_and_traces_survive_pickling(tmp_path: Path) -> None:
    # Ray ships the resource model to worker processes by pickling it.
    import pickle

    model = ResourceModel("timevarying", deadline=10.0, r_max=100.0, lam=2.0, seed=5)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.trace(8).change_points(0.0, 500.0) == model.trace(8).change_points(0.0, 500.0)
    trace = model.trace(8)
    trace.rate_at(50.0)  # partly generated
    resumed = pickle.loads(pickle.dumps(trace))
    assert resumed.change_points(0.0, 900.0) == model.trace(8).change_points(0.0, 900.0)
    csv_path = _write(tmp_path / "t.csv", "device,time,macs_per_s\n0,0,1\n0,3,2\n")
    replay = pickle.loads(pickle.dumps(ResourceModel("trace", deadline=5.0, trace_path=csv_path)))
    assert replay.trace(0).advance(0.0, 5.0) == 4.0


# --------------------------------------------------------------------------- sizing from the model


def _tiny_droppable():
    import torch
    from torch import nn

    from flwr_distreal.core.dropout import make_droppable

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
            self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(16 * 7 * 7, 10)

        def forward(self, x):
            x = self.pool(torch.relu(self.conv1(x)))
            x = self.pool(torch.relu(self.conv2(x)))
            return self.fc(torch.flatten(x, 1))

    return Tiny(), make_droppable(Tiny(), torch.zeros(2, 1, 28, 28))


def test_size_resources_lets_each_full_model_round_end_exactly_at_the_deadline() -> None:
    full = 4_020_000
    sizing = size_resources(full, 10, [181, 50, 0], local_epochs=2, variability=4.0, deadline=60.0)
    # the convention of the clock and of the experiment: step_macs of every mini-batch
    expected = [r_max_for(max(sum(step_macs(full, b) for b in batch_sizes(n, 10, 2)), 1.0), 60.0) for n in (181, 50, 0)]
    assert sizing.r_max_per_device == pytest.approx(expected, rel=1e-15)
    assert sizing.r_max == max(expected) == sizing.device_r_max(0)
    assert (sizing.deadline, sizing.variability, sizing.full_macs_per_sample) == (60.0, 4.0, full)
    assert sizing.strategy_kwargs() == {"full_macs_per_sample": full, "batch_size": 10, "local_epochs": 2}
    for device, n in ((0, 181), (1, 50)):
        clock = ResourceModel("full", deadline=60.0, r_max=sizing.device_r_max(device)).clock(device, 3)
        result = plan_fixed_round(clock, full, batch_sizes(n, 10, 2)).result
        assert result.finish_time == pytest.approx(3 * 60.0, rel=1e-12) and not result.straggler
    model = sizing.resource_model("timevarying", lam=2.0, seed=5)
    assert (model.kind, model.r_max, model.deadline, model.variability, model.lam, model.seed) == (
        "timevarying", sizing.r_max, 60.0, 4.0, 2.0, 5,
    )
    assert size_resources(full, 10, 181, local_epochs=2).r_max == pytest.approx(expected[0] * 60.0)  # deadline 1


def test_size_resources_counts_the_models_macs() -> None:
    from flwr_distreal.core.macs import count_macs

    _, model = _tiny_droppable()
    assert size_resources(model, 10, 60).full_macs_per_sample == count_macs(model) > 0
    assert size_resources(model, 10, 60).r_max == size_resources(count_macs(model), 10, 60).r_max


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((1e6, 0, 60), {}, ResourceError, "batch_size"),
        ((1e6, 10, 60), {"local_epochs": 0}, ResourceError, "local_epochs"),
        ((1e6, 10, [60, -1]), {}, ResourceError, r"samples_per_device\[1\]"),
        ((1e6, 10, []), {}, ResourceError, "empty"),
        ((1e6, 10, 60), {"variability": 0.5}, ResourceError, "variability"),
        ((1e6, 10, 60), {"deadline": 0.0}, ResourceError, "deadline"),
        ((0, 10, 60), {}, ResourceError, "forward MACs"),
        ((True, 10, 60), {}, TypeError, "bool"),
        (("femnist_cnn", 10, 60), {}, TypeError, "droppable model"),
    ],
)
def test_size_resources_refuses_bad_input(args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        size_resources(*args, **kwargs)


def test_size_resources_refuses_a_plain_module() -> None:
    plain, _ = _tiny_droppable()
    with pytest.raises(TypeError, match="make_droppable"):
        size_resources(plain, 10, 60)


def test_sized_resources_make_a_small_model_drop_where_a_fixed_r_max_does_not() -> None:
    """The README's old ``r_max=5e8`` is ~10x what a small model's round needs: no device ever
    drops and utilisation stays low. Sized from the model, the weaker devices drop filters
    (Algorithm 1) and use most of what they have."""
    from flwr_distreal.core.lut import LUT
    from flwr_distreal.training.schedule import plan_distreal_round

    _, model = _tiny_droppable()
    lut = LUT.uniform(model)
    samples, batch = 60, 10

    def rounds(resources: ResourceModel) -> tuple[list[float], list[float], list[float], int]:
        levels, dropout, utilisation, stragglers = [], [], [], 0
        for device in range(20):
            plan = plan_distreal_round(resources.clock(device, 1), lut, batch_sizes(samples, batch), "paper")
            levels.append(resources.trace(device).rate_at(0.0))
            dropout.append(plan.mean_dropout)
            utilisation.append(plan.result.utilisation)
            stragglers += plan.straggler
        return levels, dropout, utilisation, stragglers

    _, fixed_dropout, fixed_util, _ = rounds(ResourceModel("constant", deadline=1.0, r_max=5e8, variability=3.0))
    assert max(fixed_dropout) == 0.0 and np.mean(fixed_util) < 0.33

    sizing = size_resources(model, batch, samples, variability=3.0, deadline=1.0)
    levels, dropout, utilisation, stragglers = rounds(sizing.resource_model("constant", seed=0))
    weaker = [d for lv, d in zip(levels, dropout) if lv < np.median(levels)]
    assert len(weaker) == 10 and min(weaker) > 0.0
    assert np.mean(utilisation) > 0.8 and stragglers == 0
    # the weaker a device, the more it drops
    assert stats.spearmanr(levels, dropout).statistic < -0.8
