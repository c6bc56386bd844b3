"""A lost node never hangs a run and counts once (issue 20, items 1-2).

Over a fake ``Grid`` whose nodes can disappear (no SuperLink, no Ray): the Message-API
strategies' wait for nodes is bounded by ``node_wait`` (the clock and ``time.sleep`` are
replaced by a fake clock, so no test sleeps), after which a round goes on with the nodes it has
or the run ends with :class:`flwr_distreal.flower.serverapp.NodeWaitError`; a node that replied with an
error and sent no reply (Flower's SuperLink answers for a node that stopped its heartbeats with an
error of its own, from the SuperLink's node id) is one failure. Also: ``node_wait`` in the run
config, and the per-SuperNode watchdog of :mod:`flwr_distreal.run.deploy` that stops a killed
SuperNode's SuperExec and ClientApps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from conftest import GridWithoutSuperLink
from flwr.supercore.task_identity import TaskIdentity

from flwr_distreal.core import contract as C
from flwr_distreal.flower import serverapp
from flwr_distreal.run.experiment import Experiment

LOGGER = "flwr_distreal.flower.serverapp"
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the source of the SuperLink's own error replies


@pytest.fixture(autouse=True)
def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the ServerApp's task identity, which Flower sets in a real run."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` of :mod:`flwr_distreal.flower.serverapp`: sleeping advances
    the clock; ``on_sleep(now)`` may change the grid while the server waits."""

    def __init__(self, on_sleep: Callable[[float], None] | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(serverapp.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(serverapp.time, "sleep", fake.sleep)
    return fake


class LossyGrid(GridWithoutSuperLink):
    """Nodes (node id -> partition id) that can disappear. Pushing gives every message an id
    (as Flower's grids do); a train or evaluate message to a node in ``dead`` is answered as
    Flower's SuperLink answers for a node without heartbeats (an error from the SuperLink's node
    id) when ``superlink_errors``, else not at all; ``crash`` nodes reply with an error of their
    own. Everyone else answers with ``w + 1`` and metrics for DISTREAL and for evaluation."""

    def __init__(self, devices: Mapping[int, int], *, superlink_errors: bool = True) -> None:
        self.devices = dict(devices)
        self.connected = set(self.devices)
        self.dead: set[int] = set()
        self.crash: set[int] = set()
        self.superlink_errors = superlink_errors
        self.node_id_calls = 0
        super().__init__()

    def get_node_ids(self) -> list[int]:
        self.node_id_calls += 1
        return sorted(self.connected)

    def lose(self, node: int) -> None:
        """The node's SuperNode is killed: it answers nothing and leaves the SuperLink's list."""
        self.dead.add(node)
        self.connected.discard(node)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self._outbox = list(messages)
        for msg in self._outbox:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return [m.metadata.message_id for m in self._outbox]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [r for r in (self._answer(m) for m in self._outbox) if r is not None]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in self.dead:
            if self.superlink_errors and msg.metadata.message_type != MessageType.QUERY:
                return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
            return None
        if msg.metadata.message_type == MessageType.QUERY:
            props = MetricRecord({C.PARTITION_ID: self.devices[node], C.ROUND_SAMPLES: 100})
            return Message(RecordDict({C.PROPERTIES_RECORD: props}), reply_to=msg)
        if node in self.crash:
            return Message(Error(code=3, reason=f"ClientApp of node {node} crashed"), reply_to=msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            metrics = MetricRecord({"accuracy": 0.5, "num-examples": 10})
            return Message(RecordDict({C.METRICS_RECORD: metrics}), reply_to=msg)
        w = msg.content[C.ARRAYS_RECORD]["w"].numpy()
        metrics = MetricRecord({C.MACS: 2.0, C.NUM_BATCHES: 2, C.PARTITION_ID: self.devices[node], C.NUM_EXAMPLES: 10})
        content = RecordDict({C.ARRAYS_RECORD: ArrayRecord({"w": Array(w + 1)}), C.METRICS_RECORD: metrics})
        return Message(content, reply_to=msg)


def _strategy(**kw) -> serverapp.Distreal:
    kw.setdefault("full_macs_per_sample", 1.0)
    kw.setdefault("fraction_train", 1.0)
    kw.setdefault("min_train_nodes", 1)
    kw.setdefault("min_available_nodes", 3)
    kw.setdefault("fraction_evaluate", 0.0)
    kw.setdefault("node_wait", 5.0)
    return serverapp.Distreal(**kw)


def _train(strat: serverapp.Distreal, grid: LossyGrid, server_round: int):
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    messages = list(strat.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    return messages, strat.aggregate_train(server_round, replies)


# ----------------------------------------------------------------------- bounded node wait


def test_lost_node_costs_one_bounded_wait_then_rounds_go_on(clock: FakeClock, caplog) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy()
    messages, _ = _train(strat, grid, 1)
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 11, 12] and clock.sleeps == []

    grid.lose(12)
    start = clock.now
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        messages, (_, metrics) = _train(strat, grid, 2)
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 11]
    assert clock.now - start == pytest.approx(5.0)  # waited node_wait, not forever
    assert len(clock.sleeps) == 5 and max(clock.sleeps) <= 1.0
    assert (metrics["received"], metrics["failures"]) == (2, 0)
    assert "2 of 3 nodes connected after waiting node_wait=5 s; going on with the 2 connected" in caplog.text

    start = clock.now
    messages, _ = _train(strat, grid, 3)  # the run goes on with 2: no second wait
    assert len(messages) == 2 and clock.now == start

    grid.lose(11)  # a further loss waits again, once
    messages, _ = _train(strat, grid, 4)
    assert [m.metadata.dst_node_id for m in messages] == [10] and clock.now - start == pytest.approx(5.0)


def test_a_node_that_comes_back_ends_the_wait_early(clock: FakeClock) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy(node_wait=30.0)
    _train(strat, grid, 1)
    grid.connected.discard(12)
    clock.on_sleep = lambda now: grid.connected.add(12) if now >= 1003.0 else None
    messages, _ = _train(strat, grid, 2)
    assert len(messages) == 3 and clock.now == pytest.approx(1003.0)


def test_too_few_nodes_to_start_ends_the_run_naming_the_setting(clock: FakeClock) -> None:
    grid = LossyGrid({10: 0, 11: 1})
    strat = _strategy(min_available_nodes=3, node_wait=7.5)
    with pytest.raises(serverapp.NodeWaitError, match=r"2 nodes connected after waiting node_wait=7.5 s; the run needs "
                       r"min_available_nodes=3 \(run config min-nodes\) to start.*node-wait"):
        _train(strat, grid, 1)
    assert clock.now - 1000.0 == pytest.approx(7.5)


def test_every_node_lost_ends_the_run_naming_the_setting(clock: FakeClock) -> None:
    grid = LossyGrid({10: 0, 11: 1})
    strat = _strategy(min_available_nodes=2)
    _train(strat, grid, 1)
    grid.lose(10)
    grid.lose(11)
    with pytest.raises(serverapp.NodeWaitError, match=r"0 nodes connected .* at least 1 \(min_train_nodes=1\) to go on"):
        _train(strat, grid, 2)
    assert clock.now - 1000.0 == pytest.approx(5.0)


def test_min_train_nodes_is_the_floor_after_the_start(clock: FakeClock) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy(min_train_nodes=3, min_available_nodes=3)
    _train(strat, grid, 1)
    grid.lose(12)
    with pytest.raises(serverapp.NodeWaitError, match=r"min_train_nodes=3"):
        _train(strat, grid, 2)


def test_evaluation_waits_are_bounded_too(clock: FakeClock) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    assert len(list(strat.configure_evaluate(1, arrays, ConfigRecord(), grid))) == 3
    grid.lose(11)
    messages = list(strat.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 12] and clock.now - 1000.0 == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "60", None])
def test_node_wait_must_be_finite_and_positive(bad) -> None:
    with pytest.raises(ValueError, match="node_wait"):
        _strategy(node_wait=bad)


# ---------------------------------------------------------------- one failure per lost node


def test_a_lost_node_is_one_failure_with_the_superlinks_reason(clock: FakeClock, caplog) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy()
    _train(strat, grid, 1)
    grid.dead.add(12)  # killed during round 2: still listed, answered for by the SuperLink
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        messages, (_, metrics) = _train(strat, grid, 2)
    assert len(messages) == 3
    assert (metrics["received"], metrics["failures"], metrics["accepted"]) == (2, 1, 2)
    lines = [r.getMessage() for r in caplog.records if "round 2: node" in r.getMessage()]
    assert lines == [
        "round 2: node 12 (partition-id 2) replied with an error: " + grid_reason()
    ]  # one line, the node's own id and device, the SuperLink's reason; no "sent no reply"


def grid_reason() -> str:
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    return str(create_message_error_unavailable_res_message(msg.metadata, "node_unavail").error.reason)


def test_own_error_and_missing_reply_count_once_per_node(clock: FakeClock, caplog) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2, 13: 3}, superlink_errors=False)
    strat = _strategy(min_available_nodes=4)
    _train(strat, grid, 1)
    grid.crash.add(11)  # an error reply of its own
    grid.dead.add(13)  # no reply at all
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, (_, metrics) = _train(strat, grid, 2)
    assert (metrics["received"], metrics["failures"]) == (2, 2)
    assert "node 11 (partition-id 1) replied with an error: ClientApp of node 11 crashed" in caplog.text
    assert "node 13 (partition-id 3) sent no reply" in caplog.text
    assert "node 11 (partition-id 1) sent no reply" not in caplog.text


def test_an_error_naming_no_message_stands_for_a_missing_node(clock: FakeClock, caplog) -> None:
    """Without message ids (a grid that sets none) the SuperLink's error cannot be matched to its
    node: it and the node's missing reply are still one failure."""
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy()
    _train(strat, grid, 1)
    grid.dead.add(12)
    messages = list(strat.configure_train(2, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    for m in messages:
        m.metadata.__dict__["_message_id"] = ""  # as if the grid had not kept them
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, metrics = strat.aggregate_train(2, replies)
    assert (metrics["received"], metrics["failures"]) == (2, 1)
    assert "1 error reply for no message of this round (from node 1" in caplog.text
    assert "node 12 (partition-id 2) sent no reply" in caplog.text


def test_evaluation_counts_a_lost_node_once(clock: FakeClock, caplog) -> None:
    grid = LossyGrid({10: 0, 11: 1, 12: 2})
    strat = _strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    strat.aggregate_evaluate(1, grid.send_and_receive(list(strat.configure_evaluate(1, arrays, ConfigRecord(), grid))))
    grid.dead.add(11)  # killed after it told its properties
    messages = list(strat.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert len(messages) == 3
    with caplog.at_level(logging.INFO):
        metrics = strat.aggregate_evaluate(2, grid.send_and_receive(messages))
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert "aggregate_evaluate: Received 2 results and 1 failures" in caplog.text
    assert caplog.text.count("node 11 (partition-id 1)") == 1


# ---------------------------------------------------------------------------- run config


def test_node_wait_default_follows_round_timeout() -> None:
    def wait(node_wait, round_timeout) -> float:
        return Experiment.node_wait(SimpleNamespace(cfg=SimpleNamespace(node_wait=node_wait, round_timeout=round_timeout)))

    assert wait(None, None) == serverapp.DEFAULT_NODE_WAIT == 60.0
    assert wait(None, 300.0) == 300.0
    assert wait(12.0, 300.0) == 12.0


@pytest.mark.parametrize("bad", [0.0, -5.0, float("inf")])
def test_run_config_refuses_a_bad_node_wait(bad) -> None:
    from flwr_distreal.run.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="node_wait"):
        RunConfig(node_wait=bad)


def test_node_wait_is_a_run_config_key() -> None:
    from flwr_distreal.run import flwr_app as app

    assert app._VALUES["node-wait"] == "node_wait"
    assert app.overrides_from_run_config({"node-wait": 30.0}) == ["node_wait=30.0"]


# -------------------------------------------------------- a killed SuperNode's processes


_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the watchdog finds processes in /proc (Linux)")
def test_a_killed_supernodes_children_are_stopped_by_its_watchdog() -> None:
    """What :class:`flwr_distreal.run.deploy.LocalDeployment` does per SuperNode: its processes carry
    its tag, and a watchdog stops them once it is gone. Here a "SuperNode" that started a child
    (as a SuperNode starts its SuperExec) is killed with SIGKILL alone; the child must go."""
    from flwr_distreal.run.deploy import NODE_TAG_VAR
    from flwr_distreal.run.processes import start_watchdog, tagged_pids

    tag = uuid.uuid4().hex
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], env={**os.environ, NODE_TAG_VAR: tag}, stdout=subprocess.PIPE, text=True
    )
    watchdog = None
    try:
        child = int(parent.stdout.readline())
        assert sorted(tagged_pids(tag)) == sorted([parent.pid, child])
        watchdog = start_watchdog(parent.pid, tag)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        watchdog.wait(60)  # it exits once it has stopped the tagged processes
        assert tagged_pids(tag) == []
    finally:
        for pid in tagged_pids(tag):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        if watchdog is not None and watchdog.poll() is None:
            watchdog.kill()
