"""Tests of the clock strategies of the trainers (flwr_distreal.training.clock).

One trainer per method (DistrealTrainer, BaselineTrainer), the clock plugged in: the simulated
clock (the resource model's r(t)) or the measured clock (a wall-clock deadline, the throughput
estimate, the step-time table). The Measured* trainers of flwr_distreal.training.wallclock are
those trainers with a MeasuredClock; these tests check that they are the same thing, and the
clocks' own rules. Time comes from an injected fake clock, advanced by a fake step-time model
(``step MACs / speed``), so every decision is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flwr_distreal.core import contract as C
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs, macs_of_counts
from flwr_distreal.core.resources import ResourceModel, step_macs
from flwr_distreal.models import build_model
from flwr_distreal.training.clock import MeasuredClock, SimulatedClock
from flwr_distreal.training.steptimes import StepTimeTable
from flwr_distreal.training.throughput import ThroughputEstimator
from flwr_distreal.training.trainers import BaselineTrainer, DistrealTrainer, get_weights
from flwr_distreal.training.wallclock import MeasuredBaselineTrainer, MeasuredDistrealTrainer, WallclockError

from conftest import random_images

FACTOR = 3.0
BATCH = 8
N = 48  # samples: 6 mini-batches
T = 3.0  # round deadline, fake seconds
T0 = 500.0


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _fake_timed(cls):
    """``cls`` whose steps take ``step_macs / speed`` fake seconds (speed: MACs/s, halved after
    1.5 s) on the clock ``fake``."""

    class Fake(cls):
        def __init__(self, *args, fake: FakeClock, speed: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.fake, self.speed = fake, speed

        def forward_backward(self, opt, x, y, vector):
            loss = super().forward_backward(opt, x, y, vector)
            kept = getattr(self, "_kept", None)
            fwd = macs_of_counts(self.model, kept) if kept is not None else count_macs(self.model, vector)
            speed = self.speed if self.fake.t - T0 < 1.5 else self.speed / 2
            self.fake.t += step_macs(fwd, int(x.shape[0]), FACTOR) / speed
            return loss

    return Fake


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model("femnist_cnn_small")


@pytest.fixture(scope="module")
def lut(base):
    return LUT.uniform(base)


def _model(base):
    m = build_model("femnist_cnn_small")
    m.load_state_dict(base.state_dict())
    return m


def _loader() -> DataLoader:
    return DataLoader(random_images(N, 62, 0), batch_size=BATCH, shuffle=True, generator=torch.Generator())


def _speed(base) -> float:
    # the full model would need 2 T for the round: DISTREAL must drop filters to finish
    return step_macs(count_macs(base), N, FACTOR) / (2 * T)


def _rounds(trainer, arrays, configs):
    out = []
    for cfg in configs:
        res = trainer.fit(arrays, cfg)
        arrays = res.arrays
        out.append(res)
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.num_examples == y.num_examples
        assert x.metrics.keys() == y.metrics.keys()
        for k in x.metrics:
            vx, vy = x.metrics[k], y.metrics[k]
            assert vx == vy or (isinstance(vx, float) and math.isnan(vx) and math.isnan(vy)), k
        for p, q in zip(x.arrays, y.arrays):
            np.testing.assert_array_equal(p, q)


CONFIGS = [{C.SERVER_ROUND: r, C.ROUND_DEADLINE: T} for r in (1, 2)]


def test_measured_distreal_trainer_is_distreal_trainer_with_a_measured_clock(base, lut):
    """MeasuredDistrealTrainer(...) and DistrealTrainer(..., clock=MeasuredClock(...)) train the
    same rounds: equal metrics (the wall-clock ones included) and equal weights."""
    speed = _speed(base)
    fake_a, fake_b = FakeClock(), FakeClock()
    a = _fake_timed(MeasuredDistrealTrainer)(
        _model(base), _loader(), 0, lut, fake=fake_a, speed=speed, clock=fake_a, time_table="proportional",
        margin=0.05, step_macs_factor=FACTOR, lr=0.05, seed=1,
    )
    wall = MeasuredClock("proportional", margin=0.05, clock=fake_b)
    b = _fake_timed(DistrealTrainer)(
        _model(base), _loader(), 0, lut, None, fake=fake_b, speed=speed, clock=wall, step_macs_factor=FACTOR,
        lr=0.05, seed=1,
    )
    arrays = get_weights(base)
    ra, rb = _rounds(a, arrays, CONFIGS), _rounds(b, arrays, CONFIGS)
    _same(ra, rb)
    # the rounds did what the clock asks: dropped filters to meet the deadline, none missed it
    assert all(r.metrics[C.MEAN_DROPOUT] > 0 and not r.metrics[C.STRAGGLER] for r in ra)
    assert a.step_log == b.clock.step_log and len(a.step_log) > 0
    assert a.estimator.throughput == pytest.approx(b.clock.estimator.throughput)


def test_measured_baseline_trainer_is_baseline_trainer_with_a_measured_clock(base):
    speed = _speed(base)
    fake_a, fake_b = FakeClock(), FakeClock()
    a = _fake_timed(MeasuredBaselineTrainer)(
        _model(base), _loader(), 0, fake=fake_a, speed=speed, clock=fake_a, step_macs_factor=FACTOR, lr=0.05, seed=1
    )
    b = _fake_timed(BaselineTrainer)(
        _model(base), _loader(), 0, None, fake=fake_b, speed=speed, clock=MeasuredClock(None, clock=fake_b),
        step_macs_factor=FACTOR, lr=0.05, seed=1,
    )
    arrays = get_weights(base)
    ra, rb = _rounds(a, arrays, CONFIGS), _rounds(b, arrays, CONFIGS)
    _same(ra, rb)
    assert all(r.metrics[C.STRAGGLER] for r in ra)  # the full model takes 2 T: late every round


def test_the_simulated_clock_is_the_default_and_can_be_given(base, lut):
    """resources=... and clock=SimulatedClock(resources) are the same trainer."""
    resources = ResourceModel("constant", deadline=10.0, r_max=_speed(base) * 0.3)
    a = DistrealTrainer(_model(base), _loader(), 0, lut, resources, step_macs_factor=FACTOR, lr=0.05, seed=1)
    b = DistrealTrainer(
        _model(base), _loader(), 0, lut, None, clock=SimulatedClock(resources), step_macs_factor=FACTOR, lr=0.05, seed=1
    )
    assert isinstance(a.clock, SimulatedClock) and a.clock.resources is resources and b.resources is resources
    arrays = get_weights(base)
    configs = [{C.SERVER_ROUND: r} for r in (1, 2)]
    ra, rb = _rounds(a, arrays, configs), _rounds(b, arrays, configs)
    _same(ra, rb)
    assert ra[0].metrics[C.MEAN_DROPOUT] > 0  # limited: DISTREAL dropped filters


def test_a_trainer_refuses_a_wrong_clock(base, lut):
    with pytest.raises(TypeError, match="clock must be a SimulatedClock or a MeasuredClock"):
        DistrealTrainer(_model(base), _loader(), 0, lut, None, clock=lambda: 0.0)
    resources = ResourceModel("constant", deadline=10.0, r_max=1e9)
    with pytest.raises(ValueError, match="either to the SimulatedClock or to the trainer"):
        DistrealTrainer(_model(base), _loader(), 0, lut, resources, clock=SimulatedClock(resources))
    with pytest.raises(TypeError, match="resources must be a ResourceModel"):
        SimulatedClock("constant")  # type: ignore[arg-type]
    with pytest.raises(WallclockError, match="margin must be a finite number >= 0"):
        MeasuredClock(margin=-0.1)
    with pytest.raises(WallclockError, match="time_table must be"):
        MeasuredClock("fast")  # type: ignore[arg-type]


def test_a_measured_clock_cannot_plan_ahead(base, lut):
    t = DistrealTrainer(_model(base), _loader(), 0, lut, None, clock=MeasuredClock("proportional", clock=FakeClock()))
    with pytest.raises(WallclockError, match="cannot plan a round ahead"):
        t.plan(1, {C.SERVER_ROUND: 1})
    b = MeasuredBaselineTrainer(_model(base), _loader(), 0, clock=FakeClock())
    with pytest.raises(WallclockError, match="cannot plan a round ahead"):
        b.plan(1, {C.SERVER_ROUND: 1})


def test_pick_probes_stops_and_overruns(base, lut):
    """The wall clock's one selection rule: the fastest row to probe without an estimate (None
    once the deadline has passed), the most MACs that fit, and at the deadline None (stop) or,
    without stop_at_deadline, the fastest row."""
    table = StepTimeTable.proportional(lut, count_macs(base), BATCH)
    clock = MeasuredClock(table, estimator=ThroughputEstimator(), margin=0.0, clock=FakeClock())
    clock.attach(base, "cpu", FACTOR)
    kw = dict(policy="deadline", round_time=T, round_samples=N)
    probe = clock.pick(0.0, T, [BATCH] * 6, stop_at_deadline=True, **kw)
    assert probe.index == table.fastest and math.isnan(probe.predicted)
    assert clock.pick(T, T, [BATCH], stop_at_deadline=True, **kw) is None
    full_step = table.full_step_macs(BATCH, FACTOR)
    clock.estimator.reset(initial=full_step)  # the full model's step takes 1 s
    roomy = clock.pick(0.0, 100.0, [BATCH], stop_at_deadline=True, **kw)
    assert roomy.index == len(table) - 1  # plenty of time: the row with the most MACs
    half = clock.pick(0.0, 0.5, [BATCH], stop_at_deadline=True, **kw)
    assert table.rel_time[half.index] <= 0.5 < table.rel_time[min(half.index + 1, len(table) - 1)]
    assert clock.pick(0.0, 1e-6, [BATCH], stop_at_deadline=True, **kw) is None
    late = clock.pick(0.0, 1e-6, [BATCH], stop_at_deadline=False, **kw)
    assert late.index == table.fastest and late.predicted == pytest.approx(table.rel_time[table.fastest])
