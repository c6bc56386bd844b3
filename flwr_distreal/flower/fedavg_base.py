"""The Message-API adapter base: Flower's ``FedAvg`` over a Flower-free reply gate.

:class:`_CoreFedAvg` is what every Message-API strategy of :mod:`flwr_distreal.flower.serverapp`
is built on (see its module docstring for what it adds to Flower's FedAvg): it keeps the
broadcast model, sends one train message per drawn node with its own config, unpacks the
replies into the neutral :class:`flwr_distreal.server.Reply`, lets the core
(:mod:`flwr_distreal.server`) gate and combine them, stops the run with a
:class:`~flwr_distreal.core.contract.ContractError` when every reply of a round breaks the same
contract (:data:`CONTRACT_REASONS`), and averages federated evaluation as Flower's FedAvg does.
Which nodes a round trains (bounded waits, the properties query, seeded sampling) and which
failed is the node half, :class:`flwr_distreal.flower.nodes._NodeSampling`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from ..core import contract as C
from ..core.contract import ContractError, is_number, metric_values
from ..methods.binding import check_minimums
from ..server import (
    Refusal,
    RefusalReason,
    Reply,
    ReplyGate,
    ValidationResult,
    as_device_id,
)
from .nodes import DEFAULT_NODE_WAIT, _NodeSampling

__all__ = ["CONTRACT_REASONS", "EVALUATE_WEIGHT_KEY"]

#: The Message-API strategies' logger: the one of :mod:`flwr_distreal.flower.serverapp`, so that
#: the log lines keep the logger name they had before this module was split out of it.
log = logging.getLogger("flwr_distreal.flower.serverapp")

#: Refusals that mean the clients do not keep the contract (a missing metric, another model,
#: another unit or batch size): when every reply of a round is refused for one of them, every
#: later round would be too, so the run stops (:class:`flwr_distreal.core.contract.ContractError`).
#: Not among them: values a client may get wrong alone (NaN or negative MACs, NaN weights) and
#: the round-relative outliers.
CONTRACT_REASONS: frozenset[str] = frozenset(
    r.value
    for r in (
        RefusalReason.MISSING_MACS,
        RefusalReason.NON_NUMERIC_MACS,
        RefusalReason.MISSING_NUM_BATCHES,
        RefusalReason.INVALID_NUM_BATCHES,
        RefusalReason.EXCESS_MACS,
        RefusalReason.EXCESS_BATCHES,
        RefusalReason.INVALID_WEIGHT,
        RefusalReason.MALFORMED_ARRAYS,
        RefusalReason.WRONG_ARRAY_KEYS,
        RefusalReason.WRONG_ARRAY_COUNT,
        RefusalReason.WRONG_SHAPE,
        RefusalReason.WRONG_DTYPE,
        RefusalReason.UNASSIGNED_CLIENT,
        RefusalReason.DEVICE_MISMATCH,
    )
)


_ARRAY_REASONS: frozenset[str] = frozenset(
    r.value
    for r in (
        RefusalReason.MALFORMED_ARRAYS,
        RefusalReason.WRONG_ARRAY_KEYS,
        RefusalReason.WRONG_ARRAY_COUNT,
        RefusalReason.WRONG_SHAPE,
        RefusalReason.WRONG_DTYPE,
    )
)


#: What evaluate replies are weighted by (Flower's ``FedAvg`` default key).
EVALUATE_WEIGHT_KEY = "num-examples"


def _check_minimums(fedavg_kwargs: Mapping[str, Any]) -> None:
    """Fail fast on inconsistent node minimums. Evaluation minimums are checked only when
    evaluation is asked for explicitly: FedAvg's default (``fraction_evaluate=1.0``) must keep a
    swapped-in strategy working where FedAvg did."""
    check_minimums(fedavg_kwargs, unit="nodes", train="train", fraction_evaluate_default=0.0)


class _CoreFedAvg(_NodeSampling, FedAvg):
    """Flower's Message-API FedAvg over a :class:`flwr_distreal.server.ReplyGate`.

    Subclasses choose the core and may add per-node train config (:meth:`_node_configs`).

    Parameters
    ----------
    core : ReplyGate
        The Flower-free gate and aggregation rule.
    seed : int
        Seed of the node sampling (and of the core's random choices).
    properties_timeout : float | None
        Timeout in seconds of the properties query; None waits for every node.
    round_samples_key : str
        Property with the samples of one round of local training.
    node_wait : float, optional
        Seconds a round waits for enough nodes to connect (:meth:`_wait_for_nodes`; a finite
        number > 0). Defaults to :data:`DEFAULT_NODE_WAIT` (60).
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (with its defaults).
        ``min_available_nodes`` is the number of nodes **to start**: the run's first round
        waits up to ``node_wait`` seconds for them, else the run ends
        (:class:`~flwr_distreal.flower.nodes.NodeWaitError`). Later rounds go on after
        ``node_wait`` with the nodes still connected, if at least ``min_train_nodes``
        (``min_evaluate_nodes``; at least 1).
    """

    def __init__(
        self,
        core: ReplyGate,
        *,
        seed: int,
        properties_timeout: float | None,
        round_samples_key: str,
        node_wait: float = DEFAULT_NODE_WAIT,
        **fedavg_kwargs: Any,
    ) -> None:
        _check_minimums(fedavg_kwargs)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not (is_number(node_wait) and math.isfinite(float(node_wait)) and float(node_wait) > 0):
            raise ValueError(
                f"node_wait must be a finite number of seconds > 0 (how long a round waits for nodes), got {node_wait!r}"
            )
        if properties_timeout is not None and not (
            is_number(properties_timeout) and float(properties_timeout) > 0
        ):
            raise ValueError(f"properties_timeout must be None or > 0, got {properties_timeout!r}")
        self._user_metrics_aggr = fedavg_kwargs.get("train_metrics_aggr_fn")
        super().__init__(**fedavg_kwargs)
        self.core = core
        self.seed = int(seed)
        self.properties_timeout = properties_timeout
        self.round_samples_key = round_samples_key
        self._train_rng = random.Random(self.seed)
        self._evaluate_rng = random.Random(f"{self.seed}/evaluate")
        self._properties: dict[int, dict[str, int | float]] = {}
        self._unidentified: dict[int, str] = {}  # node -> why it reports no device id (cached)
        self._no_query_handler = False  # the ClientApp has no query handler: ask no node
        self._queried = False
        self._warned_unidentified = False
        self._keys: list[str] = []
        self._broadcast: ArrayRecord | None = None
        self._sent: list[int] = []
        self._sent_round: int | None = None
        self._sent_messages: list[Message] = []  # this round's train messages (their ids after sending)
        self._evaluate_messages: list[Message] = []
        self.node_wait = float(node_wait)
        #: Nodes a round waits for at most ``node_wait`` seconds: ``min_available_nodes`` until a
        #: wait ran out, then the nodes the run went on with (None: the run has not started).
        self._expected_nodes: int | None = None
        #: The devices (partition ids; ``"node <id>"`` for a node without one) the last
        #: ``configure_train`` / ``configure_evaluate`` drew, sorted: the run's audit trail.
        self.last_drawn: dict[str, list[int | str]] = {"train": [], "evaluate": []}

    # -- metric keys, read from the core -----------------------------------------------
    @property
    def partition_id_key(self) -> str:
        """Property and train metric with the device id."""
        return self.core.partition_id_key

    @property
    def straggler_key(self) -> str:
        """Train metric that is true for a straggler."""
        return self.core.straggler_key

    @property
    def available_macs_key(self) -> str:
        """Train metric with the MACs the device could have spent."""
        return self.core.available_macs_key

    def summary(self) -> None:
        """Log the sampling and gate settings, then Flower's FedAvg summary."""
        flwr_log(INFO, "\t├──> Seeded sampling: seed %s, by %r", self.seed, self.partition_id_key)
        flwr_log(
            INFO, "\t├──> Node wait: at most %g s (%s nodes to start)", self.node_wait, self.min_available_nodes
        )
        flwr_log(INFO, "\t├──> Gate: stragglers by %r, refusals logged", self.straggler_key)
        flwr_log(INFO, "\t├──> Round bounds: %r", self.core.bounds)
        super().summary()

    # -- train -------------------------------------------------------------------------
    def _node_configs(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """Extra train config per node; a node missing from the result is not trained."""
        return {node: {} for node in nodes}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the broadcast model, draw the round's nodes (seeded), one message per node.

        Parameters
        ----------
        server_round : int
            The current round (1-based).
        arrays : ArrayRecord
            The global model ``theta_{t-1}``, keyed by ``state_dict`` names in order.
        config : ConfigRecord
            The train config for every node; ``server-round`` is added.
        grid : Grid
            Node ids, the properties query.

        Returns
        -------
        Iterable[Message]
            One train message per drawn node, each with its own ``ConfigRecord``.
        """
        self._sent, self._sent_round, self._sent_messages = [], server_round, []
        self.last_drawn["train"] = []
        if self.fraction_train == 0.0:
            return []
        self._keys = list(arrays.keys())
        self._broadcast = arrays
        self.core.broadcast(server_round, [arrays[k].numpy() for k in self._keys])
        nodes = self._sample(
            grid, self.fraction_train, self.min_train_nodes, self._train_rng, "configure_train"
        )
        self.last_drawn["train"] = self._drawn_devices(nodes)
        config[C.SERVER_ROUND] = server_round
        extra = self._node_configs(server_round, nodes)
        messages: list[Message] = []
        for node in nodes:
            if node not in extra:
                continue
            node_config = ConfigRecord({**dict(config), **extra[node]})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
            self._sent.append(node)
        self._sent_messages = messages  # the Grid gives them their ids: error replies name them
        return messages

    def _examples_key(self) -> str:
        """Metric with the examples a reply trained (its weight under FedAvg-type rules)."""
        return self.weighted_by_key

    def _unpack_arrays(self, content: RecordDict) -> tuple[list[np.ndarray], ValidationResult | None]:
        """The reply's arrays in the global model's key order, or a refusal."""
        record = content.array_records.get(self.arrayrecord_key)
        if record is None:
            return [], ValidationResult.refuse(
                RefusalReason.MALFORMED_ARRAYS, f"reply holds no ArrayRecord under {self.arrayrecord_key!r}"
            )
        names = list(record.keys())
        if set(names) != set(self._keys) or len(names) != len(self._keys):
            missing = [k for k in self._keys if k not in record]
            unexpected = [k for k in names if k not in set(self._keys)]
            return [], ValidationResult.refuse(
                RefusalReason.WRONG_ARRAY_KEYS,
                f"ArrayRecord names differ from the global model's: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}",
            )
        try:
            return [record[k].numpy() for k in self._keys], None
        except Exception as err:  # noqa: BLE001 - one client's bad bytes must not stop the round
            return [], ValidationResult.refuse(
                RefusalReason.MALFORMED_ARRAYS, f"arrays cannot be decoded: {err}"
            )

    def _reply(self, msg: Message) -> Reply:
        """A reply message as the core's neutral reply."""
        node = msg.metadata.src_node_id
        content = msg.content
        record = content.metric_records.get(C.METRICS_RECORD)
        if record is None and len(content.metric_records) == 1:
            record = next(iter(content.metric_records.values()))
        metrics: dict[str, Any] = dict(record) if record is not None else {}
        device = as_device_id(metrics.get(self.partition_id_key))
        if device is None and node in self._properties:
            device = as_device_id(self._properties[node].get(self.partition_id_key))
        arrays, refusal = self._unpack_arrays(content)
        key = self._examples_key()
        examples = metrics.get(key)
        if not is_number(examples):
            if refusal is None and key == self.weighted_by_key:
                refusal = ValidationResult.refuse(
                    RefusalReason.INVALID_WEIGHT, f"metric {key!r} is {examples!r}, not a number of examples"
                )
            examples = 0
        return Reply(str(node), device, arrays, examples, metrics, refusal)  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count failures, gate and combine the replies with the core, in device order.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            The train replies received.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global model (the broadcast one, unchanged, when nothing could be
            combined) keyed by ``state_dict`` names in order, and the round's metrics
            ``received``, ``failures``, ``stragglers``, ``refused``, ``clipped``, ``accepted``,
            ``mean_macs``, ``mean_utilisation`` (plus ``train_metrics_aggr_fn``'s over the
            accepted replies, when one was given). ``(None, None)`` when no node was asked.

        Raises
        ------
        RuntimeError
            If :meth:`configure_train` did not broadcast a model before.
        """
        replies = list(replies)
        if not replies and not self._sent and self._sent_round == server_round:
            return None, None
        valid, failures = self._count_failures(server_round, replies, self._sent, self._sent_messages)
        outcome = self.core.aggregate(server_round, [self._reply(m) for m in valid], failures=failures, logger=log)
        refusal = outcome.uniform_refusal()
        if refusal is not None and refusal.reason in CONTRACT_REASONS:
            raise ContractError(self._contract_message(server_round, refusal, len(valid)), refusal.reason)
        metrics = MetricRecord(metric_values(outcome.metrics))
        if self._user_metrics_aggr is not None and outcome.accepted:
            accepted = {a.reply.node for a in outcome.accepted}
            contents = [m.content for m in valid if str(m.metadata.src_node_id) in accepted]
            metrics.update(self._user_metrics_aggr(contents, self.weighted_by_key))
        if outcome.arrays is None:
            return self._broadcast, metrics
        return self._pack(outcome.arrays), metrics

    def _contract_message(self, server_round: int, refusal: Refusal, received: int) -> str:
        """Why the run stops when every reply of a round was refused for ``refusal.reason``."""
        device = "unknown" if refusal.device_id is None else refusal.device_id
        return (
            f"round {server_round}: every reply ({received} of {received}) was refused for the same reason, "
            f"{refusal.reason} (e.g. node {refusal.node}, {self.partition_id_key} {device}: {refusal.message}). "
            f"{self._contract_hint(refusal.reason)} The run stops here: every later round would be refused alike."
        )

    def _contract_hint(self, reason: str) -> str:
        """What the clients must change when every reply is refused for ``reason``."""
        if reason == RefusalReason.INVALID_WEIGHT.value:
            return (
                f"Every train reply's MetricRecord {C.METRICS_RECORD!r} must hold {self._examples_key()!r}, "
                "the number of examples trained (as for Flower's FedAvg)."
            )
        if reason in _ARRAY_REASONS:
            return (
                f"Every train reply must hold the trained model as an ArrayRecord under {self.arrayrecord_key!r} "
                "with the global model's arrays (its state_dict names, in order, shapes and dtypes): the "
                "clients must build the model the server's initial_arrays come from."
            )
        if reason in (RefusalReason.UNASSIGNED_CLIENT.value, RefusalReason.DEVICE_MISMATCH.value):
            return (
                f"A reply's {self.partition_id_key!r} metric must be the device its node reported in the "
                "properties query, and only the nodes sent a submodel may reply."
            )
        return ""

    def _pack(self, arrays: list[np.ndarray]) -> ArrayRecord:
        """Arrays as an ``ArrayRecord`` keyed by the broadcast model's names, in order."""
        return ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(self._keys, arrays)})

    # -- evaluate ----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation with ``fraction_evaluate=0``; else the evaluation nodes are
        drawn seeded, with a generator of their own."""
        self.last_drawn["evaluate"] = []
        self._evaluate_messages = []
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(
            grid, self.fraction_evaluate, self.min_evaluate_nodes, self._evaluate_rng, "configure_evaluate"
        )
        self.last_drawn["evaluate"] = self._drawn_devices(nodes)
        config[C.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._evaluate_messages = list(self._construct_messages(record, nodes, MessageType.EVALUATE))
        return self._evaluate_messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the evaluate replies' metrics by ``num-examples``, as Flower's ``FedAvg``
        does: they carry no MACs (``weighted_by_key`` weighs the train replies only). Failures
        are logged and counted once per node, as in :meth:`aggregate_train`
        (:meth:`_count_failures`)."""
        replies = list(replies)
        sent = [m.metadata.dst_node_id for m in self._evaluate_messages]
        valid, failures = self._count_failures(server_round, replies, sent, self._evaluate_messages)
        flwr_log(INFO, "aggregate_evaluate: Received %s results and %s failures", len(valid), failures)
        if not valid:
            return None
        contents = [m.content for m in valid]
        validate_message_reply_consistency(contents, EVALUATE_WEIGHT_KEY, check_arrayrecord=False)
        return self.evaluate_metrics_aggr_fn(contents, EVALUATE_WEIGHT_KEY)
