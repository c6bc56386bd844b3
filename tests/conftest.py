"""Shared fakes and helpers of the test suite.

Pytest loads this file before the tests; ``tests/`` is on ``sys.path`` (the test files are not a
package), so a test file imports a helper by name::

    from conftest import FakeGrid, FakeProxy, reply, run_config

What lives here is what more than one test file needs:

* ``task_identity``: the fixture that gives messages the process's task identity, which Flower
  sets in a real ServerApp/ClientApp process (use it as an argument, or
  ``pytestmark = pytest.mark.usefixtures("task_identity")`` for a whole file);
* :class:`FakeGrid` and :func:`reply`: a Message-API ``Grid`` that answers queries with a node's
  properties and train messages with a trainer's reply, and the reply a ClientApp builds;
* :class:`FakeProxy`: a legacy ``ClientProxy`` that answers ``get_properties`` only;
* :func:`compose_config` and :func:`run_config`: ``conf/config.yaml`` (or another primary config)
  composed with overrides, as the Hydra runner composes it, raw or as the validated ``RunConfig``;
* :func:`random_images`, :func:`digits_tensors`: small data sets (random FEMNIST-shaped images;
  scikit-learn's 8x8 digits, no download); :func:`write_leaf`, :func:`write_cifar10`: tiny data
  folders in FEMNIST LEAF's and CIFAR-10's own formats;
* :func:`flop_macs`: per-sample forward MACs of a model as ``torch``'s ``FlopCounterMode`` counts
  them (FLOPs / 2 / batch), the independent reference the MAC counter is checked against.

The ``slow`` marker (``pyproject.toml``) marks the end-to-end tests (runs through Flower's
runtimes, subprocesses, deployments); ``pytest -m "not slow"`` is the fast tier.
"""

from __future__ import annotations

import functools
import json
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
    Scalar,
    Status,
)
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from flwr_distreal.core import contract as C
from flwr_distreal.core.dropout import make_droppable
from flwr_distreal.models.femnist_cnn import FemnistCNN

#: The repository's root and its Hydra config folder.
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

#: The ``round-samples`` a fake node reports unless told otherwise.
ROUND_SAMPLES = 100


# ----------------------------------------------------------------------------- task identity


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their sender from the process's task identity, which Flower sets in a real
    ServerApp/ClientApp process: task 1 of run 1, node 0 (the ServerApp's)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


# ------------------------------------------------------------------ the Message API: a fake grid

Trainer = Callable[[Message], "Message | None"]


class GridWithoutSuperLink(Grid):
    """What every fake ``Grid`` here shares: a run, and messages created as Flower's grids do
    (``push_messages``, ``pull_messages``, ``get_node_ids`` and ``send_and_receive`` are each
    fake's own)."""

    def __init__(self) -> None:
        self._run = Run.create_empty(1)
        self._outbox: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)


class FakeGrid(GridWithoutSuperLink):
    """A ``Grid`` without SuperLink: answers queries with the node's properties and train messages
    with ``trainer``'s reply (None: no reply). ``mute`` nodes never answer anything; ``broken``
    ones answer queries with an error.

    Parameters
    ----------
    devices
        Node id -> partition id (the device it stands for).
    trainer
        Builds a train message's reply (see :func:`reply`); default: no reply.
    samples
        The ``round-samples`` every node reports.
    mute, broken
        Node ids that never answer / answer queries with an error.

    Attributes
    ----------
    queries
        How many queries each node was sent.
    train_messages
        Every train message the grid delivered, in order.
    """

    def __init__(
        self,
        devices: Mapping[int, int],
        trainer: Trainer | None = None,
        *,
        samples: int = ROUND_SAMPLES,
        mute: Iterable[int] = (),
        broken: Iterable[int] = (),
    ) -> None:
        self.devices = dict(devices)
        self.trainer = trainer or (lambda msg: None)
        self.samples = samples
        self.mute, self.broken = set(mute), set(broken)
        self.queries: Counter[int] = Counter()
        self.train_messages: list[Message] = []
        super().__init__()

    def get_node_ids(self) -> list[int]:
        return list(self.devices)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self._outbox = list(messages)
        return [str(i) for i in range(len(self._outbox))]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = [self._answer(m) for m in self._outbox]
        return [r for r in replies if r is not None]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in self.mute:
            return None
        if msg.metadata.message_type == MessageType.QUERY:
            self.queries[node] += 1
            if node in self.broken:
                return Message(Error(code=1, reason="no properties here"), reply_to=msg)
            props = MetricRecord({C.PARTITION_ID: self.devices[node], C.ROUND_SAMPLES: self.samples})
            return Message(RecordDict({C.PROPERTIES_RECORD: props}), reply_to=msg)
        self.train_messages.append(msg)
        return self.trainer(msg)


def reply(msg: Message, arrays: Mapping[str, np.ndarray] | None, metrics: Mapping[str, object]) -> Message:
    """A train reply as a ClientApp builds it: ArrayRecord under "arrays", MetricRecord under
    "metrics" (``arrays=None``: no ArrayRecord at all). A bool metric is stored as is, bypassing
    Flower's type check, as a custom transport could deliver it."""
    content = RecordDict()
    if arrays is not None:
        content[C.ARRAYS_RECORD] = ArrayRecord({k: Array(np.asarray(a)) for k, a in arrays.items()})
    record = MetricRecord()
    for k, v in metrics.items():
        if isinstance(v, bool):
            record.__dict__["_data"][k] = v  # a bool that bypassed Flower's type check (custom transport)
        else:
            record[k] = v  # type: ignore[assignment]
    content[C.METRICS_RECORD] = record
    return Message(content, reply_to=msg)


# --------------------------------------------------------- the legacy API: a fake client proxy


class FakeProxy(ClientProxy):
    """A legacy ``ClientProxy`` that answers ``get_properties`` with ``properties`` (or raises
    ``ConnectionError`` when ``fail``); the strategies never call the rest.

    Attributes
    ----------
    properties
        What ``get_properties`` answers (a copy each call).
    device
        The partition id among ``properties`` (None: none).
    property_calls
        How many times ``get_properties`` was called.
    """

    def __init__(self, cid: str, properties: Mapping[str, Scalar] | None = None, fail: bool = False) -> None:
        super().__init__(cid)
        self.properties = dict(properties or {})
        self._fail = fail
        self.property_calls = 0

    @property
    def device(self) -> Scalar | None:
        """The partition id it reports (None: none)."""
        return self.properties.get(C.PARTITION_ID)

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None) -> GetPropertiesRes:
        self.property_calls += 1
        if self._fail:
            raise ConnectionError("node unreachable")
        return GetPropertiesRes(Status(Code.OK, ""), dict(self.properties))

    def get_parameters(self, ins: GetParametersIns, timeout: float | None, group_id: int | None) -> GetParametersRes:
        raise NotImplementedError("not used by the strategies")

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        raise NotImplementedError("not used by the strategies")

    def evaluate(self, ins: EvaluateIns, timeout: float | None, group_id: int | None) -> EvaluateRes:
        raise NotImplementedError("not used by the strategies")

    def reconnect(self, ins: ReconnectIns, timeout: float | None, group_id: int | None) -> DisconnectRes:
        return DisconnectRes(reason="")


# --------------------------------------------------------------------------------- configs


def compose_config(*overrides: str, name: str = "config", hydra_node: bool = False):
    """``conf/<name>.yaml`` composed with ``overrides`` as the Hydra runner composes it (the
    schemas registered first); ``hydra_node``: with the ``hydra`` node (sweeper, run dirs)."""
    from hydra import compose, initialize_config_dir

    from flwr_distreal.run.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra_node)


def run_config(*overrides: str):
    """The validated :class:`flwr_distreal.run.config.RunConfig` of ``conf/config.yaml`` with ``overrides``."""
    from flwr_distreal.run.config import to_run_config

    return to_run_config(compose_config(*overrides))


# ------------------------------------------------------------------------------------ data


def random_images(n: int, classes: int = 62, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28)) -> TensorDataset:
    """``n`` seeded random images of FEMNIST's shape (uniform in [0, 1)) with random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (embedded, no download): images ``(N, 1, 8, 8)`` in [0, 1]
    (float32) and labels (int64); fresh tensors each call."""
    images, target = _digits_arrays()
    return torch.tensor(images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(target, dtype=torch.long)


def write_leaf(root: Path, writers: dict[str, tuple[int, int]], shards: int = 2, seed: int = 0) -> Path:
    """A FEMNIST folder in LEAF's layout under ``root``: ``writers`` maps a writer's name to its
    (train, test) sample counts; the writers are spread over ``shards`` train json files and
    matching test files; images are seeded random 784-vectors, labels random in [0, 62)."""
    rng = np.random.default_rng(seed)
    names = list(writers)
    for split, col in (("train", 0), ("test", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            users = names[s::shards]
            data = {
                u: {"x": rng.random((writers[u][col], 784)).round(3).tolist(), "y": rng.integers(0, 62, writers[u][col]).tolist()}
                for u in users
            }
            shard = {"users": users, "num_samples": [writers[u][col] for u in users], "user_data": data}
            (root / split / f"all_data_{s}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(shard))
    return root


def cifar_images(n: int, offset: int) -> np.ndarray:
    """``n`` uint8 CIFAR images (rows of 3,072) whose first byte encodes the sample's global index
    ``offset + i`` (mod 256)."""
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = (np.arange(n) + offset) % 256
    return data


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 6) -> Path:
    """CIFAR-10's python pickles under ``root/cifar-10-batches-py`` (returned): five training
    batches of ``per_batch`` images and a test batch of ``n_test`` (:func:`cifar_images`)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        batch = {
            "batch_label": f"training batch {i} of 5",
            "labels": [(j + i) % 10 for j in range(per_batch)],
            "data": cifar_images(per_batch, (i - 1) * per_batch),
            "filenames": [f"{j}.png" for j in range(per_batch)],
        }
        with (folder / f"data_batch_{i}").open("wb") as fh:
            pickle.dump(batch, fh)
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump({"labels": list(range(n_test)), "data": cifar_images(n_test, 200)}, fh)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": per_batch}, fh)
    return folder


# ------------------------------------------------------------------------------------ MACs


def flop_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Per-sample forward MACs of ``model(x)`` as ``FlopCounterMode`` counts them: FLOPs / 2 /
    batch (asserted to divide evenly)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_total_flops()
    assert flops % (2 * x.shape[0]) == 0
    return flops // 2 // x.shape[0]


# ------------------------------------------------------------------------------ tiny models


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight the machine's other work); use
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn() -> FemnistCNN:
    """A droppable FEMNIST CNN of 4 and 6 filters, 5 hidden units, 3 classes (seeded weights)."""
    torch.manual_seed(0)
    return make_droppable(FemnistCNN(widths=(4, 6), hidden=5, num_classes=3), torch.zeros(2, 1, 28, 28), name="tiny_cnn")
