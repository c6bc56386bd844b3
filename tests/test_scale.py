"""Thousands of devices: lazy per-device data and properties (issue 21, item 1).

A federation's size may cost only what is drawn: the synthetic FEMNIST-shaped source makes a
device's samples when it is used (:class:`flwr_distreal.data.LazyPartitions`), the run's
``Experiment`` derives ``r_max`` from sizes alone, and the ClientApp answers the server's
properties query without building the node's trainer. The benchmark of what this buys is
``scripts/bench_scale.py`` (not a test).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from torch.utils.data import TensorDataset

from flwr_distreal.core.contract import PARTITION_ID, PROPERTIES_RECORD, ROUND_SAMPLES
from flwr_distreal.data import DataError, FederatedData, LazyPartitions, load_federated, load_synthetic
from flwr_distreal.data.synthetic import synthetic_sizes
from flwr_distreal.run import experiment as experiment_module
from flwr_distreal.run import flwr_app
from flwr_distreal.run.experiment import Experiment
from flwr_distreal.run.flwr_app import SimulatedProperties
from flwr_distreal.run.inprocess import NODE_ID_BASE, InProcessGrid
from flwr_distreal.run.runtimes import run_experiment
from flwr_distreal.server import seeded_draw

from conftest import run_config

TINY = dict(samples_per_device=3, num_classes=4, image_size=8, test_samples=10)


def test_a_lazy_federation_of_thousands_builds_only_the_devices_it_is_asked_for() -> None:
    data = load_synthetic(num_devices=5000, cache_size=4, **TINY)
    parts = data.partitions
    assert isinstance(parts, LazyPartitions) and parts.built == 0
    assert data.num_devices == 5000 and data.partition_sizes() == [3] * 5000
    assert "5000 devices, 15000 train samples" in data.summary() and parts.built == 0
    x, y = parts[4321].tensors
    assert parts.built == 1 and x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert parts[4321] is parts[4321] and parts.built == 1  # kept, not made again
    for device in range(10):
        parts[device]
    assert parts.built == 11 and parts.cached() == [6, 7, 8, 9]  # at most cache_size kept
    batches = list(data.train_loader(17, batch_size=2, shuffle=True, seed=0))
    assert [len(b[1]) for b in batches] == [2, 1]


def test_a_device_is_the_same_in_every_process_and_eager_equals_lazy() -> None:
    lazy = load_synthetic(num_devices=300, seed=3, **TINY)
    again = load_federated("synthetic", num_devices=300, seed=3, **TINY)
    eager = load_synthetic(num_devices=300, seed=3, lazy=False, **TINY)
    assert isinstance(eager.partitions, list)
    for device in (0, 123, 299):
        for other in (again, eager):
            assert all(torch.equal(a, b) for a, b in zip(lazy.partitions[device].tensors, other.partitions[device].tensors))
    assert torch.equal(lazy.test.tensors[0], eager.test.tensors[0])
    other_seed = load_synthetic(num_devices=300, seed=4, **TINY)
    assert not torch.equal(lazy.partitions[5].tensors[0], other_seed.partitions[5].tensors[0])


def test_femnist_shaped_sizes_by_default() -> None:
    sizes = synthetic_sizes(3550, seed=0)
    assert sizes.min() >= 10 and 170 < sizes.mean() < 192 and 60 < sizes.std() < 80  # Table 1: 181 +- 70.7
    data = load_synthetic(num_devices=3550)
    assert data.num_classes == 62 and data.input_shape == (1, 28, 28) and data.partition_sizes() == sizes.tolist()


def test_a_lazy_device_is_checked_when_it_is_made() -> None:
    def wrong_size(i: int) -> TensorDataset:
        return TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))

    parts = LazyPartitions([3, 3], wrong_size)
    with pytest.raises(DataError, match="device 1: make returned 2 samples, its size is 3"):
        parts[1]

    def wrong_label(i: int) -> TensorDataset:
        return TensorDataset(torch.zeros(3, 1, 8, 8), torch.full((3,), 9, dtype=torch.int64))

    data = FederatedData("t", 4, (1, 8, 8), LazyPartitions([3, 3], wrong_label), TensorDataset(*wrong_label(0).tensors[:1], torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(DataError, match=r"partition 0 labels must be in \[0, 4\)"):
        data.partitions[0]
    with pytest.raises(DataError, match="at least one sample"):
        LazyPartitions([3, 0], wrong_label)
    with pytest.raises(IndexError):
        parts[2]
    with pytest.raises(TypeError, match="must be an int"):
        parts["1"]


SCALE = ("dataset=synthetic", "dataset.num_devices=3000", "dataset.samples_per_device=2", "rounds=2", "clients_per_round=3", "seed=0", "runtime=inprocess")


def test_an_experiment_of_thousands_of_devices_builds_none_of_them() -> None:
    cfg = run_config(*SCALE)
    exp = Experiment(cfg)
    assert exp.num_devices == 3000 and exp.data.partitions.built == 0
    assert exp.r_max == [exp.r_max_for_samples(2)] * 3000 and exp.device_sizes == [2] * 3000


def test_the_cheap_properties_equal_the_trainers() -> None:
    """The ClientApp's answer to the properties query without a trainer is the trainer's answer."""
    femnist_like = [o for o in SCALE if not o.startswith("dataset.samples_per_device")]
    cfg = run_config(*femnist_like, "batch_size=64", "local_epochs=2")  # 181 +- 70.7 samples
    exp = Experiment(cfg)
    assert len(set(exp.device_sizes)) > 100
    for device in (0, 1234, 2999):
        trainer = exp.make_trainer(device)
        expected = trainer.properties()
        assert expected[ROUND_SAMPLES] == 2 * exp.device_sizes[device]
        context = Context(1, 1000 + device, {"partition-id": device, "num-partitions": 3000}, RecordDict(), {})
        saved = flwr_app._experiment
        try:
            flwr_app._experiment = lambda _context: (cfg, exp)
            assert flwr_app._properties_fn(context) == {PARTITION_ID: device, ROUND_SAMPLES: expected[ROUND_SAMPLES]}
        finally:
            flwr_app._experiment = saved


def test_a_run_of_thousands_of_devices_builds_only_the_drawn_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, 3,000 devices, 3 per round: the server knows every node's device and sizes
    (two nodes are asked, to check), only the drawn devices get a trainer (model and data), and
    the draws are the seeded draw by device id."""
    built: list[int] = []
    queried: list[int] = []
    events: list[str] = []
    deliver = InProcessGrid._deliver

    def counting_deliver(self, msg):
        if msg.metadata.message_type == MessageType.QUERY:
            queried.append(msg.metadata.dst_node_id)
            events.append("query")
        return deliver(self, msg)

    monkeypatch.setattr(InProcessGrid, "_deliver", counting_deliver)
    make_trainer = Experiment.make_trainer

    def counting(self, device_id, data=None):
        built.append(int(device_id))
        events.append("trainer")
        return make_trainer(self, device_id, data)

    monkeypatch.setattr(Experiment, "make_trainer", counting)
    start_output = flwr_app.start_output

    def recording_start(*args, **kwargs):
        events.append("clock starts")  # the recorder's wall_time counts from here
        return start_output(*args, **kwargs)

    monkeypatch.setattr(flwr_app, "start_output", recording_start)
    experiment_module._load_data.cache_clear()
    cfg = run_config(*SCALE)
    run_experiment(cfg, tmp_path / "run", show_rounds=False)
    with (tmp_path / "run" / "draws.csv").open(newline="") as f:
        drawn = [[int(d) for d in row["train_devices"].split()] for row in csv.DictReader(f)]
    rng = random.Random(0)
    assert drawn == [sorted(seeded_draw(rng, {d: d for d in range(3000)}, 3)) for _ in range(2)]
    assert sorted(built) == sorted({d for devices in drawn for d in devices})  # one trainer per drawn device
    assert sorted(queried) == [NODE_ID_BASE, NODE_ID_BASE + 2999]  # the check of the first and last device
    # the check wakes the ClientApps before round 1's clock starts, so round 1 is not start-up
    assert events.index("clock starts") > max(i for i, e in enumerate(events) if e == "query")
    kwargs = json.dumps(cfg.dataset.loader_kwargs(cfg.seed), sort_keys=True)
    data = experiment_module._load_data(cfg.dataset.name, kwargs)  # the run's (cached) dataset
    assert data.partitions.built == len(set(built))  # only the drawn devices' data was made


@pytest.mark.usefixtures("task_identity")
def test_the_servers_own_properties_are_checked_against_the_nodes_answers() -> None:
    """SimulatedProperties answers for the nodes whose devices the grid names, after two nodes
    confirmed them; a grid whose mapping the nodes contradict gets no answer (every node is asked)."""
    cfg = run_config(*SCALE)
    exp = Experiment(cfg)

    def client(msg: Message, context: Context) -> Message:
        record = MetricRecord({PARTITION_ID: int(context.node_config["partition-id"])})
        return Message(RecordDict({PROPERTIES_RECORD: record}), reply_to=msg)

    nodes = [{"partition-id": i, "num-partitions": 3000} for i in range(3000)]
    answer = SimulatedProperties(cfg, exp)(InProcessGrid(client, nodes, 1, {}), [NODE_ID_BASE + 7, NODE_ID_BASE + 2999])
    assert answer == {
        NODE_ID_BASE + 7: {PARTITION_ID: 7, ROUND_SAMPLES: 2},
        NODE_ID_BASE + 2999: {PARTITION_ID: 2999, ROUND_SAMPLES: 2},
    }

    class Reversed(InProcessGrid):
        def node_partitions(self) -> dict[int, int]:
            return {node: 2999 - part for node, part in super().node_partitions().items()}

    assert SimulatedProperties(cfg, exp)(Reversed(client, nodes, 1, {}), [NODE_ID_BASE + 7]) == {}
    assert SimulatedProperties(cfg, exp)(InProcessGrid(client, nodes[:10], 1, {}), [NODE_ID_BASE]) == {}  # 10 of 3000


@pytest.mark.parametrize("method", ["distreal", "fjord", "fedrolex"])
def test_evicting_trainers_changes_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """A process keeps trainers within a byte budget (``TrainerCache``, 64 MiB); over 3,550 devices
    a long run evicts and rebuilds them, and a Ray actor trains whichever devices it is sent. So a round's training
    must not depend on a trainer kept from an earlier round: a run that keeps one trainer (every
    drawn device rebuilt every round) equals one that keeps all, in every metrics.csv column but
    wall_time. 12 devices, 4 per round, 5 rounds: devices are drawn again."""
    from flwr_distreal.flower.clientapp import build_client_app
    from flwr_distreal.run import runtimes

    overrides = ("dataset=synthetic", "dataset.num_devices=12", "dataset.samples_per_device=20", "rounds=5",
                 "clients_per_round=4", "seed=0", "runtime=inprocess", f"+method={method}", "resources=timevarying")
    kept = run_experiment(run_config(*overrides), tmp_path / "kept", show_rounds=False)
    one = build_client_app(flwr_app._trainer_fn, properties_fn=flwr_app._properties_fn, max_trainers=1)
    monkeypatch.setattr(runtimes, "client_app", one)
    experiment_module.experiment_for.cache_clear()  # nothing carried over in the process either
    rebuilt = run_experiment(run_config(*overrides), tmp_path / "rebuilt", show_rounds=False)
    with (tmp_path / "kept" / "draws.csv").open(newline="") as f:
        drawn = [d for row in csv.DictReader(f) for d in row["train_devices"].split()]
    assert len(drawn) > len(set(drawn)), "no device was drawn twice: nothing was evicted and rebuilt"
    drop = {"wall_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rebuilt] == [
        {k: v for k, v in r.items() if k not in drop} for r in kept
    ]


def test_models_after_the_first_are_copies_and_the_initial_model_stays_seeded() -> None:
    """A rebuilt trainer's model is a copy of the process's first model (not built and traced
    again), never sharing a tensor with it; the server's initial model is built anew from the
    seed, whatever was built before it in the process."""
    cfg = run_config("dataset=synthetic", "dataset.num_devices=6", "dataset.samples_per_device=20", "clients_per_round=2", "seed=3")
    fresh_keys, fresh = Experiment(cfg).initial_arrays()
    exp = Experiment(cfg)
    a, b = exp.build_model(), exp.build_model()
    assert a is not b and all(
        x.data_ptr() != y.data_ptr() for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )
    exp.make_trainer(0)
    keys, arrays = exp.initial_arrays()
    assert keys == fresh_keys and all((x == y).all() for x, y in zip(arrays, fresh))
    torch.manual_seed(99)  # not the seed: the initial model must not depend on it
    assert all((x == y).all() for x, y in zip(Experiment(cfg).initial_arrays()[1], fresh))
