"""Tests of the wall-clock resource mode (flwr_distreal.training.wallclock).

Deterministic: the trainers run real femnist_cnn steps on tiny random data, but time comes from
an injected fake clock that a test subclass advances by a fake step-time model
(``step MACs / r(t)``), so every decision is reproducible.
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
from flwr_distreal.models import build_model
from flwr_distreal.core.resources import step_macs
from flwr_distreal.training.trainers import BaselineTrainer, DistrealTrainer, get_weights
from flwr_distreal.training.wallclock import (
    ROUND_DEADLINE_AT,
    MeasuredBaselineTrainer,
    MeasuredDistrealTrainer,
    StepTimeTable,
    ThroughputEstimator,
    WallclockError,
    choose_vector,
)

from conftest import random_images

FACTOR = 3.0
BATCH = 8
T = 10.0  # round deadline, fake seconds
T0 = 1000.0  # the fake clock's start


# -- fakes -----------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, t: float = T0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += float(dt)


def _fake_timed(cls):
    """``cls`` whose steps take ``step_macs(forward MACs, batch) / speed(t)`` fake seconds,
    ``t`` in seconds since the fake clock's start; ``speed`` in MACs per second."""

    class Fake(cls):
        def __init__(self, *args, fake: FakeClock, speed, **kwargs):
            super().__init__(*args, clock=fake, **kwargs)
            self.fake, self.speed = fake, speed

        def forward_backward(self, opt, x, y, vector):
            loss = super().forward_backward(opt, x, y, vector)
            kept = getattr(self, "_kept", None)
            fwd = macs_of_counts(self.model, kept) if kept is not None else count_macs(self.model, vector)
            self.fake.advance(step_macs(fwd, int(x.shape[0]), FACTOR) / self.speed(self.fake.t - T0))
            return loss

    return Fake


FakeDistreal = _fake_timed(MeasuredDistrealTrainer)
FakeBaseline = _fake_timed(MeasuredBaselineTrainer)


def _loader(n: int, batch: int = BATCH, seed: int = 0) -> DataLoader:
    return DataLoader(random_images(n, 62, seed), batch_size=batch, shuffle=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("femnist_cnn")


@pytest.fixture(scope="module")
def lut(model):
    return LUT.uniform(model)


@pytest.fixture(scope="module")
def full(model) -> int:
    return count_macs(model)


def _r_for(full: int, n: int, seconds: float) -> float:
    """Speed (MACs/s) at which the full model trains ``n`` samples in ``seconds``."""
    return step_macs(full, n, FACTOR) / seconds


def _distreal(model, lut, n, speed, fake=None, **kw):
    fake = fake or FakeClock()
    torch.manual_seed(0)
    m = build_model("femnist_cnn")
    m.load_state_dict(model.state_dict())
    trainer = FakeDistreal(
        m, _loader(n), 0, lut, fake=fake, speed=speed, time_table="proportional", step_macs_factor=FACTOR,
        lr=0.05, seed=1, **kw,
    )
    return trainer, fake


def _cfg(**extra):
    return {C.SERVER_ROUND: 1, C.ROUND_DEADLINE: T, **extra}


# -- ThroughputEstimator ---------------------------------------------------------------------


def test_estimator_steady():
    est = ThroughputEstimator()
    assert est.throughput is None
    for _ in range(20):
        est.update(0.5, 1e9)
    assert est.throughput == pytest.approx(2e9)
    assert est.changes == 0


def test_estimator_follows_a_halving_within_change_steps():
    est = ThroughputEstimator(window=7, change_threshold=0.3, change_steps=3)
    for _ in range(10):
        est.update(0.5, 1e9)
    est.update(1.0, 1e9)
    est.update(1.0, 1e9)
    assert est.throughput == pytest.approx(2e9)  # two slow steps are held back as outliers
    assert not est.change_detected
    est.update(1.0, 1e9)
    assert est.change_detected and est.changes == 1
    assert est.throughput == pytest.approx(1e9)  # the window now holds only the new speed


def test_estimator_noisy_ignores_spikes_and_detects_real_change():
    rng = np.random.default_rng(0)
    est = ThroughputEstimator()
    truth = 2e9
    errors = []
    for i in range(200):
        if i == 100:
            truth = 1e9
        sec = 1e9 / truth * float(rng.lognormal(0.0, 0.08))
        if i % 17 == 5:
            sec *= 3.0  # a lone spike (another process, a new kernel shape)
        est.update(sec, 1e9)
        if 5 <= i < 100 or i >= 106:
            errors.append(abs(est.throughput / truth - 1))
    # median of 7 samples with 8 % noise: typical error ~3 %, a few streaks near 10 %
    assert max(errors) < 0.12 and float(np.mean(errors)) < 0.04
    assert est.changes == 1


def test_estimator_prior_and_reset():
    est = ThroughputEstimator(initial=4e9)
    assert est.throughput == pytest.approx(4e9)
    for _ in range(3):
        est.update(1.0, 1e9)  # the prior was wrong: replaced after change_steps steps
    assert est.throughput == pytest.approx(1e9)
    est.reset()
    assert est.throughput is None and est.updates == 0


@pytest.mark.parametrize(
    "seconds, macs, match",
    [
        (float("nan"), 1e9, "step time"),
        (0.0, 1e9, "step time"),
        (-1.0, 1e9, "step time"),
        (float("inf"), 1e9, "step time"),
        (1.0, float("nan"), "step cost"),
        (1.0, 0.0, "step cost"),
        (True, 1e9, "step time"),
        ("1", 1e9, "step time"),
    ],
)
def test_estimator_refuses_bad_samples(seconds, macs, match):
    est = ThroughputEstimator()
    with pytest.raises(WallclockError, match=match):
        est.update(seconds, macs)
    assert est.throughput is None


def test_estimator_refuses_bad_parameters():
    with pytest.raises(WallclockError, match="window"):
        ThroughputEstimator(window=0)
    with pytest.raises(WallclockError, match="change_steps"):
        ThroughputEstimator(window=3, change_steps=4)
    with pytest.raises(WallclockError, match="change_threshold"):
        ThroughputEstimator(change_threshold=float("nan"))


# -- choose_vector -----------------------------------------------------------------------------

# MACs 1..4 (4 = full); row 1 is slower than row 2 (a narrow vector that runs badly)
TABLE = StepTimeTable(macs=(1, 2, 3, 4), rel_time=(0.5, 0.9, 0.8, 1.0), full_macs=4, batch_size=10)
# throughput at which a full step on 10 samples takes exactly 1 s
RATE = step_macs(4, 10, FACTOR)


def _choose(time_left, sizes_left, **kw):
    kw.setdefault("margin", 0.0)
    return choose_vector(TABLE, RATE, time_left, sizes_left, step_macs_factor=FACTOR, **kw)


def test_choose_most_macs_that_fits():
    assert _choose(10.0, [10] * 10).index == 3  # budget 1 s: the full model
    c = _choose(8.5, [10] * 10)  # budget 0.85 s: rows 0 and 2 fit, row 1 (0.9 s) does not
    assert c.index == 2 and c.predicted == pytest.approx(0.8) and c.budget == pytest.approx(0.85)
    assert _choose(4.0, [10] * 10).index == 0  # nothing fits 0.4 s: the fastest row
    assert _choose(math.inf, [10] * 3).index == 3


def test_choose_deadline_policy_shares_time_by_samples():
    # 3 s left for a batch of 10 and one of 5: this batch gets 2 s; a half batch costs half
    assert _choose(3.0, [10, 5]).budget == pytest.approx(2.0)
    assert _choose(1.0, [5]).index == 3  # full step on 5 samples: 0.5 s
    # overhead between steps is budgeted for the steps after this one
    assert _choose(3.0, [10, 10], overhead=1.0).budget == pytest.approx(1.0)


def test_choose_margin_and_stop():
    assert _choose(10.0, [10] * 10, margin=0.1).index == 2  # 1.1 s padded > 1 s budget
    c = _choose(0.45, [10, 10])
    assert c.index is None and c.predicted == pytest.approx(0.5)  # the fastest would miss it
    assert _choose(0.5, [10]).index == 0
    assert _choose(0.52, [10], margin=0.1).index is None
    assert _choose(-1.0, [10]).index is None


def test_choose_paper_policy():
    c = _choose(100.0, [10] * 5, policy="paper", round_time=8.5, round_samples=100)
    assert c.budget == pytest.approx(0.85) and c.index == 2
    with pytest.raises(WallclockError, match="round_time"):
        _choose(1.0, [10], policy="paper")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"throughput": 0.0}, "throughput"),
        ({"throughput": float("nan")}, "throughput"),
        ({"time_left": float("nan")}, "time_left"),
        ({"sizes_left": []}, "sizes_left"),
        ({"policy": "greedy"}, "policy"),
        ({"margin": -0.1}, "margin"),
    ],
)
def test_choose_refuses_bad_inputs(kwargs, match):
    args = {"throughput": RATE, "time_left": 1.0, "sizes_left": [10], **kwargs}
    with pytest.raises(WallclockError, match=match):
        choose_vector(TABLE, args.pop("throughput"), args.pop("time_left"), args.pop("sizes_left"), **args)


# -- StepTimeTable -----------------------------------------------------------------------------


def test_table_measure_leaves_model_alone_and_round_trips(model, lut, tmp_path):
    model.seed_dropout(7)
    gen_state = model.dropout_layers[0].generator.get_state().clone()
    before = [v.clone() for v in model.state_dict().values()]
    table = StepTimeTable.measure(model, lut, 4, repeats=1, warmup=0, max_points=3)
    assert len(table) == len(lut) and table.measured[0] and table.measured[-1]
    assert sum(table.measured) == 3
    frac = np.asarray(lut.macs) / table.full_macs
    assert np.all(np.asarray(table.rel_time) >= frac - 1e-12)
    assert table.reference_throughput() > 0
    for a, b in zip(before, model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(model.dropout_layers[0].generator.get_state(), gen_state)
    model.seed_dropout(None)
    loaded = StepTimeTable.load(table.save(tmp_path / "t.json"))
    assert loaded == table and loaded.matches(StepTimeTable.key(model, lut, 4))
    assert not loaded.matches(StepTimeTable.key(model, lut, 8))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(WallclockError, match="not a"):
        StepTimeTable.load(tmp_path / "bad.json")


def test_table_refuses_bad_values():
    with pytest.raises(WallclockError, match="rel_time"):
        StepTimeTable(macs=(1, 2), rel_time=(0.5, float("nan")), full_macs=2, batch_size=1)
    with pytest.raises(WallclockError, match="one rel_time per"):
        StepTimeTable(macs=(1, 2), rel_time=(0.5,), full_macs=2, batch_size=1)


def test_table_submodel_interpolation():
    assert TABLE.rel_time_of_macs(4) == 1.0
    assert TABLE.rel_time_of_macs(2.5) == pytest.approx(0.85)
    assert TABLE.rel_time_of_macs(0.1) >= 0.1 / 4


def test_trainer_loads_cached_table(model, lut, tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    t1 = MeasuredDistrealTrainer(build_model("femnist_cnn"), _loader(16), 0, lut, table_path=path)
    monkeypatch.setattr(StepTimeTable, "measure", classmethod(lambda *a, **k: TABLE))
    proportional = StepTimeTable.proportional(lut, count_macs(model), BATCH)
    proportional.meta.update(StepTimeTable.key(model, lut, BATCH))
    proportional.save(path)
    t1.calibrate()
    assert t1.time_table == proportional  # loaded, not measured
    assert t1.estimator.throughput is None  # a proportional table has no reference speed


def test_time_table_for_another_lut_refused(model, lut):
    with pytest.raises(WallclockError, match="another LUT"):
        MeasuredDistrealTrainer(build_model("femnist_cnn"), _loader(16), 0, lut, time_table=TABLE)


# -- MeasuredDistrealTrainer -------------------------------------------------------------------


def test_distreal_fits_the_deadline(model, lut, full):
    n = 64  # 8 batches; the full model would need 2 T
    trainer, fake = _distreal(model, lut, n, lambda t: _r_for(full, n, 2 * T))
    assert isinstance(trainer, DistrealTrainer)
    res = trainer.fit(get_weights(model), _cfg())
    m = res.metrics
    assert m[C.NUM_BATCHES] == 8 and m[C.INCOMPLETE] == 0 and res.num_examples == n
    assert m["wall_time"] <= T and m[C.STRAGGLER] is False
    assert 0 < m[C.UTILISATION] <= 1
    assert m[C.MACS] / m[C.AVAILABLE_MACS] == pytest.approx(m[C.UTILISATION])
    assert 0.3 < m[C.MEAN_DROPOUT] <= 0.5
    # c of Algorithm 1: forward MACs per sample of every completed step
    assert m[C.MACS] == sum(r.forward_macs for r in trainer.step_log)
    C.metric_values(m)  # every metric is a number


def test_distreal_stops_at_the_deadline_and_never_starts_a_late_step(model, lut, full):
    n = 64  # even the cheapest vector (30 % of the MACs) needs 1.5 T for the whole round
    speed = _r_for(full, n, 5 * T)
    trainer, fake = _distreal(model, lut, n, lambda t: speed)
    res = trainer.fit(get_weights(model), _cfg())
    m, log = res.metrics, trainer.step_log
    assert 0 < m[C.NUM_BATCHES] < 8 and m[C.INCOMPLETE] == 8 - m[C.NUM_BATCHES]
    assert all(r.completed for r in log) and m["abandoned"] == 0
    assert log[-1].end <= T and m["wall_time"] <= T and m[C.STRAGGLER] is False
    cheapest = step_macs(lut.min_macs, BATCH, FACTOR) / speed
    assert T - log[-1].end < cheapest * (1 + trainer.margin)  # it stopped only when nothing fitted
    assert m[C.MEAN_DROPOUT] == pytest.approx(0.5)
    assert 0 < m[C.UTILISATION] <= 1 and res.num_examples == BATCH * m[C.NUM_BATCHES]


def test_distreal_adapts_to_a_halving(model, lut, full):
    n = 160  # 20 batches; full model: 0.8 T at full speed
    fast = _r_for(full, n, 0.8 * T)
    trainer, fake = _distreal(model, lut, n, lambda t: fast if t < 0.4 * T else fast / 2)
    m = trainer.fit(get_weights(model), _cfg()).metrics
    assert m["throughput_changes"] >= 1
    # no prior speed (proportional table): the first step probes with the fastest vector,
    # then the full model fits until the halving
    first = trainer.step_log[0]
    assert first.rate == pytest.approx(0.5)
    assert all(r.rate == 0.0 for r in trainer.step_log[1:] if r.end <= 0.4 * T)
    assert m["mean_dropout_before"] < 0.1
    # after the halving the full model would end at 1.2 T: DISTREAL drops filters instead
    assert m["mean_dropout_after"] > m["mean_dropout_before"] + 0.05
    assert max(r.rate for r in trainer.step_log if r.start >= 0.4 * T) >= 0.2
    assert m[C.NUM_BATCHES] == 20
    assert 0.4 * T <= m["change_at"] <= 0.6 * T
    assert m["throughput"] == pytest.approx(fast / 2)
    assert m["wall_time"] <= T and 0 < m[C.UTILISATION] <= 1 and not m[C.STRAGGLER]


def test_distreal_abandons_a_step_that_overruns(model, lut, full):
    n = 64
    fast = _r_for(full, n, 0.5 * T)
    trainer, fake = _distreal(model, lut, n, lambda t: fast if t < 0.3 * T else fast / 100)
    before = get_weights(model)
    res = trainer.fit(before, _cfg())
    m, log = res.metrics, trainer.step_log
    assert m["abandoned"] == 1 and not log[-1].completed and log[-1].end > T
    done = [r for r in log if r.completed]
    assert m[C.NUM_BATCHES] == len(done) and m[C.MACS] == sum(r.forward_macs for r in done)
    assert m[C.STRAGGLER] is False and 0 < m[C.UTILISATION] <= 1


def test_distreal_is_deterministic(model, lut, full):
    speed = _r_for(full, 64, 2 * T)
    r1 = _distreal(model, lut, 64, lambda t: speed)[0].fit(get_weights(model), _cfg())
    r2 = _distreal(model, lut, 64, lambda t: speed)[0].fit(get_weights(model), _cfg())
    assert r1.metrics == r2.metrics
    for a, b in zip(r1.arrays, r2.arrays):
        np.testing.assert_array_equal(a, b)


def test_deadline_at_and_unlimited(model, lut, full):
    speed = _r_for(full, 64, 0.5 * T)
    unix = FakeClock(1.7e9)
    trainer, fake = _distreal(model, lut, 64, lambda t: speed, unix_clock=unix)
    m = trainer.fit(get_weights(model), _cfg(**{ROUND_DEADLINE_AT: unix.t + 0.25 * T})).metrics
    assert m["round_deadline"] == pytest.approx(0.25 * T) and m["wall_time"] <= 0.25 * T
    m = trainer.fit(get_weights(model), {C.SERVER_ROUND: 2, C.UNLIMITED: True}).metrics
    assert m[C.NUM_BATCHES] == 8 and m[C.MEAN_DROPOUT] == 0.0 and m[C.MACS] == 8 * full
    assert m[C.UTILISATION] == pytest.approx(1.0) and not m[C.STRAGGLER]


def test_deadline_at_already_past_trains_nothing(model, lut):
    unix = FakeClock(1.7e9)
    trainer, fake = _distreal(model, lut, 64, lambda t: 1e9, unix_clock=unix)
    res = trainer.fit(get_weights(model), _cfg(**{ROUND_DEADLINE_AT: unix.t - 1.0}))
    m = res.metrics
    assert m[C.NUM_BATCHES] == 0 and m[C.MACS] == 0 and res.num_examples == 0
    assert m[C.STRAGGLER] is False and m[C.UTILISATION] == 0.0 and m[C.INCOMPLETE] == 8
    assert fake.t == T0  # not even a probe step was started
    C.metric_values(m)


@pytest.mark.parametrize(
    "config, match",
    [
        ({C.ROUND_DEADLINE: 0.0}, "round-deadline"),
        ({C.ROUND_DEADLINE: -5.0}, "round-deadline"),
        ({C.ROUND_DEADLINE: float("nan")}, "round-deadline"),
        ({C.ROUND_DEADLINE: float("inf")}, "round-deadline"),
        ({C.ROUND_DEADLINE: "10"}, "round-deadline"),
        ({C.ROUND_DEADLINE: True}, "round-deadline"),
        ({ROUND_DEADLINE_AT: float("nan")}, "round-deadline-at"),
        ({}, "round-deadline"),
    ],
)
def test_bad_deadlines_refused(model, lut, full, config, match):
    trainer, _ = _distreal(model, lut, 16, lambda t: 1e9)
    with pytest.raises(WallclockError, match=match):
        trainer.fit(get_weights(model), {C.SERVER_ROUND: 1, **config})
    base = FakeBaseline(build_model("femnist_cnn"), _loader(16), 0, fake=FakeClock(), speed=lambda t: 1e9)
    with pytest.raises(WallclockError, match=match):
        base.fit(get_weights(model), {C.SERVER_ROUND: 1, **config})


def test_bad_trainer_parameters(lut):
    with pytest.raises(WallclockError, match="margin"):
        MeasuredDistrealTrainer(build_model("femnist_cnn"), _loader(16), 0, lut, margin=float("nan"))
    with pytest.raises(WallclockError, match="time_table"):
        MeasuredDistrealTrainer(build_model("femnist_cnn"), _loader(16), 0, lut, time_table="guess")
    trainer = MeasuredDistrealTrainer(build_model("femnist_cnn"), _loader(16), 0, lut, time_table="proportional")
    with pytest.raises(WallclockError, match="plan"):
        trainer.plan(1, {})


def test_nan_clock_refused(model, lut):
    trainer = MeasuredDistrealTrainer(
        build_model("femnist_cnn"), _loader(16), 0, lut, time_table="proportional", clock=lambda: float("nan")
    )
    with pytest.raises(WallclockError, match="step time"):
        trainer.fit(get_weights(model), _cfg())


# -- MeasuredBaselineTrainer -------------------------------------------------------------------


def _baseline(model, n, speed):
    m = build_model("femnist_cnn")
    m.load_state_dict(model.state_dict())
    return FakeBaseline(m, _loader(n), 0, fake=FakeClock(), speed=speed, step_macs_factor=FACTOR, seed=1)


def test_baseline_on_time_and_straggling_when_slowed(model, full):
    n = 64
    fast = _r_for(full, n, 0.8 * T)
    trainer = _baseline(model, n, lambda t: fast)
    assert isinstance(trainer, BaselineTrainer)
    m = trainer.fit(get_weights(model), _cfg()).metrics
    assert m[C.STRAGGLER] is False and m[C.NUM_BATCHES] == 8
    assert m["wall_time"] == pytest.approx(0.8 * T) and m[C.UTILISATION] == pytest.approx(0.8)
    slowed = _baseline(model, n, lambda t: fast if t < 0.4 * T else fast / 2)
    m = slowed.fit(get_weights(model), _cfg()).metrics
    assert m[C.STRAGGLER] is True and m[C.NUM_BATCHES] == 8  # trains all its batches, late
    assert m["wall_time"] == pytest.approx(1.2 * T) and m["overrun"] == pytest.approx(0.2 * T)
    assert m[C.UTILISATION] > 1  # spent more than the round allowed, as in the simulated mode
    C.metric_values(m)


def test_baseline_fixed_submodel(model, full):
    n = 64
    m_ = build_model("femnist_cnn")
    kept = [torch.arange(16), torch.arange(32)]  # half of each layer
    fwd = macs_of_counts(m_, [16, 32])
    trainer = _baseline(model, n, lambda t: _r_for(fwd, n, 0.5 * T))
    res = trainer.fit(get_weights(model), _cfg(**{C.FIXED_SUBSETS: C.encode_subsets(kept)}))
    m = res.metrics
    assert m[C.MACS] == 8 * fwd and m[C.MEAN_DROPOUT] == pytest.approx(0.5)
    assert m["wall_time"] == pytest.approx(0.5 * T) and not m[C.STRAGGLER]
    assert all(layer.fixed_subset is None for layer in trainer.model.dropout_layers)
