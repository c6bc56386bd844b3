"""Message-API ClientApp pieces: handler factories over :mod:`flwr_distreal.training.trainers`.

A DISTREAL or baseline device in a Flower ``ClientApp`` is a
:class:`~flwr_distreal.training.trainers.DeviceTrainer` (the same Flower-free core the legacy
``NumPyClient`` adapters wrap) plus three handlers:

``@app.train()``
    :func:`make_train_handler`: reads the global model (``ArrayRecord`` under ``"arrays"``,
    keyed by ``state_dict`` names) and the train config (``ConfigRecord`` under ``"config"``),
    runs :meth:`DeviceTrainer.fit`, and replies with the trained ``ArrayRecord`` and a
    ``MetricRecord`` under ``"metrics"`` holding the train metrics of
    :mod:`flwr_distreal.core.contract` (bools as 0/1) and ``num-examples``, so Flower's own
    aggregations keep working.
``@app.query()``
    :func:`make_query_handler`: replies with the device's properties (``partition-id``,
    ``round-samples``) under ``"properties"``; the strategies of
    :mod:`flwr_distreal.flower.serverapp` ask once per node, for seeded sampling and round-start
    budgets.
``@app.evaluate()``
    :func:`make_evaluate_handler`: loss and accuracy of the full model on local data.

:func:`build_client_app` registers all of them on a new ``ClientApp``::

    from flwr_distreal import LUT, ResourceModel, build_model
    from flwr_distreal.clientapp import build_client_app
    from flwr_distreal.training import DistrealTrainer

    def trainer_fn(context):
        device = int(context.node_config["partition-id"])
        model = build_model("femnist_cnn")
        return DistrealTrainer(model, my_loader(device), device, LUT.uniform(model), resources, lr=0.1)

    app = build_client_app(trainer_fn)

Trainers are built once per (run, node) and kept within a memory budget (:class:`TrainerCache`):
a node drawn again reuses its model and data, and :meth:`DeviceTrainer.fit` loads the global arrays first, so
nothing of an earlier round leaks into the next.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..core import contract as C
from ..core.defaults import TRAINER_CACHE_BYTES
from ..training.trainers import DeviceTrainer, evaluate_model

__all__ = [
    "TrainerCache",
    "arrays_from_record",
    "build_client_app",
    "forget_run",
    "make_evaluate_handler",
    "make_query_handler",
    "make_train_handler",
    "record_from_arrays",
]

TrainerFn = Callable[[Context], DeviceTrainer]
Handler = Callable[[Message, Context], Message]


#: Trainers of this process, per cache token: Flower's simulation pickles the ClientApp for
#: every message it sends to a Ray actor, so the copies of one :class:`TrainerCache` in an actor
#: process find their trainers here.
_PROCESS_TRAINERS: dict[str, OrderedDict[tuple[int, int], tuple[DeviceTrainer, int]]] = {}  # (trainer, its nbytes)
_PROCESS_LOCK = threading.Lock()


def forget_run(run_id: int) -> int:
    """Drop this process's trainers of run ``run_id`` (every cache); returns how many.

    A process that runs many runs one after another (the in-process runtime of a sweep) frees
    each run's models and data this way when the run ends.
    """
    dropped = 0
    with _PROCESS_LOCK:
        for trainers in _PROCESS_TRAINERS.values():
            for key in [k for k in trainers if k[0] == int(run_id)]:
                del trainers[key]
                dropped += 1
    return dropped


class TrainerCache:
    """Builds a node's trainer on first use and keeps it, keyed by ``(run_id, node_id)``, within
    a memory budget.

    The trainers live in this process, shared by every unpickled copy of the cache (Flower's
    simulation ships the ClientApp to its Ray actors with every message), so a node drawn again
    reuses its model and data instead of building them again. Keeping is only worth it while
    it is cheap: a trainer costs its model and data (:meth:`DeviceTrainer.nbytes`, about 1.3 MB
    for the FEMNIST CNN) and building one costs about 10 ms, while a federation of 3,550
    devices seldom draws a device twice. So the least recently used trainers go once the kept
    ones exceed ``max_bytes`` (or ``max_size`` trainers); the one just built always stays. No
    result depends on a kept trainer: :meth:`DeviceTrainer.fit` loads the global arrays first
    (``tests/test_scale.py::test_evicting_trainers_changes_no_result``).

    Parameters
    ----------
    trainer_fn : Callable[[Context], DeviceTrainer]
        Builds the trainer of the node that ``context`` describes (its ``node_config`` holds
        e.g. ``partition-id``).
    max_size : int, optional
        Trainers kept at most. Defaults to None (only the byte budget bounds them).
    max_bytes : int, optional
        Bytes of kept trainers at most (:meth:`DeviceTrainer.nbytes`, counted after each round).
        Defaults to 64 MiB.
    """

    def __init__(
        self, trainer_fn: TrainerFn, max_size: int | None = None, max_bytes: int = TRAINER_CACHE_BYTES
    ) -> None:
        if not callable(trainer_fn):
            raise ValueError("trainer_fn must be a callable (Context) -> DeviceTrainer")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.trainer_fn = trainer_fn
        self.max_size = None if max_size is None else int(max_size)
        self.max_bytes = int(max_bytes)
        self._token = uuid.uuid4().hex
        self._bind()

    def _bind(self) -> None:
        with _PROCESS_LOCK:
            self._trainers = _PROCESS_TRAINERS.setdefault(self._token, OrderedDict())
        self._lock = _PROCESS_LOCK

    def __getstate__(self) -> dict:
        """Pickled (Ray ships the ClientApp to its actors) without lock and trainers."""
        return {
            "trainer_fn": self.trainer_fn, "max_size": self.max_size, "max_bytes": self.max_bytes, "token": self._token
        }

    def __setstate__(self, state: dict) -> None:
        self.trainer_fn, self.max_size, self._token = state["trainer_fn"], state["max_size"], state["token"]
        self.max_bytes = state["max_bytes"]
        self._bind()

    def __call__(self, context: Context) -> DeviceTrainer:
        key = _key(context)
        with self._lock:
            entry = self._trainers.get(key)
            if entry is not None:
                self._trainers.move_to_end(key)
                return entry[0]
        trainer = self.trainer_fn(context)
        if not isinstance(trainer, DeviceTrainer):
            raise TypeError(f"trainer_fn returned {type(trainer).__name__}, expected a DeviceTrainer")
        with self._lock:
            self._trainers[key] = (trainer, trainer.nbytes())
            self._evict()
        return trainer

    def kept(self) -> list[tuple[int, int]]:
        """The ``(run_id, node_id)`` of the trainers kept, least recently used first."""
        with self._lock:
            return list(self._trainers)

    def trim(self, context: Context) -> None:
        """Count the trainer of ``context`` at its size now and evict down to the budget (the train
        handler calls it after each round: data loaded, gradients freed)."""
        key = _key(context)
        with self._lock:
            entry = self._trainers.get(key)
            if entry is not None:
                self._trainers[key] = (entry[0], entry[0].nbytes())
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used trainers (never the most recent) until within the budget. Holds the lock."""
        trainers = self._trainers
        while len(trainers) > 1 and self.max_size is not None and len(trainers) > self.max_size:
            trainers.popitem(last=False)
        total = sum(size for _, size in trainers.values())
        while len(trainers) > 1 and total > self.max_bytes:
            _, (_, size) = trainers.popitem(last=False)
            total -= size


def _key(context: Context) -> tuple[int, int]:
    """A trainer's key in :class:`TrainerCache`: ``(run_id, node_id)``."""
    return int(context.run_id), int(context.node_id)


def arrays_from_record(record: ArrayRecord, keys: Iterable[str]) -> list[np.ndarray]:
    """The arrays of ``record`` in the order of ``keys`` (a model's ``state_dict`` keys).

    Raises
    ------
    ValueError
        If the record's keys are not exactly ``keys``, naming the missing and unexpected ones.
    """
    keys = list(keys)
    missing = [k for k in keys if k not in record]
    extra = [k for k in record.keys() if k not in set(keys)]
    if missing or extra:
        raise ValueError(
            f"the ArrayRecord does not match the model's state_dict: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    return [record[k].numpy() for k in keys]


def record_from_arrays(keys: Iterable[str], arrays: Iterable[np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` keyed by ``keys`` (``state_dict`` order), C-ordered arrays. Shapes are
    kept exactly, 0-d ones too (BatchNorm's ``num_batches_tracked``): ``np.ascontiguousarray``
    would make those 1-d."""
    return ArrayRecord(OrderedDict((k, Array(np.asarray(a, order="C"))) for k, a in zip(keys, arrays, strict=True)))


def _resolve(trainers: TrainerFn | TrainerCache) -> TrainerCache:
    return trainers if isinstance(trainers, TrainerCache) else TrainerCache(trainers)


def make_train_handler(trainers: TrainerFn | TrainerCache) -> Handler:
    """A ``@app.train()`` handler that runs one round of Algorithm 1 (or a baseline's round).

    Parameters
    ----------
    trainers : Callable[[Context], DeviceTrainer] or TrainerCache
        Builds (once per node) the node's trainer.

    Returns
    -------
    Callable[[Message, Context], Message]
        The handler. Its reply holds ``"arrays"`` (the trained model, keyed like the received
        one) and ``"metrics"`` (the train metrics and ``num-examples``).
    """
    cache = _resolve(trainers)

    def train(msg: Message, context: Context) -> Message:
        trainer = cache(context)
        keys = list(trainer.model.state_dict().keys())
        arrays = arrays_from_record(msg.content[C.ARRAYS_RECORD], keys)
        config = dict(msg.content[C.CONFIG_RECORD]) if C.CONFIG_RECORD in msg.content else {}
        result = trainer.fit(arrays, config)
        metrics = C.metric_values(result.metrics)
        metrics[C.NUM_EXAMPLES] = int(result.num_examples)
        content = RecordDict(
            {C.ARRAYS_RECORD: record_from_arrays(keys, result.arrays), C.METRICS_RECORD: MetricRecord(metrics)}
        )
        cache.trim(context)  # the trainer's size after its round (data loaded, gradients freed)
        return Message(content=content, reply_to=msg)

    return train


def make_query_handler(
    trainers: TrainerFn | TrainerCache, properties_fn: Callable[[Context], Mapping[str, Any] | None] | None = None
) -> Handler:
    """A ``@app.query()`` handler that replies with the node's properties
    (``partition-id``, ``round-samples``) as a ``MetricRecord`` under ``"properties"``.

    ``properties_fn(context)``, if given, answers without building the node's trainer (a
    simulation of thousands of nodes is asked once per node: building every node's model and
    data for it would cost every node, not only the drawn ones); where it returns None the
    trainer's :meth:`~flwr_distreal.training.trainers.DeviceTrainer.properties` answer."""
    cache = _resolve(trainers)

    def query(msg: Message, context: Context) -> Message:
        props = properties_fn(context) if properties_fn is not None else None
        props = C.metric_values(cache(context).properties() if props is None else props)
        return Message(content=RecordDict({C.PROPERTIES_RECORD: MetricRecord(props)}), reply_to=msg)

    return query


def make_evaluate_handler(
    trainers: TrainerFn | TrainerCache, loader_fn: Callable[[Context], Iterable[tuple[torch.Tensor, torch.Tensor]]]
) -> Handler:
    """A ``@app.evaluate()`` handler: loss and accuracy of the received (full) model on the
    node's evaluation data (``loader_fn(context)``, built once per node).

    The reply's ``"metrics"`` hold ``loss``, ``accuracy`` and ``num-examples``.
    """
    cache = _resolve(trainers)
    loaders: dict[tuple[int, int], Iterable] = {}

    def evaluate(msg: Message, context: Context) -> Message:
        trainer = cache(context)
        key = (int(context.run_id), int(context.node_id))
        if key not in loaders:
            loaders[key] = loader_fn(context)
        keys = list(trainer.model.state_dict().keys())
        trainer.load(arrays_from_record(msg.content[C.ARRAYS_RECORD], keys))
        precision = getattr(trainer, "precision", "fp32")  # the run's, as its training
        loss, accuracy, n = evaluate_model(trainer.model, loaders[key], trainer.torch_device, precision)
        metrics = MetricRecord({"loss": loss, "accuracy": accuracy, C.NUM_EXAMPLES: n})
        return Message(content=RecordDict({C.METRICS_RECORD: metrics}), reply_to=msg)

    return evaluate


def build_client_app(
    trainer_fn: TrainerFn,
    *,
    evaluate_loader_fn: Callable[[Context], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    max_trainers: int | None = None,
    max_trainer_bytes: int = TRAINER_CACHE_BYTES,
    properties_fn: Callable[[Context], Mapping[str, Any] | None] | None = None,
) -> ClientApp:
    """A ``ClientApp`` with DISTREAL's train and query handlers (and evaluate, if asked).

    Parameters
    ----------
    trainer_fn : Callable[[Context], DeviceTrainer]
        Builds a node's trainer (a :class:`~flwr_distreal.training.trainers.DistrealTrainer` or
        :class:`~flwr_distreal.training.trainers.BaselineTrainer`) from its context.
    evaluate_loader_fn : Callable[[Context], Iterable], optional
        The node's evaluation data; with it the app also answers evaluate messages.
    max_trainers : int, optional
        Trainers kept per process at most (see :class:`TrainerCache`). Defaults to None (no
        count limit).
    max_trainer_bytes : int, optional
        Bytes of trainers kept per process at most (see :class:`TrainerCache`). Defaults to 64 MiB.
    properties_fn : Callable[[Context], Mapping | None], optional
        Answers the properties query without building the node's trainer (see
        :func:`make_query_handler`). Defaults to None (the trainer answers).
    """
    cache = TrainerCache(trainer_fn, max_trainers, max_trainer_bytes)
    app = ClientApp()
    app.train()(make_train_handler(cache))
    app.query()(make_query_handler(cache, properties_fn))
    if evaluate_loader_fn is not None:
        app.evaluate()(make_evaluate_handler(cache, evaluate_loader_fn))
    return app
