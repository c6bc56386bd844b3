"""Tests for flwr_distreal.flower.legacy.strategy: Distreal (Algorithm 2) and the baseline strategies."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy.aggregate import aggregate as flwr_aggregate

from flwr_distreal.server.aggregate import mac_weighted_update, masked_average
from flwr_distreal.flower.legacy.client_manager import SeededClientManager
from flwr_distreal.core.dropout import kept_count, parameter_masks
from flwr_distreal.core.macs import count_macs, macs_of_counts
from flwr_distreal.models import build_model
from flwr_distreal.flower.legacy.strategy import (
    Distreal,
    FederatedDropout,
    FullResources,
    HeteroFL,
    SmallNetwork,
    decode_subsets,
    encode_subsets,
    fit_metrics_aggregation,
    make_evaluate_fn,
)

from conftest import FakeProxy

MODEL = "femnist_cnn"
FULL_MACS = 4_015_616  # forward MACs per sample of femnist_cnn
T = 10.0  # round duration
ROUND_SAMPLES = 100
# availability at which the full model's round takes exactly T
R_FULL = 3.0 * ROUND_SAMPLES * FULL_MACS / T


def _global_arrays(seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return [v.detach().numpy().copy() for v in build_model(MODEL).state_dict().values()]


def _perturbed(arrays: list[np.ndarray], scale: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (a + scale * rng.normal(size=a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a.copy()
        for a in arrays
    ]


def _fit_res(arrays: list[np.ndarray], num_examples: int = 10, **metrics: Scalar) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, dict(metrics))


def _manager(proxies: list[ClientProxy]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    return manager


def _distreal(**kw) -> Distreal:
    kw.setdefault("full_macs_per_sample", FULL_MACS)
    kw.setdefault("min_fit_clients", 1)
    kw.setdefault("min_available_clients", 1)
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("min_evaluate_clients", 1)
    return Distreal(**kw)


def _broadcast(strategy, arrays, proxies, server_round: int = 1):
    return strategy.configure_fit(server_round, ndarrays_to_parameters(arrays), _manager(proxies))


# ---------------------------------------------------------------------------- Distreal


def test_distreal_aggregates_algorithm2_against_broadcast_model() -> None:
    g = _global_arrays()
    proxies = [FakeProxy("a"), FakeProxy("b"), FakeProxy("c")]
    strategy = _distreal()
    _broadcast(strategy, g, proxies)
    clients = [_perturbed(g, 0.1, s) for s in range(3)]
    macs = [10 * FULL_MACS, 4 * FULL_MACS, 1 * FULL_MACS]
    results = [
        (p, _fit_res(c, macs=m, num_batches=10, straggler=False, available_macs=2.0 * m))
        for p, c, m in zip(proxies, clients, macs)
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    out = parameters_to_ndarrays(params)
    expected = mac_weighted_update(g, clients, macs)
    for o, e, ref in zip(out, expected, g):
        assert o.dtype == ref.dtype
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    # hand check on one entry: weights 10:4:1
    w = np.array(macs, float) / sum(macs)
    manual = g[0].astype(np.float64) + sum(wi * (c[0] - g[0]) for wi, c in zip(w, clients))
    np.testing.assert_allclose(out[0], manual, rtol=1e-5, atol=1e-6)
    assert metrics["accepted"] == 3 and metrics["stragglers"] == 0 and metrics["refused"] == 0
    assert metrics["mean_macs"] == pytest.approx(np.mean(macs))
    assert metrics["mean_utilisation"] == pytest.approx(0.5)


def test_distreal_equal_macs_equals_flower_fedavg() -> None:
    g = _global_arrays()
    proxies = [FakeProxy(str(i)) for i in range(4)]
    strategy = _distreal()
    _broadcast(strategy, g, proxies)
    clients = [_perturbed(g, 0.05, 10 + i) for i in range(4)]
    results = [
        (p, _fit_res(c, num_examples=n, macs=3 * FULL_MACS, num_batches=3))
        for p, c, n in zip(proxies, clients, [5, 50, 7, 100])
    ]
    out = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    fedavg = flwr_aggregate([(c, 1) for c in clients])
    for o, f in zip(out, fedavg):
        np.testing.assert_allclose(o, f, rtol=1e-5, atol=1e-6)


def test_distreal_discards_stragglers() -> None:
    g = _global_arrays()
    proxies = [FakeProxy("ok"), FakeProxy("late"), FakeProxy("late2")]
    strategy = _distreal()
    _broadcast(strategy, g, proxies)
    good = _perturbed(g, 0.1, 1)
    results = [
        (proxies[0], _fit_res(good, macs=FULL_MACS, num_batches=1, straggler=False)),
        (proxies[1], _fit_res(_perturbed(g, 100.0, 2), macs=FULL_MACS, num_batches=1, straggler=True)),
        (proxies[2], _fit_res(_perturbed(g, 100.0, 3), macs=FULL_MACS, num_batches=1, straggler=1)),
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    for o, e in zip(parameters_to_ndarrays(params), good):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    assert metrics["stragglers"] == 2 and metrics["accepted"] == 1 and metrics["received"] == 3


@pytest.mark.parametrize(
    ("metrics", "arrays_fn", "reason"),
    [
        ({"num_batches": 2}, None, "missing-macs"),
        ({"macs": -1.0, "num_batches": 2}, None, "negative-macs"),
        ({"macs": math.nan, "num_batches": 2}, None, "non-finite-macs"),
        ({"macs": math.inf, "num_batches": 2}, None, "non-finite-macs"),
        ({"macs": "lots", "num_batches": 2}, None, "non-numeric-macs"),
        ({"macs": 2 * FULL_MACS + 1, "num_batches": 2}, None, "excess-macs"),
        ({"macs": FULL_MACS}, None, "missing-num-batches"),
        ({"macs": FULL_MACS, "num_batches": 2}, lambda g: g[:-1], "wrong-array-count"),
        ({"macs": FULL_MACS, "num_batches": 2}, lambda g: [g[0].T] + g[1:], "wrong-shape"),
        (
            {"macs": FULL_MACS, "num_batches": 2},
            lambda g: [np.where(np.arange(g[0].size).reshape(g[0].shape) == 3, np.nan, g[0])] + g[1:],
            "non-finite-arrays",
        ),
    ],
)
def test_distreal_refuses_bad_replies(metrics, arrays_fn, reason, caplog) -> None:
    g = _global_arrays()
    good_proxy, bad_proxy = FakeProxy("good"), FakeProxy("bad")
    strategy = _distreal()
    _broadcast(strategy, g, [good_proxy, bad_proxy])
    good = _perturbed(g, 0.1, 5)
    bad = _perturbed(g, 50.0, 6)
    if arrays_fn is not None:
        bad = arrays_fn(bad)
    results = [
        (good_proxy, _fit_res(good, macs=FULL_MACS, num_batches=1)),
        (bad_proxy, _fit_res(bad, **metrics)),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.flower.legacy.strategy"):
        params, out_metrics = strategy.aggregate_fit(1, results, [])
    assert out_metrics["refused"] == 1 and out_metrics["accepted"] == 1
    for o, e in zip(parameters_to_ndarrays(params), good):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    refusal_logs = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusal_logs) == 1 and reason in refusal_logs[0] and "bad" in refusal_logs[0]


def test_distreal_clips_excess_macs_when_asked() -> None:
    g = _global_arrays()
    proxies = [FakeProxy("honest"), FakeProxy("greedy")]
    strategy = _distreal(on_excess="clip")
    _broadcast(strategy, g, proxies)
    honest, greedy = _perturbed(g, 0.1, 7), _perturbed(g, 0.1, 8)
    results = [
        (proxies[0], _fit_res(honest, macs=FULL_MACS, num_batches=1)),
        (proxies[1], _fit_res(greedy, macs=1e15, num_batches=1)),  # clipped to 1 * FULL_MACS
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    expected = mac_weighted_update(g, [honest, greedy], [FULL_MACS, FULL_MACS])
    for o, e in zip(parameters_to_ndarrays(params), expected):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    assert metrics["refused"] == 0 and metrics["accepted"] == 2


def test_distreal_tolerates_failures_unless_told_not_to() -> None:
    g = _global_arrays()
    proxies = [FakeProxy("a"), FakeProxy("b")]
    strategy = _distreal()
    _broadcast(strategy, g, proxies)
    update = _perturbed(g, 0.1, 9)
    results = [(proxies[0], _fit_res(update, macs=FULL_MACS, num_batches=1))]
    failures: list = [RuntimeError("client crashed"), (proxies[1], _fit_res(g, 0))]
    params, metrics = strategy.aggregate_fit(1, results, failures)
    assert metrics["failures"] == 2 and metrics["accepted"] == 1
    for o, e in zip(parameters_to_ndarrays(params), update):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)

    strict = _distreal(accept_failures=False)
    _broadcast(strict, g, proxies)
    params, metrics = strict.aggregate_fit(1, results, failures)
    assert params is None and metrics["failures"] == 2


def test_distreal_keeps_global_when_nothing_valid(caplog) -> None:
    g = _global_arrays()
    proxies = [FakeProxy("a"), FakeProxy("b"), FakeProxy("c")]
    strategy = _distreal()
    _broadcast(strategy, g, proxies)
    results = [
        (proxies[0], _fit_res(_perturbed(g, 1, 1), macs=-5, num_batches=1)),
        (proxies[1], _fit_res(_perturbed(g, 1, 2), macs=FULL_MACS, num_batches=1, straggler=True)),
        (proxies[2], _fit_res(_perturbed(g, 1, 3), macs=0, num_batches=1)),  # valid but zero weight
    ]
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.flower.legacy.strategy"):
        params, metrics = strategy.aggregate_fit(1, results, [])
    for o, e in zip(parameters_to_ndarrays(params), g):
        np.testing.assert_array_equal(o, e)
    assert metrics["refused"] == 1 and metrics["stragglers"] == 1
    assert any("keeping the previous global model" in r.getMessage() for r in caplog.records)
    # and with no results at all
    params, metrics = strategy.aggregate_fit(1, [], [RuntimeError("x")])
    for o, e in zip(parameters_to_ndarrays(params), g):
        np.testing.assert_array_equal(o, e)


def test_distreal_needs_configure_fit_first() -> None:
    with pytest.raises(RuntimeError, match="configure_fit"):
        _distreal().aggregate_fit(1, [], [])


def test_distreal_configure_fit_adds_round_and_keeps_user_config() -> None:
    strategy = _distreal(on_fit_config_fn=lambda r: {"lr": 0.1, "epochs": 1})
    proxies = [FakeProxy("a"), FakeProxy("b")]
    pairs = _broadcast(strategy, _global_arrays(), proxies, server_round=4)
    assert len(pairs) == 2
    for _, fit_ins in pairs:
        assert fit_ins.config == {"lr": 0.1, "epochs": 1, "server-round": 4}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"full_macs_per_sample": 0}, "full_macs_per_sample"),
        ({"full_macs_per_sample": math.nan}, "full_macs_per_sample"),
        ({"full_macs_per_sample": "4M"}, "full_macs_per_sample"),
        ({"on_excess": "ignore"}, "on_excess"),
        ({"macs_key": ""}, "macs_key"),
        ({"min_fit_clients": 5, "min_available_clients": 2}, "min_fit_clients"),
        (
            {"min_evaluate_clients": 3, "min_available_clients": 2, "fraction_evaluate": 0.5},
            "min_evaluate_clients",
        ),
    ],
)
def test_distreal_constructor_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _distreal(**kwargs)


def test_distreal_custom_metric_keys() -> None:
    g = _global_arrays()
    proxies = [FakeProxy("a"), FakeProxy("b")]
    strategy = _distreal(macs_key="c", num_batches_key="B", straggler_key="late")
    _broadcast(strategy, g, proxies)
    a, b = _perturbed(g, 0.1, 1), _perturbed(g, 0.1, 2)
    results = [
        (proxies[0], _fit_res(a, c=3.0, B=1)),
        (proxies[1], _fit_res(b, c=1.0, B=1, late=True)),
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["stragglers"] == 1 and metrics["accepted"] == 1


# --------------------------------------------------------------- FedAvg-type baselines


def test_full_resources_tells_clients_unlimited_and_is_fedavg() -> None:
    g = _global_arrays()
    proxies = [FakeProxy(str(i)) for i in range(3)]
    strategy = FullResources(min_fit_clients=3, min_available_clients=3, min_evaluate_clients=3)
    pairs = _broadcast(strategy, g, proxies, server_round=2)
    assert all(fi.config["unlimited"] is True and fi.config["server-round"] == 2 for _, fi in pairs)
    clients = [_perturbed(g, 0.1, 20 + i) for i in range(3)]
    n = [3, 30, 300]
    results = [(p, _fit_res(c, num_examples=k)) for p, c, k in zip(proxies, clients, n)]
    out = parameters_to_ndarrays(strategy.aggregate_fit(2, results, [])[0])
    for o, f in zip(out, flwr_aggregate(list(zip(clients, n)))):
        np.testing.assert_allclose(o, f, rtol=1e-5, atol=1e-6)


def test_small_network_drops_stragglers_and_refuses_bad_arrays() -> None:
    g = [v.detach().numpy().copy() for v in build_model("femnist_cnn_small").state_dict().values()]
    proxies = [FakeProxy(str(i)) for i in range(3)]
    strategy = SmallNetwork(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0)
    pairs = _broadcast(strategy, g, proxies)
    assert all("unlimited" not in fi.config for _, fi in pairs)
    good = _perturbed(g, 0.1, 1)
    results = [
        (proxies[0], _fit_res(good, num_examples=7, straggler=False)),
        (proxies[1], _fit_res(_perturbed(g, 9.0, 2), num_examples=7, straggler=True)),
        (proxies[2], _fit_res(_global_arrays(), num_examples=7)),  # full-size model: wrong shapes
    ]
    params, metrics = strategy.aggregate_fit(1, results, [])
    for o, e in zip(parameters_to_ndarrays(params), good):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    assert metrics["stragglers"] == 1 and metrics["refused"] == 1 and metrics["accepted"] == 1


# ------------------------------------------------------------------ submodel baselines


def _train_submodel(global_arrays, fixed_subsets: str, seed: int) -> list[np.ndarray]:
    """What a fixed-submodel client does: load, fix the subset, train two SGD steps, return."""
    torch.manual_seed(seed)
    model = build_model(MODEL)
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in zip(keys, global_arrays)})
    model.set_fixed_subsets(decode_subsets(fixed_subsets, model.layer_widths))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(8, 1, 28, 28)
        y = torch.randint(0, 62, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def _submodel_strategy(cls, availability, **kw):
    kw.setdefault("min_fit_clients", 1)
    kw.setdefault("min_available_clients", 1)
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("min_evaluate_clients", 1)
    return cls(model_name=MODEL, availability_fn=availability, round_duration=T, **kw)


def _device_proxies(n: int, samples: int = ROUND_SAMPLES) -> list[FakeProxy]:
    return [FakeProxy(str(9000 + i), {"partition-id": i, "round-samples": samples}) for i in range(n)]


def test_federated_dropout_rate_from_availability_at_round_start() -> None:
    calls: list[tuple[int, float]] = []

    def availability(device: int, t: float) -> float:
        calls.append((device, t))
        return R_FULL if device == 0 else (R_FULL * 0.6 if device == 1 else R_FULL * 0.01)

    proxies = _device_proxies(3)
    strategy = _submodel_strategy(FederatedDropout, availability)
    pairs = _broadcast(strategy, _global_arrays(), proxies, server_round=3)
    assert sorted(calls) == [(0, 2 * T), (1, 2 * T), (2, 2 * T)]  # round 3 starts at 2T
    by_device = {fi.config["device-id"]: fi.config for _, fi in pairs}
    assert by_device[0]["dropout-rate"] == 0.0
    assert json.loads(by_device[0]["fixed-subsets"]) == [None, None]
    assert by_device[0]["submodel-macs"] == FULL_MACS
    # device 1 can afford 60 % of the full model: the lowest uniform rate that fits
    rate1 = by_device[1]["dropout-rate"]
    assert 0.0 < rate1 < 0.5
    model = build_model(MODEL)
    assert count_macs(model, [rate1, rate1]) <= 0.6 * FULL_MACS < count_macs(model, [rate1 - 0.01] * 2)
    subsets = decode_subsets(by_device[1]["fixed-subsets"], [32, 64])
    assert [len(s) for s in subsets] == [kept_count(rate1, 32), kept_count(rate1, 64)]
    assert by_device[1]["submodel-macs"] == count_macs(model, [rate1, rate1])
    # device 2 cannot afford even rate 0.5: it gets the cheapest and will straggle
    assert by_device[2]["dropout-rate"] == 0.5
    assert all(fi.config["server-round"] == 3 for _, fi in pairs)


def test_federated_dropout_subsets_seeded_per_round_and_device() -> None:
    def availability(device: int, t: float) -> float:
        return 0.5 * R_FULL

    proxies = _device_proxies(2)
    a = _submodel_strategy(FederatedDropout, availability, seed=1)
    b = _submodel_strategy(FederatedDropout, availability, seed=1)
    g = _global_arrays()
    sub = lambda pairs: {fi.config["device-id"]: fi.config["fixed-subsets"] for _, fi in pairs}  # noqa: E731
    r1a, r1b = sub(_broadcast(a, g, proxies, 1)), sub(_broadcast(b, g, proxies, 1))
    r2a = sub(_broadcast(a, g, proxies, 2))
    assert r1a == r1b  # reproducible
    assert r1a[0] != r1a[1]  # differs between devices
    assert r1a[0] != r2a[0]  # and between rounds
    c = _submodel_strategy(FederatedDropout, availability, seed=2)
    assert sub(_broadcast(c, g, proxies, 1))[0] != r1a[0]


def test_federated_dropout_asks_properties_once_per_proxy_and_skips_unknown() -> None:
    proxies = _device_proxies(2) + [FakeProxy("dead", fail=True), FakeProxy("mute", {"partition-id": 7})]
    strategy = _submodel_strategy(FederatedDropout, lambda d, t: R_FULL)
    g = _global_arrays()
    pairs = _broadcast(strategy, g, proxies, 1)
    assert sorted(p.cid for p, _ in pairs) == ["9000", "9001"]  # no device id / round samples
    _broadcast(strategy, g, proxies, 2)
    assert [p.property_calls for p in proxies[:2]] == [1, 1]  # cached after round 1
    assert proxies[2].property_calls == 2  # failed look-ups are retried next round


def test_federated_dropout_end_to_end_per_weight_averaging() -> None:
    levels = {0: 0.7, 1: 0.45, 2: 0.35}
    proxies = _device_proxies(3)
    strategy = _submodel_strategy(FederatedDropout, lambda d, t: levels[d] * R_FULL, seed=3)
    g = _global_arrays()
    pairs = _broadcast(strategy, g, proxies, 1)
    assert {fi.config["dropout-rate"] for _, fi in pairs} != {0.0}
    model = build_model(MODEL)
    keys = list(model.state_dict().keys())
    results, trained, masks = [], [], []
    for i, (proxy, fit_ins) in enumerate(pairs):
        arrays = _train_submodel(g, fit_ins.config["fixed-subsets"], seed=i)
        kept = decode_subsets(fit_ins.config["fixed-subsets"], model.layer_widths)
        mask_by_key = parameter_masks(model, kept)
        mask = [mask_by_key[k] for k in keys]
        # the client really left everything outside its submodel untouched
        for a, ga, m in zip(arrays, g, mask):
            np.testing.assert_array_equal(a[~m], ga[~m])
        trained.append(arrays)
        masks.append(mask)
        results.append(
            (proxy, _fit_res(arrays, num_examples=10 + i, **{"partition-id": fit_ins.config["device-id"]}))
        )
    params, metrics = strategy.aggregate_fit(1, results, [])
    out = parameters_to_ndarrays(params)
    expected = masked_average(g, trained, masks, [10, 11, 12])
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)
    conv1_w = keys.index("conv1.weight")
    nobody = ~(masks[0][conv1_w] | masks[1][conv1_w] | masks[2][conv1_w])
    assert nobody.any()  # some filter was dropped by every client ...
    np.testing.assert_array_equal(out[conv1_w][nobody], g[conv1_w][nobody])  # ... and kept its value
    assert not np.allclose(out[conv1_w][~nobody], g[conv1_w][~nobody])
    assert metrics["accepted"] == 3


def test_submodel_strategy_refuses_mismatched_or_unassigned_replies(caplog) -> None:
    proxies = _device_proxies(2)
    strategy = _submodel_strategy(FederatedDropout, lambda d, t: R_FULL)
    g = _global_arrays()
    _broadcast(strategy, g, proxies[:1], 1)  # only device 0 selected
    good = _perturbed(g, 0.1, 1)
    results = [
        (proxies[0], _fit_res(good, **{"partition-id": 0})),
        (proxies[1], _fit_res(_perturbed(g, 5.0, 2), **{"partition-id": 1})),  # never assigned
    ]
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.flower.legacy.strategy"):
        params, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["refused"] == 1 and "unassigned-client" in caplog.text
    for o, e in zip(parameters_to_ndarrays(params), good):
        np.testing.assert_allclose(o, e, rtol=1e-6, atol=1e-7)

    caplog.clear()
    _broadcast(strategy, g, proxies[:1], 2)
    lying = [(proxies[0], _fit_res(good, **{"partition-id": 5}))]
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.flower.legacy.strategy"):
        params, metrics = strategy.aggregate_fit(2, lying, [])
    assert metrics["refused"] == 1 and "device-mismatch" in caplog.text
    for o, e in zip(parameters_to_ndarrays(params), g):
        np.testing.assert_array_equal(o, e)


def test_submodel_strategy_with_explicit_device_functions() -> None:
    proxies = [FakeProxy("17"), FakeProxy("18")]
    strategy = _submodel_strategy(
        HeteroFL,
        lambda d, t: R_FULL if d == 17 else 0.3 * R_FULL,  # 0.3 x 4.02 M fits level 3 (1.20 M)
        device_id_fn=lambda proxy: int(proxy.cid),
        round_samples_fn=lambda device: ROUND_SAMPLES,
    )
    pairs = _broadcast(strategy, _global_arrays(), proxies, 1)
    assert {fi.config["device-id"]: fi.config["width-level"] for _, fi in pairs} == {17: 1, 18: 3}
    assert all(p.property_calls == 0 for p in proxies)


def test_heterofl_levels_and_first_channels() -> None:
    strategy = _submodel_strategy(HeteroFL, lambda d, t: R_FULL)
    assert strategy.level_counts == [[32, 64], [23, 45], [16, 32], [11, 22], [8, 16]]
    model = build_model(MODEL)
    assert strategy.level_macs == [macs_of_counts(model, c) for c in strategy.level_counts]
    assert strategy.level_macs[0] == FULL_MACS
    assert strategy.level_for_budget(FULL_MACS) == 1
    assert strategy.level_for_budget(FULL_MACS - 1) == 2
    assert strategy.level_for_budget(strategy.level_macs[2]) == 3
    assert strategy.level_for_budget(0) == 5  # nothing fits: narrowest

    fractions = {0: 1.0, 1: 0.6, 2: 0.2, 3: 0.05}
    proxies = _device_proxies(4)
    strategy = _submodel_strategy(HeteroFL, lambda d, t: fractions[d] * R_FULL)
    pairs = _broadcast(strategy, _global_arrays(), proxies, 1)
    by_device = {fi.config["device-id"]: fi.config for _, fi in pairs}
    assert {d: c["width-level"] for d, c in by_device.items()} == {0: 1, 1: 2, 2: 4, 3: 5}
    assert by_device[1]["width"] == pytest.approx(0.7)
    assert json.loads(by_device[1]["fixed-subsets"]) == [list(range(23)), list(range(45))]
    assert by_device[1]["submodel-macs"] == strategy.level_macs[1]


def test_heterofl_end_to_end_keeps_unused_channels() -> None:
    fractions = {0: 0.6, 1: 0.35}  # levels 2 and 3
    proxies = _device_proxies(2)
    strategy = _submodel_strategy(HeteroFL, lambda d, t: fractions[d] * R_FULL)
    g = _global_arrays()
    pairs = _broadcast(strategy, g, proxies, 1)
    results, trained = [], {}
    for i, (proxy, fit_ins) in enumerate(pairs):
        arrays = _train_submodel(g, fit_ins.config["fixed-subsets"], seed=i)
        trained[fit_ins.config["width-level"]] = arrays
        results.append((proxy, _fit_res(arrays, num_examples=20)))
    out = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    keys = list(build_model(MODEL).state_dict().keys())
    w = out[keys.index("conv1.weight")]
    g1 = g[keys.index("conv1.weight")]
    np.testing.assert_array_equal(w[23:], g1[23:])  # beyond the widest level: untouched
    # filters 16..22 trained by level 2 only: its value; 0..15 by both: the mean
    l2, l3 = trained[2][keys.index("conv1.weight")], trained[3][keys.index("conv1.weight")]
    np.testing.assert_allclose(w[16:23], l2[16:23], rtol=1e-6)
    np.testing.assert_allclose(w[:16], (l2[:16] + l3[:16]) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (HeteroFL, {"shrink": 1.0}, "shrink"),
        (HeteroFL, {"levels": 0}, "levels"),
        (FederatedDropout, {"rates": [0.1, 0.7]}, "rates"),
        (FederatedDropout, {"round_duration": 0.0}, "round_duration"),
        (FederatedDropout, {"model_name": "no_such_net"}, "unknown model"),
    ],
)
def test_submodel_constructor_errors(cls, kwargs, match) -> None:
    base = {"model_name": MODEL, "availability_fn": lambda d, t: 1.0, "round_duration": T}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cls(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0, **base)


# ------------------------------------------------------------------------------ helpers


def test_subsets_codec_roundtrip_and_errors() -> None:
    text = encode_subsets([torch.tensor([3, 1]), None, np.array([0])])
    assert json.loads(text) == [[3, 1], None, [0]]
    decoded = decode_subsets(text, [4, 2, 1])
    assert decoded[0].tolist() == [1, 3] and decoded[1] is None and decoded[2].tolist() == [0]
    for bad, match in [
        ("not json", "JSON"),
        ("[null]", "2 layers"),
        ("[[], null]", "non-empty"),
        ("[[0, 0], null]", "repeated"),
        ("[[4], null]", "out-of-range"),
        ('[["a"], null]', "ints"),
    ]:
        with pytest.raises(ValueError, match=match):
            decode_subsets(bad, [4, 2])


def test_fit_metrics_aggregation_hand_example() -> None:
    metrics = fit_metrics_aggregation(
        [
            (10, {"macs": 100.0, "available_macs": 200.0, "straggler": False}),
            (10, {"macs": 300.0, "available_macs": 300.0}),
            (10, {"macs": 900.0, "available_macs": 100.0, "straggler": True}),
            (10, {"macs": "n/a"}),
        ]
    )
    assert metrics == {"received": 4, "stragglers": 1, "mean_macs": 200.0, "mean_utilisation": 0.75}
    empty = fit_metrics_aggregation([])
    assert empty["received"] == 0 and math.isnan(empty["mean_macs"])


def test_make_evaluate_fn_evaluates_full_model() -> None:
    torch.manual_seed(0)
    xs, ys = torch.randn(40, 1, 28, 28), torch.randint(0, 62, (40,))
    batches = [(xs[i : i + 16], ys[i : i + 16]) for i in range(0, 40, 16)]
    calls = []

    def factory():
        calls.append(1)
        return batches

    evaluate_fn = make_evaluate_fn(MODEL, None, factory)
    g = _global_arrays(seed=3)
    loss, metrics = evaluate_fn(1, g, {})
    ref = build_model(MODEL)
    ref.load_state_dict({k: torch.from_numpy(a) for k, a in zip(ref.state_dict().keys(), g)})
    ref.eval()
    with torch.no_grad():
        logits = ref(xs)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ys)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == ys).float().mean()))
    assert metrics["num_examples"] == 40
    evaluate_fn(2, g, {})
    assert len(calls) == 1  # loader built once
    with pytest.raises(ValueError, match="state_dict entries"):
        evaluate_fn(3, g[:-1], {})


@pytest.mark.slow
def test_strategies_work_in_flower_simulation() -> None:
    """FederatedDropout through Flower's simulation engine: get_properties reaches the clients."""
    pytest.importorskip("ray")
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.history import History
    from flwr.simulation import run_simulation

    g = _global_arrays()
    histories: list[History] = []

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def get_properties(self, config):
            return {"partition-id": self.pid, "round-samples": ROUND_SAMPLES}

        def fit(self, parameters, config):
            subsets = decode_subsets(str(config["fixed-subsets"]), [32, 64])
            assert int(config["device-id"]) == self.pid
            return (
                [p + 1 for p in parameters],
                10,
                {"partition-id": self.pid, "straggler": False, "macs": float(len(subsets))},
            )

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    class Recording(FederatedDropout):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            histories.append(out[1])
            return out

    def server_fn(context: Context):
        strategy = Recording(
            model_name=MODEL,
            availability_fn=lambda d, t: R_FULL * (d + 1) / 3,
            round_duration=T,
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=3,
            min_available_clients=3,
            initial_parameters=ndarrays_to_parameters(g),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=2))

    run_simulation(
        ServerApp(server_fn=server_fn),
        ClientApp(client_fn=client_fn),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )
    assert len(histories) == 2
    assert all(m["accepted"] == 3 and m["refused"] == 0 for m in histories)


def _managed(seed: int, order: list[int], cids: list[str]) -> tuple[SeededClientManager, list[FakeProxy]]:
    manager = SeededClientManager(seed)
    proxies = [FakeProxy(cid, {"partition-id": dev}) for cid, dev in zip(cids, order)]
    for p in proxies:
        manager.register(p)
    return manager, proxies


def test_seeded_client_manager_draws_the_same_devices_whatever_the_node_ids() -> None:
    """Node ids are random per simulation and clients register in any order: the same seed
    still draws the same devices, round after round, and asks each client only once."""
    rng = np.random.default_rng(0)
    draws = []
    for run in range(2):
        order = [int(d) for d in rng.permutation(20)]
        cids = [str(int(c)) for c in rng.integers(1, 2**62, size=20)]
        manager, proxies = _managed(7, order, cids)
        rounds = [[int(manager.device_ids([c])[c.cid]) for c in manager.sample(5)] for _ in range(4)]
        draws.append(rounds)
        assert all(p.property_calls == 1 for p in proxies)
        assert all(len(set(r)) == 5 for r in rounds)
    assert draws[0] == draws[1]
    other, _ = _managed(8, list(range(20)), [str(i) for i in range(20)])
    assert [[other.device_ids([c])[c.cid] for c in other.sample(5)] for _ in range(4)] != draws[0]


def test_seeded_client_manager_refuses_clients_without_device_id() -> None:
    manager = SeededClientManager(0)
    manager.register(FakeProxy("1", {"partition-id": 0}))
    manager.register(FakeProxy("2", {}))
    with pytest.raises(ValueError, match="partition-id"):
        manager.sample(2)
    assert manager.sample(3, min_num_clients=2) == []  # more than available: Flower's behaviour
