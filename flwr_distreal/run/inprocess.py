"""The in-process runtime: the Message-API app, its ServerApp and ClientApp, in this process.

``runtime=inprocess`` runs exactly the code that ``flwr run`` runs (:mod:`flwr_distreal.run.flwr_app`: the
ServerApp's main, the Message-API strategies of :mod:`flwr_distreal.flower.serverapp`, the ClientApp
handlers of :mod:`flwr_distreal.flower.clientapp`) but delivers the messages through
:class:`InProcessGrid`, a :class:`flwr.serverapp.Grid` that hands every message to the ClientApp
in this process, one after another, instead of through a SuperLink, SuperNodes and Ray actors.

What it is for: sweeps on small machines. A sweep of hundreds of short runs (learning-rate
tuning, seeds, the figure presets) pays ``flwr run``'s fixed cost per run (starting the SuperLink,
installing the app, a ServerApp process, Ray) and its per-message cost, which on 2 cores is
larger than the training itself for the FEMNIST CNN. Because the same ServerApp, strategies,
ClientApp and trainers run, a seeded run gives the same per-round metrics as ``flwr run``
(``tests/test_simulation.py`` checks them bit for bit); only ``wall_time`` differs.

What it is not: a simulation of parallel devices or of the network. Clients train one after
another; a round's ``round_timeout`` cannot interrupt a client (it is not applied), and nothing
is serialised between server and clients beyond Flower's records. Use ``flwr run`` (the default)
or a deployment for anything that depends on concurrency or transport.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from ..flower.clientapp import forget_run

__all__ = ["InProcessGrid", "run_app_in_process"]

log = logging.getLogger(__name__)

#: Node ids of the in-process nodes are ``NODE_ID_BASE + partition id``: fixed, so a seeded run
#: orders and names its nodes alike every time.
NODE_ID_BASE = 1000


class InProcessGrid(Grid):
    """A :class:`flwr.serverapp.Grid` whose nodes are ClientApp calls in this process.

    Every node has its own :class:`flwr.app.Context` (``node_config`` as a SuperNode would have
    it, ``run_config`` of the run, a persistent ``state``). :meth:`send_and_receive` delivers the
    messages in the order given and returns the replies; a ClientApp that raises is answered with
    an error reply (``CLIENT_APP_RAISED_EXCEPTION``), as Flower's simulation engine does.

    Parameters
    ----------
    client_app : Callable[[Message, Context], Message]
        The ClientApp (a :class:`flwr.clientapp.ClientApp`).
    node_configs : sequence of Mapping
        One node config per node (e.g. ``{"partition-id": 3, "num-partitions": 105}``).
    run_id : int
        The run's id (the trainer cache keys nodes by run and node id).
    run_config : Mapping
        The run config every node sees.
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        node_configs: Iterable[Mapping[str, Any]],
        run_id: int,
        run_config: Mapping[str, Any],
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(int(run_id))
        self._contexts: dict[int, Context] = {}
        for i, node_config in enumerate(node_configs):
            node_id = NODE_ID_BASE + i
            self._contexts[node_id] = Context(int(run_id), node_id, dict(node_config), RecordDict(), dict(run_config))
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}

    # -- Grid ------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def node_partitions(self) -> dict[int, int]:
        """``partition-id`` by node id, of the nodes whose node config has one: the server's
        answer to the properties query without waking every node
        (:class:`flwr_distreal.run.flwr_app.SimulatedProperties`)."""
        out = {}
        for node, context in self._contexts.items():
            part = context.node_config.get("partition-id")
            if isinstance(part, int) and not isinstance(part, bool):
                out[node] = part
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this in-process federation")
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            self._pending[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for msg_id in message_ids:
            if msg_id in self._pending:
                self._replies[msg_id] = self._deliver(self._pending.pop(msg_id))
            if msg_id in self._replies:
                out.append(self._replies.pop(msg_id))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp, in order, and return the replies.

        ``timeout`` is not applied: a client in this process cannot be interrupted.
        """
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- delivery --------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        context = self._contexts[node_id]
        server_node = TaskIdentity._node_id
        TaskIdentity.node_id = node_id
        try:
            reply = self.client_app(msg, context)
        except Exception as ex:  # reported as an error reply, as Flower's simulation engine does
            log.error("node %s (%s): the ClientApp raised %s: %s", node_id, dict(context.node_config), type(ex).__name__, ex)
            log.debug("%s", traceback.format_exc())
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg
            )
        finally:
            TaskIdentity._node_id = server_node
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def run_app_in_process(
    server_main: Callable[[Grid, Context], None],
    client_app: Callable[[Message, Context], Message],
    node_configs: Iterable[Mapping[str, Any]],
    run_config: Mapping[str, Any],
) -> None:
    """Run a ServerApp's main with an :class:`InProcessGrid` over ``node_configs``.

    Sets Flower's task identity (run, task and server node id) for the run, as Flower's runtime
    does in a ServerApp process, and restores it afterwards.
    """
    run_id = int(time.time_ns() % (2**62))  # unique per run: keys the nodes' trainers
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, run_id, 0
    grid = InProcessGrid(client_app, node_configs, run_id, run_config)
    try:
        server_main(grid, Context(run_id, 0, {}, RecordDict(), dict(run_config)))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
        forget_run(run_id)
