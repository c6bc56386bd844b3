"""DISTREAL's Message-API strategies in a plain Flower app: a ClientApp with only ``@app.train()``
and ``@app.evaluate()`` (no query handler), as written for Flower's ``FedAvg``.

The fast tests run Flower's own ``ClientApp`` (its "no query function registered" error included)
through the project's in-process grid (:class:`flwr_distreal.run.inprocess.InProcessGrid`); the slow
one through ``flwr.simulation.run_simulation`` (Ray).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from flwr_distreal.core import contract as C
from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy
from flwr_distreal.core.contract import ContractError
from flwr_distreal.core.dropout import make_droppable
from flwr_distreal.run.inprocess import InProcessGrid, run_app_in_process
from flwr_distreal.core.macs import count_macs
from flwr_distreal.server import DistrealCore

from conftest import digits_tensors

LOGGER = "flwr_distreal.flower.serverapp"


pytestmark = pytest.mark.usefixtures("task_identity")


# ------------------------------------------------------------------------ a plain Flower app


class Net(nn.Module):
    """A user's small CNN for 8x8 digits (a plain nn.Module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


#: The full model's forward MACs per sample, as the user counts them.
FULL_MACS = count_macs(make_droppable(Net(), torch.zeros(2, 1, 8, 8)))
NODES = 4
BATCH = 32


def _partition(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node ``pid``'s training data: its share of the first 1,400 digits."""
    x, y = digits_tensors()
    idx = torch.arange(1400)[pid::NODES]
    return x[idx], y[idx]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def plain_client_app(metrics_fn: Callable[[int, int], dict[str, int | float]], *, train: bool = True) -> ClientApp:
    """A ClientApp as written for Flower's FedAvg: train and evaluate, no query handler.

    ``metrics_fn(num_examples, num_batches)`` is what the train reply's MetricRecord holds.
    With ``train=False`` the handler returns the received arrays nudged (fast, no SGD).
    """
    app = ClientApp()

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = _partition(int(context.node_config["partition-id"]))
        batches = 0
        if train:
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            model.train()
            gen = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]))
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), BATCH):
                b = order[i : i + BATCH]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
                batches += 1
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            batches = -(-len(y) // BATCH)
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics_fn(len(y), batches))}
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = _partition(int(context.node_config["partition-id"]))
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": _accuracy(model, x, y), "num-examples": len(y)})}), reply_to=msg)

    return app


def fedavg_metrics(n: int, batches: int) -> dict[str, int | float]:
    """What a FedAvg client reports."""
    return {"num-examples": n}


def distreal_metrics(n: int, batches: int) -> dict[str, int | float]:
    """A plain client that trains the full model on every batch, with DISTREAL's two metrics."""
    return {"num-examples": n, C.MACS: batches * FULL_MACS, C.NUM_BATCHES: batches}


class CountingGrid(InProcessGrid):
    """The in-process grid, counting the messages of each type every node receives."""

    def __init__(self, client_app: ClientApp, nodes: int = NODES) -> None:
        super().__init__(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], 1, {})
        self.received: Counter[tuple[int, str]] = Counter()

    def _deliver(self, msg: Message) -> Message:
        self.received[(msg.metadata.dst_node_id, msg.metadata.message_type)] += 1
        return super()._deliver(msg)

    def count(self, message_type: str) -> int:
        return sum(n for (_, t), n in self.received.items() if t == message_type)


def _initial() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(Net().state_dict())


def _distreal(**kw) -> serverapp.Distreal:
    kw.setdefault("full_macs_per_sample", FULL_MACS)
    kw.setdefault("fraction_train", 0.5)
    kw.setdefault("min_train_nodes", 2)
    kw.setdefault("min_available_nodes", NODES)
    return serverapp.Distreal(**kw)


def _messages(records: list[logging.LogRecord], text: str) -> list[str]:
    return [r.getMessage() for r in records if text in r.getMessage()]


# ------------------------------------------------- sampling without a query handler


@pytest.mark.parametrize("cls", [serverapp.Distreal, serverapp.FullResources, serverapp.SmallNetwork])
def test_nodes_without_query_handler_are_sampled_and_trained(cls, caplog) -> None:
    """No query handler: the strategy samples by node id, trains, and says so once; the query
    goes to one node only, and its cause is one log line for all the nodes."""
    grid = CountingGrid(plain_client_app(distreal_metrics, train=False))
    kwargs = {"full_macs_per_sample": FULL_MACS} if cls is serverapp.Distreal else {}
    strat = cls(fraction_train=0.5, min_train_nodes=2, min_available_nodes=NODES, **kwargs)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = strat.start(grid=grid, initial_arrays=_initial(), num_rounds=3)
    assert grid.count(MessageType.TRAIN) == 3 * 2  # fraction 0.5 of 4 nodes, every round
    assert all(m["accepted"] == 2 and m["refused"] == 0 for m in result.train_metrics_clientapp.values())
    start, end = _initial(), result.arrays
    assert not np.allclose(start["fc.bias"].numpy(), end["fc.bias"].numpy())  # the model moved
    assert grid.count(MessageType.QUERY) == 1  # one node asked; the others run the same ClientApp
    causes = _messages(caplog.records, "no query handler")
    assert len(causes) == 1 and causes[0].startswith("configure_train: 4 nodes: no query handler")
    assert "No query function registered" in causes[0] and "sampled by node id" in causes[0]
    fallback = _messages(caplog.records, "report no device id")
    assert len(fallback) == 1  # warned once over three rounds
    assert "@app.query()" in fallback[0] and "'partition-id'" in fallback[0] and "seed=0" in fallback[0]
    assert not _messages(caplog.records, "only 0 of")


def test_sampling_by_node_id_is_seeded() -> None:
    """Without device ids the draw is over the sorted node ids with the strategy's generator:
    the same seed and node ids draw the same nodes, another seed others."""

    def draws(seed: int) -> list[list[int]]:
        grid = CountingGrid(plain_client_app(distreal_metrics, train=False), nodes=12)
        strat = _distreal(seed=seed, fraction_train=0.25, min_available_nodes=12)
        picks = []
        for rnd in range(1, 5):
            messages = strat.configure_train(rnd, _initial(), ConfigRecord(), grid)
            picks.append(sorted(m.metadata.dst_node_id for m in messages))
        return picks

    first = draws(3)
    assert all(len(p) == 3 for p in first) and len({tuple(p) for p in first}) > 1
    assert draws(3) == first
    assert draws(4) != first


def test_identified_nodes_come_first_and_the_rest_by_node_id(caplog) -> None:
    """A federation where only some nodes report a device id: all are sampled (fraction 1), the
    causes are one line each, the fallback warned once."""
    app = plain_client_app(distreal_metrics, train=False)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == 0:
            raise RuntimeError("no data here")
        props = {C.PARTITION_ID: pid} if pid < 3 else {"something-else": 1}
        return Message(RecordDict({C.PROPERTIES_RECORD: MetricRecord(props)}), reply_to=msg)

    grid = CountingGrid(app, nodes=5)
    strat = _distreal(fraction_train=1.0, min_available_nodes=5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        messages = list(strat.configure_train(1, _initial(), ConfigRecord(), grid))
        strat.configure_train(2, _initial(), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1000, 1001, 1002, 1003, 1004]
    assert len(_messages(caplog.records, "1 node: query handler raised")) == 2  # asked again in round 2
    lacking = _messages(caplog.records, "no device id (")
    assert len(lacking) == 1 and lacking[0].startswith("configure_train: 2 nodes: no device id") and "1003, 1004" in lacking[0]
    assert len(_messages(caplog.records, "report no device id: they are sampled")) == 1
    assert grid.received[(1001, MessageType.QUERY)] == 1 and grid.received[(1000, MessageType.QUERY)] == 2


def test_submodel_baselines_need_device_ids() -> None:
    """HeteroFL assigns each device a submodel from its availability: without a query handler
    it cannot, and says what the client must add instead of training nothing."""
    grid = CountingGrid(plain_client_app(fedavg_metrics, train=False))
    strat = serverapp.HeteroFL(
        model_name="femnist_cnn_small", availability_fn=lambda d, t: 1e9, round_duration=1.0,
        min_train_nodes=2, min_available_nodes=NODES,
    )
    with pytest.raises(ContractError, match=r"none of the 4 nodes reports a device id \(no query handler\).*'partition-id'.*'round-samples'"):
        strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid)


# ---------------------------------------------------------- every reply refused alike


def test_a_fedavg_client_under_distreal_stops_the_run_naming_the_metrics(caplog) -> None:
    """Swapping only the strategy: every reply lacks ``macs``; the run ends in round 1 with the
    reason and the keys the client must report."""
    grid = CountingGrid(plain_client_app(fedavg_metrics, train=False))
    with pytest.raises(ContractError) as info:
        _distreal().start(grid=grid, initial_arrays=_initial(), num_rounds=5)
    err = info.value
    assert err.reason == "missing-macs"
    text = str(err)
    assert text.startswith("round 1: every reply (2 of 2) was refused for the same reason, missing-macs")
    assert "'macs' (Algorithm 1's c" in text and "'num_batches' (the mini-batches trained" in text
    assert "'num-examples'" in text and "build_client_app" in text
    assert grid.count(MessageType.TRAIN) == 2  # round 1 only


def test_per_batch_macs_claims_stop_the_run_naming_full_macs_per_sample() -> None:
    """A client that reports a batch's MACs (x batch size) where Algorithm 1 adds per-sample
    MACs: every claim exceeds num_batches x full_macs_per_sample."""
    def per_batch(n: int, batches: int) -> dict[str, int | float]:
        return {"num-examples": n, C.MACS: batches * BATCH * FULL_MACS, C.NUM_BATCHES: batches}

    grid = CountingGrid(plain_client_app(per_batch, train=False))
    with pytest.raises(ContractError, match=r"excess-macs.*full_macs_per_sample \(\d+\).*count_macs\(model\)") as info:
        _distreal().start(grid=grid, initial_arrays=_initial(), num_rounds=2)
    assert info.value.reason == "excess-macs"


def test_mixed_refusals_or_one_accepted_reply_do_not_stop_the_run() -> None:
    calls = Counter()

    def varying(n: int, batches: int) -> dict[str, int | float]:
        calls["n"] += 1
        if calls["n"] % 2:
            return {"num-examples": n, C.NUM_BATCHES: batches}  # missing-macs
        return {"num-examples": n, C.MACS: -1.0, C.NUM_BATCHES: batches}  # negative-macs: not a contract reason

    grid = CountingGrid(plain_client_app(varying, train=False))
    result = _distreal().start(grid=grid, initial_arrays=_initial(), num_rounds=2)
    assert all(m["refused"] == 2 and m["accepted"] == 0 for m in result.train_metrics_clientapp.values())


def test_every_reply_with_negative_macs_keeps_the_model_and_goes_on() -> None:
    """Values a client may get wrong alone (negative MACs) are not a contract reason."""
    def negative(n: int, batches: int) -> dict[str, int | float]:
        return {"num-examples": n, C.MACS: -1.0, C.NUM_BATCHES: batches}

    grid = CountingGrid(plain_client_app(negative, train=False))
    result = _distreal().start(grid=grid, initial_arrays=_initial(), num_rounds=2)
    assert sorted(result.train_metrics_clientapp) == [1, 2]


def test_fedavg_type_strategy_names_num_examples() -> None:
    grid = CountingGrid(plain_client_app(lambda n, b: {"loss": 0.5}, train=False))
    strat = serverapp.SmallNetwork(fraction_train=0.5, min_train_nodes=2, min_available_nodes=NODES)
    with pytest.raises(ContractError, match=r"invalid-weight.*must hold 'num-examples'") as info:
        strat.start(grid=grid, initial_arrays=_initial(), num_rounds=2)
    assert info.value.reason == "invalid-weight"


# ---------------------------------------------------------------- the renamed argument


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: serverapp.Distreal(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0, **kw),
        lambda **kw: strategy.Distreal(min_fit_clients=1, min_available_clients=1, fraction_evaluate=0.0, **kw),
        lambda **kw: DistrealCore(**kw),
    ],
    ids=["message-api", "legacy", "core"],
)
def test_full_macs_per_batch_is_a_deprecated_alias(make) -> None:
    with pytest.warns(DeprecationWarning, match="full_macs_per_batch is deprecated, pass full_macs_per_sample"):
        old = make(full_macs_per_batch=1234.0)
    assert old.full_macs_per_sample == 1234.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = make(full_macs_per_sample=1234.0)  # no warning
        assert new.full_macs_per_sample == 1234.0
    with pytest.warns(DeprecationWarning, match="read full_macs_per_sample"):
        assert new.full_macs_per_batch == 1234.0
    with pytest.raises(TypeError, match="full_macs_per_sample only"):
        make(full_macs_per_sample=1.0, full_macs_per_batch=1.0)
    with pytest.raises(TypeError, match="missing keyword argument full_macs_per_sample"):
        make()
    with pytest.raises(ValueError, match="full_macs_per_sample must be a positive finite number"):
        make(full_macs_per_sample=0)


def test_the_alias_bounds_the_claims_alike() -> None:
    """The alias maps to the same bound: a claim of 2 x full per batch is refused by both."""
    g = [np.zeros(2, np.float32)]
    from flwr_distreal.server import Reply

    for kw in ({"full_macs_per_sample": 10.0}, {"full_macs_per_batch": 10.0}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            core = DistrealCore(**kw)
        core.broadcast(1, g)
        ok = Reply("1", 1, [np.ones(2, np.float32)], 5, {C.MACS: 30.0, C.NUM_BATCHES: 3})
        over = Reply("2", 2, [np.ones(2, np.float32)], 5, {C.MACS: 31.0, C.NUM_BATCHES: 3})
        outcome = core.aggregate(1, [ok, over])
        assert outcome.metrics["accepted"] == 1 and [r.reason for r in outcome.refusals] == ["excess-macs"]


# ---------------------------------------------------------------- end to end


def _server_app(strat_fn: Callable[[], serverapp.Distreal], accuracies: list[float], rounds: int) -> ServerApp:
    app = ServerApp()
    x, y = digits_tensors()
    test_x, test_y = x[1400:], y[1400:]

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = Net()
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracies.append(_accuracy(model, test_x, test_y))
            return MetricRecord({"accuracy": accuracies[-1]})

        strat_fn().start(grid=grid, initial_arrays=_initial(), num_rounds=rounds, evaluate_fn=evaluate_fn)

    return app


def test_plain_app_trains_end_to_end_in_process(caplog) -> None:
    """The plain app (no query handler) with Distreal in the project's in-process runtime: every
    round trains, and the server-side accuracy rises well above chance."""
    accuracies: list[float] = []
    server = _server_app(lambda: _distreal(fraction_train=0.5, seed=1), accuracies, rounds=4)
    configs = [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_app_in_process(server, plain_client_app(distreal_metrics), configs, {})
    assert len(accuracies) == 5  # the initial model and 4 rounds
    assert accuracies[0] < 0.2 and accuracies[-1] > 0.6, accuracies
    assert len(_messages(caplog.records, "report no device id")) == 1
    print("accuracy by round:", [round(a, 3) for a in accuracies])


@pytest.mark.heavy
@pytest.mark.slow
def test_plain_app_through_flowers_simulation(caplog) -> None:
    """The same through ``flwr.simulation.run_simulation`` (Ray): Flower's own runtime answers
    the query with its "No query function registered" error; the app trains. Then the FedAvg
    client under Distreal: ``run_simulation`` raises the ServerApp's ContractError."""
    pytest.importorskip("ray")
    from flwr.simulation import run_simulation

    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}}
    accuracies: list[float] = []
    server = _server_app(lambda: _distreal(fraction_train=0.5, seed=1), accuracies, rounds=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_simulation(server, plain_client_app(distreal_metrics), num_supernodes=NODES, backend_config=backend)
    assert len(accuracies) == 4 and accuracies[-1] > 0.5, accuracies
    causes = _messages(caplog.records, "no query handler")
    assert len(causes) == 1 and "4 nodes" in causes[0] and "No query function registered" in causes[0]

    with pytest.raises(ContractError, match="missing-macs"):
        run_simulation(
            _server_app(lambda: _distreal(), [], rounds=3),
            plain_client_app(fedavg_metrics, train=False),
            num_supernodes=NODES,
            backend_config=backend,
        )
