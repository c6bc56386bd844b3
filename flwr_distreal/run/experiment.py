"""The composition root of a run: everything a federated experiment needs, built from a
:class:`~flwr_distreal.run.config.RunConfig`.

:class:`Experiment` loads the data, builds the model, the LUT, the resource model (with ``r_max``
per device such that the full model finishes a round's local training exactly at the deadline),
the devices' trainers and the strategy (DISTREAL or a baseline, Message API or legacy). It is
shared by the ServerApp and ClientApp (:mod:`flwr_distreal.run.flwr_app`) and the runtimes
(:mod:`flwr_distreal.run.runtimes`, which run it: ``flwr run``, in-process, legacy); what a run
records is in :mod:`flwr_distreal.run.recording` (its names are re-exported here for existing
imports). ``run_experiment`` lives in :mod:`flwr_distreal.run.runtimes`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import ndarrays_to_parameters
from torch.utils.data import DataLoader, Subset

from ..flower import serverapp
from ..flower.legacy import strategy as legacy
from ..core.allocator import keep_freed_memory
from .checks import check_classes, check_trace_devices, warn_unused_lut
from ..flower.legacy.client import TrainerClient
from .config import ConfigError, RunConfig, to_run_config
from ..methods import get_method
from ..core.contract import PARTITION_ID, ROUND_DEADLINE, is_number
from ..data import DataError, FederatedData, load_federated, node_data_from_npz, regroup
from ..core.dropout import recompute_bn_statistics
from ..training.layout import resolve_layout
from ..core.lut import LUT, SHIPPED_DIR
from ..core.macs import count_macs
from ..models import build_model
from ..core.precision import check_precision
from ..training.recipe import Recipe, resolve_device
from .recording import (
    CANONICAL_LUT,
    DRAWS_FILE,
    RUN_RECORD_FILE,
    MetricsRecorder,
    RunDirectoryError,
    RunFailedError,
    check_failures,
    check_run_dir,
    finish_output,
    lut_record,
    read_metrics,
    start_output,
    summary_line,
    with_absolute_paths,
    write_run_record,
)
from ..core.resources import ResourceModel, r_max_for, step_macs
from ..training.schedule import batch_sizes
from ..training.trainers import BaselineTrainer, DeviceTrainer, DistrealTrainer, evaluate_model, get_weights, set_weights
from ..training.wallclock import THROUGHPUT, MeasuredBaselineTrainer, MeasuredDistrealTrainer

__all__ = [
    "CANONICAL_LUT",
    "DRAWS_FILE",
    "RUN_RECORD_FILE",
    "Experiment",
    "MetricsRecorder",
    "NodeConfigError",
    "RunDirectoryError",
    "RunFailedError",
    "check_failures",
    "check_run_dir",
    "experiment_for",
    "finish_output",
    "lut_record",
    "read_metrics",
    "start_output",
    "summary_line",
    "with_absolute_paths",
    "write_run_record",
]

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
        keep_freed_memory()  # server, clients and in-process runs: no page-fault storm per forward pass
        self.cfg = cfg
        kwargs = cfg.dataset.loader_kwargs(cfg.seed)
        self.data = _load_data(cfg.dataset.name, json.dumps(kwargs, sort_keys=True))
        if cfg.validation_fraction > 0:  # seeded by the run's seed: server and clients hold out the same samples
            self.data = self.data.split_validation(cfg.validation_fraction, cfg.seed)  # r_max from what remains
        self.num_devices = self.data.num_devices
        self.measured = cfg.resources.kind == "measured"
        #: The run's method (:mod:`flwr_distreal.methods`): its server rule, client trainer, model.
        self.method = get_method(cfg.strategy.name)
        if cfg.deployment and self.method.assigns_submodels and cfg.resources.kind not in (
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
        check_precision(cfg.precision, resolve_device(cfg.device))  # bf16 on a CPU without it: refused at start-up
        self._layout: str | None = None  # cfg.layout resolved (layout=auto: calibrated) by the first build_model
        self.num_classes = check_classes(cfg.model.num_classes, self.data)
        self.model_name = cfg.model.small if self.method.trains_small else cfg.model.name
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
        self.lut: LUT | None = self._load_lut(probe) if self.method.uses_lut else None
        self.full_forward_macs = count_macs(build_model(cfg.model.name, self.num_classes))
        self.factor = cfg.resources.step_macs_factor
        #: Training samples of every device (known without loading a device: lazy datasets too).
        self.device_sizes: list[int] = self.data.partition_sizes()
        # r_max depends on a device's sample count only: computed once per distinct count (FEMNIST's
        # 3,550 writers have a few hundred), not once per device
        by_size = {n: self.r_max_for_samples(n) for n in set(self.device_sizes)}
        self.r_max = [by_size[n] for n in self.device_sizes]
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
        layout (``layout``; ``auto``: :func:`flwr_distreal.training.layout.resolve_layout`, cached
        per machine): a copy of the first one this experiment built."""
        if getattr(self, "_template", None) is None:
            self._template = self._new_model()
        # A copy, 1 ms against 10 ms for building (and tracing) the FEMNIST CNN: trainers are
        # rebuilt whenever the TrainerCache has evicted a device drawn again. Its weights never
        # matter (every round starts by loading the server's arrays; the server's seeded initial
        # model is built anew, initial_arrays).
        return copy.deepcopy(self._template)

    def _new_model(self):
        """A newly built model (weights from torch's generator) as :meth:`build_model` describes."""
        if getattr(self, "_layout", None) is None:  # (getattr: also on an Experiment made without __init__)
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
        method = self.method
        options = method.client_options_of(cfg.strategy)  # e.g. DISTREAL's policy, stop_at_deadline
        if method.trainer is not None:  # a method with a client trainer of its own (FjORD, ...)
            if self.measured:
                raise ConfigError(f"strategy={method.name} has no wall-clock trainer (resources=measured)")
            return method.trainer(model, loader, device_id, self.resources, options, **common)
        if self.measured:
            timing = dict(margin=cfg.resources.margin)
            if method.client == "distreal":
                trainer = MeasuredDistrealTrainer(
                    model, loader, device_id, self.lut, time_table=cfg.resources.time_table,
                    table_path=cfg.resources.table_path or self.default_table_path(device_id),
                    **options, **timing, **common,
                )
                trainer.calibrate()  # now, when the node is set up, not inside round 1's deadline
                return trainer
            return MeasuredBaselineTrainer(model, loader, device_id, **options, **timing, **common)
        if method.client == "distreal":
            return DistrealTrainer(model, loader, device_id, self.lut, self.resources, **options, **common)
        return BaselineTrainer(model, loader, device_id, self.resources, **options, **common)

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
        model = self._new_model()
        return list(model.state_dict().keys()), get_weights(model)

    def evaluates(self, server_round: int) -> bool:
        """Whether the server evaluates the global model after round ``server_round``
        (``evaluate_every`` = k: after rounds k, 2k, ... and always after the last round,
        ``rounds``)."""
        return server_round % self.cfg.evaluate_every == 0 or server_round >= self.cfg.rounds

    def evaluate_round(self, server_round: int, arrays: list) -> tuple[float | None, float | None, int]:
        """:meth:`evaluate` after a round it evaluates (:meth:`evaluates`); ``(None, None, 0)``
        after any other: nothing is computed there, not even static BN's statistics, and the
        round's ``metrics.csv`` row leaves accuracy and loss empty."""
        if not self.evaluates(server_round):
            return None, None, 0
        return self.evaluate(arrays)

    def evaluate(self, arrays: list) -> tuple[float, float, int]:
        """Server-side evaluation of the full model: (loss, accuracy, n), on the test split, or on
        the validation split (the held-out training samples) with ``evaluate_on=validation``; with
        ``evaluate_samples``, on a fixed subset of it (:meth:`evaluation_indices`)."""
        if not hasattr(self, "_eval_model"):
            self._eval_device = resolve_device(self.cfg.device)
            self._eval_model = self.build_model().to(self._eval_device)
            if self.cfg.evaluate_on == "validation":
                loader = self.data.validation_loader(self.cfg.eval_batch_size)
            else:
                loader = self.data.test_loader(self.cfg.eval_batch_size)
            total = len(loader.dataset)
            indices = self.evaluation_indices(total)
            if indices is not None:
                loader = DataLoader(Subset(loader.dataset, indices), batch_size=self.cfg.eval_batch_size, shuffle=False)
            self._eval_loader = loader
            what = f"{len(loader.dataset)} samples" + (
                f", a fixed subset of its {total} drawn from the seed" if indices is not None else ""
            )
            if self.cfg.evaluate_on == "validation":
                log.info(
                    "evaluating on the validation split (%s): metrics.csv's accuracy and loss are validation "
                    "accuracy and loss", what,
                )
            else:
                log.info("evaluating on the test split (%s)", what)
            k = self.cfg.evaluate_every
            if k > 1:
                log.info(
                    "the server evaluates after rounds %d, %d, ... and the last (evaluate_every=%d); the other "
                    "rounds' accuracy and loss are left empty", k, 2 * k, k,
                )
        set_weights(self._eval_model, arrays)
        if self.cfg.strategy.bn_recompute_devices():  # static BN (strategy.static_bn): statistics from training data
            recompute_bn_statistics(self._eval_model, self.bn_batches(), device=self._eval_device)
        return evaluate_model(self._eval_model, self._eval_loader, device=self._eval_device, precision=self.cfg.precision)

    def evaluation_indices(self, total: int) -> list[int] | None:
        """The samples of the evaluation split (of ``total``) the server evaluates on: with
        ``evaluate_samples`` = m < ``total``, m distinct indices drawn once from the run's seed
        (sorted; the same every round and in every process of the run); None: all of them."""
        m = self.cfg.evaluate_samples
        if m is None or m >= total:
            return None
        rng = np.random.default_rng([self.cfg.seed, 0xE5A])
        return sorted(rng.choice(total, size=m, replace=False).tolist())

    def bn_batches(self, devices: int | None = None):
        """The batches the server recomputes BatchNorm statistics from before evaluating (static
        BN): the training data, unshuffled and unaugmented, in the run's batch size, of
        ``strategy.bn_devices`` devices (or ``devices``) drawn once from the run's seed."""
        k = min(self.cfg.strategy.bn_recompute_devices() if devices is None else devices, self.num_devices)
        rng = np.random.default_rng([self.cfg.seed, 0xB4])
        for device in sorted(rng.choice(self.num_devices, size=k, replace=False).tolist()):
            yield from self.data.train_loader(device, self.cfg.batch_size, shuffle=False, augment=False)

    def strategy_kwargs(self) -> dict[str, Any]:
        """Arguments of the strategy classes, common to both APIs, that the run's method takes
        from the run (:meth:`flwr_distreal.methods.Method.server_options`: DISTREAL's claim
        bounds, or the submodel methods' round-start assignment)."""
        own = self.method.server_options(self)
        if self.method.rule == "submodel":
            own["seed"] = self.cfg.seed
        return own

    def train_config(self) -> dict[str, Any]:
        """What every node gets in its train config besides the strategy's keys: the round
        deadline in real seconds in the wall-clock mode."""
        return {ROUND_DEADLINE: float(self.cfg.deadline)} if self.measured else {}

    def round_timeout(self) -> float:
        """Seconds the server waits for a round's replies (``round_timeout``; by default 3600, or
        ``2 * deadline + 60`` in the wall-clock mode, where a round lasts about ``deadline``)."""
        if self.cfg.round_timeout is not None:
            return float(self.cfg.round_timeout)
        return 2 * self.cfg.deadline + 60 if self.measured else 3600.0

    def node_wait(self) -> float:
        """Seconds a round waits for nodes (``node_wait``; by default ``round_timeout`` when it
        is set, else :data:`flwr_distreal.flower.serverapp.DEFAULT_NODE_WAIT`, 60)."""
        if self.cfg.node_wait is not None:
            return float(self.cfg.node_wait)
        return float(self.cfg.round_timeout) if self.cfg.round_timeout is not None else 60.0

    def note_replies(self, metrics: list[Mapping[str, Any]]) -> None:
        """Keep each device's last reported throughput (wall-clock mode)."""
        for m in metrics:
            device, rate = m.get(PARTITION_ID), m.get(THROUGHPUT)
            if is_number(device) and is_number(rate) and math.isfinite(float(rate)) and float(rate) > 0:
                self.reported_throughput[int(device)] = float(rate)

    # -- Flower pieces: legacy API -----------------------------------------------------------
    def make_client(self, device_id: int):
        """The legacy ``NumPyClient`` of one device (an adapter over :meth:`make_trainer`)."""
        return TrainerClient(self.make_trainer(device_id))

    def make_strategy(self):
        """DISTREAL's or a baseline's legacy Flower strategy, with centralized full-model evaluation."""
        cfg = self.cfg
        _, arrays = self.initial_arrays()

        def evaluate_fn(server_round: int, parameters_ndarrays: list, config: dict):
            if server_round < 1:  # the initial model: evaluated as before (Flower logs it as round 0)
                loss, accuracy, n = self.evaluate(parameters_ndarrays)
            else:  # evaluate_every: a round not evaluated reports loss None (recorded with empty cells)
                loss, accuracy, n = self.evaluate_round(server_round, parameters_ndarrays)
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
        return legacy.MethodStrategy(self.method, **self.strategy_kwargs(), **common)

    # -- Flower pieces: Message API ----------------------------------------------------------
    def make_message_strategy(self):
        """DISTREAL's or a baseline's Message-API strategy (:mod:`flwr_distreal.flower.serverapp`),
        with seeded node sampling of ``clients_per_round`` of the federation's nodes."""
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
        own["seed"] = cfg.seed  # the Message-API strategies draw nodes themselves, seeded
        return serverapp.MethodStrategy(self.method, **own, **common)


class NodeConfigError(ValueError):
    """A SuperNode's node config does not say which data the node trains on."""


@functools.lru_cache(maxsize=2)
def experiment_for(cfg_json: str) -> Experiment:
    """The :class:`Experiment` of a config given as JSON (``dataclasses.asdict`` of a
    :class:`RunConfig`, sorted keys), cached per process: the ServerApp, every ClientApp message
    and the runtimes of one run share it."""
    return Experiment(to_run_config(json.loads(cfg_json)))
