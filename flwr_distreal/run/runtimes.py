"""The runtimes: run a federated experiment (:class:`~flwr_distreal.run.experiment.Experiment`) and
record it (:mod:`flwr_distreal.run.recording`).

:func:`run_experiment` dispatches on ``runtime`` in the config:

``flwr-run`` (default)
    The Message-API app of :mod:`flwr_distreal.run.flwr_app` through ``flwr run`` on a private local
    SuperLink (:mod:`flwr_distreal.run.local_runtime`): Flower's supported way to run a
    simulation (``run_simulation`` is deprecated since Flower 1.21).
``legacy``
    The legacy pair (:class:`~flwr_distreal.flower.legacy.strategy.Distreal` and
    :class:`~flwr_distreal.flower.legacy.client.DistrealClient`, ...) on ``flwr.simulation.run_simulation``,
    kept for users of the legacy API. A seeded run gives the same per-round metrics on both.
``inprocess``
    The same Message-API app with its messages delivered in this process, clients one after
    another (:mod:`flwr_distreal.run.inprocess`): for sweeps on small machines; the same per-round
    metrics as ``flwr run``.

The runtimes launch the app, so this module sits above both :mod:`flwr_distreal.run.flwr_app` and
:mod:`flwr_distreal.run.experiment` (which import neither it nor each other's runners).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.client import ClientApp
from flwr.common import Context, FitRes, Parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from .flwr_app import client_app, server_main
from .flwr_runner import AppRun, run_with_flwr  # run_with_flwr: re-exported (it runs torch-free)
from ..flower.legacy.client_manager import SeededClientManager
from .config import RunConfig
from .experiment import experiment_for
from .inprocess import run_app_in_process
from .local_runtime import ProcessGuard
from .recording import (
    MetricsRecorder,
    RunDirectoryError,
    RunFailedError,
    check_failures,
    check_run_dir,
    finish_output,
    start_line,
    start_output,
    with_absolute_paths,
)

__all__ = ["RecordingStrategy", "run_experiment", "run_inprocess", "run_legacy_simulation", "run_with_flwr"]

log = logging.getLogger(__name__)


class RecordingStrategy(Strategy):
    """Delegates to a strategy and reports fit metrics and evaluations to a recorder."""

    def __init__(self, inner: Strategy, recorder: MetricsRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    def __repr__(self) -> str:
        return f"Recording({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        pairs = self.inner.configure_fit(server_round, parameters, client_manager)
        drawn = getattr(self.inner, "last_sampled", [client for client, _ in pairs])
        self.recorder.on_draw(server_round, "train", _client_devices(drawn, client_manager))
        return pairs

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.recorder.on_fit(server_round, metrics)
        return params, metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        # Flower's legacy loop evaluates federated after the server-side evaluation that closes the
        # round's row: recorded only when federated evaluation comes first (not in this runner)
        pairs = self.inner.configure_evaluate(server_round, parameters, client_manager)
        self.recorder.on_draw(server_round, "evaluate", _client_devices([c for c, _ in pairs], client_manager))
        return pairs

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        out = self.inner.evaluate(server_round, parameters)
        if out is None:
            return out
        arrays = parameters_to_ndarrays(parameters)
        if server_round >= 1:
            self.recorder.on_evaluate(server_round, out[0], out[1], arrays)
        else:  # the initial model: the reference of round 1's update
            self.recorder.set_global(arrays)
        return out


def _client_devices(clients: Sequence[ClientProxy], client_manager: ClientManager) -> list[int | str]:
    """Legacy API: the sorted device ids of ``clients`` (the seeded client manager's cached
    ``partition-id``; ``"client <cid>"`` where it knows none)."""
    known = client_manager.device_ids(list(clients)) if hasattr(client_manager, "device_ids") and clients else {}
    return [
        *sorted(known[c.cid] for c in clients if c.cid in known),
        *sorted(f"client {c.cid}" for c in clients if c.cid not in known),
    ]


def _client_fn_factory(cfg_dict: dict) -> Callable[[Context], Any]:
    def client_fn(context: Context):
        exp = experiment_for(json.dumps(cfg_dict, sort_keys=True))
        return exp.make_client(int(context.node_config["partition-id"])).to_client()

    return client_fn


def run_experiment(
    cfg: RunConfig, output_dir: str | os.PathLike | None = None, *, show_rounds: bool = True
) -> list[dict[str, Any]]:
    """Run a federated simulation in the configured runtime (``cfg.runtime``).

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    output_dir : path, optional
        Where ``metrics.csv``, ``draws.csv``, ``run.json``, ``config.yaml`` and ``accuracy.png`` go.
        The ``flwr-run`` runtime needs one: without it, the run writes to a temporary folder that
        is removed after.
    show_rounds : bool, optional
        Print a line per finished round (default); a sweep prints a line per run instead.

    Returns
    -------
    list of dict
        The per-round metrics rows.
    """
    if cfg.runtime == "legacy":
        return run_legacy_simulation(cfg, output_dir)
    if cfg.runtime == "inprocess":
        return run_inprocess(cfg, output_dir, show_rounds=show_rounds)
    return run_with_flwr(cfg, output_dir, show_rounds=show_rounds)


def run_inprocess(
    cfg: RunConfig, output_dir: str | os.PathLike | None = None, *, show_rounds: bool = True
) -> list[dict[str, Any]]:
    """Run the Message-API app (:mod:`flwr_distreal.run.flwr_app`: the same ServerApp, strategies,
    ClientApp and trainers as ``flwr run``) in this process, its clients one after another
    (:mod:`flwr_distreal.run.inprocess`), and return the rows of ``metrics.csv``.

    For sweeps on small machines: no SuperLink, no Ray, no per-message transport. A seeded run
    gives the same per-round metrics as ``flwr run``; clients do not run in parallel and
    ``round_timeout`` is not applied.
    """
    cfg = with_absolute_paths(cfg)
    exp = experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))  # refuse bad input here
    log.info("%s", start_line(cfg, exp, "in process"))
    run = AppRun(cfg, output_dir, show_rounds)
    nodes = [{"partition-id": i, "num-partitions": exp.num_devices} for i in range(exp.num_devices)]
    printer = _RoundPrinter(run.progress)
    try:
        with printer:
            run_app_in_process(server_main, client_app, nodes, run.run_config)
    finally:
        rows = run.close()
    return rows


class _RoundPrinter:
    """Calls ``progress`` every ``interval`` seconds from a daemon thread while in its ``with``
    block (and once at the end): the in-process run blocks this thread."""

    def __init__(self, progress: Callable[[], None], interval: float = 1.0) -> None:
        self.progress, self.interval = progress, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.progress()
            except (OSError, ValueError, KeyError):  # a metrics.csv being written
                pass

    def __enter__(self) -> "_RoundPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.progress()
        except (OSError, ValueError, KeyError):
            pass


def run_legacy_simulation(cfg: RunConfig, output_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Run the legacy pair (``NumPyClient`` + legacy strategy) on Flower's deprecated
    ``run_simulation`` (Ray backend) in this process.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    output_dir : path, optional
        Where ``metrics.csv``, ``draws.csv``, ``run.json``, ``config.yaml`` and ``accuracy.png`` go.

    Returns
    -------
    list of dict
        The per-round metrics rows.
    """
    # Lazy on purpose (heavy, and only for this deprecated runtime): flwr.simulation loads the
    # superlink and the Ray simulation engine (Ray: Flower's optional "simulation" extra).
    from flwr.simulation import run_simulation

    if cfg.resume:
        raise RunDirectoryError("resume=true needs runtime=flwr-run (the legacy runtime keeps no checkpoints)")
    out = Path(output_dir) if output_dir is not None else None
    check_run_dir(out, cfg)
    cfg_dict = dataclasses.asdict(cfg)
    exp = experiment_for(json.dumps(cfg_dict, sort_keys=True))
    recorder = start_output(out, cfg, exp=exp)
    log.info("%s", start_line(cfg, exp, "legacy run_simulation"))

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = RecordingStrategy(exp.make_strategy(), recorder)
        return ServerAppComponents(
            strategy=strategy,
            config=ServerConfig(num_rounds=cfg.rounds),
            client_manager=SeededClientManager(cfg.seed),
        )

    backend_config = {
        "client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": cfg.num_gpus_per_client},
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False},
    }
    if os.environ.get("RAY_ADDRESS"):  # joins that Ray cluster: its nodes declare their CPUs (ray.init refuses num_cpus)
        del backend_config["init_args"]["num_cpus"]
    with warnings.catch_warnings(), ProcessGuard():
        warnings.simplefilter("ignore", DeprecationWarning)  # runtime=legacy chose it knowingly
        run_simulation(
            ServerApp(server_fn=server_fn),
            ClientApp(client_fn=_client_fn_factory(cfg_dict)),
            num_supernodes=exp.num_devices,
            backend_config=backend_config,
        )
    finish_output(out, cfg, recorder)
    diverged = [r["round"] for r in recorder.rows if r["loss"] is not None and not math.isfinite(float(r["loss"]))]
    if diverged:  # (loss None: a round not evaluated, evaluate_every)
        raise RunFailedError(f"the test loss became non-finite (round {diverged[0]})")
    check_failures(recorder.rows, cfg.failure_threshold)
    return recorder.rows
