"""Build and run a federated experiment from a :class:`~flwr_distreal.config.RunConfig`.

This is the Flower edge shared by the Hydra runner (:mod:`flwr_distreal.main`) and the
``flwr run`` app (:mod:`flwr_distreal.app`): it loads the data, builds the model, the LUT,
the resource model (with ``r_max`` per device such that the full model finishes a round's
local training exactly at the deadline), the strategy (DISTREAL or a baseline) and the
``client_fn``; runs Flower's simulation engine; and records one metrics row per round.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.common import Context, FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from omegaconf import OmegaConf

from .client import BaselineClient, DistrealClient, get_weights
from .client_manager import SeededClientManager
from .config import RunConfig, to_run_config
from .data import FederatedData, load_federated
from .lut import LUT
from .macs import count_macs
from .models import build_model
from .resources import ResourceModel, r_max_for, step_macs
from .schedule import batch_sizes
from .strategy import Distreal, FederatedDropout, FullResources, HeteroFL, SmallNetwork, make_evaluate_fn

__all__ = ["Experiment", "MetricsRecorder", "RecordingStrategy", "run_experiment"]

log = logging.getLogger(__name__)

#: Uniform LUT used when no DSE LUT is configured: rates 0, 0.01, ..., 0.5.
UNIFORM_RATES = [round(0.01 * i, 2) for i in range(51)]


@functools.lru_cache(maxsize=4)
def _load_data(name: str, kwargs_json: str) -> FederatedData:
    """Load a dataset once per process (Ray reuses worker processes across clients)."""
    return load_federated(name, **json.loads(kwargs_json))


class Experiment:
    """Everything a run needs, derived deterministically from a :class:`RunConfig`.

    Built once on the server and once per simulation worker process; both sides derive the
    same per-device ``r_max`` and resource traces from the config and the seed.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        kwargs = cfg.dataset.loader_kwargs(cfg.seed)
        self.data = _load_data(cfg.dataset.name, json.dumps(kwargs, sort_keys=True))
        self.num_devices = self.data.num_devices
        if cfg.clients_per_round > self.num_devices:
            raise ValueError(
                f"clients_per_round={cfg.clients_per_round} exceeds the {self.num_devices} devices of {cfg.dataset.name}"
            )
        self.num_classes = cfg.model.num_classes or self.data.num_classes
        self.model_name = cfg.model.small if cfg.strategy.name == "small" else cfg.model.name
        probe = build_model(self.model_name, self.num_classes)
        if tuple(probe.input_shape) != tuple(self.data.input_shape):
            raise ValueError(
                f"model {self.model_name} takes input {probe.input_shape} but dataset {cfg.dataset.name} "
                f"has {self.data.input_shape}"
            )
        # Loaded and checked once, here: a LUT that does not fit the model fails before the
        # simulation, not in every client; the clients share it (their models are all `probe`'s).
        self.lut: LUT | None = self._load_lut(probe) if cfg.strategy.name == "distreal" else None
        self.full_forward_macs = count_macs(build_model(cfg.model.name, self.num_classes))
        self.factor = cfg.resources.step_macs_factor
        sizes = self.data.partition_sizes()
        self.r_max = [
            r_max_for(
                max(
                    sum(step_macs(self.full_forward_macs, b, self.factor) for b in batch_sizes(n, cfg.batch_size, cfg.local_epochs)),
                    1.0,
                ),
                cfg.deadline,
            )
            for n in sizes
        ]
        variability = cfg.resources.variability or cfg.dataset.variability
        self.resources = ResourceModel(
            kind=cfg.resources.kind,
            deadline=cfg.deadline,
            r_max=max(self.r_max),
            variability=variability,
            lam=cfg.resources.lam,
            seed=cfg.seed,
            trace_path=cfg.resources.trace_path,
        )
        self._traces: dict[int, Any] = {}

    # -- models and LUT --------------------------------------------------------------------
    def build_model(self):
        """A fresh model of the run's architecture (the small one for ``strategy=small``)."""
        return build_model(self.model_name, self.num_classes)

    def _load_lut(self, model) -> LUT:
        """The configured LUT file (checked against the model), or a fine uniform LUT."""
        if self.cfg.lut:
            return LUT.load(self.cfg.lut, model)
        return LUT.uniform(model, UNIFORM_RATES)

    def availability(self, device_id: int, t: float) -> float:
        """Resource availability of a device at simulated time ``t`` (MACs per second)."""
        trace = self._traces.get(device_id)
        if trace is None:
            trace = self.resources.trace(device_id, self.r_max[device_id])
            self._traces[device_id] = trace
        return trace.rate_at(t)

    # -- Flower pieces ---------------------------------------------------------------------
    def make_client(self, device_id: int):
        """The NumPyClient of one device for this run's strategy."""
        cfg = self.cfg
        torch.set_num_threads(cfg.torch_threads)
        model = self.build_model()
        loader = self.data.train_loader(device_id, cfg.batch_size, shuffle=True, seed=cfg.seed)
        common = dict(
            r_max=self.r_max[device_id],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            local_epochs=cfg.local_epochs,
            step_macs_factor=self.factor,
            skip_straggler_training=cfg.skip_straggler_training,
            seed=cfg.seed,
        )
        if cfg.strategy.name == "distreal":
            return DistrealClient(
                model, loader, device_id, self.lut, self.resources, policy=cfg.strategy.policy,
                stop_at_deadline=cfg.strategy.stop_at_deadline, **common
            )
        return BaselineClient(model, loader, device_id, self.resources, **common)

    def make_strategy(self) -> Strategy:
        """DISTREAL's or a baseline's Flower strategy, with centralized full-model evaluation."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = self.build_model()
        initial = ndarrays_to_parameters(get_weights(model))
        data = self.data
        evaluate_fn = make_evaluate_fn(
            self.model_name, self.num_classes, lambda: data.test_loader(cfg.eval_batch_size)
        )
        common: dict[str, Any] = dict(
            fraction_fit=cfg.clients_per_round / self.num_devices,
            min_fit_clients=cfg.clients_per_round,
            min_available_clients=self.num_devices,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            evaluate_fn=evaluate_fn,
            initial_parameters=initial,
        )
        name = cfg.strategy.name
        if name == "distreal":
            return Distreal(full_macs_per_batch=count_macs(model), on_excess=cfg.strategy.on_excess, **common)
        if name == "full":
            return FullResources(**common)
        if name == "small":
            return SmallNetwork(**common)
        sub = dict(
            model_name=self.model_name,
            availability_fn=self.availability,
            round_duration=cfg.deadline,
            num_classes=self.num_classes,
            step_macs_factor=self.factor,
            seed=cfg.seed,
        )
        if name == "feddropout":
            return FederatedDropout(**sub, **common)
        return HeteroFL(shrink=cfg.strategy.shrink, levels=cfg.strategy.levels, **sub, **common)


class MetricsRecorder:
    """Collects one row per round and writes ``metrics.csv`` as the run goes."""

    FIELDS = [
        "round", "accuracy", "loss", "received", "stragglers", "refused", "accepted",
        "mean_macs", "mean_utilisation", "sim_time", "wall_time",
    ]

    def __init__(self, path: Path | None, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.rows: list[dict[str, Any]] = []
        self._fit: dict[int, dict[str, Scalar]] = {}
        self._start = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.FIELDS).writeheader()

    def on_fit(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        self._fit[server_round] = dict(metrics)

    def on_evaluate(self, server_round: int, loss: float, metrics: dict[str, Scalar]) -> None:
        fit = self._fit.get(server_round, {})
        row = {
            "round": server_round,
            "accuracy": float(metrics.get("accuracy", math.nan)),
            "loss": float(loss),
            "received": fit.get("received", 0),
            "stragglers": fit.get("stragglers", 0),
            "refused": fit.get("refused", 0),
            "accepted": fit.get("accepted", 0),
            "mean_macs": fit.get("mean_macs", math.nan),
            "mean_utilisation": fit.get("mean_utilisation", math.nan),
            "sim_time": server_round * self.deadline,
            "wall_time": round(time.perf_counter() - self._start, 3),
        }
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)
        log.info(
            "round %s: accuracy %.4f loss %.4f stragglers %s/%s mean utilisation %.3f (%.1f s)",
            server_round, row["accuracy"], row["loss"], row["stragglers"], row["received"],
            float(row["mean_utilisation"]),
            row["wall_time"],
        )


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
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.recorder.on_fit(server_round, metrics)
        return params, metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters):
        out = self.inner.evaluate(server_round, parameters)
        if out is not None and server_round >= 1:
            self.recorder.on_evaluate(server_round, out[0], out[1])
        return out


def start_output(out: Path | None, cfg: RunConfig) -> MetricsRecorder:
    """Create the run directory, write the resolved ``config.yaml`` and return the recorder
    that writes ``metrics.csv`` there (``out=None``: record in memory only)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    return MetricsRecorder(out / "metrics.csv" if out is not None else None, cfg.deadline)


def finish_output(out: Path | None, cfg: RunConfig, recorder: MetricsRecorder) -> None:
    """Plot the recorded rounds to ``accuracy.png`` (when enabled and anything was recorded)."""
    if out is not None and cfg.plot and recorder.rows:
        from .plotting import plot_runs

        plot_runs({cfg.strategy.name: recorder.rows}, out / "accuracy.png", title=f"{cfg.dataset.name}: {cfg.strategy.name}")


def _client_fn_factory(cfg_dict: dict) -> Callable[[Context], Any]:
    def client_fn(context: Context):
        exp = _experiment_for(json.dumps(cfg_dict, sort_keys=True))
        return exp.make_client(int(context.node_config["partition-id"])).to_client()

    return client_fn


@functools.lru_cache(maxsize=2)
def _experiment_for(cfg_json: str) -> Experiment:
    return Experiment(to_run_config(json.loads(cfg_json)))


def run_experiment(cfg: RunConfig, output_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Run a federated simulation on Flower's simulation engine (Ray backend).

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    output_dir : path, optional
        Where ``metrics.csv``, ``config.yaml`` and ``accuracy.png`` go.

    Returns
    -------
    list of dict
        The per-round metrics rows.
    """
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    out = Path(output_dir) if output_dir is not None else None
    cfg_dict = dataclasses.asdict(cfg)
    exp = _experiment_for(json.dumps(cfg_dict, sort_keys=True))
    recorder = start_output(out, cfg)
    log.info(
        "%s on %s: %s devices, %s per round, %s rounds, model %s (%.2f M MACs full), resources %s",
        cfg.strategy.name, cfg.dataset.name, exp.num_devices, cfg.clients_per_round, cfg.rounds,
        exp.model_name, exp.full_forward_macs / 1e6, exp.resources,
    )

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
    run_simulation(
        ServerApp(server_fn=server_fn),
        ClientApp(client_fn=_client_fn_factory(cfg_dict)),
        num_supernodes=exp.num_devices,
        backend_config=backend_config,
    )
    finish_output(out, cfg, recorder)
    return recorder.rows
