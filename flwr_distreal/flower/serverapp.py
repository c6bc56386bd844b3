"""Flower strategies (Message API): DISTREAL (Algorithm 2) and the paper's baselines.

Twins of the legacy strategies of :mod:`flwr_distreal.flower.legacy.strategy` for Flower's Message API
(``ServerApp`` + ``Grid`` + ``strategy.start``). Each is a subclass of
:class:`flwr.serverapp.strategy.FedAvg` that overrides the hooks it needs and delegates every
decision to the Flower-free core (:mod:`flwr_distreal.server.core`), the same core the legacy
strategies run: given the same replies, in any order, both APIs produce bit-identical global
models.

What these strategies add to Flower's FedAvg
--------------------------------------------
Seeded sampling
    Flower samples with the unseeded global :mod:`random` over random node ids. Here each
    node is asked once for its properties (a ``MessageType.QUERY`` message; the reply holds a
    ``MetricRecord`` under ``"properties"`` with ``partition-id`` and ``round-samples``,
    cached per node id) and the round's nodes are drawn with
    :func:`flwr_distreal.server.core.seeded_draw` and ``random.Random(seed)``: the same
    devices as the legacy :class:`~flwr_distreal.flower.legacy.client_manager.SeededClientManager` draws for
    the same seed. A node that does not answer is logged and not sampled that round.
A plain Flower ClientApp (no query handler)
    Nodes that answer without a device id (no ``@app.query()``, no ``"properties"`` record,
    no integer ``partition-id``) are still sampled, as Flower's FedAvg samples them: by node
    id, sorted, after the nodes that report one, drawn with the same seeded generator. This is
    warned once, with what the client could add; the causes are logged as one line per cause
    and round, naming the nodes. The first query goes to one node alone: if its ClientApp has
    no query handler, no other node is asked (one error reply per run, not one per node). The
    submodel baselines need every device id and stop with a
    :class:`~flwr_distreal.core.contract.ContractError` when no node reports one.
Per-node train config
    Every train message holds the global ``ArrayRecord`` under ``"arrays"`` and its own
    ``ConfigRecord`` under ``"config"``: ``server-round``, plus ``unlimited``
    (:class:`FullResources`) or the node's submodel (``device-id``, ``fixed-subsets``,
    ``submodel-macs``, ``dropout-rate`` or ``width-level``/``width``) for the submodel
    baselines.
Bounded waits for nodes
    Flower waits for ``min_available_nodes`` without end, every round. Here
    ``min_available_nodes`` is the number of nodes **to start**: the run's first round waits
    for them at most ``node_wait`` seconds (default :data:`DEFAULT_NODE_WAIT`) and the run ends
    with a :class:`NodeWaitError` naming the setting if they do not come. A later round that
    finds fewer nodes (a SuperNode was lost) waits at most ``node_wait`` seconds, then goes on
    with the nodes connected if at least ``min_train_nodes`` (``min_evaluate_nodes``; at least
    1), else ends the run the same way; after such a round only a further loss makes a round
    wait again.
One gate, no exceptions for one bad client
    Error replies and replies that never came count as ``failures``, once per node and round
    with one reason (an error reply stands for the node its message went to: a lost node's
    "Node Unavailable" error from the SuperLink and its missing reply are one failure);
    stragglers are dropped;
    every other reply is validated (``ArrayRecord`` names, shapes, dtypes, finiteness; for
    DISTREAL its MACs, also against the batches the server configured for the node's
    ``round-samples``) and a bad one is refused, with its reason logged, instead of Flower's
    ``InconsistentMessageReplies`` stopping the round. The survivors are screened against each
    other (:class:`flwr_distreal.server.core.RoundBounds`): an update norm or a MACs claim far
    above the round's median is refused or clipped. ``aggregate_train`` returns the new
    ``ArrayRecord`` (keyed by ``state_dict`` names, in order; the broadcast one unchanged when
    nothing could be combined) and a ``MetricRecord`` with ``received``, ``failures``,
    ``stragglers``, ``refused``, ``clipped``, ``accepted``, ``mean_macs`` and
    ``mean_utilisation``. A round in which every reply is refused for the same contract
    reason (:data:`CONTRACT_REASONS`: e.g. every reply lacks ``macs``, or has another model's
    arrays) raises :class:`~flwr_distreal.core.contract.ContractError`, naming the reason and what
    the clients must report, so the ServerApp fails instead of training nothing.

Federated evaluation follows Flower's ``FedAvg`` (``fraction_evaluate=1.0`` by default), so a
strategy swapped into a working app keeps the app's evaluation; the project's own runner passes
``fraction_evaluate=0.0`` and evaluates the global model on the server
(``strategy.start(..., evaluate_fn=...)``).

Example
-------
.. code:: python

    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp

    from flwr_distreal.serverapp import Distreal

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Distreal(full_macs_per_sample=4_015_616, fraction_train=0.1, seed=0)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=100)
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from ..core import defaults as D
from ..core.contract import ContractError, is_number, metric_values
from ..core.dropout import DropoutModel
from ..methods import Method, build_core, core_arguments, get_method, list_methods
from ..methods.base import strategy_signature
from ..server import (
    DistrealCore,
    HeteroFLPlanner,
    OnExcess,
    Refusal,
    RefusalReason,
    Reply,
    ReplyGate,
    SubmodelAggregation,
    SubmodelCore,
    ValidationResult,
    as_device_id,
    brief_list,
    sample_size,
    seeded_draw,
)

__all__ = [
    "CONTRACT_REASONS",
    "DEFAULT_NODE_WAIT",
    "ContractError",
    "Distreal",
    "FederatedDropout",
    "FullResources",
    "HeteroFL",
    "MethodStrategy",
    "NodeWaitError",
    "SmallNetwork",
    "SubmodelStrategy",
]

log = logging.getLogger(__name__)

# Why a node reports no device id, as the sampling logs it (one line per cause and round).
_NO_QUERY_HANDLER = "no query handler"
_QUERY_ERROR = "query handler raised"
_NO_PROPERTIES = "no properties record"
_NO_DEVICE_ID = "no device id"
_MISSING_PROPERTIES = "missing properties"
_NO_REPLY = "no reply to the properties query"

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


_NO_HANDLER_TEXT = re.compile(r"No query function registered with name '[^']*'")


def _lacks_query_handler(reply: Message) -> bool:
    """True for the error reply of a ClientApp without a query handler: Flower's ClientApp
    raises ``ValueError("No query function registered with name 'default'")`` and the runtime
    replies with its text (in a simulation, inside Ray's traceback)."""
    return reply.has_error() and "No query function registered" in str(reply.error.reason)


def _short_reason(reason: str, most: int = 200) -> str:
    """An error reply's reason on one line: Flower's simulation puts a whole Ray traceback in it,
    whose last line says what was raised."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= most else text[: most - 3] + "..."


#: What evaluate replies are weighted by (Flower's ``FedAvg`` default key).
EVALUATE_WEIGHT_KEY = "num-examples"

#: Seconds a round waits for enough nodes to connect, by default (``node_wait``).
DEFAULT_NODE_WAIT = D.NODE_WAIT
#: Seconds between two "Waiting for nodes" log lines while a round waits.
_WAIT_LOG_EVERY_S = 10.0


class NodeWaitError(RuntimeError):
    """Too few nodes connected within ``node_wait`` seconds: the run cannot start (fewer than
    ``min_available_nodes``) or go on (fewer than ``min_train_nodes`` / ``min_evaluate_nodes``)."""


def _reply_node(sent: Mapping[str, int]) -> Callable[[Message], int]:
    """The node a reply answers for: the destination of the message it replies to (by message
    id), else its source node.

    Flower's SuperLink synthesizes the error reply of a message whose node stopped sending
    heartbeats ("Node Unavailable") with the SuperLink's own node id as its source; only its
    ``reply_to_message_id`` names the message, hence the node, it stands for.
    """

    def node_of(reply: Message) -> int:
        return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    return node_of


def _sent_ids(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the messages sent (the Grid sets the ids in place)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def _check_minimums(fedavg_kwargs: Mapping[str, Any]) -> None:
    """Fail fast on inconsistent node minimums."""
    min_train = fedavg_kwargs.get("min_train_nodes", 2)
    min_eval = fedavg_kwargs.get("min_evaluate_nodes", 2)
    min_avail = fedavg_kwargs.get("min_available_nodes", 2)
    if min_train > min_avail:
        raise ValueError(f"min_available_nodes ({min_avail}) must be >= min_train_nodes ({min_train})")
    # Evaluation minimums are checked when evaluation is asked for explicitly: FedAvg's default
    # (fraction_evaluate=1.0) must keep a swapped-in strategy working where FedAvg did.
    if fedavg_kwargs.get("fraction_evaluate", 0.0) > 0 and min_eval > min_avail:
        raise ValueError(
            f"min_available_nodes ({min_avail}) must be >= min_evaluate_nodes ({min_eval}) "
            "when nodes evaluate (fraction_evaluate > 0)"
        )


class _CoreFedAvg(FedAvg):
    """Flower's Message-API FedAvg over a :class:`flwr_distreal.server.core.ReplyGate`.

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
        (:class:`NodeWaitError`). Later rounds go on after ``node_wait`` with the nodes still
        connected, if at least ``min_train_nodes`` (``min_evaluate_nodes``; at least 1).
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

    def sampling_state(self) -> dict[str, list]:
        """The state of the seeded node draws (JSON-able), for a checkpoint: a resumed run draws
        the nodes an uninterrupted one would. Node properties are not part of it (node ids
        change on restart; they are asked again)."""
        return {
            name: [version, list(internal), gauss]
            for name, (version, internal, gauss) in (
                ("train", self._train_rng.getstate()),
                ("evaluate", self._evaluate_rng.getstate()),
            )
        }

    def load_sampling_state(self, state: Mapping[str, list]) -> None:
        """Restore :meth:`sampling_state`."""
        for name, rng in (("train", self._train_rng), ("evaluate", self._evaluate_rng)):
            version, internal, gauss = state[name]
            rng.setstate((version, tuple(internal), gauss))

    def summary(self) -> None:
        """Log the sampling and gate settings, then Flower's FedAvg summary."""
        flwr_log(INFO, "\t├──> Seeded sampling: seed %s, by %r", self.seed, self.partition_id_key)
        flwr_log(
            INFO, "\t├──> Node wait: at most %g s (%s nodes to start)", self.node_wait, self.min_available_nodes
        )
        flwr_log(INFO, "\t├──> Gate: stragglers by %r, refusals logged", self.straggler_key)
        flwr_log(INFO, "\t├──> Round bounds: %r", self.core.bounds)
        super().summary()

    # -- devices -----------------------------------------------------------------------
    #: Whether nodes that report no device id may be sampled (by node id, Flower's way).
    #: The submodel baselines assign each device a submodel and need its id: they may not.
    samples_unidentified: bool = True

    #: Properties the server derives itself, without asking the nodes: called as
    #: ``node_properties(grid, nodes)``, it returns the properties (``partition-id``,
    #: ``round-samples``) of the nodes it knows, by node id; the others are asked. In a
    #: simulation of thousands of nodes the ServerApp knows every node's device and sizes (the
    #: run's :class:`~flwr_distreal.run.experiment.Experiment` is the clients'), and a query of
    #: every node would wake every node once (:mod:`flwr_distreal.run.flwr_app` sets it). None:
    #: every node is asked.
    node_properties: Callable[[Grid, Sequence[int]], Mapping[int, Mapping[str, int | float]]] | None = None

    def _required_properties(self) -> list[str]:
        """Properties every node must report to be sampled by device."""
        return [self.partition_id_key]

    def _query(self, grid: Grid, nodes: Sequence[int]) -> dict[int, Message]:
        """Ask ``nodes`` for their properties (one ``MessageType.QUERY`` message each)."""
        queries = [
            Message(
                content=RecordDict({self.configrecord_key: ConfigRecord()}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.properties_timeout))
        node_of = _reply_node(_sent_ids(queries))
        return {node_of(reply): reply for reply in replies}

    def _learn_devices(
        self, grid: Grid, nodes: Sequence[int], what: str
    ) -> tuple[dict[int, int], dict[int, str]]:
        """The device id of every node that reports one, and the nodes that answered without.

        Every node is asked once (the answer is cached). The very first query goes to one node
        alone: when its ClientApp has no query handler, no other node is asked (every node of
        a run runs the same ClientApp), so a plain Flower app costs one error reply, not one
        per node and round. A node whose query handler raised, or that did not answer, is
        asked again next round. What was learnt is logged as one line per cause, naming the
        nodes.

        Returns
        -------
        tuple[dict[int, int], dict[int, str]]
            Device id by node; and by node, why a node that answered reports no usable device
            id (no query handler, no ``"properties"`` record, no integer ``partition-id``, or
            its query handler raised). A node that did not answer is in neither.
        """
        todo = [n for n in nodes if n not in self._properties and n not in self._unidentified]
        if todo and self.node_properties is not None:  # derived by the server: not asked
            for node, props in (self.node_properties(grid, todo) or {}).items():
                props = dict(props)
                if all(k in props for k in self._required_properties()) and as_device_id(
                    props[self.partition_id_key]
                ) is not None:
                    self._properties[node] = props
            todo = [n for n in todo if n not in self._properties]
        retried: dict[int, str] = {}
        learnt: dict[str, list[int]] = {}
        details: dict[str, str] = {}
        if todo:
            replies: dict[int, Message] = {}
            asked = todo
            if not self._no_query_handler and not self._queried:
                probe = min(todo)
                replies = self._query(grid, [probe])
                self._no_query_handler = probe in replies and _lacks_query_handler(replies[probe])
                asked = [n for n in todo if n != probe]
            self._queried = True
            if asked and not self._no_query_handler:
                replies.update(self._query(grid, asked))
            for node in sorted(todo, key=lambda n: n not in replies):  # a real answer's detail first
                if node in replies:
                    props, cause, detail = self._properties_of(replies[node])
                    if props is not None:
                        self._properties[node] = props
                        continue
                elif self._no_query_handler:
                    cause, detail = _NO_QUERY_HANDLER, "not asked: the first node asked has none"
                else:
                    cause, detail = _NO_REPLY, f"properties_timeout={self.properties_timeout}"
                if cause == _QUERY_ERROR:
                    retried[node] = cause
                elif cause != _NO_REPLY:
                    self._unidentified[node] = cause
                learnt.setdefault(cause, []).append(node)
                details.setdefault(cause, detail)
        for cause, which in learnt.items():
            if cause == _NO_REPLY:
                action = "not sampled this round, asked again next round"
            elif self.samples_unidentified:
                action = "sampled by node id" + (", asked again next round" if cause == _QUERY_ERROR else "")
            else:
                action = f"not sampled: {type(self).__name__} assigns submodels by device id"
            log.warning(
                "%s: %s node%s: %s (%s): %s; %s",
                what, len(which), "s" if len(which) != 1 else "", cause, details[cause],
                brief_list(sorted(which)), action,
            )
        devices = {n: int(self._properties[n][self.partition_id_key]) for n in nodes if n in self._properties}
        unidentified = {n: self._unidentified[n] for n in nodes if n in self._unidentified}
        unidentified.update(retried)
        return devices, unidentified

    def _properties_of(self, reply: Message) -> tuple[dict[str, int | float] | None, str, str]:
        """The properties in a query reply, or None with the cause and a detail."""
        if reply.has_error():
            if _lacks_query_handler(reply):
                said = _NO_HANDLER_TEXT.search(str(reply.error.reason))
                return None, _NO_QUERY_HANDLER, f"the ClientApp registers no @app.query(): {said.group(0) if said else ''}"
            return None, _QUERY_ERROR, _short_reason(str(reply.error.reason))
        record = reply.content.metric_records.get(C.PROPERTIES_RECORD) if reply.has_content() else None
        if record is None:
            return None, _NO_PROPERTIES, f"the reply holds no MetricRecord {C.PROPERTIES_RECORD!r}"
        props = dict(record)
        missing = [k for k in self._required_properties() if k not in props]
        if missing:
            cause = _NO_DEVICE_ID if self.partition_id_key in missing else _MISSING_PROPERTIES
            return None, cause, f"{C.PROPERTIES_RECORD!r} lacks {missing}, has {sorted(props)}"
        if as_device_id(props[self.partition_id_key]) is None:
            return None, _NO_DEVICE_ID, f"{self.partition_id_key}={props[self.partition_id_key]!r} is not an int"
        return props, "", ""  # type: ignore[return-value]

    def _warn_unidentified(self, unidentified: int, nodes: int) -> None:
        """Say once what sampling by node id means and what the client could add."""
        if self._warned_unidentified:
            return
        self._warned_unidentified = True
        log.warning(
            "%s of %s nodes report no device id: they are sampled as Flower's FedAvg samples, by node "
            "id (sorted, then drawn with this strategy's random.Random(seed=%s)), after the nodes that "
            "report one. Such a draw is reproducible only while the node ids are (Flower's simulation "
            "makes new ones every run)%s. To sample by device, add a query handler to the ClientApp "
            "(@app.query()) that replies with a MetricRecord %r holding %r (the node's device id, an "
            "int) and %r (the samples of one round of local training), as "
            "flwr_distreal.flower.clientapp.make_query_handler does. This is said once.",
            unidentified,
            nodes,
            self.seed,
            self._unidentified_costs(),
            C.PROPERTIES_RECORD,
            self.partition_id_key,
            self.round_samples_key,
        )

    def _unidentified_costs(self) -> str:
        """What else a node without properties costs this strategy (for the warning)."""
        return ""

    def _wait_for_nodes(self, grid: Grid, fraction: float, min_nodes: int, what: str) -> tuple[list[int], int]:
        """The connected nodes once enough are, waiting at most ``node_wait`` seconds.

        Enough: ``min_available_nodes`` for the run's first round (the nodes **to start**), and
        at least the round's sample size ``max(int(connected * fraction), min_nodes)``. When
        ``node_wait`` runs out the round goes on with the nodes connected, if at least
        ``max(1, min_nodes)`` (a warning says so, and later rounds wait only while fewer than
        these are connected: a lost node does not cost every round ``node_wait``); else
        :class:`NodeWaitError`. Never an unbounded wait: a node lost for good (a SuperNode
        killed) ends the wait after ``node_wait`` seconds.

        Returns
        -------
        tuple[list[int], int]
            The connected node ids and the round's sample size (at most their number).

        Raises
        ------
        NodeWaitError
            If fewer than ``min_available_nodes`` nodes connected within ``node_wait`` seconds
            of the run's start, or fewer than ``max(1, min_nodes)`` later.
        """
        setting = "min_evaluate_nodes" if "evaluate" in what else "min_train_nodes"
        starting = self._expected_nodes is None
        expected = self.min_available_nodes if starting else self._expected_nodes
        floor = self.min_available_nodes if starting else max(1, int(min_nodes))
        start = time.monotonic()
        logged: float | None = None
        while True:
            nodes = list(grid.get_node_ids())
            k = sample_size(len(nodes), fraction, min_nodes)
            need = max(expected, k)  # type: ignore[type-var]
            if len(nodes) >= need:
                break
            waited = time.monotonic() - start
            if waited >= self.node_wait:
                if len(nodes) < max(floor, 1):
                    raise NodeWaitError(
                        f"{what}: {len(nodes)} node{'s' if len(nodes) != 1 else ''} connected after waiting "
                        f"node_wait={self.node_wait:g} s; "
                        + (
                            f"the run needs min_available_nodes={self.min_available_nodes} (run config min-nodes) to start"
                            if starting
                            else f"a round needs at least {max(floor, 1)} ({setting}={min_nodes}) to go on"
                        )
                        + ". Start (or reconnect) the SuperNodes, or raise node_wait (run config node-wait)."
                    )
                k = min(k, len(nodes))
                log.warning(
                    "%s: %s of %s nodes connected after waiting node_wait=%g s; going on with the %s connected "
                    "(later rounds wait only while fewer than %s are connected)",
                    what, len(nodes), need, self.node_wait, len(nodes), len(nodes),
                )
                self._expected_nodes = len(nodes)
                return nodes, k
            if logged is None or waited - logged >= _WAIT_LOG_EVERY_S:
                logged = waited
                flwr_log(
                    INFO,
                    "Waiting for nodes to connect: %d connected (minimum required: %d; at most %.0f s more, node_wait=%g).",
                    len(nodes), need, self.node_wait - waited, self.node_wait,
                )
            time.sleep(max(0.0, min(1.0, self.node_wait - waited)))
        if starting:
            self._expected_nodes = self.min_available_nodes
        return nodes, k

    def _sample(
        self, grid: Grid, fraction: float, min_nodes: int, rng: random.Random, what: str
    ) -> list[int]:
        """Wait for enough nodes, at most ``node_wait`` seconds (:meth:`_wait_for_nodes`), then
        draw seeded: by device id, and the nodes without one by node id after them
        (:func:`flwr_distreal.server.core.seeded_draw`).

        Raises
        ------
        NodeWaitError
            If too few nodes connected within ``node_wait`` seconds (:meth:`_wait_for_nodes`).
        ContractError
            If no node reports a device id and this strategy cannot sample without one.
        """
        nodes, k = self._wait_for_nodes(grid, fraction, min_nodes, what)
        devices, unidentified = self._learn_devices(grid, nodes, what)
        if unidentified and not self.samples_unidentified:
            if not devices:
                raise ContractError(
                    f"{what}: none of the {len(nodes)} nodes reports a device id "
                    f"({', '.join(sorted(set(unidentified.values())))}): "
                    f"{type(self).__name__} assigns each device a submodel from its availability and needs "
                    f"every node's query reply, a MetricRecord {C.PROPERTIES_RECORD!r} holding "
                    f"{C.describe_keys({self.partition_id_key: C.QUERY_PROPERTIES[C.PARTITION_ID], self.round_samples_key: C.QUERY_PROPERTIES[C.ROUND_SAMPLES]})} "
                    "(flwr_distreal.flower.clientapp.make_query_handler replies with them)",
                    "no-device-id",
                )
            unidentified = {}
        if unidentified:
            self._warn_unidentified(len(unidentified), len(nodes))
        available = len(devices) + len(unidentified)
        if available < k:
            log.warning("%s: only %s of %s nodes can be sampled; drawing %s", what, available, k, available)
            k = available
        picked = seeded_draw(rng, devices, k, list(unidentified))
        flwr_log(INFO, "%s: Sampled %s nodes (out of %s)", what, len(picked), len(nodes))
        return picked

    def _drawn_devices(self, nodes: Sequence[int]) -> list[int | str]:
        """The devices of drawn ``nodes``, sorted: partition ids, then ``"node <id>"`` for a node
        that reports none."""
        ids = [as_device_id(self._properties.get(n, {}).get(self.partition_id_key)) for n in nodes]
        named = sorted(i for i in ids if i is not None)
        return [*named, *sorted(f"node {n}" for n, i in zip(nodes, ids) if i is None)]

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

    def _count_failures(
        self, server_round: int, replies: Sequence[Message], sent: Sequence[int], messages: Sequence[Message]
    ) -> tuple[list[Message], int]:
        """The replies with content, and the round's failures: one per node, with one reason.

        A node fails when it replied with an error or sent no reply; it counts **once**, with
        its error's reason when it has one. A reply stands for the node its message went to
        (:func:`_reply_node`): Flower's SuperLink answers for a node that stopped sending
        heartbeats with an error reply of its own ("Node Unavailable", from the SuperLink's
        node id), which must not count as a second failure beside the node's missing reply.
        An error reply that names no message sent this round stands for one of the nodes that
        sent no reply (each message gets at most one reply), so those count
        ``max(missing, unattributed)``.

        Returns
        -------
        tuple[list[Message], int]
            The replies without error, and the number of failed nodes.
        """
        node_of = _reply_node(_sent_ids(messages))
        valid = [m for m in replies if not m.has_error()]
        answered = {node_of(m) for m in valid}
        sent_set = set(sent)
        failed: dict[int, str] = {}
        unattributed: list[Message] = []
        for msg in replies:
            if not msg.has_error():
                continue
            node = node_of(msg)
            if node in sent_set:
                if node not in answered:
                    failed.setdefault(node, str(msg.error.reason))
            else:
                unattributed.append(msg)
        for node, reason in failed.items():
            log.warning(
                "round %s: node %s (%s %s) replied with an error: %s",
                server_round, node, self.partition_id_key, self._device_of(node), reason,
            )
        missing = [n for n in sent if n not in answered and n not in failed]
        for node in missing:
            log.warning(
                "round %s: node %s (%s %s) sent no reply", server_round, node, self.partition_id_key, self._device_of(node)
            )
        if unattributed:
            log.warning(
                "round %s: %s error repl%s for no message of this round (from node %s: %s); counted with the %s "
                "node%s that sent no reply",
                server_round, len(unattributed), "y" if len(unattributed) == 1 else "ies",
                unattributed[0].metadata.src_node_id, _short_reason(str(unattributed[0].error.reason)),
                len(missing), "" if len(missing) == 1 else "s",
            )
        return valid, len(failed) + max(len(missing), len(unattributed))

    def _device_of(self, node: int) -> object:
        """A node's device id for the log (``"unknown"`` before it reported one)."""
        return self._properties.get(node, {}).get(self.partition_id_key, "unknown")

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


# ---------------------------------------------------------------------------- DISTREAL


class MethodStrategy(_CoreFedAvg):
    """The Message-API strategy of any registered method (:mod:`flwr_distreal.methods`).

    The method's record picks the server rule (:func:`flwr_distreal.methods.build_core`: Algorithm
    2's MACs weights, FedAvg's example weights, or round-start submodels with the method's
    planner and per-weight averaging) and what each node's train config carries; this class is
    the one Flower adapter for all of them. ``MethodStrategy("heterofl", shrink=0.5, ...)`` runs
    any registered method; the public classes below (:class:`Distreal`, :class:`FullResources`,
    :class:`SmallNetwork`, :class:`FederatedDropout`, :class:`HeteroFL`) are this class bound to
    one method, with that method's arguments in their signatures.

    Parameters
    ----------
    method : str | Method
        A registered method's name (or record). Bound classes take none.
    seed : int, optional
        Seed of the node sampling (and of a planner's random choices). Defaults to 0.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None (wait for every node).
    round_samples_key : str, optional
        Node property with the samples of one round of local training. Defaults to
        ``"round-samples"``.
    round_samples_fn : Callable[[int], int] | None, optional
        Rule ``submodel`` only: ``round_samples_fn(device_id)`` instead of the node's
        ``round-samples`` property.
    weighted_by_key : str, optional
        Rule ``macs``: the train metric with the MACs ``c_i`` (default ``"macs"``); other rules:
        FedAvg's weight key (default ``"num-examples"``).
    **kwargs : Any
        The method's arguments (:func:`flwr_distreal.methods.core_arguments`: bounds, keys, and
        the rule's and planner's own), then ``node_wait`` (seconds a round waits for enough
        nodes, see :class:`_CoreFedAvg`; default 60) and :class:`flwr.serverapp.strategy.FedAvg`'s.
    """

    #: The method a public subclass is bound to (None: the ``method`` argument names it).
    method_name: str | None = None

    def __init__(
        self,
        method: str | Method | None = None,
        *,
        seed: int = D.SEED,
        properties_timeout: float | None = None,
        round_samples_key: str = C.ROUND_SAMPLES,
        round_samples_fn: Callable[[int], int] | None = None,
        weighted_by_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.method = _bound_method(type(self), method)
        rule = self.method.rule
        if round_samples_fn is not None and rule != "submodel":
            raise TypeError(f"round_samples_fn is an argument of the submodel methods, not of {self.method.name!r}")
        known = core_arguments(self.method)
        core_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in known}
        if rule == "macs":
            if weighted_by_key is not None and "macs_key" in core_kwargs:
                raise TypeError("pass weighted_by_key or macs_key (the same key), not both")
            weighted_by_key = core_kwargs.setdefault("macs_key", weighted_by_key or C.MACS)
        if rule == "submodel":
            core_kwargs["seed"] = seed
            _check_minimums(kwargs)
        if weighted_by_key is not None:
            kwargs["weighted_by_key"] = weighted_by_key
        super().__init__(
            build_core(self.method, **core_kwargs),
            seed=seed,
            properties_timeout=properties_timeout,
            round_samples_key=round_samples_key,
            **kwargs,
        )
        self.round_samples_fn = round_samples_fn
        self.samples_unidentified = rule != "submodel"  # a submodel is planned for a known device

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method_name"):
            _bind_signature(cls)

    # -- what the rule needs from the nodes ----------------------------------------------
    def _required_properties(self) -> list[str]:
        keys = [self.partition_id_key]
        if self.method.rule == "submodel" and self.round_samples_fn is None:
            keys.append(self.round_samples_key)
        return keys

    def _known_devices(self, nodes: list[int]) -> dict[str, tuple[object, object]]:
        """(device id, round samples) of every node, as learnt from its properties."""
        devices: dict[str, tuple[object, object]] = {}
        for node in nodes:
            props = self._properties.get(node, {})
            device_id = props.get(self.partition_id_key)
            if self.round_samples_fn is not None and is_number(device_id):
                samples: object = self.round_samples_fn(int(device_id))  # type: ignore[arg-type]
            else:
                samples = props.get(self.round_samples_key)
            devices[str(node)] = (device_id, samples)
        return devices

    def _node_configs(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """Each node's train config: ``macs``: its ``num_batches`` limit from its
        ``round-samples`` property (when the batch size or ``max_batches_fn`` is known) and the
        batch size and local epochs it is bounded by; ``examples``: nothing, or ``unlimited``
        for a method without resource limits; ``submodel``: the submodel the planner chose for
        its device (a node left out is not trained)."""
        rule = self.method.rule
        if rule == "macs":
            if self.core.bounds_batches:
                self.core.limit_round(server_round, self._known_devices(nodes), logger=log)
            return {node: self.core.train_config() for node in nodes}
        if rule == "submodel":
            if self._keys != self.core.state_keys:
                raise ValueError(
                    f"the global ArrayRecord's names are not the state_dict names of {self.core.model.model_name!r}"
                )
            configs = self.core.plan_round(server_round, self._known_devices(nodes), logger=log)
            return {node: configs[str(node)] for node in nodes if str(node) in configs}
        if self.method.unlimited:
            return {node: {C.UNLIMITED: True} for node in nodes}
        return super()._node_configs(server_round, nodes)

    def _examples_key(self) -> str:
        if self.method.rule == "macs":
            return C.NUM_EXAMPLES  # informative only: Algorithm 2 weights by MACs
        return super()._examples_key()

    def _unidentified_costs(self) -> str:
        if self.method.rule == "macs" and self.core.bounds_batches and self.core.max_batches_fn is None:
            return f", and without {self.round_samples_key!r} their num_batches is bounded only by their own num-examples"
        return ""

    def _contract_hint(self, reason: str) -> str:
        if self.method.rule != "macs":
            return super()._contract_hint(reason)
        core = self.core
        if reason in (
            RefusalReason.MISSING_MACS.value,
            RefusalReason.NON_NUMERIC_MACS.value,
            RefusalReason.MISSING_NUM_BATCHES.value,
            RefusalReason.INVALID_NUM_BATCHES.value,
        ):
            required = {
                self.weighted_by_key: C.DISTREAL_TRAIN_METRICS[C.MACS],
                core.num_batches_key: C.DISTREAL_TRAIN_METRICS[C.NUM_BATCHES],
            }
            optional = {
                C.NUM_EXAMPLES: C.OPTIONAL_TRAIN_METRICS[C.NUM_EXAMPLES],
                self.partition_id_key: C.OPTIONAL_TRAIN_METRICS[C.PARTITION_ID],
                self.straggler_key: C.OPTIONAL_TRAIN_METRICS[C.STRAGGLER],
                self.available_macs_key: C.OPTIONAL_TRAIN_METRICS[C.AVAILABLE_MACS],
            }
            return (
                "Distreal weights each update by the MACs its client spent (Algorithm 2), so every train "
                f"reply's MetricRecord {C.METRICS_RECORD!r} must hold {C.describe_keys(required)}; it may add "
                f"{C.describe_keys(optional)}. A ClientApp written for Flower's FedAvg reports only "
                f"{C.NUM_EXAMPLES!r}; flwr_distreal.clientapp.build_client_app reports them all."
            )
        if reason == RefusalReason.EXCESS_MACS.value:
            return (
                f"Every reply claims more MACs than {core.num_batches_key!r} x full_macs_per_sample "
                f"({core.full_macs_per_sample:g}). {self.weighted_by_key!r} adds, per mini-batch, the forward "
                "MACs per sample of the (sub)model trained, at most count_macs(model) (not times the batch "
                "size, nor the backward pass), and full_macs_per_sample must be the full model's "
                "count_macs(model)."
            )
        if reason == RefusalReason.EXCESS_BATCHES.value:
            return (
                f"Every reply reports more mini-batches than batch_size={core.batch_size} and "
                f"local_epochs={core.local_epochs} allow for its node's {self.round_samples_key!r} (or "
                "max_batches_fn): pass the clients' batch size and local epochs to the strategy."
            )
        return super()._contract_hint(reason)

    def summary(self) -> None:
        """Log the method's settings, then the base summary."""
        core, rule = self.core, self.method.rule
        flwr_log(INFO, "\t├──> Method: %s (%s)", self.method.label, self.method.name)
        if rule == "macs":
            flwr_log(INFO, "\t│\t├── MACs key: %r", self.weighted_by_key)
            flwr_log(INFO, "\t│\t├── Full model's MACs per sample: %g", core.full_macs_per_sample)
            flwr_log(
                INFO,
                "\t│\t├── Batches bounded by: %s",
                "max_batches_fn" if core.max_batches_fn is not None
                else f"batch size {core.batch_size}, {core.local_epochs} local epochs, round-samples"
                if core.batch_size is not None else "the client's num_batches only",
            )
            flwr_log(INFO, "\t│\t└── On excess MACs: %s", core.on_excess)
        elif rule == "submodel":
            flwr_log(INFO, "\t│\t├── Model: %s (%s dropout layers)", core.model.model_name, len(core.widths))
            flwr_log(
                INFO, "\t│\t├── Round duration: %g s, step MACs factor %g", core.round_duration, core.step_macs_factor
            )
            flwr_log(INFO, "\t│\t└── Aggregation: %s", core.aggregation)
        super().summary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method.name!r}, seed={self.seed})"


def _bound_method(cls: type, method: str | Method | None) -> Method:
    """The method of a strategy: the class's bound one, or the ``method`` argument."""
    if cls.method_name is not None:
        if method is not None and get_method(method).name != cls.method_name:
            raise TypeError(f"{cls.__name__} runs method {cls.method_name!r}; got method={method!r}")
        return get_method(cls.method_name)
    if method is None:
        raise TypeError(f"{cls.__name__} needs a method: one of {list_methods()}")
    return get_method(method)


#: The adapter's own arguments (before the method's) in a bound class's signature.
_COMMON_PARAMETERS = [
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=D.SEED),
    inspect.Parameter("properties_timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("round_samples_key", inspect.Parameter.KEYWORD_ONLY, default=C.ROUND_SAMPLES),
]


def _bind_signature(cls: type) -> None:
    """Give a class bound to a method a constructor whose signature lists that method's
    arguments and defaults (it calls :meth:`MethodStrategy.__init__`)."""
    method = get_method(cls.method_name)
    leading = list(_COMMON_PARAMETERS)
    drop: tuple[str, ...] = ()
    if method.rule == "macs":
        leading.append(inspect.Parameter("weighted_by_key", inspect.Parameter.KEYWORD_ONLY, default=C.MACS))
        drop = ("macs_key",)
    if method.rule == "submodel":
        leading.append(inspect.Parameter("round_samples_fn", inspect.Parameter.KEYWORD_ONLY, default=None))

    def __init__(self: MethodStrategy, **kwargs: Any) -> None:
        MethodStrategy.__init__(self, kwargs.pop("method", None), **kwargs)  # a method= is refused there

    __init__.__signature__ = strategy_signature(method, leading, drop)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"A :class:`MethodStrategy` of method {method.name!r} (arguments: see the class)."
    cls.__init__ = __init__  # type: ignore[method-assign]


# ------------------------------------------------------------- the paper's methods, by name
class Distreal(MethodStrategy):
    """DISTREAL server (Message API): average updates weighted by the MACs each client spent.

    Algorithm 2 of Rapp et al. (AAAI 2022),
    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i``, with ``c_i`` the
    MACs in the reply's ``weighted_by_key`` metric (:class:`flwr_distreal.server.core.DistrealCore`).
    Stragglers are dropped; a reply is refused, with a logged reason, when its MACs are
    missing, not a number, NaN/inf, negative or above ``num_batches * full_macs_per_sample``,
    its ``num_batches`` above what the server configured for the node (``batch_size``,
    ``local_epochs`` and the node's ``round-samples`` property, or ``max_batches_fn``), or its
    arrays do not match the global model. The round's bounds
    (:class:`flwr_distreal.server.core.RoundBounds`) then refuse or clip an update whose norm
    per ``sqrt(num_batches)`` is more than ``update_bound`` times the round's median, and clip
    or refuse a MACs claim above ``claim_bound`` times the round's median claim. With equal
    ``c_i`` this is FedAvg. A round in which every reply is refused for the same contract
    reason (e.g. no ``macs`` metric: a ClientApp written for Flower's FedAvg) ends the run with
    a :class:`~flwr_distreal.core.contract.ContractError` that names what the clients must report.

    Parameters
    ----------
    full_macs_per_sample : float
        The full model's forward MACs per sample, ``count_macs(model)``. Algorithm 1 adds, once
        per mini-batch, the forward MACs per sample of the (sub)model it trained, so this is the
        most one mini-batch adds to a reply's ``macs`` (bound: ``num_batches`` times it).
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum, or ``num_batches`` above the server's limit.
        Defaults to "refuse".
    batch_size : int | None, optional
        The clients' mini-batch size; with ``local_epochs`` and each node's ``round-samples``
        property it bounds ``num_batches``. Defaults to None (no such bound).
    local_epochs : int, optional
        The clients' local epochs per round. Defaults to 1.
    max_batches_fn : Callable[[int], int] | None, optional
        ``max_batches_fn(device_id)``: the most mini-batches a device trains per round;
        overrides ``batch_size``. Defaults to None.
    update_bound : float | None, optional
        ``k`` (> 1): an update norm (per ``sqrt(batches)``) above ``k`` times the round's median
        is an outlier; None disables it. Defaults to 10.
    on_outlier : {"refuse", "clip"}, optional
        Refuse an outlier update, or scale it down to the bound. Defaults to "refuse".
    update_norm : {"model", "layer"}, optional
        Compare whole-model norms or per-array norms. Defaults to "model".
    claim_bound : float | None, optional
        ``m`` (> 1): a MACs claim above ``m`` times the round's median is an outlier; None
        disables it. Defaults to 10.
    on_claim_outlier : {"refuse", "clip"}, optional
        Clip an outlier claim to ``m`` times the median, or refuse the reply. Defaults to "clip".
    share_bound : float | None, optional
        ``k`` (>= 1): no reply weighs more than ``k`` times the mean of the round's other
        accepted replies, i.e. holds at most ``k / (n + k - 1)`` of the round's weight, whatever
        it claims (:func:`flwr_distreal.server.core.cap_shares`); None disables it. Defaults to
        :data:`~flwr_distreal.server.core.SHARE_BOUND` (4).
    robust : {"clip-to-median", "median", "trimmed-mean"} | None, optional
        Robust aggregation for adversarial settings. Defaults to None (Algorithm 2).
    trim_beta : float, optional
        Fraction trimmed at each end with ``robust="trimmed-mean"``. Defaults to 0.2.
    seed : int, optional
        Seed of the node sampling. Defaults to 0.
    weighted_by_key : str, optional
        Train metric with the MACs ``c_i`` spent. Defaults to ``"macs"``.
    num_batches_key : str, optional
        Train metric with the mini-batches trained. Defaults to ``"num_batches"``.
    straggler_key : str, optional
        Train metric that is true for a straggler. Defaults to ``"straggler"``.
    available_macs_key : str, optional
        Train metric with the MACs the device could have spent. Defaults to ``"available_macs"``.
    partition_id_key : str, optional
        Property and train metric with the device id. Defaults to ``"partition-id"``.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None (wait for every node).
    node_wait : float, optional
        Seconds a round waits for enough nodes (``min_available_nodes`` to start the run; then
        the nodes the run has) before it goes on with the nodes connected, or ends the run with
        :class:`NodeWaitError` (see "Bounded waits for nodes" above). Defaults to 60.
    full_macs_per_batch : float, optional
        Deprecated name of ``full_macs_per_sample`` (a ``DeprecationWarning``; same value).
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``, ``fraction_evaluate`` (default 1, as FedAvg's), ...).

    Raises
    ------
    ValueError
        If ``full_macs_per_sample`` is not a positive finite number, ``on_excess`` is not
        "refuse" or "clip", a bound is out of range, a key is empty, or the node minimums are
        inconsistent.
    TypeError
        If both or neither of ``full_macs_per_sample`` and ``full_macs_per_batch`` are given.
    """

    method_name = "distreal"
    core: DistrealCore

    @property
    def full_macs_per_sample(self) -> float:
        """The full model's forward MACs per sample: the most one mini-batch adds to ``macs``."""
        return self.core.full_macs_per_sample

    @property
    def full_macs_per_batch(self) -> float:
        """Deprecated name of :attr:`full_macs_per_sample` (a ``DeprecationWarning``)."""
        warnings.warn("full_macs_per_batch is deprecated, read full_macs_per_sample", DeprecationWarning, stacklevel=2)
        return self.core.full_macs_per_sample

    @property
    def on_excess(self) -> OnExcess:
        """"refuse" or "clip" MACs above the maximum."""
        return self.core.on_excess

    def __repr__(self) -> str:
        return (
            f"Distreal(full_macs_per_sample={self.full_macs_per_sample:g}, on_excess={self.on_excess!r}, "
            f"seed={self.seed})"
        )


class SmallNetwork(MethodStrategy):
    """Baseline "small network" (Message API): FedAvg on a network that fits the weakest device.

    FedAvg weighted by ``weighted_by_key`` (default ``"num-examples"``) with stragglers dropped
    and every reply's arrays validated (:class:`flwr_distreal.server.core.FedAvgCore`); the
    round's update bounds apply as in :class:`Distreal` (there are no MACs claims to bound).

    Parameters
    ----------
    seed : int, optional
        Seed of the node sampling. Defaults to 0.
    update_bound, on_outlier, update_norm, robust, trim_beta : optional
        The round's update bounds and robust aggregation, as in :class:`Distreal` (defaults
        10, "refuse", "model", None, 0.2); robust rules weight by examples.
    straggler_key, macs_key, available_macs_key, partition_id_key : str, optional
        Train metric keys (MACs only for ``mean_macs``). Defaults from :mod:`flwr_distreal.core.contract`.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None.
    node_wait : float, optional
        Seconds a round waits for enough nodes, as in :class:`Distreal`. Defaults to 60.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    method_name = "small"


class FullResources(SmallNetwork):
    """Baseline "full resources" (Message API): FedAvg on the full model, no resource limits.

    Every train config carries ``"unlimited": True``. Arguments as :class:`SmallNetwork`.
    """

    method_name = "full"


class SubmodelStrategy(MethodStrategy):
    """Shared base of the Message-API baselines that assign a fixed submodel per node.

    At round start every drawn node's device gets a forward budget from its availability at
    the round's start time, and the planner chooses its submodel
    (:class:`flwr_distreal.server.core.SubmodelCore`); the node's own train config carries it.
    Replies are combined with the ``aggregation`` rule (``per_weight``: every weight averaged
    over the clients that trained it; ``all_clients``: FedAvg over the zero-padded updates),
    weighted by ``weighted_by_key`` (default ``"num-examples"``).

    Parameters
    ----------
    model_name : str
        Registry name of the full model the clients train.
    availability_fn : Callable[[int, float], float]
        ``availability_fn(device_id, t)``: MACs per second at simulated time ``t``.
    round_duration : float
        Round duration ``T`` in seconds of simulated time.
    num_classes : int | None, optional
        Classifier outputs; None keeps the model's default.
    model_kwargs : Mapping[str, Any] | None, optional
        Extra builder arguments for the model.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass. Defaults to 3.0.
    round_samples_fn : Callable[[int], int] | None, optional
        ``round_samples_fn(device_id)``; None (default) uses the node's ``round-samples``
        property.
    seed : int, optional
        Seed of the node sampling and the random submodel choices. Defaults to 0.
    aggregation : {"per_weight", "all_clients"}, optional
        The submodel rule (:data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`). Defaults to
        ``"per_weight"``.
    update_bound, on_outlier, update_norm : optional
        The round's update bounds, as in :class:`Distreal` (defaults 10, "refuse", "model").
    robust : {"clip-to-median"} | None, optional
        Every update clipped to the round's median normalised norm. Defaults to None.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None.
    node_wait : float, optional
        Seconds a round waits for enough nodes, as in :class:`Distreal`. Defaults to 60.
    partition_id_key, round_samples_key : str, optional
        Property keys. Defaults ``"partition-id"``, ``"round-samples"``.
    straggler_key, macs_key, available_macs_key : str, optional
        Train metric keys.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Raises
    ------
    ValueError
        If the model name is unknown, ``round_duration`` or ``step_macs_factor`` is not a
        positive finite number, a bound is out of range (``robust`` other than
        "clip-to-median"), or the node minimums are inconsistent.
    
    Bound to no method: its subclasses are; ``SubmodelStrategy(method=...)`` runs any
    registered method of rule ``submodel``.
    """

    core: SubmodelCore

    def __init__(self, method: str | Method | None = None, **kwargs: Any) -> None:
        super().__init__(method, **kwargs)
        if self.method.rule != "submodel":
            raise TypeError(f"{type(self).__name__} runs submodel methods; {self.method.name!r} is rule {self.method.rule!r}")

    @property
    def model(self) -> DropoutModel:
        """The full model (for MACs and masks)."""
        return self.core.model

    @property
    def model_name(self) -> str:
        """Registry name of the full model."""
        return self.core.model.model_name

    @property
    def aggregation(self) -> SubmodelAggregation:
        """The submodel rule: ``"per_weight"`` or ``"all_clients"``."""
        return self.core.aggregation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name={self.model_name!r}, seed={self.seed}, aggregation={self.aggregation!r})"


class FederatedDropout(SubmodelStrategy):
    """Baseline Federated Dropout (Message API; Caldas et al. 2018, extended as in the paper).

    One dropout rate for all layers per node, from its device's availability at round start,
    and a random filter subset fixed for the round, seeded by ``(seed, server_round,
    device_id)`` (:class:`flwr_distreal.server.core.FederatedDropoutPlanner`). Nodes get
    ``"dropout-rate"`` and ``"fixed-subsets"``.

    Parameters
    ----------
    rate_for_budget : Callable[[float], float] | None, optional
        Budget to rate; None (default) uses a uniform LUT over ``rates``.
    rates : Sequence[float] | None, optional
        Candidate rates. Defaults to 0, 0.01, ..., 0.5.
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` and of FedAvg.
    """

    method_name = "feddropout"


class HeteroFL(SubmodelStrategy):
    """Baseline HeteroFL (Message API; Diao, Ding and Tarokh 2021).

    Width level ``p`` keeps the first ``ceil(s**(p-1) * C)`` filters of every dropout layer;
    each node's device gets the widest level whose MACs fit its budget at round start
    (:class:`flwr_distreal.server.core.HeteroFLPlanner`). Nodes get ``"width-level"``,
    ``"width"`` and ``"fixed-subsets"``.

    Parameters
    ----------
    shrink : float, optional
        Shrinking ratio ``s`` in (0, 1). Defaults to 0.7.
    levels : int, optional
        Number of width levels (>= 1). Defaults to 5.
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` and of FedAvg.
    """

    method_name = "heterofl"

    @property
    def planner(self) -> HeteroFLPlanner:
        """The width levels (``level_counts``, ``level_macs``, ``level_for_budget``)."""
        return self.core.planner  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"HeteroFL(model_name={self.model_name!r}, shrink={self.planner.shrink}, "
            f"levels={self.planner.levels}, aggregation={self.aggregation!r})"
        )
