"""The Message-API ClientApp handlers on fake messages, against the legacy NumPyClient.

Both wrap the same Flower-free trainer (:mod:`flwr_distreal.training.trainers`), so for the same global
model, config and seed they must return the same arrays and metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from torch.utils.data import DataLoader

from flwr_distreal.core import contract as C
from flwr_distreal.flower.legacy.client import BaselineClient, DistrealClient, TrainerClient
from flwr_distreal.flower.clientapp import (
    TrainerCache,
    arrays_from_record,
    build_client_app,
    make_evaluate_handler,
    make_query_handler,
    make_train_handler,
    record_from_arrays,
)
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs
from flwr_distreal.models import build_model
from flwr_distreal.core.resources import ResourceModel, r_max_for, step_macs
from flwr_distreal.training.schedule import batch_sizes
from flwr_distreal.training.trainers import BaselineTrainer, DistrealTrainer, get_weights

from conftest import random_images

NUM_SAMPLES, BATCH, DEVICE = 40, 16, 3


pytestmark = pytest.mark.usefixtures("task_identity")


def _loader() -> DataLoader:
    return DataLoader(random_images(NUM_SAMPLES, 10), batch_size=BATCH, shuffle=True, generator=torch.Generator())


def _resources() -> tuple[ResourceModel, float]:
    full = count_macs(build_model("femnist_cnn", 10))
    r_max = r_max_for(sum(step_macs(full, b, 3.0) for b in batch_sizes(NUM_SAMPLES, BATCH)), 1.0)
    return ResourceModel(kind="timevarying", deadline=1.0, r_max=r_max, variability=3.0, lam=2.0, seed=0), r_max


def _trainer_kwargs() -> dict:
    resources, r_max = _resources()
    return dict(resources=resources, r_max=r_max, lr=0.1, seed=5)


def _distreal_trainer(context: Context) -> DistrealTrainer:
    torch.manual_seed(1)
    model = build_model("femnist_cnn", 10)
    return DistrealTrainer(
        model, _loader(), int(context.node_config["partition-id"]), LUT.uniform(model), policy="deadline", **_trainer_kwargs()
    )


def _context(node_id: int = 11, partition: int = DEVICE) -> Context:
    return Context(run_id=7, node_id=node_id, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def _global() -> tuple[list[str], list[np.ndarray]]:
    torch.manual_seed(0)
    model = build_model("femnist_cnn", 10)
    return list(model.state_dict().keys()), get_weights(model)


def _train_message(keys, arrays, config: dict) -> Message:
    content = RecordDict({C.ARRAYS_RECORD: record_from_arrays(keys, arrays), C.CONFIG_RECORD: ConfigRecord(config)})
    return Message(content=content, dst_node_id=11, message_type=MessageType.TRAIN)


def test_train_handler_equals_the_legacy_client() -> None:
    keys, arrays = _global()
    config = {C.SERVER_ROUND: 2}
    reply = make_train_handler(_distreal_trainer)(_train_message(keys, arrays, config), _context())

    legacy = TrainerClient(_distreal_trainer(_context()))
    legacy_arrays, legacy_n, legacy_metrics = legacy.fit(arrays, dict(config))

    got = arrays_from_record(reply.content[C.ARRAYS_RECORD], keys)
    assert list(reply.content[C.ARRAYS_RECORD].keys()) == keys  # keyed by state_dict names, in order
    for a, b in zip(got, legacy_arrays):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(got, arrays)), "the handler did not train"
    metrics = reply.content[C.METRICS_RECORD]
    assert isinstance(metrics, MetricRecord)
    assert metrics[C.NUM_EXAMPLES] == legacy_n == NUM_SAMPLES
    assert metrics[C.STRAGGLER] == int(legacy_metrics[C.STRAGGLER]) == 0  # a bool travels as 0/1
    assert metrics[C.MACS] == legacy_metrics[C.MACS] > 0
    assert metrics[C.PARTITION_ID] == DEVICE
    for key, value in legacy_metrics.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(metrics[key])
        else:
            assert metrics[key] == pytest.approx(float(value))
    # a reply to the message it answers
    assert reply.metadata.reply_to_message_id == "" and reply.metadata.dst_node_id == 0


def test_train_handler_trains_the_fixed_subset_of_a_baseline() -> None:
    keys, arrays = _global()

    def trainer_fn(context: Context):
        torch.manual_seed(1)
        return BaselineTrainer(build_model("femnist_cnn", 10), _loader(), DEVICE, **_trainer_kwargs())

    kept = [np.arange(8), None]  # 8 of conv1's 32 filters, all of conv2's
    config = {C.SERVER_ROUND: 1, C.FIXED_SUBSETS: C.encode_subsets(kept), C.UNLIMITED: True}
    reply = make_train_handler(trainer_fn)(_train_message(keys, arrays, config), _context())
    got = dict(zip(keys, arrays_from_record(reply.content[C.ARRAYS_RECORD], keys)))
    before = dict(zip(keys, arrays))
    conv1 = [k for k in keys if k.endswith("weight") and before[k].ndim == 4][0]
    np.testing.assert_array_equal(got[conv1][8:], before[conv1][8:])  # filters outside the subset untouched
    assert not np.array_equal(got[conv1][:8], before[conv1][:8])


def test_train_handler_refuses_an_array_record_of_another_model() -> None:
    keys, arrays = _global()
    msg = _train_message(keys[:-1] + ["not.a.key"], arrays, {C.SERVER_ROUND: 1})
    with pytest.raises(ValueError, match=r"missing \[.*\], unexpected \['not.a.key'\]"):
        make_train_handler(_distreal_trainer)(msg, _context())


def test_query_handler_replies_with_properties() -> None:
    msg = Message(content=RecordDict({C.CONFIG_RECORD: ConfigRecord()}), dst_node_id=11, message_type=MessageType.QUERY)
    reply = make_query_handler(_distreal_trainer)(msg, _context(partition=4))
    props = reply.content[C.PROPERTIES_RECORD]
    assert dict(props) == {C.PARTITION_ID: 4, C.ROUND_SAMPLES: NUM_SAMPLES}


def test_evaluate_handler_reports_loss_accuracy_and_examples() -> None:
    keys, arrays = _global()
    handler = make_evaluate_handler(_distreal_trainer, lambda ctx: _loader())
    msg = Message(
        content=RecordDict({C.ARRAYS_RECORD: record_from_arrays(keys, arrays), C.CONFIG_RECORD: ConfigRecord()}),
        dst_node_id=11,
        message_type=MessageType.EVALUATE,
    )
    metrics = handler(msg, _context()).content[C.METRICS_RECORD]
    assert metrics[C.NUM_EXAMPLES] == NUM_SAMPLES
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])


def test_trainer_cache_builds_once_per_node_and_run() -> None:
    built: list[int] = []

    def trainer_fn(context: Context):
        built.append(int(context.node_id))
        return _distreal_trainer(context)

    cache = TrainerCache(trainer_fn, max_size=2)
    a = cache(_context(node_id=1))
    assert cache(_context(node_id=1)) is a
    cache(_context(node_id=2))
    cache(_context(node_id=3))  # evicts node 1, the least recently used
    cache(_context(node_id=1))
    assert built == [1, 2, 3, 1]
    with pytest.raises(TypeError, match="expected a DeviceTrainer"):
        TrainerCache(lambda ctx: object())(_context())
    # Ray pickles the ClientApp for every message: the copies in one process share the trainers
    import pickle

    original = TrainerCache(_distreal_trainer, max_size=3)
    first = pickle.loads(pickle.dumps(original))
    trainer = first(_context())
    assert first.max_size == 3 and isinstance(trainer, DistrealTrainer)
    assert pickle.loads(pickle.dumps(original))(_context()) is trainer
    assert TrainerCache(_distreal_trainer)(_context()) is not trainer  # another cache, other trainers


def test_trainer_cache_keeps_trainers_within_its_byte_budget() -> None:
    """Kept trainers cost their model and data (nbytes); the least recently used go once the
    kept ones exceed max_bytes, and a round's gradients are freed (not kept between rounds)."""
    keys, arrays = _global()
    one = _distreal_trainer(_context())
    size = one.nbytes()
    params = sum(p.numel() * p.element_size() for p in one.model.parameters())
    data = sum(t.numel() * t.element_size() for t in one.train_loader.dataset.tensors)
    assert params + data <= size < 2 * params + data  # model and data, no gradients yet
    cache = TrainerCache(_distreal_trainer, max_bytes=int(2.5 * size))
    handler = make_train_handler(cache)
    for node in (1, 2, 3, 4):
        handler(_train_message(keys, arrays, {C.SERVER_ROUND: 1}), _context(node_id=node))
    assert [n for _, n in cache.kept()] == [3, 4]  # two fit the budget, the oldest went
    trained = cache(_context(node_id=4))
    assert all(p.grad is None for p in trained.model.parameters()) and trained.nbytes() == size
    tiny = TrainerCache(_distreal_trainer, max_bytes=0)
    tiny(_context(node_id=1))
    tiny(_context(node_id=2))
    assert [n for _, n in tiny.kept()] == [2]  # the one just built always stays
    with pytest.raises(ValueError, match="max_bytes"):
        TrainerCache(_distreal_trainer, max_bytes=-1)


def test_build_client_app_registers_train_query_and_evaluate() -> None:
    app = build_client_app(_distreal_trainer, evaluate_loader_fn=lambda ctx: _loader())
    keys, arrays = _global()
    reply = app(_train_message(keys, arrays, {C.SERVER_ROUND: 1}), _context())
    assert reply.content[C.METRICS_RECORD][C.NUM_EXAMPLES] == NUM_SAMPLES
    query = Message(content=RecordDict({C.CONFIG_RECORD: ConfigRecord()}), dst_node_id=11, message_type=MessageType.QUERY)
    assert app(query, _context()).content[C.PROPERTIES_RECORD][C.PARTITION_ID] == DEVICE


def test_metric_values_are_what_a_metric_record_accepts() -> None:
    values = C.metric_values({"a": True, "b": np.int64(3), "c": np.float32(0.5), "d": float("nan")})
    assert values["a"] == 1 and type(values["a"]) is int and type(values["b"]) is int and values["c"] == 0.5
    MetricRecord(values)  # accepted
    with pytest.raises(TypeError, match="metric 'x' is 'text'"):
        C.metric_values({"x": "text"})


def test_legacy_clients_are_adapters_over_trainers() -> None:
    model = build_model("femnist_cnn", 10)
    client = DistrealClient(model, _loader(), DEVICE, LUT.uniform(model), None)
    assert isinstance(client.trainer, DistrealTrainer) and client.model is model
    assert client.get_properties({}) == {C.PARTITION_ID: DEVICE, C.ROUND_SAMPLES: NUM_SAMPLES}
    assert isinstance(BaselineClient(build_model("femnist_cnn", 10), _loader(), DEVICE, None).trainer, BaselineTrainer)
    with pytest.raises(TypeError, match="must be a DeviceTrainer"):
        TrainerClient(object())  # type: ignore[arg-type]


def test_records_keep_every_shape_of_a_batchnorm_model() -> None:
    """DenseNet's BatchNorm layers hold 0-d ``num_batches_tracked`` tensors: a round trip through
    an ArrayRecord keeps their shape (a 1-d copy would be refused by ``set_weights``)."""
    from flwr_distreal.flower.clientapp import arrays_from_record, record_from_arrays
    from flwr_distreal.models import build_model
    from flwr_distreal.training.trainers import get_weights, set_weights

    model = build_model("densenet_bc_19", 10)
    keys = list(model.state_dict().keys())
    arrays = get_weights(model)
    assert any(a.ndim == 0 for a in arrays)
    back = arrays_from_record(record_from_arrays(keys, arrays), keys)
    assert [a.shape for a in back] == [a.shape for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back))
    set_weights(build_model("densenet_bc_19", 10), back)  # accepted
