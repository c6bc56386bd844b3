"""A real node's data in a deployment: regrouping a dataset for any number of SuperNodes, a node's
own .npz, and refusals of bad node configs naming the key."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from flwr_distreal.run.config import ConfigError
from flwr_distreal.data import DataError, load_digits, node_data_from_npz, regroup
from flwr_distreal.run.experiment import Experiment, NodeConfigError
from flwr_distreal.training.trainers import DistrealTrainer
from flwr_distreal.training.wallclock import MeasuredBaselineTrainer, MeasuredDistrealTrainer

from conftest import run_config


def _cfg(*overrides: str):
    return run_config("dataset.num_devices=6", "clients_per_round=3", *overrides)


def test_regroup_keeps_whole_devices_and_every_sample() -> None:
    data = load_digits(num_devices=7)
    grouped = regroup(data, 3)
    assert grouped.num_devices == 3
    assert sum(grouped.partition_sizes()) == sum(data.partition_sizes())
    # partition 1 holds devices 1 and 4, in that order
    expected = torch.cat([data.partitions[1].tensors[0], data.partitions[4].tensors[0]])
    assert torch.equal(grouped.partitions[1].tensors[0], expected)
    assert grouped.test is data.test
    assert regroup(data, 7) is data
    with pytest.raises(DataError, match="num-partitions=8 but digits has only 7 devices"):
        regroup(data, 8)
    with pytest.raises(DataError, match="num-partitions must be an int >= 1"):
        regroup(data, 0)


def test_node_data_from_npz(tmp_path) -> None:
    ref = load_digits(num_devices=2)
    path = tmp_path / "node.npz"
    x = (np.random.default_rng(0).random((12, 28, 28)) * 255).astype(np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(12) % 10)
    node = node_data_from_npz(path, ref)
    assert node.num_devices == 1 and node.partition_sizes() == [12] and node.test is ref.test
    assert torch.allclose(node.partitions[0].tensors[0][3, 0], torch.as_tensor(x[3] / 255.0, dtype=torch.float32))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=x, y_train=np.arange(12) + 5)
    with pytest.raises(DataError, match=r"labels in \[5, 16\] but the run has 10 classes"):
        node_data_from_npz(bad, ref)
    np.savez(bad, x_train=x[:, :20, :20], y_train=np.arange(12) % 10)
    with pytest.raises(DataError, match=r"images of shape \(1, 20, 20\)"):
        node_data_from_npz(bad, ref)
    np.savez(bad, images=x)
    with pytest.raises(DataError, match=r"missing arrays \['x_train', 'y_train'\]"):
        node_data_from_npz(bad, ref)
    with pytest.raises(DataError, match="not found"):
        node_data_from_npz(tmp_path / "none.npz", ref)


def test_node_trainers_from_node_config(tmp_path) -> None:
    exp = Experiment(_cfg("deployment=true"))
    a = exp.make_node_trainer({"partition-id": 1, "num-partitions": 3})
    assert isinstance(a, DistrealTrainer) and a.device_id == 1
    assert a.num_samples == sum(exp.data.partition_sizes()[d] for d in (1, 4))
    path = tmp_path / "node.npz"
    np.savez(path, x_train=np.zeros((5, 28, 28), np.float32), y_train=np.zeros(5, np.int64))
    own = exp.make_node_trainer({"data-path": str(path), "partition-id": 9})
    assert own.num_samples == 5 and own.device_id == 9 and own.properties()["partition-id"] == 9


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, r"needs 'partition-id' \(with 'num-partitions'\) or 'data-path'"),
        ({"partition-id": "x", "num-partitions": 3}, "'partition-id' must be an integer, got 'x'"),
        ({"partition-id": 3, "num-partitions": 3}, "'partition-id'=3 must be < 'num-partitions'=3"),
        ({"partition-id": 0, "num-partitions": 0}, "'num-partitions' must be >= 1"),
        ({"partition-id": 0, "num-partitions": 50}, "num-partitions=50 but digits has only 6 devices"),
        ({"data-path": "/no/such.npz"}, "data-path /no/such.npz not found"),
    ],
)
def test_bad_node_config_is_refused_naming_the_key(node_config, message) -> None:
    exp = Experiment(_cfg("deployment=true"))
    with pytest.raises(NodeConfigError, match=message):
        exp.node_data(node_config)


def test_measured_resources_build_wall_clock_trainers() -> None:
    exp = Experiment(_cfg("resources=measured", "deadline=5.0", "resources.time_table=proportional"))
    assert exp.resources is None and exp.train_config() == {"round-deadline": 5.0}
    assert exp.round_timeout() == 70.0
    assert isinstance(exp.make_trainer(0), MeasuredDistrealTrainer)
    base = Experiment(_cfg("resources=measured", "strategy=heterofl", "deployment=true"))
    assert isinstance(base.make_trainer(0), MeasuredBaselineTrainer)
    # the submodel baselines assign from the throughput each device last reported
    assert base.availability(2, 0.0) == float("inf")
    base.note_replies([{"partition-id": 2, "throughput": 5e8}, {"partition-id": 3, "throughput": float("nan")}])
    assert base.availability(2, 0.0) == 5e8 and base.availability(3, 0.0) == float("inf")


def test_submodel_baselines_in_a_deployment_need_measured_resources() -> None:
    with pytest.raises(ConfigError, match="strategy=feddropout with deployment=true needs resources=measured"):
        Experiment(_cfg("strategy=feddropout", "deployment=true", "resources=timevarying"))
    Experiment(_cfg("strategy=feddropout", "deployment=true", "resources=full"))
