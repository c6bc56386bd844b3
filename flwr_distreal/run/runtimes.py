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
import gc
import json
import logging
import math
import os
import shutil
import tempfile
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
from omegaconf import OmegaConf

from .flwr_app import client_app, server_main, stage_app
from ..core.allocator import release_freed_memory
from ..flower.legacy.client_manager import SeededClientManager
from .config import RunConfig
from .experiment import Experiment, clear_data_cache, experiment_for
from .inprocess import run_app_in_process
from .local_runtime import FlwrRunError, ProcessGuard, shared_runtime
from .recording import (
    MetricsRecorder,
    RunDirectoryError,
    RunFailedError,
    check_failures,
    check_run_dir,
    finish_output,
    read_metrics,
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


def _log_start(cfg: RunConfig, exp: Experiment, runtime: str) -> None:
    log.info(
        "%s on %s (%s): %s devices, %s per round, %s rounds, model %s (%.2f M MACs full), resources %s",
        cfg.strategy.name, cfg.dataset.name, runtime, exp.num_devices, cfg.clients_per_round, cfg.rounds,
        exp.model_name, exp.full_forward_macs / 1e6, exp.resources,
    )


class _AppRun:
    """What both app runtimes (``flwr run`` and in-process) prepare before the ServerApp starts: the
    checked config with absolute paths, the output directory with ``config.yaml`` (the ServerApp
    composes nothing: it reads this file), and a printer of one line per finished round."""

    def __init__(
        self, cfg: RunConfig, output_dir: str | os.PathLike | None, runtime: str, show_rounds: bool = True
    ) -> None:
        self.show_rounds = show_rounds
        self.cfg = cfg = with_absolute_paths(cfg)  # the app may run in another working directory
        self.exp = experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))  # refuse bad input here
        _log_start(cfg, self.exp, runtime)
        self.tmp = Path(tempfile.mkdtemp(prefix="fdr-run-")) if output_dir is None else None
        self.out = Path(output_dir if output_dir is not None else self.tmp).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        check_run_dir(self.out, cfg)  # refuse before anything starts (the app checks again)
        self.config_file = self.out / "config.yaml"
        self.config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
        self.metrics = self.out / "metrics.csv"
        self.run_config = {"config-file": str(self.config_file), "output-dir": str(self.out)}
        self._shown = len(read_metrics(self.metrics))

    def progress(self) -> None:
        """Print a line for each round finished since the last call (every ``rounds // 50``-th
        round of a long run)."""
        rows = read_metrics(self.metrics)
        if not self.show_rounds:
            self._shown = len(rows)
            return
        every = max(1, self.cfg.rounds // 50)  # at most ~50 lines per run, and always the last round
        for row in rows[self._shown:]:
            if int(row["round"]) % every and int(row["round"]) != self.cfg.rounds:
                continue
            accuracy = row.get("accuracy")  # None: a round the server did not evaluate (evaluate_every)
            print(
                f"  [{self.cfg.strategy.name}] round {row['round']}/{self.cfg.rounds}: accuracy "
                f"{'not evaluated' if accuracy is None else format(float(accuracy), '.4f')}, "
                f"stragglers {row['stragglers']}/{row['received']}, "
                f"{float(row['wall_time']):.1f} s",
                flush=True,
            )
        self._shown = len(rows)

    def close(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.csv``; removes the temporary output directory, if any."""
        rows = read_metrics(self.metrics)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return rows


def run_with_flwr(
    cfg: RunConfig, output_dir: str | os.PathLike | None = None, *, show_rounds: bool = True
) -> list[dict[str, Any]]:
    """Run the Message-API app (:mod:`flwr_distreal.run.flwr_app`) with ``flwr run`` on this process's
    private local SuperLink (:func:`flwr_distreal.run.local_runtime.shared_runtime`), one simulated
    SuperNode per device, and return the rows the ServerApp wrote to ``metrics.csv``.

    Prints one line per finished round. Raises :class:`~flwr_distreal.run.local_runtime.FlwrRunError`
    when the run does not finish as completed (with Flower's reason and the log's path).
    """
    run = _AppRun(cfg, output_dir, "flwr run", show_rounds)
    cfg = run.cfg
    num_devices = run.exp.num_devices
    # The ServerApp and the ClientApps build their own Experiment in Flower's processes; this one
    # only checked the config. Free it (model, test data, device partitions) before waiting out
    # the run: it would otherwise stay in this process's memory for the whole run.
    run.exp = None
    experiment_for.cache_clear()
    clear_data_cache()  # the dataset outlives the Experiment in its own cache
    gc.collect()
    release_freed_memory()
    if cfg.num_cpus_per_client != math.ceil(cfg.num_cpus_per_client):
        log.warning(
            "num_cpus_per_client=%s: flwr run reserves whole CPUs per client, using %s",
            cfg.num_cpus_per_client, math.ceil(cfg.num_cpus_per_client),
        )
    runtime = shared_runtime()
    try:
        result = runtime.run(
            stage_app(runtime.root / "flwr-distreal"),  # flwr walks every file of the folder it is given
            num_devices,
            run.run_config,
            federation_config={
                # Flower's simulation config takes whole CPUs per client; GPUs may be fractional
                # (several clients share one GPU)
                "client-resources-num-cpus": max(1, math.ceil(cfg.num_cpus_per_client)),
                "client-resources-num-gpus": float(cfg.num_gpus_per_client),
            },
            log_path=_next_log(run.out),
            on_poll=run.progress,
        )
        if not result.ok:
            raise FlwrRunError(
                f"run {result.run_id} ended {result.status}: {result.details}; logs: {result.log_path}"
            )
    finally:
        rows = run.close()
    return rows


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
    run = _AppRun(cfg, output_dir, "in process", show_rounds)
    nodes = [{"partition-id": i, "num-partitions": run.exp.num_devices} for i in range(run.exp.num_devices)]
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


def _next_log(out: Path) -> Path:
    """``flwr.log``, or ``flwr.<n>.log`` when resuming a run that already has one."""
    path, n = out / "flwr.log", 1
    while path.exists():
        path, n = out / f"flwr.{n}.log", n + 1
    return path


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
    _log_start(cfg, exp, "legacy run_simulation")

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
