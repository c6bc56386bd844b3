"""ServerApp and ClientApp for ``flwr run .`` (the ``[tool.flwr.app]`` section of pyproject.toml),
on Flower's Message API.

The ServerApp (``@server_app.main()``) builds the run's Message-API strategy
(:mod:`flwr_distreal.flower.serverapp`) and calls ``strategy.start(...)`` with server-side evaluation
through ``evaluate_fn``, writing ``metrics.csv`` as the rounds go. The ClientApp
(:func:`flwr_distreal.flower.clientapp.build_client_app`) trains each SuperNode's device with the
Flower-free trainer of :mod:`flwr_distreal.training.trainers`. The same app runs in the simulation runtime
(``flwr run . local``) and, unchanged, in the deployment runtime.

The run config (``[tool.flwr.app.config]``, overridable with ``flwr run . local --run-config
"strategy='heterofl' lam=2.0"``) maps onto the same Hydra composition as
``python -m flwr_distreal.main``: each key is a Hydra override, so both entry points run the
same experiment for the same settings. Keys: ``dataset``, ``model``, ``strategy``,
``resources`` (group choices), ``lam``, ``rounds``, ``clients-per-round``, ``seed``,
``deadline``, ``lr``, ``batch-size``, ``local-epochs``, ``lut``, ``output-dir``. An empty
string (the default of every value key in pyproject.toml) keeps ``conf/config.yaml``'s value.
``config-file`` (a YAML written by the Hydra runner: a whole resolved config) replaces the
composition; only ``output-dir`` may be given beside it.

One SuperNode simulates one device of the dataset, so the federation must have exactly as
many SuperNodes as the dataset has devices (20 for the default ``digits``)::

    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\
        flwr run . local --federation-config "num-supernodes=20" --stream

The ServerApp checks the number of SuperNodes before round 1 and stops the run with a
:class:`SuperNodeCountError` naming both numbers when they differ; the ClientApp checks its
``partition-id`` (and ``num-partitions`` in simulation) against the dataset.

Relative paths (``output-dir``, ``lut``, dataset roots) resolve against the working directory
of the process that runs the app, i.e. of the local SuperLink (the directory the first
``flwr run`` that started it ran in). Without ``output-dir`` a run writes to
``outputs/flwr_run/<run id>/``: ``config.yaml``, ``metrics.csv`` (one row per round),
``draws.csv`` (the devices drawn each round), ``run.json`` (the LUT's SHA-256) and
``accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from .checkpoint import Checkpoint, save_checkpoint
from ..flower.clientapp import arrays_from_record, build_client_app, record_from_arrays
from .config import RunConfig, register_configs, to_run_config
from ..core.contract import METRICS_RECORD, PARTITION_ID, PROPERTIES_RECORD, ROUND_SAMPLES
from .experiment import Experiment, experiment_for
from .recording import RunFailedError, check_failures, check_run_dir, finish_output, start_output, summary_line
from .resolvers import register_resolvers
from .staging import APP_DIR, CONF_DIR, stage_app  # re-exported: the app's folder and its staging
from ..training.schedule import batch_sizes

__all__ = [
    "APP_DIR",
    "CONF_DIR",
    "RecordingMessageStrategy",
    "SuperNodeCountError",
    "check_partition",
    "client_app",
    "output_dir_for",
    "overrides_from_run_config",
    "run_config_from_flower",
    "server_app",
    "server_main",
    "stage_app",
    "wait_for_supernodes",
]

#: Seconds the SuperNode count must stay unchanged before a count that differs from the
#: dataset's device count is final (simulation registers all SuperNodes at once).
SUPERNODE_SETTLE_S = 5.0
#: Seconds to wait for the first SuperNode before giving up.
SUPERNODE_TIMEOUT_S = 120.0

_GROUPS = {"dataset": "dataset", "model": "model", "strategy": "strategy", "resources": "resources"}
_VALUES = {
    "lam": "resources.lam",
    "rounds": "rounds",
    "clients-per-round": "clients_per_round",
    "seed": "seed",
    "deadline": "deadline",
    "lr": "lr",
    "batch-size": "batch_size",
    "local-epochs": "local_epochs",
    "lut": "lut",
    "output-dir": "output_dir",
    "deployment": "deployment",
    "min-nodes": "min_nodes",
    "round-timeout": "round_timeout",
    "node-wait": "node_wait",
    "resume": "resume",
    "clip-norm": "clip_norm",
    "device": "device",
}
#: Run-config key with a whole resolved config (YAML), written by the Hydra runner.
CONFIG_FILE_KEY = "config-file"


class SuperNodeCountError(ValueError):
    """The federation's SuperNodes do not match the dataset's devices one to one."""


def overrides_from_run_config(run_config: dict[str, Any]) -> list[str]:
    """Hydra overrides for a Flower run config.

    Parameters
    ----------
    run_config : dict
        Flower's run config (``context.run_config``): the keys of
        ``[tool.flwr.app.config]`` with their ``--run-config`` overrides. A group key
        (``dataset``, ``model``, ``strategy``, ``resources``) names a YAML of that group in
        ``conf/``; a value key with ``""`` keeps ``conf/config.yaml``'s value.

    Returns
    -------
    list of str
        Hydra overrides such as ``["strategy=heterofl", "resources.lam=2.0"]``.

    Raises
    ------
    ValueError
        For a key that is not a known setting (the message lists the known ones), or an
        empty group choice.
    """
    overrides = []
    for key, value in run_config.items():
        if key == CONFIG_FILE_KEY:
            continue
        if key in _GROUPS:
            if value in ("", None):
                raise ValueError(f"run-config key {key!r} needs a {_GROUPS[key]} name from conf/{_GROUPS[key]}/")
            overrides.append(f"{_GROUPS[key]}={value}")
        elif key in _VALUES:
            if value in ("", None):
                continue
            overrides.append(f"{_VALUES[key]}={json.dumps(value) if isinstance(value, str) else value}")
        else:
            raise ValueError(
                f"unknown run-config key {key!r}; known: {sorted({**_GROUPS, **_VALUES, CONFIG_FILE_KEY: ''})}"
            )
    return overrides


def run_config_from_flower(run_config: dict[str, Any]) -> RunConfig:
    """Compose ``conf/config.yaml`` with the run config's overrides and validate it.

    Parameters
    ----------
    run_config : dict
        Flower's run config (see :func:`overrides_from_run_config`).

    Returns
    -------
    RunConfig
        The validated run configuration.

    Raises
    ------
    FileNotFoundError
        If ``conf/`` is not next to the package (a FAB built without it).
    ValueError
        For an unknown key; Hydra's errors for an unknown group option or a wrongly typed
        value; :class:`~flwr_distreal.run.config.ConfigError` for a value out of range.
    """
    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(
            f"Hydra config {CONF_DIR / 'config.yaml'} not found: the app needs the conf/ folder next to "
            "the flwr_distreal package (flwr build/run includes it through fab-include in pyproject.toml)"
        )
    run_config = dict(run_config)
    overrides = overrides_from_run_config(run_config)
    config_file = run_config.get(CONFIG_FILE_KEY)
    if config_file:
        others = [k for k, v in run_config.items() if k in _VALUES and k != "output-dir" and v not in ("", None)]
        if others:
            raise ValueError(
                f"run-config {CONFIG_FILE_KEY!r} holds a whole config; do not also set {others} (edit the file)"
            )
        path = Path(str(config_file)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"run-config {CONFIG_FILE_KEY!r}: no such file {path}")
        return to_run_config(OmegaConf.load(path))
    # Lazy on purpose: Hydra is needed only to compose from run-config keys; a run started by the
    # runner (config-file, above) and each of its ClientApp processes never load it.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()  # lr: ${tuned_lr:<setting>}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg)


def output_dir_for(cfg: RunConfig, run_id: int) -> Path:
    """Where a ``flwr run`` writes its results: ``output-dir``, else ``outputs/flwr_run/<run_id>``.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (its ``output_dir``, ``None`` when not set).
    run_id : int
        Flower's run ID (``context.run_id``), so that runs do not overwrite each other.

    Returns
    -------
    Path
        The absolute output directory (relative paths resolve against the working directory).
    """
    out = Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / "flwr_run" / str(run_id)
    return out.expanduser().resolve()


def wait_for_supernodes(
    node_ids: Callable[[], Any],
    expected: int,
    what: str,
    *,
    settle_s: float = SUPERNODE_SETTLE_S,
    timeout_s: float = SUPERNODE_TIMEOUT_S,
    poll_s: float = 0.5,
) -> int:
    """Wait until the federation has ``expected`` SuperNodes, or fail with a clear error.

    Simulation registers all its SuperNodes at once, shortly after the ServerApp starts;
    so a count that is non-zero but differs from ``expected`` and stays unchanged for
    ``settle_s`` seconds is final.

    Parameters
    ----------
    node_ids : callable
        Returns the IDs of the connected SuperNodes (``grid.get_node_ids``).
    expected : int
        The number of SuperNodes the run needs (the dataset's devices).
    what : str
        What the SuperNodes stand for, for the error message (e.g. "devices of digits").
    settle_s : float
        How long a wrong, non-zero count must stay unchanged before it is final.
    timeout_s : float
        How long to wait in total.
    poll_s : float
        Seconds between two polls.

    Returns
    -------
    int
        The number of SuperNodes (== ``expected``).

    Raises
    ------
    SuperNodeCountError
        With more SuperNodes than ``expected`` (at once), or fewer once the count settled or
        the timeout passed.
    """
    if expected < 1:
        raise ValueError(f"expected must be >= 1, got {expected}")
    start = time.monotonic()
    count, since = -1, start
    while True:
        now_count = len(list(node_ids()))
        now = time.monotonic()
        if now_count != count:
            count, since = now_count, now
        if count == expected:
            return count
        settled = count > 0 and now - since >= settle_s
        if count > expected or settled or now - start >= timeout_s:
            raise SuperNodeCountError(
                f"the federation has {count} SuperNode(s) but this run needs exactly {expected}, one per "
                f"{what}; run with --federation-config \"num-supernodes={expected}\" (or pick a dataset "
                f"with {count} devices)"
            )
        time.sleep(poll_s)


def check_partition(node_config: dict[str, Any], num_devices: int, dataset: str) -> int:
    """The device a ClientApp simulates, checked against the dataset.

    Parameters
    ----------
    node_config : dict
        The SuperNode's node config: ``partition-id`` (the device) and, in simulation,
        ``num-partitions`` (the number of SuperNodes).
    num_devices : int
        The dataset's number of devices.
    dataset : str
        The dataset's name, for the error message.

    Returns
    -------
    int
        The device index (``partition-id``).

    Raises
    ------
    SuperNodeCountError
        If ``num-partitions`` differs from ``num_devices``, ``partition-id`` is missing or out
        of range.
    """
    if "partition-id" not in node_config:
        raise SuperNodeCountError(
            f"node config has no 'partition-id' (keys: {sorted(node_config)}); each SuperNode must name "
            f"its device of {dataset}, e.g. --node-config \"partition-id=0 num-partitions={num_devices}\""
        )
    num_partitions = node_config.get("num-partitions")
    if num_partitions is not None and int(num_partitions) != num_devices:
        raise SuperNodeCountError(
            f"{num_partitions} SuperNodes (num-partitions) but {dataset} has {num_devices} devices; "
            f"run with --federation-config \"num-supernodes={num_devices}\""
        )
    device = int(node_config["partition-id"])
    if not 0 <= device < num_devices:
        raise SuperNodeCountError(f"partition-id {device} is not a device of {dataset} (0..{num_devices - 1})")
    return device


def _experiment(context: Context) -> tuple[RunConfig, Experiment]:
    """The run's validated config and its (per-process cached) experiment, keyed by the run
    config and, with ``config-file``, by that file's contents (one process may run several runs
    whose config files share a path: the in-process runtime of a sweep)."""
    run_config = dict(context.run_config)
    contents = ""
    if run_config.get(CONFIG_FILE_KEY):
        try:
            contents = Path(str(run_config[CONFIG_FILE_KEY])).read_text()
        except OSError:
            contents = ""  # composing reports the missing file
    return _experiment_cached(json.dumps(run_config, sort_keys=True), contents)


@functools.lru_cache(maxsize=2)
def _experiment_cached(run_config_json: str, config_file_contents: str = "") -> tuple[RunConfig, Experiment]:
    """Compose once per run config and process: the ClientApp handles every message of every
    round, and a Hydra composition per message would be repeated work. ``config_file_contents``
    only keys the cache."""
    cfg = run_config_from_flower(json.loads(run_config_json))
    return cfg, experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


def _trainer_fn(context: Context):
    cfg, exp = _experiment(context)
    if cfg.deployment:  # a real node: its own data from its node config, any number of nodes
        return exp.make_node_trainer(dict(context.node_config))
    device = check_partition(dict(context.node_config), exp.num_devices, cfg.dataset.name)
    return exp.make_trainer(device)


def _device_properties(cfg: RunConfig, exp: Experiment, device: int) -> dict[str, int]:
    """A simulated device's properties as its trainer reports them: ``partition-id`` and
    ``round-samples`` (the batches of one round of local training,
    :func:`flwr_distreal.training.schedule.batch_sizes`), from the dataset's sizes alone."""
    samples = sum(batch_sizes(exp.device_sizes[device], cfg.batch_size, cfg.local_epochs))
    return {PARTITION_ID: int(device), ROUND_SAMPLES: int(samples)}


def simulated_partitions(grid: Grid) -> dict[int, int] | None:
    """Partition id by node id of a simulation's nodes, as its runtime registered them; None
    where the grid does not say.

    The in-process grid knows them (:meth:`flwr_distreal.run.inprocess.InProcessGrid.node_partitions`).
    In ``flwr run``'s simulation the ServerApp's :class:`flwr.superlink.grid.InMemoryGrid` shares the
    engine's in-memory ``LinkState``, whose nodes were registered one after another, node ``i``
    with ``partition-id`` ``i`` (Flower 1.42: ``flwr.server.superlink.fleet.vce.vce_api._register_nodes``;
    the dict of nodes keeps that order). That is Flower's internals: :class:`SimulatedProperties`
    checks it with two nodes' own answers before it relies on it.
    """
    known = getattr(grid, "node_partitions", None)
    if callable(known):
        return {int(node): int(part) for node, part in known().items()}
    nodes = getattr(getattr(grid, "state", None), "nodes", None)
    # Looked up, not imported: importing flwr.superlink.grid loads SQLAlchemy and FastAPI (about
    # 45 MB in every process that imports this app, the runner of flwr run included); a grid of
    # that class exists only where Flower's simulation has loaded it.
    in_memory = getattr(sys.modules.get("flwr.superlink.grid.inmemory_grid"), "InMemoryGrid", None)
    if in_memory is not None and isinstance(grid, in_memory) and isinstance(nodes, dict):
        return {int(node): i for i, node in enumerate(list(nodes))}
    return None


class SimulatedProperties:
    """The server's own answer to the properties query in a simulation (a
    :attr:`flwr_distreal.flower.serverapp._CoreFedAvg.node_properties` hook): which device each node
    is (:func:`simulated_partitions`) and its ``round-samples`` (the run's dataset sizes), so no
    node is woken to be asked; only the drawn nodes cost anything per round.

    Checked once against two nodes' own answers (the first and the last partition); when the grid
    does not say, the count differs from the dataset's devices, or the check fails, it answers
    nothing and every node is asked, as before (logged).
    """

    def __init__(self, cfg: RunConfig, exp: Experiment) -> None:
        self.cfg, self.exp = cfg, exp
        self._partitions: dict[int, int] | None = None

    def learn(self, grid: Grid) -> None:
        """Learn the nodes' devices now (once; later calls do nothing): the server calls it
        before round 1, so that the check's two probes, which start the ClientApps' processes
        (Ray actors load the app and build the experiment), are start-up, not round 1's time."""
        if self._partitions is None:
            self._partitions = self._checked(grid)

    def __call__(self, grid: Grid, nodes: Sequence[int]) -> dict[int, dict[str, int]]:
        self.learn(grid)
        return {
            node: _device_properties(self.cfg, self.exp, self._partitions[node]) for node in nodes if node in self._partitions
        }

    def _checked(self, grid: Grid) -> dict[int, int]:
        partitions = simulated_partitions(grid)
        if partitions is None or sorted(partitions.values()) != list(range(self.exp.num_devices)):
            log(INFO, "node properties: the nodes' devices are not known to the server; every node is asked once")
            return {}
        by_part = {part: node for node, part in partitions.items()}
        probes = sorted({by_part[0], by_part[self.exp.num_devices - 1]})
        queries = [
            Message(content=RecordDict({"config": ConfigRecord()}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in probes
        ]
        try:
            replies = list(grid.send_and_receive(queries, timeout=300))
            answers = {
                int(r.metadata.src_node_id): int(r.content.metric_records[PROPERTIES_RECORD][PARTITION_ID])
                for r in replies if not r.has_error()
            }
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            answers = {}
            log(WARNING, "node properties: checking the nodes' devices failed (%s)", err)
        if answers != {node: partitions[node] for node in probes}:
            log(
                WARNING,
                "node properties: nodes %s answered partition ids %s, not the registration order's %s; every node "
                "is asked once", probes, answers, [partitions[n] for n in probes],
            )
            return {}
        log(INFO, "node properties: the %d nodes' devices and sizes from the run's config (2 nodes asked)", len(partitions))
        return partitions


def _properties_fn(context: Context) -> dict[str, int] | None:
    """A simulated node's properties (``partition-id``, ``round-samples``) from the run's config
    and the dataset's sizes, without building its model and data: the server asks every node
    once, and in a simulation of thousands of nodes only the drawn ones may cost a trainer. The
    same values the trainer reports (``round-samples``: the batches of one round of local
    training, :func:`flwr_distreal.training.schedule.batch_sizes`). None (the trainer answers) in
    a deployment (a node's data is its own) and with measured resources (the trainer calibrates
    when it is built: at the query, not inside round 1's deadline)."""
    cfg, exp = _experiment(context)
    if cfg.deployment or exp.measured:
        return None
    return _device_properties(cfg, exp, check_partition(dict(context.node_config), exp.num_devices, cfg.dataset.name))


def _client_app():
    return build_client_app(_trainer_fn, properties_fn=_properties_fn)


class RecordingMessageStrategy(Strategy):
    """Delegates every hook to a Message-API strategy, numbering rounds from ``offset + 1`` (a
    resumed run goes on where its checkpoint left it: clients seed their draws and place the round
    on their clock by the round number), and hands each round's train metrics and the devices the
    strategy drew (its ``last_drawn``) to a :class:`~flwr_distreal.run.recording.MetricsRecorder`
    (evaluation reaches it through ``evaluate_fn``), so ``metrics.csv`` and ``draws.csv`` grow as
    the run goes."""

    def __init__(
        self,
        inner: Strategy,
        recorder: Any,
        on_replies: Callable[[list], None] | None = None,
        offset: int = 0,
    ) -> None:
        self.inner = inner
        self.recorder = recorder
        self.on_replies = on_replies
        self.offset = int(offset)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        messages = self.inner.configure_train(server_round + self.offset, arrays, config, grid)
        self._record_draw(server_round, "train")
        return messages

    def _record_draw(self, server_round: int, phase: str) -> None:
        """Hand the devices the strategy just drew (``last_drawn``, if it keeps one) to the recorder."""
        drawn = getattr(self.inner, "last_drawn", None)
        if isinstance(drawn, dict) and hasattr(self.recorder, "on_draw"):
            self.recorder.on_draw(server_round + self.offset, phase, list(drawn.get(phase, [])))

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.on_replies is not None:
            self.on_replies(
                [dict(m.content[METRICS_RECORD]) for m in replies if not m.has_error() and METRICS_RECORD in m.content]
            )
        arrays, metrics = self.inner.aggregate_train(server_round + self.offset, replies)
        self.recorder.on_fit(server_round + self.offset, dict(metrics or {}))
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        messages = self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)
        self._record_draw(server_round, "evaluate")
        return messages

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


client_app = _client_app()
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Run the configured experiment: check the federation and the output directory, train,
    record and checkpoint every round, resume from a checkpoint, plot."""
    cfg, exp = _experiment(context)
    given = context.run_config.get("output-dir")
    out = Path(str(given)).expanduser().resolve() if given else output_dir_for(cfg, context.run_id)
    ckpt = check_run_dir(out, cfg)  # refuses a directory that holds a run, or a resume that does not fit
    if not cfg.deployment:  # simulation: one SuperNode per device of the dataset
        wait_for_supernodes(grid.get_node_ids, exp.num_devices, f"device of {cfg.dataset.name}")
    strategy = exp.make_message_strategy()
    if not cfg.deployment and not exp.measured and hasattr(strategy, "node_properties"):
        properties = SimulatedProperties(cfg, exp)  # no node woken to be asked its device
        properties.learn(grid)  # its two probes start the ClientApps' processes now, not in round 1
        strategy.node_properties = properties
    recorder = start_output(out, cfg, ckpt.rows if ckpt else None, exp)  # also run.json: the LUT's SHA-256
    done = ckpt.round if ckpt else 0
    if cfg.deployment:
        log(
            INFO,
            "%s on %s nodes (deployment, at least %s), resources %s, %s rounds; results in %s",
            cfg.strategy.name, cfg.dataset.name, cfg.min_nodes, cfg.resources.kind, cfg.rounds, out,
        )
    else:
        log(
            INFO,
            "%s on %s: %s devices, %s per round, %s rounds; results in %s",
            cfg.strategy.name, cfg.dataset.name, exp.num_devices, cfg.clients_per_round, cfg.rounds, out,
        )
    keys, arrays = (ckpt.keys, ckpt.arrays) if ckpt else exp.initial_arrays()
    recorder.set_global(arrays)  # the reference of the first round's update norm
    if ckpt:
        strategy.load_sampling_state(ckpt.strategy)
        log(INFO, "resuming from %s after round %s of %s", out / "checkpoint.npz", done, cfg.rounds)
    config = dataclasses.asdict(cfg)

    def evaluate_fn(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # the initial model: not a round of the run
            return None
        rnd = server_round + done
        global_arrays = arrays_from_record(record, keys)
        loss, accuracy, n = exp.evaluate_round(rnd, global_arrays)  # evaluate_every: None between evaluations
        recorder.on_evaluate(rnd, loss, {"accuracy": accuracy}, global_arrays)
        if loss is not None and not math.isfinite(loss):
            raise RunFailedError(
                f"round {rnd}: the test loss is {loss}: the global model diverged (try a smaller lr or gradient "
                "clipping); the run stops here"
            )
        if rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds:
            save_checkpoint(
                out, Checkpoint(rnd, keys, global_arrays, config, recorder.rows, strategy.sampling_state())
            )
        return None if loss is None else MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": n})

    if done < cfg.rounds:
        recording = RecordingMessageStrategy(strategy, recorder, exp.note_replies, offset=done)
        recording.start(
            grid=grid,
            initial_arrays=record_from_arrays(keys, arrays),
            num_rounds=cfg.rounds - done,
            timeout=exp.round_timeout(),
            train_config=ConfigRecord(exp.train_config()),
            evaluate_fn=evaluate_fn,
        )
    else:
        log(INFO, "the checkpoint in %s already holds all %s rounds", out, cfg.rounds)
    finish_output(out, cfg, recorder)
    log(INFO, "%s", summary_line(cfg, recorder.rows, out))
    check_failures(recorder.rows, cfg.failure_threshold)
