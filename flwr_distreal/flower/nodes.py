"""Which nodes a Message-API round trains, and which of them failed.

The node half of :class:`flwr_distreal.flower.fedavg_base._CoreFedAvg` (see "Seeded sampling",
"A plain Flower ClientApp" and "Bounded waits for nodes" in :mod:`flwr_distreal.flower.serverapp`):
a round waits at most ``node_wait`` seconds for enough nodes (:class:`NodeWaitError` if they do
not come), asks each node once for its properties (a ``MessageType.QUERY`` message; the very
first query goes to one node alone), draws the round's nodes seeded by device id
(:func:`flwr_distreal.server.seeded_draw`), nodes without one after them by node id, and counts a
failed node once per round, with one reason (:meth:`_NodeSampling._count_failures`).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from ..core import contract as C
from ..core import defaults as D
from ..core.contract import ContractError
from ..server import ReplyGate, as_device_id, brief_list, sample_size, seeded_draw

__all__ = ["DEFAULT_NODE_WAIT", "NodeWaitError"]

#: The Message-API strategies' logger: the one of :mod:`flwr_distreal.flower.serverapp`, so that
#: the log lines keep the logger name they had before this module was split out of it.
log = logging.getLogger("flwr_distreal.flower.serverapp")

# Why a node reports no device id, as the sampling logs it (one line per cause and round).
_NO_QUERY_HANDLER = "no query handler"
_QUERY_ERROR = "query handler raised"
_NO_PROPERTIES = "no properties record"
_NO_DEVICE_ID = "no device id"
_MISSING_PROPERTIES = "missing properties"
_NO_REPLY = "no reply to the properties query"

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



class _NodeSampling:
    """Node waiting, the properties query, seeded sampling and failure counting of
    :class:`~flwr_distreal.flower.fedavg_base._CoreFedAvg` (a mixin: the state it reads is set by
    that class's constructor and by Flower's ``FedAvg``)."""

    # set by _CoreFedAvg.__init__ (and FedAvg's): what the node half reads
    core: ReplyGate
    seed: int
    node_wait: float
    properties_timeout: float | None
    round_samples_key: str
    configrecord_key: str
    min_available_nodes: int
    partition_id_key: str
    _train_rng: random.Random
    _evaluate_rng: random.Random
    _properties: dict[int, dict[str, int | float]]
    _unidentified: dict[int, str]
    _no_query_handler: bool
    _queried: bool
    _warned_unidentified: bool
    _expected_nodes: int | None

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
        (:func:`flwr_distreal.server.seeded_draw`).

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
