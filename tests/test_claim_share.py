"""No single reply carries more than a bounded share of a round's weight (issue 20, item 3).

The share cap (:func:`flwr_distreal.server.bounds.cap_shares`, ``share_bound``), the batch size the
server states in every train message, the ``num_batches`` bound from a reply's examples, through
the core and both APIs; honest heterogeneous rounds of the real resources model are not clipped."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.supercore.task_identity import TaskIdentity

from flwr_distreal.core import contract as C
from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy
from flwr_distreal.models import build_model
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.resources import size_resources
from flwr_distreal.server import (
    SHARE_BOUND,
    DistrealCore,
    Reply,
    RoundBounds,
    cap_shares,
    mac_weighted_update,
    share_limit,
)

from test_bounds import FULL, KEYS, _global, _honest, _metrics, _run  # noqa: E402  (tests/ is on sys.path)
from test_serverapp import FakeGrid  # noqa: E402
from test_strategy import FakeProxy  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "claim_share.py"
APIS = ["legacy", "message"]
#: Partition sizes of the digits preset (``+experiment=main_digits``: 20 devices, Dirichlet 1.0).
DIGITS_SIZES = [60, 59, 47, 49, 110, 95, 87, 68, 45, 79, 99, 94, 68, 39, 55, 63, 78, 64, 112, 67]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the ServerApp's task identity, which Flower sets in a real run."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _script():
    spec = importlib.util.spec_from_file_location("claim_share", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["claim_share"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# ------------------------------------------------------------------------ the pure rule


def test_share_limit_is_k_times_the_others_mean() -> None:
    assert share_limit(5, 4) == pytest.approx(0.5)
    assert share_limit(10, 4) == pytest.approx(4 / 13)
    assert share_limit(35, 4) == pytest.approx(4 / 38)
    assert share_limit(5, 2) == pytest.approx(2 / 6)  # 2 / (n + 1)
    assert share_limit(7, 1) == pytest.approx(1 / 7)  # k = 1: equal shares
    assert share_limit(1, 4) == 1.0
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n must"):
            share_limit(bad, 4)  # type: ignore[arg-type]
    for bad in (0.5, math.inf, math.nan, None, "4"):
        with pytest.raises(ValueError, match="share_bound"):
            share_limit(5, bad)  # type: ignore[arg-type]


def test_cap_shares_bounds_every_share_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 40))
        w = rng.lognormal(0.0, 1.5, size=n) * rng.choice([0.0, 1.0], size=n, p=[0.1, 0.9])
        if trial % 3 == 0:
            w[rng.integers(n)] = 10.0 ** rng.uniform(3, 15)  # one inflated claim
        if trial % 5 == 0:
            w[rng.integers(n)] = 10.0 ** rng.uniform(3, 15)  # and a second
        p = int(np.count_nonzero(w))
        k = float(rng.choice([1.0, 2.0, 4.0, 10.0]))
        if p < 2:
            continue
        limit = share_limit(p, k)
        out = cap_shares(w, limit)
        assert np.all(out <= w) and np.all(out >= 0)
        assert out.max() / out.sum() <= limit * (1 + 1e-9)
        changed = out < w
        if changed.any():  # one level: every capped weight equals tau, each at k x the others' mean
            tau = out[changed]
            assert np.allclose(tau, tau[0])
            assert tau[0] >= out[~changed].max(initial=0.0)
            assert tau[0] == pytest.approx(k * (out.sum() - tau[0]) / (p - 1), rel=1e-9)
        else:
            assert w.max() / w.sum() <= limit * (1 + 1e-12)
        np.testing.assert_array_equal(out[~changed], w[~changed])  # the others unchanged
        assert np.all(np.diff(out[np.argsort(w, kind="stable")]) >= -1e-9 * out.max())  # order kept


def test_cap_shares_one_inflated_claim() -> None:
    out = cap_shares([1.0, 2.0, 3.0, 2.0, 4e15], share_limit(5, 4))
    np.testing.assert_allclose(out, [1.0, 2.0, 3.0, 2.0, 4 * 2.0])  # 4 x the others' mean 2
    assert out[-1] / out.sum() == pytest.approx(0.5)
    np.testing.assert_array_equal(cap_shares([1.0, 2.0, 3.0], 0.5), [1.0, 2.0, 3.0])  # within: unchanged
    np.testing.assert_array_equal(cap_shares([0.0, 0.0, 5.0], 0.4), [0.0, 0.0, 5.0])  # one positive weight


@pytest.mark.parametrize(
    ("weights", "share", "match"),
    [([1.0, -1.0], 0.6, "non-negative"), ([1.0, math.nan], 0.6, "finite"), ([1.0, 1.0, 1.0], 0.2, "below 1/3"),
     ([1.0, 2.0], 1.5, "max_share"), ([1.0, 2.0], "x", "max_share")],
)
def test_cap_shares_refuses_bad_input(weights, share, match) -> None:
    with pytest.raises(ValueError, match=match):
        cap_shares(weights, share)


def test_round_bounds_refuses_a_bad_share_bound() -> None:
    for bad in (0.5, 0, math.inf, "2", True):
        with pytest.raises(ValueError, match="share_bound"):
            RoundBounds(share_bound=bad)  # type: ignore[arg-type]
    assert RoundBounds(share_bound=None).share_bound is None and SHARE_BOUND == 4.0


# ----------------------------------------------------- the share bound, without a batch size


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("honest", [4, 9, 34])
def test_one_inflated_claim_holds_at_most_k_over_n_plus_k_minus_1(api, honest) -> None:
    """Without a batch size the server cannot bound num_batches: 1e9 batches at the full model
    pass the per-reply check, the median bound clips them to 10 x the median, and the share cap
    to 4 x the others' mean: the attacker holds exactly share_limit(n, 4) = 4 / (n + 3) of the
    weight (50 %, 31 %, 10.5 % of 5, 10, 35 replies), where the median bound alone left it
    10 x median / (10 x median + honest)."""
    g = _global()
    rng = np.random.default_rng(honest)
    batches = rng.integers(2, 7, size=honest)
    spec = {
        d: (_honest(g, int(b), d), _metrics(int(b), int(b) * FULL * float(rng.uniform(0.3, 1.0)), d))
        for d, b in enumerate(batches)
    }
    spec[99] = (_honest(g, 4, 99), _metrics(1e9, 1e9 * FULL, 99))
    out, metrics, _ = _run(api, g, spec)
    n = honest + 1
    assert metrics["refused"] == 0 and metrics["accepted"] == n and metrics["clipped"] == 1
    claims = [float(spec[d][1][C.MACS]) for d in sorted(spec) if d != 99]
    attacker = SHARE_BOUND * sum(claims) / honest  # 4 x the others' mean
    assert attacker / (attacker + sum(claims)) == pytest.approx(share_limit(n, SHARE_BOUND))
    assert attacker / (attacker + sum(claims)) <= SHARE_BOUND / (n + SHARE_BOUND - 1) + 1e-12
    expected = mac_weighted_update(g, [spec[d][0] for d in sorted(spec)], claims + [attacker])
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-9)
    # the old rule, 10 x the median alone, left the attacker a larger share
    median = float(np.median(claims + [1e9 * FULL]))
    assert 10 * median / (10 * median + sum(claims)) > share_limit(n, SHARE_BOUND)


def test_share_bound_2_is_2_over_n_plus_1() -> None:
    g = _global()
    core = DistrealCore(full_macs_per_sample=FULL, bounds=RoundBounds(share_bound=2.0))
    core.broadcast(1, g)
    replies = [Reply(str(d), d, _honest(g, 4, d), 10, _metrics(4, device=d)) for d in range(4)]
    replies.append(Reply("9", 9, _honest(g, 4, 9), 10, _metrics(1e9, 1e9 * FULL, 9)))
    outcome = core.aggregate(1, replies)
    weights = {a.reply.node: a.macs for a in outcome.accepted}
    assert weights["9"] / sum(weights.values()) == pytest.approx(2 / (5 + 1))
    assert outcome.accepted[-1].clipped == ("outlier-claim", "excess-share")


def test_two_inflated_claims_each_capped() -> None:
    """Two inflated claims: the median bound and the cap hold each to the same level, k x the
    mean of the others (the other attacker included), so each holds at most k / (n + k - 1)."""
    g = _global()
    core = DistrealCore(full_macs_per_sample=FULL)
    core.broadcast(1, g)
    replies = [Reply(str(d), d, _honest(g, 4, d), 10, _metrics(4, device=d)) for d in range(8)]
    replies += [Reply(str(d), d, _honest(g, 4, d), 10, _metrics(1e9, 1e9 * FULL, d)) for d in (90, 91)]
    outcome = core.aggregate(1, replies)
    weights = {a.reply.node: float(a.macs) for a in outcome.accepted}
    total = sum(weights.values())
    assert weights["90"] == weights["91"] and weights["90"] / total <= share_limit(10, SHARE_BOUND) + 1e-12


# -------------------------------------------------------------------- with a batch size


@pytest.mark.parametrize("api", APIS)
def test_train_message_states_the_batch_size(api) -> None:
    """With batch_size, every train message's config carries batch-size and local-epochs (the
    contract's keys); without it, neither."""
    g = _global()
    for kwargs, expected in (({"batch_size": 16, "local_epochs": 2}, {C.BATCH_SIZE: 16, C.LOCAL_EPOCHS: 2}), ({}, {})):
        if api == "message":
            strat = serverapp.Distreal(
                full_macs_per_sample=FULL, min_train_nodes=1, min_available_nodes=1, fraction_train=1.0, **kwargs
            )
            grid = FakeGrid({100 + d: d for d in range(3)})
            record = ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(KEYS, g)})
            configs = [dict(m.content[C.CONFIG_RECORD]) for m in strat.configure_train(1, record, ConfigRecord(), grid)]
        else:
            strat = strategy.Distreal(
                full_macs_per_sample=FULL, min_fit_clients=1, min_available_clients=1, fraction_fit=1.0,
                fraction_evaluate=0.0, **kwargs,
            )
            manager = SimpleClientManager()
            for d in range(3):
                manager.register(FakeProxy(str(100 + d), {C.PARTITION_ID: d, C.ROUND_SAMPLES: 100}))
            configs = [dict(ins.config) for _, ins in strat.configure_fit(1, ndarrays_to_parameters(g), manager)]
        assert len(configs) == 3
        for config in configs:
            assert config[C.SERVER_ROUND] == 1
            assert {k: config[k] for k in (C.BATCH_SIZE, C.LOCAL_EPOCHS) if k in config} == expected


@pytest.mark.parametrize("api", APIS)
def test_with_batch_size_the_inflated_reply_is_refused_or_clipped(api) -> None:
    """With the batch size the node's round-samples (160, batches of 32: at most 5) bound
    num_batches: the 1e9-batch reply is refused (share 0, the model is the honest mean), or with
    on_excess="clip" weighted by at most 5 x full MACs."""
    g = _global()
    spec = {d: (_honest(g, 4, d), _metrics(4, device=d)) for d in range(4)}
    spec[99] = (_honest(g, 4, 99), _metrics(1e9, 1e9 * FULL, 99))
    out, metrics, _ = _run(api, g, spec, samples=160, batch_size=32)
    assert metrics["refused"] == 1 and metrics["accepted"] == 4
    honest = mac_weighted_update(g, [spec[d][0] for d in range(4)], [4 * FULL] * 4)
    for o, e in zip(out, honest):
        np.testing.assert_array_equal(o, e)
    out, metrics, _ = _run(api, g, spec, samples=160, batch_size=32, on_excess="clip")
    assert metrics["refused"] == 0 and metrics["clipped"] == 1
    expected = mac_weighted_update(g, [spec[d][0] for d in sorted(spec)], [4 * FULL] * 4 + [5 * FULL])
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-9)


def test_without_round_samples_the_examples_bound_num_batches() -> None:
    """A node without round-samples (a ClientApp without a query handler): with the batch size,
    the reply's own examples bound num_batches, local_epochs x (floor(examples / batch) + 1),
    whether the examples count one epoch or all; without a batch size, no such bound."""
    g = _global()
    core = DistrealCore(full_macs_per_sample=FULL, batch_size=32, local_epochs=2)
    core.broadcast(1, g)
    arrays = _honest(g, 4, 0)
    honest_per_epoch = Reply("1", 1, arrays, 100, _metrics(8))  # 2 epochs x ceil(100 / 32) = 8
    honest_total = Reply("2", 2, arrays, 200, _metrics(8))  # the same round, examples of both epochs
    assert core.limit_of(honest_per_epoch) == (8, "100 examples in batches of at most 32, 2 local epochs")
    assert core.check(honest_per_epoch).ok and not core.check(honest_per_epoch).clipped
    assert core.check(honest_total).ok and not core.check(honest_total).clipped
    inflated = Reply("3", 3, arrays, 100, _metrics(1e9, 1e9 * FULL))
    result = core.check(inflated)
    assert not result.ok and result.reason.value == "excess-batches" and "100 examples" in result.message
    assert core.work_of(inflated) == 8.0
    clip = DistrealCore(full_macs_per_sample=FULL, batch_size=32, local_epochs=2, on_excess="clip")
    clip.broadcast(1, g)
    result = clip.check(inflated)
    assert result.ok and result.clipped and result.macs == 8 * FULL
    unknown = Reply("4", 4, arrays, 0, _metrics(1e9, 1e9 * FULL))  # no example count: no such bound
    assert core.limit_of(unknown) is None and core.check(unknown).ok
    assert DistrealCore(full_macs_per_sample=FULL).limit_of(inflated) is None


def test_with_batch_size_examples_inflated_too_the_share_cap_holds() -> None:
    """An attacker that inflates its examples with its batches passes the examples bound; the
    share cap still holds it to 4 / (n + 3)."""
    g = _global()
    core = DistrealCore(full_macs_per_sample=FULL, batch_size=32)
    core.broadcast(1, g)
    replies = [Reply(str(d), d, _honest(g, 4, d), 128, _metrics(4, device=d)) for d in range(9)]
    replies.append(Reply("99", 99, _honest(g, 4, 99), 32e9, _metrics(1e9, 1e9 * FULL, 99)))
    outcome = core.aggregate(1, replies)
    weights = {a.reply.node: float(a.macs) for a in outcome.accepted}
    assert outcome.metrics["refused"] == 0
    assert weights["99"] / sum(weights.values()) == pytest.approx(share_limit(10, SHARE_BOUND))


# --------------------------------------------------------------- honest heterogeneous rounds


@pytest.fixture(scope="module")
def digits_devices():
    """The digits preset's devices without its data: femnist_cnn (10 classes) with the shipped
    LUT, the partition sizes, time-varying availability at lambda = 2 (variability 3), every
    device's r_max from its own samples, as :class:`flwr_distreal.run.experiment.Experiment` sizes them."""
    cs = _script()
    model = build_model("femnist_cnn", 10)
    sizing = size_resources(model, 32, DIGITS_SIZES, variability=3.0)
    return cs, cs.Devices(
        sizes=list(DIGITS_SIZES),
        r_max=list(sizing.r_max_per_device),
        resources=sizing.resource_model("timevarying", lam=2.0, seed=0),
        lut=LUT.learned(model),
        batch_size=32,
        local_epochs=1,
        policy="deadline",
        stop_at_deadline=True,
        step_macs_factor=3.0,
        full_macs=float(sizing.full_macs_per_sample),
    )


@pytest.mark.parametrize("n", [5, 10])
def test_honest_heterogeneous_rounds_are_not_clipped(digits_devices, n) -> None:
    """Honest rounds of the real resources model (time-varying, lambda = 2; devices doing 0.3x to
    1x of the full model's MACs per batch on 39 to 112 samples): no honest claim is clipped at
    the default bounds in 150 rounds, while k = 2 clips some (the trade-off is real, and this
    test could fail)."""
    cs, devices = digits_devices
    rounds = cs.honest_rounds(devices, n, 150, seed=0)
    lut_range = devices.lut.min_macs / devices.full_macs
    assert 0.25 < lut_range < 0.35
    per_batch = [r.macs / (r.batches * devices.full_macs) for rnd in rounds for r in rnd]
    assert min(per_batch) < 0.5 and max(per_batch) > 0.9  # heterogeneous: weak and (nearly) full devices
    assert max(cs.max_ratio_to_others([r.macs for r in rnd]) for rnd in rounds) > 2.0
    for rnd in rounds:
        assert not any(cs.claim_clips([float(r.macs) for r in rnd], share_bound=SHARE_BOUND)), rnd
    rates = cs.false_clip_rates(rounds, (2.0, SHARE_BOUND))
    assert rates[SHARE_BOUND] == (0.0, 0.0, 0.0)
    assert rates[2.0][0] > 0.0
