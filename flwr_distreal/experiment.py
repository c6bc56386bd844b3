"""Build and run a federated experiment from a :class:`~flwr_distreal.config.RunConfig`.

This is the Flower edge shared by the Hydra runner (:mod:`flwr_distreal.main`) and the
``flwr run`` app (:mod:`flwr_distreal.app`): it loads the data, builds the model, the LUT,
the resource model (with ``r_max`` per device such that the full model finishes a round's
local training exactly at the deadline), the devices' trainers, the strategy (DISTREAL or a
baseline, Message API or legacy) and records one metrics row per round.

Three runtimes (``runtime`` in the config):

``flwr-run`` (default)
    The Message-API app of :mod:`flwr_distreal.app` through ``flwr run`` on a private local
    SuperLink (:mod:`flwr_distreal.local_runtime`): Flower's supported way to run a
    simulation (``run_simulation`` is deprecated since Flower 1.21).
``legacy``
    The legacy pair (:class:`~flwr_distreal.strategy.Distreal` and
    :class:`~flwr_distreal.client.DistrealClient`, ...) on ``flwr.simulation.run_simulation``,
    kept for users of the legacy API. A seeded run gives the same per-round metrics on both.
``inprocess``
    The same Message-API app with its messages delivered in this process, clients one after
    another (:mod:`flwr_distreal.inprocess`): for sweeps on small machines; the same per-round
    metrics as ``flwr run``.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from .aggregate import update_norms
from .allocator import keep_freed_memory
from .checks import check_classes, check_trace_devices, warn_unused_lut
from .config import ConfigError, RunConfig, to_run_config
from .data import FederatedData, load_federated
from .dropout import recompute_bn_statistics
from .lut import LUT
from .macs import count_macs
from .models import build_model
from .resources import ResourceModel, r_max_for, step_macs
from .schedule import batch_sizes
from .training import BaselineTrainer, DeviceTrainer, DistrealTrainer, evaluate_model, get_weights, set_weights

from flwr.common import Context, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

__all__ = ["Experiment", "NodeConfigError", "RunDirectoryError", "RunFailedError", "MetricsRecorder", "RecordingStrategy", "run_experiment"]

log = logging.getLogger(__name__)

#: The per-round log of the devices drawn (:class:`MetricsRecorder`), beside ``metrics.csv``.
DRAWS_FILE = "draws.csv"
#: The run's record of what it used (the LUT and its SHA-256), beside ``metrics.csv``.
RUN_RECORD_FILE = "run.json"

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
        keep_freed_memory()  # server, clients and in-process runs: no page-fault storm per forward pass
        self.cfg = cfg
        kwargs = cfg.dataset.loader_kwargs(cfg.seed)
        self.data = _load_data(cfg.dataset.name, json.dumps(kwargs, sort_keys=True))
        if cfg.validation_fraction > 0:  # seeded by the run's seed: server and clients hold out the same samples
            self.data = self.data.split_validation(cfg.validation_fraction, cfg.seed)  # r_max from what remains
        self.num_devices = self.data.num_devices
        self.measured = cfg.resources.kind == "measured"
        if cfg.deployment and cfg.strategy.name in ("feddropout", "heterofl") and cfg.resources.kind not in (
            "measured",
            "full",
        ):
            raise ConfigError(
                f"strategy={cfg.strategy.name} with deployment=true needs resources=measured (the server assigns "
                "submodels from the throughput each node reports) or resources=full; a simulated "
                f"resources={cfg.resources.kind} trace is tied to the dataset's devices, not to real nodes"
            )
        if not cfg.deployment and cfg.clients_per_round > self.num_devices:
            raise ConfigError(
                f"clients_per_round={cfg.clients_per_round} exceeds the {self.num_devices} devices of {cfg.dataset.name}"
            )
        warn_unused_lut(cfg.strategy.name, cfg.lut)
        from .precision import check_precision
        from .recipe import resolve_device

        check_precision(cfg.precision, resolve_device(cfg.device))  # bf16 on a CPU without it: refused at start-up
        self._layout: str | None = None  # cfg.layout resolved (layout=auto: calibrated) by the first build_model
        self.num_classes = check_classes(cfg.model.num_classes, self.data)
        self.model_name = cfg.model.small if cfg.strategy.name == "small" else cfg.model.name
        probe = build_model(self.model_name, self.num_classes)
        if tuple(probe.input_shape) != tuple(self.data.input_shape):
            raise ConfigError(
                f"model {self.model_name} takes input {probe.input_shape} but dataset {cfg.dataset.name} "
                f"has {self.data.input_shape}"
            )
        # Loaded and checked once, here: a LUT that does not fit the model fails before the
        # simulation, not in every client; the clients share it (their models are all `probe`'s).
        #: Which LUT the run uses, for ``run.json`` (:func:`lut_record`; no LUT but DISTREAL's).
        self.lut_record: dict[str, Any] = {"lut": None, "lut_sha256": None}
        self.lut: LUT | None = self._load_lut(probe) if cfg.strategy.name == "distreal" else None
        self.full_forward_macs = count_macs(build_model(cfg.model.name, self.num_classes))
        self.factor = cfg.resources.step_macs_factor
        self.r_max = [self.r_max_for_samples(n) for n in self.data.partition_sizes()]
        variability = cfg.resources.variability or cfg.dataset.variability
        # wall-clock mode: no simulated availability, each device measures its own
        self.resources: ResourceModel | None = None
        if not self.measured:
            self.resources = ResourceModel(
                kind=cfg.resources.kind,
                deadline=cfg.deadline,
                r_max=max(self.r_max),
                variability=variability,
                lam=cfg.resources.lam,
                seed=cfg.seed,
                trace_path=cfg.resources.trace_path,
            )
            if cfg.resources.kind == "trace" and not cfg.deployment:
                check_trace_devices(cfg.resources.trace_path, self.num_devices, devices=self.resources.devices_in_file)
        self._traces: dict[int, Any] = {}
        #: Wall-clock mode: the last throughput (full-model MACs/s) each device reported; the
        #: submodel baselines assign from it at round start.
        self.reported_throughput: dict[int, float] = {}

    def r_max_for_samples(self, num_samples: int) -> float:
        """Availability (MACs/s) at which the full model trains ``num_samples`` samples' round of
        local training exactly by the deadline."""
        cfg = self.cfg
        sizes = batch_sizes(num_samples, cfg.batch_size, cfg.local_epochs)
        return r_max_for(max(sum(step_macs(self.full_forward_macs, b, self.factor) for b in sizes), 1.0), cfg.deadline)

    # -- models and LUT --------------------------------------------------------------------
    def build_model(self):
        """A fresh model of the run's architecture (the small one for ``strategy=small``), with the
        strategy's model-level switches set (inverted scaling, static BatchNorm), in the run's memory
        layout (``layout``; ``auto``: :func:`flwr_distreal.layout.resolve_layout`, cached per machine)."""
        if getattr(self, "_layout", None) is None:  # (getattr: also on an Experiment made without __init__)
            from .layout import resolve_layout
            from .recipe import resolve_device

            try:
                self._layout = resolve_layout(
                    self.cfg.layout, self.model_name, self.cfg.batch_size, num_classes=self.num_classes,
                    torch_device=resolve_device(self.cfg.device), precision=self.cfg.precision,
                )
            except (RuntimeError, TypeError, ValueError) as err:  # a speed choice never stops a run
                log.warning("layout=%s: calibration failed (%s); using channels-last", self.cfg.layout, err)
                self._layout = "channels_last"
        model = build_model(self.model_name, self.num_classes)  # channels-last
        if self._layout == "nchw":
            model = model.to(memory_format=torch.contiguous_format)
        self.cfg.strategy.apply_to(model)
        return model

    def _load_lut(self, model) -> LUT:
        """DISTREAL's LUT (``lut``): ``learned``, the DSE's LUT shipped for the model
        (:meth:`LUT.learned`); ``uniform``, equal rates in every layer; or a LUT file (checked
        against the model). Logs which one the run uses."""
        from .lut import SHIPPED_DIR

        spec = str(self.cfg.lut)
        file: Path | None = None
        if spec == "uniform":
            lut, source = LUT.uniform(model, UNIFORM_RATES), "uniform (the same rate in every layer, 0 to 0.5)"
        elif spec == "learned":
            lut, file = LUT.learned(model), SHIPPED_DIR / f"{model.model_name}.json"
            source = f"learned (flwr_distreal/luts/{model.model_name}.json"
            if "recosted_from_classes" in lut.meta:
                source += f", learned with {lut.meta['recosted_from_classes']} classes, MACs recomputed for {model.num_classes}"
            source += ")"
        else:
            lut, source, file = LUT.load(spec, model), spec, Path(spec)
        self.lut_record = lut_record(spec, lut, file)
        log.info(
            "DISTREAL LUT: %s; %d vectors, %.3g to %.3g M MACs; sha256 %s (%s)", source, len(lut), lut.min_macs / 1e6,
            lut.max_macs / 1e6, self.lut_record["lut_sha256"], self.lut_record["lut_sha256_of"],
        )
        self.lut_source = source
        return lut

    def availability(self, device_id: int, t: float) -> float:
        """Resource availability of a device at simulated time ``t`` (MACs per second); in the
        wall-clock mode the throughput the device last reported (infinite before its first report:
        the full model)."""
        if self.resources is None:
            return self.reported_throughput.get(int(device_id), math.inf)
        trace = self._traces.get(device_id)
        if trace is None:
            trace = self.resources.trace(device_id, self.r_max[device_id])
            self._traces[device_id] = trace
        return trace.rate_at(t)

    # -- devices, model, evaluation (Flower-free) ------------------------------------------
    def make_trainer(self, device_id: int, data: FederatedData | None = None) -> DeviceTrainer:
        """The Flower-free trainer of one device for this run's strategy and resources.

        Parameters
        ----------
        device_id : int
            The device: a partition of ``data``; it also seeds the device's random draws and picks
            its simulated resource trace.
        data : FederatedData, optional
            The data the device's partition comes from; the run's dataset by default (a real
            node's own data in a deployment, see :meth:`node_data`).
        """
        from .recipe import Recipe, resolve_device

        cfg = self.cfg
        torch.set_num_threads(cfg.torch_threads)
        data = self.data if data is None else data
        model = self.build_model()
        loader = data.train_loader(device_id, cfg.batch_size, shuffle=True, seed=cfg.seed)
        own = data is self.data
        common = dict(
            r_max=self.r_max[device_id] if own else self.r_max_for_samples(len(data.partitions[device_id])),
            recipe=Recipe.from_config(cfg),  # one recipe for DISTREAL and every baseline
            local_epochs=cfg.local_epochs,
            step_macs_factor=self.factor,
            skip_straggler_training=cfg.skip_straggler_training,
            torch_device=resolve_device(cfg.device),
            precision=cfg.precision,
            seed=cfg.seed,
        )
        if self.measured:
            from .wallclock import MeasuredBaselineTrainer, MeasuredDistrealTrainer

            timing = dict(margin=cfg.resources.margin)
            if cfg.strategy.name == "distreal":
                trainer = MeasuredDistrealTrainer(
                    model, loader, device_id, self.lut, policy="deadline", time_table=cfg.resources.time_table,
                    table_path=cfg.resources.table_path or self.default_table_path(device_id),
                    stop_at_deadline=cfg.strategy.stop_at_deadline,
                    **timing, **common,
                )
                trainer.calibrate()  # now, when the node is set up, not inside round 1's deadline
                return trainer
            return MeasuredBaselineTrainer(model, loader, device_id, **timing, **common)
        if cfg.strategy.name == "distreal":
            return DistrealTrainer(
                model, loader, device_id, self.lut, self.resources, policy=cfg.strategy.policy,
                stop_at_deadline=cfg.strategy.stop_at_deadline, **common
            )
        return BaselineTrainer(model, loader, device_id, self.resources, **common)

    def default_table_path(self, device_id: int) -> Path:
        """Where a device caches its measured step-time table when ``resources.table_path`` is not
        set: ``$XDG_CACHE_HOME/flwr_distreal/`` (``~/.cache``). A SuperNode starts a fresh ClientApp
        process every round, so without a cache it would time its vectors every round. The table
        is refused and re-measured when model, LUT, batch size, threads, torch or host differ."""
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flwr_distreal"
        return cache / f"steptimes_{self.model_name}_{self.cfg.batch_size}_device{int(device_id)}.json"

    def node_data(self, node_config: Mapping[str, Any]) -> tuple[FederatedData, int]:
        """A real node's data in a deployment, from its node config, and its device index.

        ``data-path`` (an .npz with ``x_train`` and ``y_train``; ``partition-id``, if also given,
        seeds its draws), else ``partition-id`` and ``num-partitions`` (the run's dataset regrouped
        into that many partitions, see :func:`flwr_distreal.data.regroup`; without
        ``num-partitions``, the dataset's own devices).

        Raises
        ------
        NodeConfigError
            Naming the key that is missing or wrong.
        """
        from .data import DataError, node_data_from_npz, regroup

        def integer(key: str, minimum: int) -> int:
            value = node_config[key]
            try:
                number = int(str(value))
            except ValueError:
                raise NodeConfigError(f"node config {key!r} must be an integer, got {value!r}") from None
            if number < minimum:
                raise NodeConfigError(f"node config {key!r} must be >= {minimum}, got {number}")
            return number

        try:
            if "data-path" in node_config:
                device = integer("partition-id", 0) if "partition-id" in node_config else 0
                return node_data_from_npz(str(node_config["data-path"]), self.data), device
            if "partition-id" not in node_config:
                raise NodeConfigError(
                    f"node config needs 'partition-id' (with 'num-partitions') or 'data-path'; it has "
                    f"{sorted(node_config)}; e.g. flower-supernode --node-config \"partition-id=0 num-partitions=3\""
                )
            device = integer("partition-id", 0)
            parts = integer("num-partitions", 1) if "num-partitions" in node_config else self.num_devices
            if device >= parts:
                raise NodeConfigError(f"node config 'partition-id'={device} must be < 'num-partitions'={parts}")
            data = regroup(self.data, parts)
        except DataError as err:
            raise NodeConfigError(f"node config: {err}") from err
        return data, device

    def make_node_trainer(self, node_config: Mapping[str, Any]) -> DeviceTrainer:
        """The trainer of a real node in a deployment (its data from :meth:`node_data`)."""
        data, device = self.node_data(node_config)
        if data is self.data or len(data.partitions) > 1:  # a partition of the run's dataset
            return self.make_trainer(device, data)
        trainer = self.make_trainer(0, data)  # the node's own file: one partition
        trainer.device_id = device  # reported as, and seeded from, its partition-id
        return trainer

    def initial_arrays(self) -> tuple[list[str], list]:
        """The seeded initial global model: ``state_dict`` keys and arrays."""
        torch.manual_seed(self.cfg.seed)
        model = self.build_model()
        return list(model.state_dict().keys()), get_weights(model)

    def evaluate(self, arrays: list) -> tuple[float, float, int]:
        """Server-side evaluation of the full model: (loss, accuracy, n), on the test split, or on
        the validation split (the held-out training samples) with ``evaluate_on=validation``."""
        if not hasattr(self, "_eval_model"):
            from .recipe import resolve_device

            self._eval_device = resolve_device(self.cfg.device)
            self._eval_model = self.build_model().to(self._eval_device)
            if self.cfg.evaluate_on == "validation":
                self._eval_loader = self.data.validation_loader(self.cfg.eval_batch_size)
                log.info(
                    "evaluating on the validation split (%d samples): metrics.csv's accuracy and loss are "
                    "validation accuracy and loss", len(self._eval_loader.dataset),
                )
            else:
                self._eval_loader = self.data.test_loader(self.cfg.eval_batch_size)
        set_weights(self._eval_model, arrays)
        if self.cfg.strategy.bn_recompute_devices():  # static BN (strategy.static_bn): statistics from training data
            recompute_bn_statistics(self._eval_model, self.bn_batches(), device=self._eval_device)
        return evaluate_model(self._eval_model, self._eval_loader, device=self._eval_device, precision=self.cfg.precision)

    def bn_batches(self, devices: int | None = None):
        """The batches the server recomputes BatchNorm statistics from before evaluating (static
        BN): the training data, unshuffled and unaugmented, in the run's batch size, of
        ``strategy.bn_devices`` devices (or ``devices``) drawn once from the run's seed."""
        k = min(self.cfg.strategy.bn_recompute_devices() if devices is None else devices, self.num_devices)
        rng = np.random.default_rng([self.cfg.seed, 0xB4])
        for device in sorted(rng.choice(self.num_devices, size=k, replace=False).tolist()):
            yield from self.data.train_loader(device, self.cfg.batch_size, shuffle=False, augment=False)

    def strategy_kwargs(self) -> dict[str, Any]:
        """Arguments of the strategy classes, common to both APIs: DISTREAL's claim bounds, or the
        submodel baselines' round-start assignment."""
        cfg = self.cfg
        name = cfg.strategy.name
        own: dict[str, Any] = {}
        if name == "distreal":
            # Algorithm 1 adds forward MACs per sample once per mini-batch: the full model's bound
            own = dict(
                full_macs_per_sample=self.full_forward_macs,
                on_excess=cfg.strategy.on_excess,
                # claims bounded by what the server configured: batches of the device's samples
                batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs,
            )
        elif name in ("feddropout", "heterofl"):
            own = dict(
                model_name=self.model_name,
                availability_fn=self.availability,
                round_duration=cfg.deadline,
                num_classes=self.num_classes,
                step_macs_factor=self.factor,
                seed=cfg.seed,
            )
            own["aggregation"] = cfg.strategy.aggregation
            if name == "heterofl":
                own.update(shrink=cfg.strategy.shrink, levels=cfg.strategy.levels)
        return own

    def train_config(self) -> dict[str, Any]:
        """What every node gets in its train config besides the strategy's keys: the round
        deadline in real seconds in the wall-clock mode."""
        from .contract import ROUND_DEADLINE

        return {ROUND_DEADLINE: float(self.cfg.deadline)} if self.measured else {}

    def round_timeout(self) -> float:
        """Seconds the server waits for a round's replies (``round_timeout``; by default 3600, or
        ``2 * deadline + 60`` in the wall-clock mode, where a round lasts about ``deadline``)."""
        if self.cfg.round_timeout is not None:
            return float(self.cfg.round_timeout)
        return 2 * self.cfg.deadline + 60 if self.measured else 3600.0

    def node_wait(self) -> float:
        """Seconds a round waits for nodes (``node_wait``; by default ``round_timeout`` when it
        is set, else :data:`flwr_distreal.serverapp.DEFAULT_NODE_WAIT`, 60)."""
        if self.cfg.node_wait is not None:
            return float(self.cfg.node_wait)
        return float(self.cfg.round_timeout) if self.cfg.round_timeout is not None else 60.0

    def note_replies(self, metrics: list[Mapping[str, Any]]) -> None:
        """Keep each device's last reported throughput (wall-clock mode)."""
        from .contract import PARTITION_ID, is_number
        from .wallclock import THROUGHPUT

        for m in metrics:
            device, rate = m.get(PARTITION_ID), m.get(THROUGHPUT)
            if is_number(device) and is_number(rate) and math.isfinite(float(rate)) and float(rate) > 0:
                self.reported_throughput[int(device)] = float(rate)

    # -- Flower pieces: legacy API -----------------------------------------------------------
    def make_client(self, device_id: int):
        """The legacy ``NumPyClient`` of one device (an adapter over :meth:`make_trainer`)."""
        from .client import TrainerClient

        return TrainerClient(self.make_trainer(device_id))

    def make_strategy(self):
        """DISTREAL's or a baseline's legacy Flower strategy, with centralized full-model evaluation."""
        from flwr.common import ndarrays_to_parameters

        from .strategy import Distreal, FederatedDropout, FullResources, HeteroFL, SmallNetwork

        cfg = self.cfg
        _, arrays = self.initial_arrays()

        def evaluate_fn(server_round: int, parameters_ndarrays: list, config: dict):
            loss, accuracy, n = self.evaluate(parameters_ndarrays)
            return loss, {"accuracy": accuracy, "num_examples": n}

        common: dict[str, Any] = dict(
            fraction_fit=cfg.clients_per_round / self.num_devices,
            min_fit_clients=cfg.clients_per_round,
            min_available_clients=self.num_devices,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            evaluate_fn=evaluate_fn,
            initial_parameters=ndarrays_to_parameters(arrays),
        )
        own = self.strategy_kwargs()
        classes = {
            "distreal": Distreal, "full": FullResources, "small": SmallNetwork,
            "feddropout": FederatedDropout, "heterofl": HeteroFL,
        }
        return classes[cfg.strategy.name](**own, **common)

    # -- Flower pieces: Message API ----------------------------------------------------------
    def make_message_strategy(self):
        """DISTREAL's or a baseline's Message-API strategy (:mod:`flwr_distreal.serverapp`),
        with seeded node sampling of ``clients_per_round`` of the federation's nodes."""
        from . import serverapp

        cfg = self.cfg
        common: dict[str, Any] = dict(
            fraction_train=cfg.clients_per_round / self.num_devices,
            min_train_nodes=cfg.clients_per_round,
            min_available_nodes=self.num_devices,
            fraction_evaluate=0.0,
            min_evaluate_nodes=0,
            node_wait=self.node_wait(),
        )
        if cfg.deployment:  # real nodes: wait for min_nodes to start, train every connected node
            common.update(fraction_train=1.0, min_train_nodes=1, min_available_nodes=cfg.min_nodes)
        own = self.strategy_kwargs()
        if cfg.strategy.name in ("distreal", "full", "small"):
            own["seed"] = cfg.seed
        classes = {
            "distreal": serverapp.Distreal, "full": serverapp.FullResources, "small": serverapp.SmallNetwork,
            "feddropout": serverapp.FederatedDropout, "heterofl": serverapp.HeteroFL,
        }
        return classes[cfg.strategy.name](**own, **common)


class NodeConfigError(ValueError):
    """A SuperNode's node config does not say which data the node trains on."""


#: What ``lut_sha256`` hashes for a LUT the run generates (``lut=uniform``) rather than reads.
CANONICAL_LUT = "canonical JSON of the LUT as used: LUT.to_dict(), sorted keys, no spaces, UTF-8"


def lut_record(spec: str, lut: LUT, file: Path | None) -> dict[str, Any]:
    """Which LUT a run uses, for its audit trail (``run.json``).

    Parameters
    ----------
    spec : str
        The config's ``lut``: ``learned``, ``uniform`` or a file.
    lut : LUT
        The LUT as the run uses it.
    file : Path or None
        The file it was read from (the shipped one for ``learned``); None when generated.

    Returns
    -------
    dict
        ``lut`` (the spec), ``lut_file``, ``lut_sha256`` (SHA-256 of the file's bytes, or for a
        generated LUT of :data:`CANONICAL_LUT`), ``lut_sha256_of`` (``"file"`` or
        :data:`CANONICAL_LUT`) and ``lut_content_sha256`` (:data:`CANONICAL_LUT`, always: it also
        tells apart a learned LUT whose MACs were recomputed for another number of classes).
    """
    import hashlib

    canonical = json.dumps(lut.to_dict(), sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    content = hashlib.sha256(canonical).hexdigest()
    return {
        "lut": spec,
        "lut_file": str(file) if file is not None else None,
        "lut_sha256": hashlib.sha256(file.read_bytes()).hexdigest() if file is not None else content,
        "lut_sha256_of": "file" if file is not None else CANONICAL_LUT,
        "lut_content_sha256": content,
    }


class MetricsRecorder:
    """Collects one row per round and writes ``metrics.csv`` as the run goes.

    Columns: the server's evaluation (``accuracy``, ``loss``: on the test split, or on the
    validation split with ``evaluate_on=validation``), the round's replies (``received``,
    ``failures``, ``stragglers``, ``refused``, ``clipped``, and ``accepted``: the clients
    aggregated), resources (``mean_macs``, ``mean_utilisation``), the recipe's ``lr`` of the round,
    ``update_norm`` (L2 norm of the aggregated update: the new global model minus the previous one,
    over floating-point entries) and the clocks (``sim_time``, ``wall_time``).

    Beside it, ``draws.csv`` (:attr:`DRAW_FIELDS`): per round, the devices (partition ids, sorted,
    space-separated) drawn for training and for federated evaluation (empty: none drawn, as with
    the runner's server-side evaluation), from :meth:`on_draw`; written with the round's metrics
    row, so both files hold the same rounds. For one seed every method draws the same devices.
    A resumed run keeps the rows of the rounds it resumes after and appends the rest.
    """

    DRAW_FIELDS = ["round", "train_devices", "evaluate_devices"]
    FIELDS = [
        "round", "accuracy", "loss", "received", "failures", "stragglers", "refused", "clipped", "accepted",
        "mean_macs", "mean_utilisation", "lr", "update_norm", "sim_time", "wall_time",
    ]

    def __init__(
        self,
        path: Path | None,
        deadline: float,
        rows: list[dict[str, Any]] | None = None,
        lr_fn: Callable[[int], float] | None = None,
    ) -> None:
        self.path = path
        self.deadline = deadline
        self.lr_fn = lr_fn
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows or []]
        self._fit: dict[int, dict[str, Scalar]] = {}
        self._draws: dict[int, dict[str, str]] = {}
        self._previous: list | None = None
        # a resumed run's wall time goes on from where the checkpoint left it
        self._start = time.perf_counter() - (float(self.rows[-1]["wall_time"]) if self.rows else 0.0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in self.FIELDS} for r in self.rows)
            os.replace(tmp, path)
            self._start_draws(path.with_name(DRAWS_FILE))

    def _start_draws(self, path: Path) -> None:
        """Write ``draws.csv``: a fresh run's header, or a resumed run's rows up to the round it
        resumes after (a round drawn but not checkpointed is drawn again, alike)."""
        done = int(self.rows[-1]["round"]) if self.rows else 0
        kept: list[dict[str, str]] = []
        if done and path.is_file():
            kept = [r for r in _read_csv(path) if str(r.get("round", "")).isdigit() and int(r["round"]) <= done]
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.DRAW_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.DRAW_FIELDS} for r in kept)
        os.replace(tmp, path)

    def on_draw(self, server_round: int, phase: str, devices: Sequence[int | str]) -> None:
        """The devices drawn in round ``server_round`` for ``phase`` (``"train"`` or ``"evaluate"``)."""
        if phase not in ("train", "evaluate"):
            raise ValueError(f"phase must be 'train' or 'evaluate', got {phase!r}")
        self._draws.setdefault(server_round, {})[f"{phase}_devices"] = " ".join(str(d) for d in devices)

    def on_fit(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        self._fit[server_round] = dict(metrics)

    def set_global(self, arrays: list) -> None:
        """The global model the next round starts from (the reference of its ``update_norm``)."""
        self._previous = [np.array(a, copy=True) for a in arrays]

    def _update_norm(self, arrays: list | None) -> float:
        if arrays is None or self._previous is None or len(arrays) != len(self._previous):
            return math.nan
        return float(np.sqrt(np.sum(update_norms(self._previous, arrays) ** 2)))  # floating arrays, in float64

    def on_evaluate(
        self, server_round: int, loss: float, metrics: dict[str, Scalar], arrays: list | None = None
    ) -> None:
        """Record round ``server_round`` (its evaluation, and the round's train metrics); ``arrays``:
        the round's new global model, for ``update_norm``."""
        fit = self._fit.get(server_round, {})
        update_norm = self._update_norm(arrays)
        if arrays is not None:
            self.set_global(arrays)
        row = {
            "round": server_round,
            "accuracy": float(metrics.get("accuracy", math.nan)),
            "loss": float(loss),
            "received": fit.get("received", 0),
            "failures": fit.get("failures", 0),
            "stragglers": fit.get("stragglers", 0),
            "refused": fit.get("refused", 0),
            "clipped": fit.get("clipped", 0),
            "accepted": fit.get("accepted", 0),
            "mean_macs": fit.get("mean_macs", math.nan),
            "mean_utilisation": fit.get("mean_utilisation", math.nan),
            "lr": self.lr_fn(server_round) if self.lr_fn is not None else math.nan,
            "update_norm": update_norm,
            "sim_time": server_round * self.deadline,
            "wall_time": round(time.perf_counter() - self._start, 3),
        }
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)
            draws = self._draws.pop(server_round, {})
            with self.path.with_name(DRAWS_FILE).open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.DRAW_FIELDS).writerow(
                    {"round": server_round, "train_devices": "", "evaluate_devices": "", **draws}
                )
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
        from flwr.common import parameters_to_ndarrays

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


class RunDirectoryError(ValueError):
    """The output directory already holds a run (and ``resume`` is off), or a resume does not fit."""


class RunFailedError(RuntimeError):
    """A run could not produce a meaningful result (non-finite loss, clients failing every round)."""


def check_run_dir(out: Path | None, cfg: RunConfig):
    """The checkpoint to resume from (``resume=true``), or None for a fresh run.

    Raises
    ------
    RunDirectoryError
        If ``out`` already holds a run (``metrics.csv`` or a checkpoint) and ``resume`` is off;
        or ``resume`` is on and ``out`` holds no checkpoint, ``rounds`` is below the checkpoint's
        round, or the checkpoint was made with another config (the message names the differing
        keys).
    CheckpointError
        If the checkpoint is unreadable or truncated.
    """
    from .checkpoint import CHECKPOINT_FILE, config_differences, load_checkpoint

    if out is None:
        if cfg.resume:
            raise RunDirectoryError("resume=true needs an output directory to resume from")
        return None
    holds = [name for name in ("metrics.csv", CHECKPOINT_FILE) if (out / name).exists()]
    if not cfg.resume:
        if holds:
            raise RunDirectoryError(
                f"{out} already holds a run ({', '.join(holds)}); pass resume=true to continue it, or choose "
                "another output directory (nothing was overwritten)"
            )
        return None
    ckpt = load_checkpoint(out)
    if ckpt is None:
        if holds:
            raise RunDirectoryError(f"resume=true but {out} has no {CHECKPOINT_FILE} to resume from (only {holds})")
        raise RunDirectoryError(
            f"resume=true but {out} holds no run to resume (no {CHECKPOINT_FILE}); check the directory, or drop "
            "resume=true to start a fresh run there"
        )
    if cfg.rounds < ckpt.round:
        raise RunDirectoryError(
            f"rounds={cfg.rounds} is below the {ckpt.round} rounds the checkpoint in {out} already holds; a resume "
            f"can only go on (rounds >= {ckpt.round}); its metrics.csv keeps every round (nothing was changed)"
        )
    diff = config_differences(ckpt.config, dataclasses.asdict(cfg))
    if diff:
        raise RunDirectoryError(f"resume=true with another config than the checkpoint's in {out}: {'; '.join(diff)}")
    return ckpt


def check_failures(rows: list[dict[str, Any]], threshold: float) -> None:
    """Refuse a run in which, in every round, more than ``threshold`` of the sampled clients failed.

    Raises
    ------
    RunFailedError
        Saying how many rounds and clients failed.
    """
    if not rows:
        return
    fractions = []
    for row in rows:
        failures, received = float(row.get("failures", 0) or 0), float(row.get("received", 0) or 0)
        fractions.append(failures / (failures + received) if failures + received > 0 else 1.0)
    if all(f > threshold for f in fractions):
        raise RunFailedError(
            f"in every one of the {len(rows)} rounds more than {threshold:.0%} of the sampled clients failed "
            f"(least: {min(fractions):.0%}); the model was trained by too few clients to mean anything. "
            "See the run's log for the clients' errors (failure_threshold sets the limit)"
        )


def start_output(
    out: Path | None,
    cfg: RunConfig,
    rows: list[dict[str, Any]] | None = None,
    exp: Experiment | None = None,
) -> MetricsRecorder:
    """Create the run directory, write the resolved ``config.yaml`` (and with ``exp``, the run
    record ``run.json``, :func:`write_run_record`) and return the recorder that writes
    ``metrics.csv`` and ``draws.csv`` there (``out=None``: record in memory only); ``rows``: the
    rows of a resumed run so far (``metrics.csv`` is rewritten with exactly those)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if exp is not None:  # first: a resume with another LUT is refused before anything is written
            write_run_record(out, cfg, exp.lut_record, int(rows[-1]["round"]) if rows else 0)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    from .recipe import Recipe

    lr_fn = Recipe.from_config(cfg).lr_at
    return MetricsRecorder(out / "metrics.csv" if out is not None else None, cfg.deadline, rows, lr_fn)


def write_run_record(out: Path, cfg: RunConfig, lut: Mapping[str, Any], resumed_after: int = 0) -> dict[str, Any]:
    """Write the run's record ``run.json``: what the run used that ``config.yaml`` names only
    (the LUT's SHA-256, :func:`lut_record`), and where the drawn devices are logged.

    A fresh run (``resumed_after=0``) writes it; a resumed one keeps it and appends
    ``{"after_round": resumed_after, "runtime": ...}`` to its ``resumed``.

    Raises
    ------
    RunDirectoryError
        If a resume would use another LUT (other bytes) than the run started with, naming both
        hashes.
    """
    path = out / RUN_RECORD_FILE
    record: dict[str, Any] = {
        "strategy": cfg.strategy.name, "dataset": cfg.dataset.name, "model": cfg.model.name, "seed": cfg.seed,
        "runtime": cfg.runtime, "deployment": cfg.deployment, **dict(lut), "draws": DRAWS_FILE, "resumed": [],
    }
    if resumed_after and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise RunDirectoryError(f"{path} is not a readable run record ({err}); move it away or restore it") from err
        if before.get("lut_sha256") != lut.get("lut_sha256"):
            raise RunDirectoryError(
                f"resume=true but the LUT differs from the one the run in {out} started with: lut={lut.get('lut')!r} "
                f"has sha256 {lut.get('lut_sha256')}, {path} records {before.get('lut_sha256')} "
                f"(lut={before.get('lut')!r}); restore that LUT or start a fresh run (nothing was changed)"
            )
        record = before
    if resumed_after:
        record.setdefault("resumed", []).append({"after_round": int(resumed_after), "runtime": cfg.runtime})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def _read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV text file as strings.

    Raises
    ------
    RunDirectoryError
        If it cannot be read (not UTF-8, malformed), naming it.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise RunDirectoryError(
            f"{path} is not a readable CSV file ({type(err).__name__}: {err}); move it away or restore it "
            "(nothing was changed)"
        ) from err


def summary_line(cfg: RunConfig, rows: list[dict[str, Any]], output_dir: str | os.PathLike | None = None) -> str:
    """End-of-run summary: final accuracy and the failures, refusals and stragglers of the run;
    with ``output_dir``, the LUT's SHA-256 from its ``run.json`` (DISTREAL)."""
    lut = ""
    record = Path(output_dir) / RUN_RECORD_FILE if output_dir is not None else None
    if record is not None and record.is_file():
        try:
            sha = json.loads(record.read_text(encoding="utf-8")).get("lut_sha256")
        except (OSError, UnicodeDecodeError, ValueError):
            sha = None
        if sha:
            lut = f"; LUT {cfg.lut} sha256 {sha[:16]}"
    if not rows:
        return f"{cfg.strategy.name}: no round completed{lut}"

    def total(key: str) -> int:
        return int(sum(float(r.get(key, 0) or 0) for r in rows))

    return (
        f"{cfg.strategy.name}: {len(rows)} rounds, final accuracy {float(rows[-1]['accuracy']):.4f}; "
        f"failures {total('failures')}, refused {total('refused')}, clipped {total('clipped')}, "
        f"stragglers {total('stragglers')} (of {total('received') + total('failures')} sampled){lut}"
    )


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
        import tempfile

        self.show_rounds = show_rounds
        self.cfg = cfg = with_absolute_paths(cfg)  # the app may run in another working directory
        self.exp = _experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))  # refuse bad input here
        _log_start(cfg, self.exp, runtime)
        self.tmp = Path(tempfile.mkdtemp(prefix="fdr-run-")) if output_dir is None else None
        self.out = Path(output_dir if output_dir is not None else self.tmp).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        check_run_dir(self.out, cfg)  # refuse before anything starts (the app checks again)
        self.config_file = self.out / "config.yaml"
        self.config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
        self.metrics = self.out / "metrics.csv"
        self.run_config = {"config-file": str(self.config_file), "output-dir": str(self.out)}
        self._shown = len(_read_metrics(self.metrics))

    def progress(self) -> None:
        """Print a line for each round finished since the last call (every ``rounds // 50``-th
        round of a long run)."""
        rows = _read_metrics(self.metrics)
        if not self.show_rounds:
            self._shown = len(rows)
            return
        every = max(1, self.cfg.rounds // 50)  # at most ~50 lines per run, and always the last round
        for row in rows[self._shown:]:
            if int(row["round"]) % every and int(row["round"]) != self.cfg.rounds:
                continue
            print(
                f"  [{self.cfg.strategy.name}] round {row['round']}/{self.cfg.rounds}: accuracy "
                f"{float(row['accuracy']):.4f}, stragglers {row['stragglers']}/{row['received']}, "
                f"{float(row['wall_time']):.1f} s",
                flush=True,
            )
        self._shown = len(rows)

    def close(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.csv``; removes the temporary output directory, if any."""
        import shutil

        rows = _read_metrics(self.metrics)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return rows


def run_with_flwr(
    cfg: RunConfig, output_dir: str | os.PathLike | None = None, *, show_rounds: bool = True
) -> list[dict[str, Any]]:
    """Run the Message-API app (:mod:`flwr_distreal.app`) with ``flwr run`` on this process's
    private local SuperLink (:func:`flwr_distreal.local_runtime.shared_runtime`), one simulated
    SuperNode per device, and return the rows the ServerApp wrote to ``metrics.csv``.

    Prints one line per finished round. Raises :class:`~flwr_distreal.local_runtime.FlwrRunError`
    when the run does not finish as completed (with Flower's reason and the log's path).
    """
    from .app import APP_DIR
    from .local_runtime import FlwrRunError, shared_runtime

    run = _AppRun(cfg, output_dir, "flwr run", show_rounds)
    cfg = run.cfg
    if cfg.num_cpus_per_client != math.ceil(cfg.num_cpus_per_client):
        log.warning(
            "num_cpus_per_client=%s: flwr run reserves whole CPUs per client, using %s",
            cfg.num_cpus_per_client, math.ceil(cfg.num_cpus_per_client),
        )
    try:
        result = shared_runtime().run(
            APP_DIR,
            run.exp.num_devices,
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
    """Run the Message-API app (:mod:`flwr_distreal.app`: the same ServerApp, strategies,
    ClientApp and trainers as ``flwr run``) in this process, its clients one after another
    (:mod:`flwr_distreal.inprocess`), and return the rows of ``metrics.csv``.

    For sweeps on small machines: no SuperLink, no Ray, no per-message transport. A seeded run
    gives the same per-round metrics as ``flwr run``; clients do not run in parallel and
    ``round_timeout`` is not applied.
    """
    from .app import _server_main, client_app
    from .inprocess import run_app_in_process

    run = _AppRun(cfg, output_dir, "in process", show_rounds)
    nodes = [{"partition-id": i, "num-partitions": run.exp.num_devices} for i in range(run.exp.num_devices)]
    printer = _RoundPrinter(run.progress)
    try:
        with printer:
            run_app_in_process(_server_main, client_app, nodes, run.run_config)
    finally:
        rows = run.close()
    return rows


class _RoundPrinter:
    """Calls ``progress`` every ``interval`` seconds from a daemon thread while in its ``with``
    block (and once at the end): the in-process run blocks this thread."""

    def __init__(self, progress: Callable[[], None], interval: float = 1.0) -> None:
        import threading

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


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its relative file paths (``dataset.root``, ``dataset.path``, ``lut``,
    ``resources.trace_path``) made absolute against this process's working directory, for a
    run whose processes start elsewhere (``flwr run``'s SuperLink)."""

    def absolute(path: str | None) -> str | None:
        if not path or "://" in path:
            return path
        return str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        lut=cfg.lut if cfg.lut in ("learned", "uniform") else absolute(cfg.lut),  # keywords, not files
        dataset=dataclasses.replace(cfg.dataset, root=absolute(cfg.dataset.root), path=absolute(cfg.dataset.path)),
        resources=dataclasses.replace(cfg.resources, trace_path=absolute(cfg.resources.trace_path)),
    )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv`` (numbers as floats, ``round`` as int); [] if absent.

    Raises
    ------
    RunDirectoryError
        If the file cannot be read as a CSV text file (not UTF-8, malformed), naming it.
    """
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise RunDirectoryError(
            f"{path} is not a readable metrics.csv ({type(err).__name__}: {err}); move it away or restore it "
            "(nothing was changed)"
        ) from err
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            try:
                parsed[key] = int(value) if key == "round" else float(value)
            except (TypeError, ValueError):
                parsed[key] = value
        out.append(parsed)
    return out


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
    import warnings

    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    from .client_manager import SeededClientManager

    if cfg.resume:
        raise RunDirectoryError("resume=true needs runtime=flwr-run (the legacy runtime keeps no checkpoints)")
    out = Path(output_dir) if output_dir is not None else None
    check_run_dir(out, cfg)
    cfg_dict = dataclasses.asdict(cfg)
    exp = _experiment_for(json.dumps(cfg_dict, sort_keys=True))
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
    from .local_runtime import ProcessGuard

    with warnings.catch_warnings(), ProcessGuard():
        warnings.simplefilter("ignore", DeprecationWarning)  # runtime=legacy chose it knowingly
        run_simulation(
            ServerApp(server_fn=server_fn),
            ClientApp(client_fn=_client_fn_factory(cfg_dict)),
            num_supernodes=exp.num_devices,
            backend_config=backend_config,
        )
    finish_output(out, cfg, recorder)
    if any(not math.isfinite(float(r["loss"])) for r in recorder.rows):
        raise RunFailedError(f"the test loss became non-finite (round {next(r['round'] for r in recorder.rows if not math.isfinite(float(r['loss'])))})")
    check_failures(recorder.rows, cfg.failure_threshold)
    return recorder.rows
