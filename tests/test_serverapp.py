"""Tests for flwr_distreal.flower.serverapp: the Message-API strategies over a fake Grid (no Ray)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flwr_distreal.core import contract as C
from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy
from flwr_distreal.server.aggregate import mac_weighted_update, masked_average
from flwr_distreal.flower.legacy.client_manager import SeededClientManager
from flwr_distreal.core.dropout import kept_count, parameter_masks
from flwr_distreal.models import build_model

from conftest import ROUND_SAMPLES, FakeGrid, FakeProxy, reply

MODEL = "femnist_cnn"
FULL_MACS = 4_015_616
T = 10.0
R_FULL = 3.0 * ROUND_SAMPLES * FULL_MACS / T  # the full model's round takes exactly T
LOGGER = "flwr_distreal.flower.serverapp"


pytestmark = pytest.mark.usefixtures("task_identity")


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_model(MODEL).state_dict().items()}


def _perturbed(arrays: Mapping[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (a + scale * rng.normal(size=a.shape)).astype(a.dtype) for k, a in arrays.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(a)) for k, a in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _distreal(**kw) -> serverapp.Distreal:
    kw.setdefault("full_macs_per_sample", FULL_MACS)
    kw.setdefault("min_train_nodes", 1)
    kw.setdefault("min_available_nodes", 1)
    kw.setdefault("fraction_evaluate", 0.0)
    return serverapp.Distreal(**kw)


def _train(strat, grid: FakeGrid, arrays: Mapping[str, np.ndarray], server_round: int = 1, config=None):
    """configure_train, every message through the grid, aggregate_train."""
    messages = list(strat.configure_train(server_round, _record(arrays), ConfigRecord(config or {}), grid))
    replies = grid.send_and_receive(messages)
    return messages, strat.aggregate_train(server_round, replies)


def _partition(grid: FakeGrid, msg: Message) -> int:
    return grid.devices[msg.metadata.dst_node_id]


# ------------------------------------------------------------------------- Algorithm 2


def test_algorithm2_hand_numbers() -> None:
    g = {"w": np.array([0.0, 0.0], np.float32), "b": np.array([1.0], np.float32)}
    clients = {
        0: ({"w": np.array([1.0, 2.0], np.float32), "b": np.array([3.0], np.float32)}, 3.0, 6.0),
        1: ({"w": np.array([4.0, -2.0], np.float32), "b": np.array([1.0], np.float32)}, 1.0, 4.0),
    }

    def trainer(msg: Message) -> Message:
        device = grid.devices[msg.metadata.dst_node_id]
        arrays, macs, avail = clients[device]
        return reply(
            msg,
            arrays,
            {C.MACS: macs, C.NUM_BATCHES: 3, C.STRAGGLER: 0, C.AVAILABLE_MACS: avail, C.PARTITION_ID: device, C.NUM_EXAMPLES: 5},
        )

    grid = FakeGrid({101: 0, 202: 1}, trainer)
    strat = _distreal(full_macs_per_sample=1.0)
    messages, (arrays, metrics) = _train(strat, grid, g)
    assert len(messages) == 2
    out = _numpy(arrays)
    assert list(out) == ["w", "b"]
    # theta = g + (3 * (theta_0 - g) + 1 * (theta_1 - g)) / 4
    np.testing.assert_allclose(out["w"], [7 / 4, 1.0])
    np.testing.assert_allclose(out["b"], [1.0 + (3 * 2.0 + 0.0) / 4])
    assert out["w"].dtype == np.float32
    assert dict(metrics) == {
        "received": 2, "failures": 0, "stragglers": 0, "refused": 0, "clipped": 0, "accepted": 2,
        "mean_macs": 2.0, "mean_utilisation": pytest.approx((0.5 + 0.25) / 2),
    }


def test_equal_macs_equals_flowers_fedavg() -> None:
    g = _state()
    updates = {d: _perturbed(g, 0.05, 10 + d) for d in range(4)}

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        return reply(msg, updates[d], {C.MACS: 3 * FULL_MACS, C.NUM_BATCHES: 3, C.PARTITION_ID: d, C.NUM_EXAMPLES: 10 * d + 1})

    grid = FakeGrid({7 + 3 * d: d for d in range(4)}, trainer)
    strat = _distreal()
    messages, (arrays, metrics) = _train(strat, grid, g)
    replies = grid.send_and_receive(messages)
    flower, _ = FlowerFedAvg(weighted_by_key="macs").aggregate_train(1, replies)
    ours, theirs = _numpy(arrays), _numpy(flower)
    assert list(ours) == list(g) == list(theirs)
    for k in g:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
    assert metrics["accepted"] == 4


# ------------------------------------------------------------------------------ refusals


def _bad_arrays(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    out = dict(arrays)
    if kind == "renamed":
        out["conv1.kernel"] = out.pop("conv1.weight")
    elif kind == "dropped":
        out.pop("fc2.bias")
    elif kind == "shape":
        out["fc1.weight"] = out["fc1.weight"].T.copy()
    elif kind == "dtype":
        out["conv1.bias"] = np.zeros(out["conv1.bias"].shape, np.int64)
    elif kind == "nan":
        w = out["fc2.weight"].copy()
        w[0, 0] = np.nan
        out["fc2.weight"] = w
    elif kind == "none":
        return None
    return out


GOOD = {C.MACS: FULL_MACS, C.NUM_BATCHES: 2, C.STRAGGLER: 0, C.NUM_EXAMPLES: 10}


@pytest.mark.parametrize(
    ("metrics", "arrays_kind", "reason"),
    [
        ({C.NUM_BATCHES: 2}, "ok", "missing-macs"),
        ({C.MACS: math.nan, C.NUM_BATCHES: 2}, "ok", "non-finite-macs"),
        ({C.MACS: -1.0, C.NUM_BATCHES: 2}, "ok", "negative-macs"),
        ({C.MACS: True, C.NUM_BATCHES: 2}, "ok", "non-numeric-macs"),
        ({C.MACS: [1.0, 2.0], C.NUM_BATCHES: 2}, "ok", "non-numeric-macs"),
        ({C.MACS: 2 * FULL_MACS + 1, C.NUM_BATCHES: 2}, "ok", "excess-macs"),
        ({C.MACS: FULL_MACS}, "ok", "missing-num-batches"),
        (GOOD, "renamed", "wrong-array-keys"),
        (GOOD, "dropped", "wrong-array-keys"),
        (GOOD, "shape", "wrong-shape"),
        (GOOD, "dtype", "wrong-dtype"),
        (GOOD, "nan", "non-finite-arrays"),
        (GOOD, "none", "malformed-arrays"),
    ],
)
def test_every_refusal_through_the_message_api(metrics, arrays_kind, reason, caplog) -> None:
    g = _state()
    good, bad = _perturbed(g, 0.1, 5), _perturbed(g, 50.0, 6)

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        if d == 0:
            return reply(msg, good, {**GOOD, C.PARTITION_ID: 0})
        return reply(msg, _bad_arrays(arrays_kind, bad), {**metrics, C.PARTITION_ID: 41})

    grid = FakeGrid({5: 0, 9: 41}, trainer)
    strat = _distreal()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, (arrays, out) = _train(strat, grid, g)
    assert out["refused"] == 1 and out["accepted"] == 1 and out["received"] == 2
    for k, v in _numpy(arrays).items():
        np.testing.assert_allclose(v, good[k], rtol=1e-6, atol=1e-7)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert reason in refusals[0] and "partition-id 41" in refusals[0] and "node 9" in refusals[0]


def test_stragglers_errors_and_missing_replies(caplog) -> None:
    g = _state()
    good = _perturbed(g, 0.1, 1)

    def trainer(msg: Message) -> Message | None:
        d = _partition(grid, msg)
        if d == 0:
            return reply(msg, good, {**GOOD, C.PARTITION_ID: 0})
        if d == 1:
            return reply(msg, _perturbed(g, 100.0, 2), {**GOOD, C.STRAGGLER: 1, C.PARTITION_ID: 1})
        if d == 2:
            return Message(Error(code=3, reason="ClientApp crashed"), reply_to=msg)
        return None  # device 3 never answers

    grid = FakeGrid({10: 0, 11: 1, 12: 2, 13: 3}, trainer)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, (arrays, out) = _train(_distreal(), grid, g)
    assert (out["received"], out["stragglers"], out["failures"], out["accepted"], out["refused"]) == (2, 1, 2, 1, 0)
    for k, v in _numpy(arrays).items():
        np.testing.assert_allclose(v, good[k], rtol=1e-6, atol=1e-7)
    text = caplog.text
    assert "node 12 (partition-id 2) replied with an error: ClientApp crashed" in text
    assert "node 13 (partition-id 3) sent no reply" in text


def test_nothing_valid_keeps_the_broadcast_model(caplog) -> None:
    g = _state()

    def trainer(msg: Message) -> Message:
        return reply(msg, _perturbed(g, 1.0, 3), {C.MACS: -5.0, C.NUM_BATCHES: 1, C.PARTITION_ID: _partition(grid, msg)})

    grid = FakeGrid({1: 0, 2: 1}, trainer)
    strat = _distreal()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, (arrays, out) = _train(strat, grid, g)
    assert out["refused"] == 2 and out["accepted"] == 0 and math.isnan(out["mean_macs"])
    for k, v in _numpy(arrays).items():
        np.testing.assert_array_equal(v, g[k])
    assert "keeping the previous global model" in caplog.text
    with pytest.raises(RuntimeError, match="configure_train"):
        _distreal().aggregate_train(1, [])


def test_fedavg_baselines_refuse_a_bad_weight_and_full_resources_is_unlimited() -> None:
    g = _state()
    updates = {d: _perturbed(g, 0.1, d) for d in range(3)}

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        metrics = {C.PARTITION_ID: d, C.NUM_EXAMPLES: 10 + d} if d < 2 else {C.PARTITION_ID: d}
        return reply(msg, updates[d], metrics)

    grid = FakeGrid({30: 0, 31: 1, 32: 2}, trainer)
    strat = serverapp.FullResources(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    messages, (arrays, out) = _train(strat, grid, g, config={"lr": 0.1})
    for msg in messages:
        cfg = msg.content[C.CONFIG_RECORD]
        assert cfg[C.UNLIMITED] is True and cfg[C.SERVER_ROUND] == 1 and cfg["lr"] == 0.1
    assert out["refused"] == 1 and out["accepted"] == 2
    expected = mac_weighted_update(list(g.values()), [list(updates[d].values()) for d in (0, 1)], [10, 11])
    for o, e in zip(_numpy(arrays).values(), expected):
        np.testing.assert_array_equal(o, e)


# --------------------------------------------------------------- submodel baselines


def _fd_grid(trainer=None, n: int = 3) -> FakeGrid:
    return FakeGrid({500 + 17 * d: d for d in range(n)}, trainer)


def _submodel(cls, availability, **kw):
    kw.setdefault("min_train_nodes", 1)
    kw.setdefault("min_available_nodes", 1)
    kw.setdefault("fraction_evaluate", 0.0)
    return cls(model_name=MODEL, availability_fn=availability, round_duration=T, **kw)


def _masked_replies(g: Mapping[str, np.ndarray], model, store: dict):
    """A trainer that changes exactly the weights of the node's submodel."""
    keys = list(g)

    def trainer(msg: Message) -> Message:
        cfg = msg.content[C.CONFIG_RECORD]
        device = int(cfg[C.DEVICE_ID])
        kept = C.decode_subsets(str(cfg[C.FIXED_SUBSETS]), model.layer_widths)
        by_key = parameter_masks(model, kept)
        masks = [by_key[k] for k in keys]
        rng = np.random.default_rng(device)
        arrays = {
            k: np.where(m, g[k] + rng.normal(size=g[k].shape).astype(g[k].dtype), g[k]).astype(g[k].dtype)
            for k, m in zip(keys, masks)
        }
        store[device] = (arrays, masks, 10 + device, cfg)
        return reply(msg, arrays, {C.PARTITION_ID: device, C.NUM_EXAMPLES: 10 + device, C.STRAGGLER: 0})

    return trainer


@pytest.mark.parametrize("cls", [serverapp.FederatedDropout, serverapp.HeteroFL])
def test_submodel_baselines_send_own_subsets_and_average_per_weight(cls) -> None:
    fractions = {0: 0.9, 1: 0.45, 2: 0.2}
    g = _state()
    model = build_model(MODEL)
    store: dict = {}
    grid = _fd_grid(_masked_replies(g, model, store))
    strat = _submodel(cls, lambda d, t: fractions[d] * R_FULL, seed=3)
    messages, (arrays, out) = _train(strat, grid, g)
    assert out["accepted"] == 3 and out["refused"] == 0
    configs = {int(m.content[C.CONFIG_RECORD][C.DEVICE_ID]): m.content[C.CONFIG_RECORD] for m in messages}
    assert sorted(configs) == [0, 1, 2]
    assert all(_partition(grid, m) == int(m.content[C.CONFIG_RECORD][C.DEVICE_ID]) for m in messages)
    subsets = {d: c[C.FIXED_SUBSETS] for d, c in configs.items()}
    assert len(set(subsets.values())) == 3  # every node has its own submodel
    for d, cfg in configs.items():
        kept = C.decode_subsets(str(cfg[C.FIXED_SUBSETS]), model.layer_widths)
        counts = [w if k is None else len(k) for k, w in zip(kept, model.layer_widths)]
        if cls is serverapp.FederatedDropout:
            rate = float(cfg[C.DROPOUT_RATE])
            assert counts == [kept_count(rate, w) for w in model.layer_widths]
        else:
            level = int(cfg[C.WIDTH_LEVEL])
            assert counts == strat.planner.level_counts[level - 1]
            assert all(k is None or k.tolist() == list(range(len(k))) for k in kept)  # first channels
            assert cfg[C.WIDTH] == pytest.approx(0.7 ** (level - 1))
    order = sorted(store)
    expected = masked_average(
        list(g.values()),
        [list(store[d][0].values()) for d in order],
        [store[d][1] for d in order],
        [store[d][2] for d in order],
    )
    for o, e in zip(_numpy(arrays).values(), expected):
        np.testing.assert_array_equal(o, e)


def test_submodel_refuses_device_mismatch_and_skips_nodes_without_round_samples(caplog) -> None:
    g = _state()

    def trainer(msg: Message) -> Message:
        cfg = msg.content[C.CONFIG_RECORD]
        lie = 99 if int(cfg[C.DEVICE_ID]) == 1 else int(cfg[C.DEVICE_ID])
        return reply(msg, _perturbed(g, 0.0, 0), {C.PARTITION_ID: lie, C.NUM_EXAMPLES: 5})

    grid = _fd_grid(trainer, n=2)
    strat = _submodel(serverapp.FederatedDropout, lambda d, t: R_FULL)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, (_, out) = _train(strat, grid, g)
    assert out["refused"] == 1 and "device-mismatch" in caplog.text and "partition-id 99" in caplog.text

    grid = FakeGrid({1: 0, 2: 1}, trainer, samples=0)  # no training samples: not trained
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        messages, _ = _train(_submodel(serverapp.HeteroFL, lambda d, t: R_FULL), grid, g)
    assert messages == [] and "no training samples" in caplog.text


# ------------------------------------------------------------------------------ sampling


def _proxy(cid: str, device: int) -> FakeProxy:
    """A legacy proxy of partition ``device`` with ``ROUND_SAMPLES`` samples a round."""
    return FakeProxy(cid, {C.PARTITION_ID: device, C.ROUND_SAMPLES: ROUND_SAMPLES})


def _drawn(seed: int, devices: Mapping[int, int], rounds: int = 4) -> tuple[list[list[int]], FakeGrid]:
    grid = FakeGrid(devices)
    strat = _distreal(seed=seed, fraction_train=0.25)
    g = {"w": np.zeros(3, np.float32)}
    picks = []
    for r in range(1, rounds + 1):
        messages = list(strat.configure_train(r, _record(g), ConfigRecord(), grid))
        picks.append([_partition(grid, m) for m in messages])
    return picks, grid


def test_seeded_sampling_is_reproducible_and_matches_the_legacy_client_manager() -> None:
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):  # random node ids, nodes in any order: same devices
        order = [int(d) for d in rng.permutation(20)]
        nodes = [int(n) for n in rng.integers(1, 2**62, size=20)]
        picks, grid = _drawn(7, dict(zip(nodes, order)))
        assert all(len(set(p)) == 5 for p in picks)
        assert all(grid.queries[n] == 1 for n in nodes)  # asked once, then cached
        runs.append(picks)
    assert runs[0] == runs[1]
    assert _drawn(8, {n: n for n in range(20)})[0] != runs[0]

    manager = SeededClientManager(7)
    for node in range(20):
        manager.register(_proxy(str(1000 + node), node))
    legacy = [[p.device for p in manager.sample(5)] for _ in range(4)]  # type: ignore[attr-defined]
    assert legacy == runs[0]


def test_silent_nodes_are_not_sampled_and_failed_queries_are_retried(caplog) -> None:
    """A node that does not answer the query is left out this round; one whose query handler
    raised answered, so it is sampled by node id (after the identified ones). Both are asked
    again next round; the identified ones are not."""
    grid = FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}, mute=[2], broken=[3])
    strat = _distreal(fraction_train=1.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        messages = list(strat.configure_train(1, _record({"w": np.zeros(1)}), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3, 4]
    assert "1 node: no reply to the properties query (properties_timeout=None): 2; not sampled" in caplog.text
    assert "1 node: query handler raised (no properties here): 3; sampled by node id" in caplog.text
    strat.configure_train(2, _record({"w": np.zeros(1)}), ConfigRecord(), grid)
    assert grid.queries[1] == 1 and grid.queries[3] == 2  # failed look-ups are retried


# ---------------------------------------------------------------- legacy == Message API


def _legacy_fit(strat, g: Mapping[str, np.ndarray], proxies, server_round: int = 1):
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    return strat.configure_fit(server_round, ndarrays_to_parameters(list(g.values())), manager)


def test_legacy_and_message_api_distreal_aggregate_identically() -> None:
    g = _state()
    devices = {40 + d: d for d in range(5)}
    updates = {d: _perturbed(g, 0.1, 20 + d) for d in devices.values()}
    macs = {d: (d + 1) * 0.7 * FULL_MACS for d in devices.values()}
    metrics = {d: {C.MACS: macs[d], C.NUM_BATCHES: 5, C.PARTITION_ID: d, C.NUM_EXAMPLES: 9} for d in macs}

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        return reply(msg, updates[d], metrics[d])

    grid = FakeGrid(devices, trainer)
    message_api = _distreal(fraction_train=1.0)
    messages = list(message_api.configure_train(1, _record(g), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    new, _ = message_api.aggregate_train(1, replies[::-1])  # order must not matter

    legacy = strategy.Distreal(
        full_macs_per_sample=FULL_MACS, min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0
    )
    proxies = [_proxy(str(node), d) for node, d in devices.items()]
    _legacy_fit(legacy, g, proxies)
    results = [
        (p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(updates[p.device].values())), 9, metrics[p.device]))
        for p in proxies[2:] + proxies[:2]
    ]
    params, legacy_metrics = legacy.aggregate_fit(1, results, [])
    for ours, theirs in zip(_numpy(new).values(), parameters_to_ndarrays(params)):
        np.testing.assert_array_equal(ours, theirs)  # bit-identical
    expected = mac_weighted_update(
        list(g.values()), [list(updates[d].values()) for d in sorted(updates)], [macs[d] for d in sorted(macs)]
    )
    for ours, e in zip(_numpy(new).values(), expected):
        np.testing.assert_array_equal(ours, e)
    assert legacy_metrics["accepted"] == 5


def test_legacy_and_message_api_federated_dropout_agree() -> None:
    fractions = {0: 0.8, 1: 0.5, 2: 0.3}
    g = _state()
    model = build_model(MODEL)
    store: dict = {}
    grid = _fd_grid(_masked_replies(g, model, store))
    message_api = _submodel(serverapp.FederatedDropout, lambda d, t: fractions[d] * R_FULL, seed=5, fraction_train=1.0)
    _, (new, _) = _train(message_api, grid, g, server_round=2)

    legacy = strategy.FederatedDropout(
        model_name=MODEL,
        availability_fn=lambda d, t: fractions[d] * R_FULL,
        round_duration=T,
        seed=5,
        min_fit_clients=1,
        min_available_clients=1,
        fraction_evaluate=0.0,
    )
    proxies = [_proxy(str(node), d) for node, d in grid.devices.items()]
    pairs = _legacy_fit(legacy, g, proxies, server_round=2)
    legacy_cfg = {int(fi.config[C.DEVICE_ID]): fi.config for _, fi in pairs}
    for d, (arrays, _, n, cfg) in store.items():
        assert {k: legacy_cfg[d][k] for k in (C.FIXED_SUBSETS, C.DROPOUT_RATE, C.SUBMODEL_MACS)} == {
            k: cfg[k] for k in (C.FIXED_SUBSETS, C.DROPOUT_RATE, C.SUBMODEL_MACS)
        }
    results = [
        (p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(store[p.device][0].values())), store[p.device][2], {C.PARTITION_ID: p.device}))
        for p in proxies
    ]
    params, _ = legacy.aggregate_fit(2, results, [])
    for ours, theirs in zip(_numpy(new).values(), parameters_to_ndarrays(params)):
        np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------ Flower's lifecycle


def test_strategy_start_runs_through_flowers_lifecycle() -> None:
    g = _state()
    seen: list[int] = []

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        incoming = _numpy(msg.content[C.ARRAYS_RECORD])
        arrays = {k: (v + 0.01 * (d + 1)).astype(v.dtype) for k, v in incoming.items()}
        return reply(msg, arrays, {C.MACS: FULL_MACS * (d + 1), C.NUM_BATCHES: 4, C.PARTITION_ID: d, C.NUM_EXAMPLES: 8})

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(server_round)
        return MetricRecord({"norm": float(sum(np.abs(v.numpy()).sum() for v in arrays.values()))})

    grid = FakeGrid({11: 0, 22: 1, 33: 2, 44: 3}, trainer)
    strat = _distreal(fraction_train=0.5, min_train_nodes=2, min_available_nodes=4, seed=1)
    result = strat.start(grid=grid, initial_arrays=_record(g), num_rounds=2, evaluate_fn=evaluate_fn)
    assert seen == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["accepted"] == 2 and m["failures"] == 0 for m in result.train_metrics_clientapp.values())
    assert len(grid.train_messages) == 4
    assert all(m.content[C.CONFIG_RECORD][C.SERVER_ROUND] in (1, 2) for m in grid.train_messages)
    out = _numpy(result.arrays)
    assert list(out) == list(g) and not np.allclose(out["fc2.bias"], g["fc2.bias"])


def test_user_train_metrics_aggregation_over_accepted_replies() -> None:
    g = {"w": np.zeros(2, np.float32)}

    def trainer(msg: Message) -> Message:
        d = _partition(grid, msg)
        macs = 1.0 if d else -1.0  # device 0 is refused
        return reply(msg, {"w": np.full(2, d, np.float32)}, {C.MACS: macs, C.NUM_BATCHES: 1, C.PARTITION_ID: d, "loss": 0.5 * d})

    grid = FakeGrid({1: 0, 2: 1, 3: 2}, trainer)
    strat = _distreal(full_macs_per_sample=1.0, train_metrics_aggr_fn=lambda records, key: MetricRecord({"n": len(records)}))
    _, (_, out) = _train(strat, grid, g)
    assert out["n"] == 2 and out["accepted"] == 2 and out["refused"] == 1


def test_federated_evaluation_is_off_by_default_and_seeded_when_on() -> None:
    grid = FakeGrid({n: n % 7 for n in range(10, 20)})
    arrays = _record({"w": np.zeros(1)})
    assert list(_distreal().configure_evaluate(1, arrays, ConfigRecord(), grid)) == []
    picks = []
    for _ in range(2):
        strat = _distreal(seed=4, fraction_evaluate=0.3, min_evaluate_nodes=1)
        messages = list(strat.configure_evaluate(1, arrays, ConfigRecord(), grid))
        assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
        assert all(m.content[C.CONFIG_RECORD][C.SERVER_ROUND] == 1 for m in messages)
        picks.append([m.metadata.dst_node_id for m in messages])
    assert len(picks[0]) == 3 and picks[0] == picks[1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"full_macs_per_sample": 0}, "full_macs_per_sample"),
        ({"on_excess": "ignore"}, "on_excess"),
        ({"weighted_by_key": ""}, "macs_key"),
        ({"min_train_nodes": 5, "min_available_nodes": 2}, "min_train_nodes"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_constructor_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _distreal(**kwargs)
