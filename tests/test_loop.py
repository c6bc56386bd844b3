"""Tests of the per-batch API (flwr_distreal.training.loop): DISTREAL inside a hand-written training loop.

A user's own nn.Sequential CNN on 8x8 digits (scikit-learn's embedded set), made droppable with
make_droppable, trained by hand with Adam and a label-smoothed loss inside DistrealRound.batches.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core import contract as C
from flwr_distreal.core.dropout import DroppedWeightGuard, kept_count, make_droppable
from flwr_distreal.training.loop import DistrealRound, batch_len
from flwr_distreal.training.wallclock import MeasuredDistrealRound
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs
from flwr_distreal.core.resources import (
    DEADLINE_RTOL,
    ResourceModel,
    RoundClock,
    TraceResources,
    forward_macs_budget,
    r_max_for,
    step_macs,
)
from flwr_distreal.training.schedule import batch_sizes, plan_distreal_round
from flwr_distreal.server import DistrealCore, Reply
from flwr_distreal.training.trainers import DistrealTrainer, get_weights, set_weights

from conftest import digits_tensors

N = 90  # samples: batches of 16 x 5 and a last one of 10
B = 16
T = 1.0
FACTOR = 3.0


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    x, y = digits_tensors()
    return TensorDataset(x[:N], y[:N])


def _loader(data: TensorDataset, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=B, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _model(seed: int = 0):
    model = make_droppable(_net(seed), torch.zeros(1, 1, 8, 8))
    model.seed_dropout(seed)
    return model


def _full_round_rate(model, sizes=None) -> float:
    """Availability at which the full model's round takes exactly T."""
    sizes = batch_sizes(N, B) if sizes is None else sizes
    return r_max_for(sum(step_macs(count_macs(model), b, FACTOR) for b in sizes), T)


def _record_kept(model) -> list[list[int]]:
    seen: list[list[int]] = []

    def hook(module, inputs, output) -> None:
        if module.training:
            seen.append([w if k is None else int(k.numel()) for k, w in zip(module.last_kept_indices(), module.layer_widths)])

    model.register_forward_hook(hook)
    return seen


def _adam_loop(model, rnd: DistrealRound, loader, *, autocast: bool = False, stop_after: int | None = None):
    """The user's own loop: Adam (guarded), label smoothing, optional bf16 autocast."""
    opt = DroppedWeightGuard(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    inside: list[dict] = []
    for i, (x, y) in enumerate(rnd.batches(loader)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        rnd.record_loss(loss)
        inside.append(rnd.metrics())
        if stop_after is not None and i + 1 == stop_after:
            break
    return inside


def _gate(model, start, rnd: DistrealRound) -> DistrealCore:
    gate = DistrealCore(full_macs_per_sample=float(count_macs(model)), batch_size=B)
    gate.broadcast(rnd.server_round, start)
    gate.limit_round(rnd.server_round, {"node": (rnd.device_id, N)})
    return gate


def _reply(model, rnd: DistrealRound) -> Reply:
    return Reply("node", rnd.device_id, get_weights(model), float(rnd.num_examples), rnd.metrics())


# ------------------------------------------------------------------------- Algorithm 1, per batch


def test_vectors_follow_the_availability_batch_by_batch(digits) -> None:
    """r(t) drops to a quarter mid-round: every batch's vector is D[r(t)] for the r(t) at its
    start (paper policy), the model trains exactly that vector, and c adds up MACs(d)."""
    model = _model()
    lut = LUT.uniform(model)
    hi = _full_round_rate(model)
    clock = RoundClock(TraceResources([0.0, 0.4], [hi, hi / 4]), 0.0, T)
    rnd = DistrealRound(model, lut, clock, device_id=0, policy="paper", stop_at_deadline=False)
    kept = _record_kept(model)
    _adam_loop(model, rnd, _loader(digits))

    sizes = batch_sizes(N, B)
    assert [s.batch_size for s in rnd.steps] == sizes
    for step in rnd.steps:
        assert step.rate == clock.trace.rate_at(step.start)
        budget = forward_macs_budget(step.rate * T * step.batch_size / N, step.batch_size, FACTOR)
        assert step.forward_macs == lut.select(budget * (1 + DEADLINE_RTOL), fallback_to_cheapest=True)[1]
        assert step.forward_macs == count_macs(model, step.vector)
    before = [s.forward_macs for s in rnd.steps if s.start < 0.4]
    after = [s.forward_macs for s in rnd.steps if s.start >= 0.4]
    assert before and after and min(before) > max(after)  # the vector changed with r(t)
    assert before[0] == count_macs(model)  # at r_max the full model fits
    # the model trained the vector set for each batch
    assert len(kept) == len(sizes)
    for counts, step in zip(kept, rnd.steps):
        expected = model.layer_widths if step.vector is None else [
            kept_count(p, w) for p, w in zip(step.vector, model.layer_widths)
        ]
        assert counts == list(expected)
    m = rnd.metrics()
    # c is the contract's: MACs(d) per sample summed over the batches (not times the batch size)
    assert m[C.MACS] == sum(count_macs(model, s.vector) for s in rnd.steps) == rnd.macs
    assert rnd.clock.spent_macs == pytest.approx(sum(step_macs(s.forward_macs, s.batch_size) for s in rnd.steps))
    assert m[C.NUM_BATCHES] == len(sizes) and rnd.num_examples == N
    assert m[C.MEAN_DROPOUT] == pytest.approx(np.mean([s.dropout_rate for s in rnd.steps]))


@pytest.mark.parametrize("policy", ["paper", "deadline"])
@pytest.mark.parametrize("stop", [True, False])
def test_the_round_is_the_planned_round(digits, policy, stop) -> None:
    """The vectors, the timing and the straggler flag are plan_distreal_round's (one place for
    the policies and the clock), and forecast() predicts them before training."""
    model = _model()
    lut = LUT.uniform(model)
    resources = ResourceModel("timevarying", deadline=T, r_max=_full_round_rate(model), variability=4.0, lam=4.0, seed=2)
    rnd = DistrealRound(model, lut, resources, device_id=5, server_round=3, policy=policy, stop_at_deadline=stop)
    forecast = rnd.forecast(_loader(digits))
    _adam_loop(model, rnd, _loader(digits))
    plan = plan_distreal_round(resources.clock(5, 3), lut, batch_sizes(N, B), policy, FACTOR, stop)
    for got in (rnd.plan, forecast):
        assert got.forward_macs == plan.forward_macs
        assert all(np.array_equal(a, b) for a, b in zip(got.vectors, plan.vectors))
        assert got.result == plan.result and got.incomplete == plan.incomplete
    assert rnd.metrics()[C.STRAGGLER] == int(plan.straggler)
    assert rnd.metrics()[C.SIM_TIME] == plan.result.finish_time - plan.result.start


def test_low_resources_stop_at_the_deadline_with_fewer_batches(digits) -> None:
    """The same data at 1/5 of r_max: fewer batches, each step ends by the deadline, not a
    straggler (it sends what it trained); without the stop it trains all and is a straggler."""
    counts = {}
    for level in (1.0, 0.2):
        model = _model()
        resources = ResourceModel("constant", deadline=T, r_max=level * _full_round_rate(model), variability=1.0)
        rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=0, policy="paper")
        _adam_loop(model, rnd, _loader(digits))
        m = rnd.metrics()
        counts[level] = m[C.NUM_BATCHES]
        assert m[C.STRAGGLER] == 0
        assert rnd.clock.now <= rnd.deadline * (1 + DEADLINE_RTOL)
        assert m[C.INCOMPLETE] == len(batch_sizes(N, B)) - m[C.NUM_BATCHES]
        assert rnd.stopped_at_deadline == (m[C.INCOMPLETE] > 0)
    assert counts[1.0] == 6 and 0 < counts[0.2] < counts[1.0]

    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=0.2 * _full_round_rate(model), variability=1.0)
    late = DistrealRound(model, LUT.uniform(model), resources, device_id=0, policy="paper", stop_at_deadline=False)
    _adam_loop(model, late, _loader(digits))
    m = late.metrics()
    assert m[C.STRAGGLER] == 1 and m[C.NUM_BATCHES] == 6 and m[C.INCOMPLETE] == 0
    assert m[C.SIM_TIME] > T


def test_the_metrics_pass_the_servers_gate(digits) -> None:
    """A hand-written round's reply passes DistrealCore's check and is aggregated, weighted by c."""
    model = _model()
    start = get_weights(model)
    resources = ResourceModel("timevarying", deadline=T, r_max=_full_round_rate(model), variability=4.0, lam=2.0, seed=0)
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=2, server_round=4, policy="deadline", lr=1e-2)
    _adam_loop(model, rnd, _loader(digits, shuffle=True))
    m = rnd.metrics()
    assert set(m) == {
        C.MACS, C.NUM_BATCHES, C.SIM_TIME, C.STRAGGLER, C.MEAN_DROPOUT, C.AVAILABLE_MACS,
        C.UTILISATION, C.TRAIN_LOSS, C.PARTITION_ID, C.INCOMPLETE, C.LR,
    }
    assert C.metric_values(m)  # all numbers: a MetricRecord takes them
    assert m[C.LR] == 1e-2 and m[C.PARTITION_ID] == 2 and math.isfinite(m[C.TRAIN_LOSS])
    assert 0 < m[C.UTILISATION] <= 1 and m[C.MACS] / m[C.AVAILABLE_MACS] == pytest.approx(m[C.UTILISATION])
    gate = _gate(model, start, rnd)
    assert gate.check(_reply(model, rnd)).ok
    outcome = gate.aggregate(4, [_reply(model, rnd)])
    assert outcome.metrics["accepted"] == 1 and outcome.accepted[0].macs == m[C.MACS]
    # a claim of more MACs than its batches could cost is refused
    forged = Reply("node", 2, get_weights(model), float(rnd.num_examples), {**m, C.MACS: 10 * m[C.MACS] * 6})
    assert not gate.check(forged).ok


def test_autocast_bf16_inside_the_loop(digits) -> None:
    model = _model()
    start = get_weights(model)
    resources = ResourceModel("constant", deadline=T, r_max=0.5 * _full_round_rate(model), variability=1.0)
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=0, policy="deadline")
    _adam_loop(model, rnd, _loader(digits), autocast=True)
    m = rnd.metrics()
    assert m[C.NUM_BATCHES] > 0 and 0 < m[C.MEAN_DROPOUT] <= 0.5 and math.isfinite(m[C.TRAIN_LOSS])
    weights = get_weights(model)
    assert all(np.isfinite(w).all() for w in weights)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start))
    assert _gate(model, start, rnd).check(_reply(model, rnd)).ok


def test_dropout_is_cleared_and_the_mode_restored_after_the_round(digits) -> None:
    """Evaluation after the round runs the full model: the droppable model's eval output equals
    the plain module's with the same weights; a model that came in eval mode leaves in it."""
    model = _model()
    model.eval()
    resources = ResourceModel("constant", deadline=T, r_max=0.3 * _full_round_rate(model), variability=1.0)
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=0)
    modes = []
    for x, y in rnd.batches(_loader(digits)):
        modes.append(model.training)
        F.cross_entropy(model(x), y).backward()
    assert modes and all(modes)  # trained in training mode
    assert not model.training
    assert all(g.rate == 0.0 for g in model.dropout_groups)
    plain = _net(1)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    x = digits.tensors[0][:20]
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    # and a training forward after the round keeps every filter
    model.train()
    model(x)
    assert all(k is None for k in model.last_kept_indices())


def test_breaking_out_early_gives_consistent_metrics(digits) -> None:
    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=0.6 * _full_round_rate(model), variability=1.0)
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=1, policy="deadline")
    inside = _adam_loop(model, rnd, _loader(digits), stop_after=2)
    m = rnd.metrics()
    assert inside[-1] == m  # metrics() inside the loop are the round so far
    assert inside[0][C.NUM_BATCHES] == 1 and m[C.NUM_BATCHES] == 2
    assert m[C.MACS] == sum(s.forward_macs for s in rnd.steps) == inside[0][C.MACS] + rnd.steps[1].forward_macs
    assert rnd.num_examples == 2 * B and m[C.INCOMPLETE] == 4
    assert m[C.STRAGGLER] == 0 and m[C.SIM_TIME] == pytest.approx(rnd.clock.now - rnd.clock.start)
    assert all(g.rate == 0.0 for g in model.dropout_groups)  # the break closed the iterator
    with pytest.raises(RuntimeError, match="runs once"):
        rnd.batches(_loader(digits))


def test_discard_takes_a_batch_back(digits) -> None:
    """A batch whose update the loop skipped leaves c and the examples; its time stays."""
    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=2 * _full_round_rate(model), variability=1.0)
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=0)
    with rnd:
        for i, (x, y) in enumerate(rnd.batches(_loader(digits))):
            if i == 1:
                rnd.discard()
                break
    m = rnd.metrics()
    assert m[C.NUM_BATCHES] == 1 and rnd.num_examples == B and m[C.MACS] == rnd.steps[0].forward_macs
    assert m[C.SIM_TIME] == pytest.approx(rnd.steps[1].end - rnd.clock.start)  # both steps' time
    assert m[C.UTILISATION] == pytest.approx(step_macs(rnd.steps[0].forward_macs, B) / rnd.clock.result().available_macs)
    assert m[C.INCOMPLETE] == 5
    with pytest.raises(RuntimeError, match="no mini-batch to discard"):
        rnd.discard()


def test_uneven_batches_and_a_loader_of_unknown_length(digits) -> None:
    """A generator of batches of 5, 12 and 3 samples: the round needs round_samples, charges
    each step for its true size and ends at the planned samples."""
    x, y = digits.tensors

    def stream():
        i = 0
        for b in (5, 12, 3, 7):
            yield x[i:i + b], y[i:i + b]
            i += b

    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=1e12, variability=1.0)
    with pytest.raises(ValueError, match="round_samples"):
        DistrealRound(model, LUT.uniform(model), resources, device_id=0).batches(stream())
    rnd = DistrealRound(model, LUT.uniform(model), resources, device_id=0, round_samples=20, batch_size=8)
    seen = [int(xb.shape[0]) for xb, _ in rnd.batches(stream())]
    assert seen == [5, 12, 3]  # the 4th batch is beyond the round's 20 samples
    assert [s.batch_size for s in rnd.steps] == [5, 12, 3] and rnd.num_examples == 20
    assert rnd.clock.result().step_macs == tuple(step_macs(s.forward_macs, s.batch_size) for s in rnd.steps)
    # unlimited needs no plan: the full model on every batch of the stream
    free = DistrealRound(model, LUT.uniform(model), None, device_id=0)
    assert [int(xb.shape[0]) for xb, _ in free.batches(stream())] == [5, 12, 3, 7]
    m = free.metrics()
    assert m[C.MACS] == 4 * count_macs(model) and m[C.MEAN_DROPOUT] == 0.0 and m[C.STRAGGLER] == 0
    assert batch_len({"image": x[:4], "label": y[:4]}) == 4


def test_from_config_reads_the_train_config(digits) -> None:
    model = _model()
    lut = LUT.uniform(model)
    resources = ResourceModel("constant", deadline=T, r_max=_full_round_rate(model), variability=2.0, seed=1)
    config = {C.SERVER_ROUND: 3, "my-key": "kept"}
    rnd = DistrealRound.from_config(model, lut, config, resources=resources, device_id=4, policy="deadline")
    assert rnd.server_round == 3 and rnd.clock.start == 2 * T and rnd.config["my-key"] == "kept"
    free = DistrealRound.from_config(model, lut, {C.SERVER_ROUND: 2, C.UNLIMITED: True}, resources=resources, device_id=4)
    assert free.clock is None and free.deadline == math.inf
    for bad in ({C.SERVER_ROUND: 0}, {C.SERVER_ROUND: "2"}, {C.SERVER_ROUND: 1.5}):
        with pytest.raises(ValueError, match="server-round"):
            DistrealRound.from_config(model, lut, bad, resources=resources, device_id=4)
    with pytest.raises(TypeError, match="DroppableModel"):
        DistrealRound(_net(), lut, resources, device_id=0)
    with pytest.raises(ValueError, match="policy"):
        DistrealRound(model, lut, resources, device_id=0, policy="greedy")
    with pytest.raises(ValueError, match="device_id"):
        DistrealRound(model, lut, resources, device_id=-1)


def test_the_trainer_is_one_use_of_the_round(digits) -> None:
    """DistrealTrainer's fit equals its own step run by hand inside DistrealRound.batches."""
    model = _model()
    lut = LUT.uniform(model)
    resources = ResourceModel("timevarying", deadline=T, r_max=_full_round_rate(model), variability=4.0, lam=4.0, seed=3)
    trainer = DistrealTrainer(copy.deepcopy(model), _loader(digits), 2, lut, resources, policy="deadline", lr=0.1, seed=0)
    res = trainer.fit(get_weights(model), {C.SERVER_ROUND: 2})

    by_hand = copy.deepcopy(model)
    trainer.model = by_hand
    trainer.reseed(2)
    rnd = DistrealRound.from_config(
        by_hand, lut, {C.SERVER_ROUND: 2}, resources=resources, device_id=2, policy="deadline", lr=0.1, batch_size=B
    )
    step = trainer.local_step(2)
    for x, y in rnd.batches(_loader(digits)):
        rnd.record_loss(step(x, y, rnd.vector))
    assert rnd.metrics() == res.metrics and rnd.num_examples == res.num_examples
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(by_hand), res.arrays))


# ------------------------------------------------------------------------- the wall clock


def test_measured_round_stops_by_a_wall_clock_deadline(digits) -> None:
    """A fake clock advances by each step's true time (MACs over a fixed throughput): the round
    adapts the vectors to the deadline, ends before it and its reply passes the gate."""
    model = _model()
    start = get_weights(model)
    lut = LUT.uniform(model)
    full_round = sum(step_macs(count_macs(model), b) for b in batch_sizes(N, B))
    speed = full_round / 0.5  # the full round would take 0.5 s; the deadline is 0.3 s
    now = [100.0]
    rnd = MeasuredDistrealRound(
        model, lut, deadline=0.3, clock=lambda: now[0], device_id=0, policy="deadline", margin=0.05
    )
    for x, y in rnd.batches(_loader(digits)):
        F.cross_entropy(model(x), y).backward()
        now[0] += step_macs(rnd.forward_macs, int(x.shape[0])) / speed
        now[0] += 1e-4  # data loading
    m = rnd.metrics()
    assert m[C.NUM_BATCHES] >= 3 and m["wall_time"] <= 0.3 and m["overrun"] == 0.0
    assert m[C.STRAGGLER] == 0 and C.SIM_TIME not in m
    assert m[C.MACS] == sum(s.forward_macs for s in rnd.steps)
    assert m["throughput"] == pytest.approx(speed, rel=0.05)
    assert 0.5 < m[C.UTILISATION] <= 1.0
    assert all(g.rate == 0.0 for g in model.dropout_groups)
    gate = DistrealCore(full_macs_per_sample=float(count_macs(model)), batch_size=B)
    gate.broadcast(1, start)
    assert gate.check(_reply(model, rnd)).ok
    with pytest.raises(ValueError, match="round-deadline"):
        MeasuredDistrealRound.from_config(model, lut, {C.SERVER_ROUND: 1}, device_id=0)
    cfg = MeasuredDistrealRound.from_config(model, lut, {C.SERVER_ROUND: 1, C.ROUND_DEADLINE: 2.5}, device_id=0)
    assert cfg.round_seconds == 2.5


# ------------------------------------------------------------------------- the README example


def test_readme_example_runs() -> None:
    """The code of the README's "Your own training loop" section, as written there."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from flwr_distreal import LUT, DroppedWeightGuard
    from flwr_distreal.core.dropout import make_droppable
    from flwr_distreal.training.loop import DistrealRound
    from flwr_distreal.core.resources import size_resources

    # your model and your data
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    digits = load_digits()
    x = torch.tensor(digits.images[:256], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:256])
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

    model = make_droppable(net, torch.zeros(1, 1, 8, 8))  # DISTREAL's structured dropout, from the model
    lut = LUT.uniform(model)                              # or the LUT of a DSE (python -m flwr_distreal.dse)
    # the device's availability r(t): at r_max the full model just fits a round; 4x variability, time-varying
    sizing = size_resources(model, batch_size=32, samples_per_device=len(x), variability=4.0)
    resources = sizing.resource_model("timevarying", lam=2.0, seed=0)

    opt = DroppedWeightGuard(torch.optim.Adam(model.parameters(), lr=1e-3), model)  # dropped filters stay put
    for server_round in (1, 2, 3):
        rnd = DistrealRound(model, lut, resources, device_id=0, server_round=server_round, policy="deadline")
        for xb, yb in rnd.batches(loader):  # sets d = D[r(t)] on the model, counts MACs(d), stops at the deadline
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            loss.backward()
            opt.step()
            rnd.record_loss(loss)
        m = rnd.metrics()  # what the DISTREAL strategy needs: macs (c), num_batches, straggler, ...
        print(server_round, m["num_batches"], m["macs"], round(m["mean_dropout"], 2), m["straggler"])

        assert m["num_batches"] > 0 and m["straggler"] == 0
        assert m["macs"] == sum(count_macs(model, s.vector) for s in rnd.steps)


def test_readme_flower_client_example() -> None:
    """The README's NumPyClient over DistrealRound.from_config, fitted as the server would."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from flwr.client import NumPyClient
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from flwr_distreal import LUT, DroppedWeightGuard
    from flwr_distreal.core.dropout import make_droppable
    from flwr_distreal.training.loop import DistrealRound
    from flwr_distreal.core.resources import ResourceModel
    from flwr_distreal.training.trainers import get_weights, set_weights

    class MyClient(NumPyClient):
        def __init__(self, device_id: int, model, lut: LUT, loader: DataLoader, resources: ResourceModel) -> None:
            self.device_id, self.model, self.lut, self.loader, self.resources = device_id, model, lut, loader, resources

        def get_properties(self, config):
            return {"partition-id": self.device_id, "round-samples": len(self.loader.dataset)}

        def get_parameters(self, config):
            return get_weights(self.model)

        def fit(self, parameters, config):
            set_weights(self.model, parameters)
            rnd = DistrealRound.from_config(
                self.model, self.lut, config, resources=self.resources, device_id=self.device_id,
                policy="deadline", lr=1e-3,
            )
            opt = DroppedWeightGuard(torch.optim.Adam(self.model.parameters(), lr=rnd.lr), self.model)
            for xb, yb in rnd.batches(self.loader):
                opt.zero_grad()
                loss = F.cross_entropy(self.model(xb), yb, label_smoothing=0.1)
                loss.backward()
                opt.step()
                rnd.record_loss(loss)
            return get_weights(self.model), rnd.num_examples, rnd.metrics()

    digits = load_digits()
    x = torch.tensor(digits.images[:64], dtype=torch.float32).unsqueeze(1) / 16.0
    loader = DataLoader(TensorDataset(x, torch.tensor(digits.target[:64])), batch_size=16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    model = make_droppable(net, torch.zeros(1, 1, 8, 8))
    resources = ResourceModel("constant", deadline=1.0, r_max=1e9, variability=4.0)
    client = MyClient(7, model, LUT.uniform(model), loader, resources)
    start = client.get_parameters({})
    arrays, n, metrics = client.fit(start, {"server-round": 2})

    gate = DistrealCore(full_macs_per_sample=float(count_macs(model)), batch_size=16)
    gate.broadcast(2, start)
    gate.limit_round(2, {"7": (7, client.get_properties({})["round-samples"])})
    assert gate.check(Reply("7", 7, arrays, float(n), metrics)).ok
    assert n == 64 and metrics["partition-id"] == 7 and metrics["lr"] == 1e-3
