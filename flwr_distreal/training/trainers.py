"""Local training of one device in one round: DISTREAL (Algorithm 1) and the baselines.

The Flower-free core of every client. The legacy ``NumPyClient`` adapters
(:mod:`flwr_distreal.flower.legacy.client`) and the Message-API ``ClientApp`` handlers
(:mod:`flwr_distreal.flower.clientapp`) are thin wrappers over :meth:`DeviceTrainer.fit`: it takes the
global arrays and the train config (keys of :mod:`flwr_distreal.core.contract`) and returns the
trained arrays, the number of examples and the metrics. No Flower or Hydra imports.

:class:`DistrealTrainer` wraps a model from the registry, a device's training data, a LUT and
the device's resource trace. Before every mini-batch it reads r(t), selects a dropout vector
from the LUT, trains one step with it and adds the vector's MACs to ``c`` (Algorithm 1);
it returns the weights and ``c``. It is one use of :class:`flwr_distreal.training.loop.DistrealRound`,
the per-batch API that puts the same round inside a user's own training loop: the trainer's
step runs inside ``DistrealRound.batches``.

:class:`BaselineTrainer` trains a (sub)model fixed for the whole round: the full model
(full resources, no limits; small network, limited), or the submodel the server assigns at
round start in ``"fixed-subsets"`` (Federated Dropout, HeteroFL). If the device's
resources drop during the round, it misses the deadline and becomes a straggler.

The clock is a strategy object the trainer takes (``clock=``, :mod:`flwr_distreal.training.clock`),
not a class of its own: the trainer decides what a mini-batch trains, the clock when the round
ends. On the :class:`~flwr_distreal.training.clock.SimulatedClock` (the default, from
``resources``) both plan the round first (see :mod:`flwr_distreal.training.schedule`; DISTREAL
with :meth:`DistrealRound.forecast <flwr_distreal.training.loop.DistrealRound.forecast>`) and, with
``skip_straggler_training`` (default), do not spend wall time training an update the server will
discard anyway. On the :class:`~flwr_distreal.training.clock.MeasuredClock` (a real deadline)
they decide per mini-batch while training (:meth:`DeviceTrainer.measured_choice`);
``MeasuredDistrealTrainer`` and ``MeasuredBaselineTrainer`` (:mod:`flwr_distreal.training.wallclock`)
are these trainers with that clock. Arrays are the ``state_dict()`` values in order.

Every trainer kind trains with the run's :class:`~flwr_distreal.training.recipe.Recipe` through one step helper, :class:`LocalStep`:
the round's learning rate from the schedule, SGD with the recipe's momentum and weight decay
(in a :class:`~flwr_distreal.core.dropout.DroppedWeightGuard`), and gradient-norm clipping between the
backward pass and the optimiser step. A step whose loss is not finite ends the round's training:
the device reports the steps before it, ``train_loss`` NaN and ``incomplete`` for the rest.

(:class:`LocalStep`, :func:`forward_backward`, :func:`evaluate_model`, :class:`TrainResult`,
:func:`get_weights` and :func:`set_weights` live in :mod:`flwr_distreal.training.step` and are
re-exported here.)

Precision (``precision``, see :mod:`flwr_distreal.core.precision`): every trainer kind passes it to
its :class:`LocalStep`, whose forward pass runs under autocast (``bf16``: on CPUs with native
bf16 and on CUDA; ``fp16``: CUDA with a GradScaler); :func:`evaluate_model` takes the same
switch. The loss, the parameters, the gradients and BatchNorm's statistics stay float32.

Train metrics: see :mod:`flwr_distreal.core.contract` (``macs``, ``num_batches``, ``sim_time``,
``straggler``, ``mean_dropout``, ``available_macs``, ``utilisation``, ``train_loss``, ``lr``,
``partition-id``, ``incomplete``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core import contract as C
from ..core import defaults as D
from ..core.dropout import DropoutModel
from ..core.lut import LUT
from ..core.macs import count_macs, macs_of_counts
from ..core.precision import check_precision
from ..core.resources import ResourceModel, RoundClock
from .clock import MeasuredClock, Pick, SimulatedClock
from .loop import DistrealRound, round_metrics
from .recipe import Recipe
from .schedule import POLICIES, RoundPlan, batch_sizes, plan_fixed_round
from .step import LocalStep, NDArrays, Scalar, TrainResult, evaluate_model, forward_backward, get_weights, set_weights
from .throughput import WallclockError

__all__ = [
    "BaselineTrainer",
    "DeviceTrainer",
    "DistrealTrainer",
    "LocalStep",
    "TrainResult",
    "evaluate_model",
    "forward_backward",
    "get_weights",
    "set_weights",
]

log = logging.getLogger(__name__)


class DeviceTrainer:
    """One device's local training: data, recipe, a clock, training a round, metrics.

    The trainer decides what each mini-batch trains; its clock (``clock=``, a strategy object of
    :mod:`flwr_distreal.training.clock`) decides when the round ends: :meth:`fit` hands the
    round to ``clock.fit``. :class:`~flwr_distreal.training.clock.SimulatedClock` (the default,
    from ``resources``) calls back :meth:`simulated_fit` (subclasses implement :meth:`plan`:
    which (sub)model each mini-batch trains and when the round ends on the simulated clock);
    :class:`~flwr_distreal.training.clock.MeasuredClock` runs the round step by step and asks
    :meth:`measured_choice` for each mini-batch's (sub)model.
    """

    def __init__(
        self,
        model: DropoutModel,
        train_loader: DataLoader,
        device_id: int,
        resources: ResourceModel | None,
        *,
        r_max: float | None = None,
        recipe: Recipe | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        local_epochs: int = D.LOCAL_EPOCHS,
        step_macs_factor: float = D.STEP_MACS_FACTOR,
        skip_straggler_training: bool = D.SKIP_STRAGGLER_TRAINING,
        torch_device: str = "cpu",
        seed: int | None = None,
        precision: str = D.PRECISION,
        clock: SimulatedClock | MeasuredClock | None = None,
    ) -> None:
        self.precision = check_precision(precision, torch_device)
        if clock is None:
            clock = SimulatedClock(resources, r_max)
        elif not isinstance(clock, (SimulatedClock, MeasuredClock)):
            raise TypeError(f"clock must be a SimulatedClock or a MeasuredClock, got {type(clock).__name__}")
        elif resources is not None or r_max is not None:
            raise ValueError("pass resources and r_max either to the SimulatedClock or to the trainer, not with a clock")
        if recipe is None:  # the old keyword arguments: a constant recipe, validated by Recipe
            given = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
            recipe = Recipe.constant(**{k: v for k, v in given.items() if v is not None})
        elif not isinstance(recipe, Recipe):
            raise ValueError(f"recipe must be a Recipe, got {type(recipe).__name__}")
        elif lr is not None or momentum is not None or weight_decay is not None:
            raise ValueError("pass lr, momentum and weight_decay either in the recipe or as arguments, not both")
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
        self.model = model.to(torch_device)
        self.train_loader = train_loader
        self.device_id = int(device_id)
        self.resources = resources
        self.r_max = r_max
        self.recipe = recipe
        self.local_epochs = int(local_epochs)
        self.step_macs_factor = float(step_macs_factor)
        self.skip_straggler_training = bool(skip_straggler_training)
        self.torch_device = torch_device
        self.seed = None if seed is None else int(seed)
        self.num_samples = len(train_loader.dataset)  # type: ignore[arg-type]
        self.sizes = batch_sizes(
            self.num_samples, int(train_loader.batch_size or 1), self.local_epochs, bool(train_loader.drop_last)
        )
        if isinstance(clock, SimulatedClock) and clock.resources is not None:
            self.resources, self.r_max = clock.resources, clock.r_max
        self.clock = clock
        clock.bind(self)

    @property
    def lr(self) -> float:
        """The recipe's learning rate of round 1."""
        return self.recipe.lr

    @property
    def momentum(self) -> float:
        """The recipe's SGD momentum."""
        return self.recipe.momentum

    @property
    def weight_decay(self) -> float:
        """The recipe's SGD weight decay."""
        return self.recipe.weight_decay

    def local_step(self, server_round: int, model: DropoutModel | None = None) -> LocalStep:
        """The round's step helper for this device's model (or ``model``, e.g. a calibration copy)."""
        return LocalStep(self.model if model is None else model, self.recipe, server_round, self.precision)

    # -- the round ---------------------------------------------------------------------------
    def get_weights(self) -> NDArrays:
        """The model's arrays (``state_dict`` order)."""
        return get_weights(self.model)

    def load(self, arrays: NDArrays) -> None:
        """Load arrays (``state_dict`` order) into the model, refusing a mismatch."""
        set_weights(self.model, arrays)

    def properties(self) -> dict[str, Scalar]:
        """``partition-id`` (device id) and ``round-samples`` (samples per round): the server
        orders and samples devices by the first and sizes the submodel baselines' round-start
        assignment with the second."""
        return {C.PARTITION_ID: self.device_id, C.ROUND_SAMPLES: int(sum(self.sizes))}

    def fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Run one round on the trainer's clock (``clock.fit``).

        Parameters
        ----------
        arrays : list of np.ndarray
            The global model (``state_dict`` order).
        config : Mapping
            The train config (:mod:`flwr_distreal.core.contract`), ``server-round`` at least
            (and ``round-deadline`` / ``round-deadline-at`` on the measured clock).

        Returns
        -------
        TrainResult
            The trained arrays, the samples trained and the metrics.
        """
        result = self.clock.fit(self, arrays, config)
        # The next round starts from the server's arrays and every step zeroes the gradients: kept
        # between rounds they would only cost one more model per kept trainer (TrainerCache).
        self.model.zero_grad(set_to_none=True)
        return result

    def nbytes(self) -> int:
        """Bytes this trainer keeps between rounds: its model's tensors (parameters, buffers,
        gradients) and, for a dataset of in-memory tensors (a ``TensorDataset``), its data; what
        :class:`~flwr_distreal.flower.clientapp.TrainerCache` budgets."""
        seen: set[int] = set()
        total = 0
        tensors = [*self.model.state_dict(keep_vars=True).values()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for t in getattr(self.train_loader.dataset, "tensors", ()) if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:  # a view or a tied weight is counted once
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def simulated_fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """The round on the simulated clock: load the global arrays, plan on the clock, train, report.

        Parameters
        ----------
        arrays : list of np.ndarray
            The global model (``state_dict`` order).
        config : Mapping
            The train config (:mod:`flwr_distreal.core.contract`), ``server-round`` at least.

        Returns
        -------
        TrainResult
            The trained arrays, the samples trained and the metrics.
        """
        self.load(arrays)
        server_round = int(config.get(C.SERVER_ROUND, 1))
        self.reseed(server_round)
        plan = self.plan(server_round, config)
        loss = float("nan")
        if not (plan.straggler and self.skip_straggler_training):
            loss, done = self.train(plan, server_round)
            if done < len(plan.vectors):  # a non-finite loss ended the round: report what was trained
                plan = _truncated(plan, done)
        self.model.set_fixed_subsets(None)
        metrics = self.metrics(plan, loss)
        metrics[C.LR] = self.recipe.lr_at(server_round)
        return TrainResult(get_weights(self.model), int(sum(plan.batch_sizes)), metrics)

    # -- overridable hooks -----------------------------------------------------------------
    def reseed(self, server_round: int) -> None:
        """Seed the round's random draws from ``(seed, round, device id)``: the dropped filters
        of every mini-batch and, when the loader has its own generator, the batch order (and
        augmentation). Without a ``seed`` they come from torch's global generator."""
        if self.seed is None:
            return
        dropout_seed, loader_seed = np.random.SeedSequence([self.seed, server_round, self.device_id]).generate_state(2)
        self.model.seed_dropout(int(dropout_seed))
        generator = getattr(self.train_loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(int(loader_seed))

    def round_clock(self, server_round: int, config: Mapping[str, Scalar]) -> RoundClock | None:
        """The device's simulated clock for the round, or ``None`` when unlimited.

        Raises
        ------
        WallclockError
            On the measured clock: a measured device cannot plan a round ahead.
        """
        if not isinstance(self.clock, SimulatedClock):
            raise WallclockError("a measured trainer cannot plan a round ahead; its fit() decides per mini-batch")
        return self.clock.round_clock(self.device_id, server_round, config)

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:  # pragma: no cover
        raise NotImplementedError

    def measured_choice(
        self, clock: MeasuredClock, start: float, deadline: float
    ) -> tuple[Callable[[int, float, Sequence[int]], Pick | None], bool]:  # pragma: no cover
        """The measured clock's question: what mini-batch ``j`` trains, given the time and the
        sizes left (``None``: stop); and whether the round stops at the deadline."""
        raise NotImplementedError

    def calibration_lut(self) -> LUT:  # pragma: no cover
        """The LUT whose vectors the measured clock's step-time table covers."""
        raise NotImplementedError

    def forward_backward(self, opt: Any, x: torch.Tensor, y: torch.Tensor, vector: Any) -> torch.Tensor:
        """Set the step's dropout vector, run forward and backward (no optimiser step).

        The unit of work the measured clock times, with the optimiser step after it; tests
        override it to advance a fake clock.
        """
        return forward_backward(self.model, opt, x, y, vector)

    def prepare(self, config: Mapping[str, Scalar]) -> None:
        """Set the model up for the round (fixed subsets for baselines)."""

    def train(self, plan: RoundPlan, server_round: int = 1) -> tuple[float, int]:
        """Train the planned mini-batches with the round's :class:`LocalStep`.

        Returns
        -------
        tuple[float, int]
            The mean training loss (NaN when a step's loss was not finite) and the mini-batches
            trained: all of the plan's, or those before the first non-finite loss (that step
            does not update the model and ends the round).
        """
        model = self.model
        model.train()
        step = self.local_step(server_round)
        losses: list[float] = []
        batches = self._batches()
        for vector in plan.vectors:  # None: no random dropout (full model or fixed subsets)
            x, y = next(batches)
            loss = step(x.to(self.torch_device), y.to(self.torch_device), vector)
            if not math.isfinite(loss):
                log.warning(
                    "Device %s, round %s: the loss of mini-batch %s is %s; training stops here",
                    self.device_id, server_round, len(losses), loss,
                )
                model.set_dropout(None)
                return float("nan"), len(losses)
            losses.append(loss)
        model.set_dropout(None)
        return (float(np.mean(losses)) if losses else float("nan")), len(losses)

    def _batches(self) -> Iterable:
        for _ in range(self.local_epochs):
            yield from self.train_loader

    def metrics(self, plan: RoundPlan, loss: float) -> dict[str, Scalar]:
        """The train metrics of a round that did ``plan`` (:func:`flwr_distreal.training.loop.round_metrics`)."""
        return round_metrics(
            plan,
            train_loss=loss,
            device_id=self.device_id,
            step_macs_factor=self.step_macs_factor,
            batch_size=int(self.train_loader.batch_size or 1),
        )


def _truncated(plan: RoundPlan, done: int) -> RoundPlan:
    """``plan`` cut to its first ``done`` mini-batches (``incomplete`` counts the rest; the
    timing stays the planned one)."""
    planned = plan.planned_batches if plan.planned_batches >= 0 else len(plan.vectors)
    return dataclasses.replace(
        plan,
        vectors=list(plan.vectors[:done]),
        forward_macs=list(plan.forward_macs[:done]),
        batch_sizes=list(plan.batch_sizes[:done]),
        planned_batches=planned,
    )


class DistrealTrainer(DeviceTrainer):
    """DISTREAL device (Algorithm 1 of Rapp et al., AAAI 2022).

    One use of :class:`~flwr_distreal.training.loop.DistrealRound`, the per-batch API for a user's own
    loop: every round, the round's :class:`LocalStep` (the recipe's SGD, clipping) trains inside
    ``DistrealRound.batches``. Before every mini-batch the round reads the device's resource
    availability r(t), selects the LUT vector that fits (policy ``"paper"``: budget
    ``r(t) * T / B``; ``"deadline"``: time left times ``r(t)`` over batches left), sets it on the
    model, and adds the vector's MACs to ``c``; the step trains with per-batch random structured
    dropout under that vector. It sends the weights and ``c`` (metric ``macs``); the DISTREAL
    strategies weight by ``c`` (Algorithm 2).

    The learning rate is the recipe's (:meth:`Recipe.lr_at <flwr_distreal.training.recipe.Recipe.lr_at>`
    of the round), reported as the ``lr`` metric: the train config of
    :mod:`flwr_distreal.core.contract` carries no learning rate. Of the config it reads
    ``server-round`` and ``unlimited``; the other keys belong to the submodel baselines and the
    wall-clock mode.

    Parameters
    ----------
    model : DropoutModel
        Model from :func:`flwr_distreal.models.build_model` (full architecture).
    train_loader : DataLoader
        The device's local training data (batch size = the round's mini-batch size).
    device_id : int
        Device (partition) id: selects the resource trace.
    lut : LUT
        Lookup table of dropout vectors for ``model`` (checked against it).
    resources : ResourceModel or None
        Resource availability of all devices; ``None`` trains without limits (full model).
    r_max : float, optional
        This device's upper availability bound (MACs/s), if it differs from the model's.
    policy : {"deadline", "paper"} (default: "deadline", the run config's ``strategy.policy``)
        Per-batch budget rule (``paper``: the paper's ``r(t) * T / B``). Until 2026-12 the
        default here was ``paper`` while the runner ran ``deadline``.
    recipe : Recipe, optional
        How to train (:mod:`flwr_distreal.training.recipe`): learning rate and its schedule over the
        rounds, momentum, weight decay, gradient-norm clipping. With momentum or weight decay,
        weights dropped in a step keep their value and optimiser state
        (:class:`DroppedWeightGuard`).
    lr, momentum, weight_decay : float, optional
        Without ``recipe``: :meth:`Recipe.constant <flwr_distreal.training.recipe.Recipe.constant>` of
        these, the paper's plain SGD (no clipping) with the run config's defaults (lr 0.1, was
        0.05 until 2026-12; momentum 0, weight decay 0). Not together with ``recipe``.
    local_epochs : int
        Passes over the local data per round.
    step_macs_factor : float
        Cost of a training step relative to its forward pass (forward + backward ~ 3x).
    stop_at_deadline : bool
        Stop at the deadline and send the completed steps (weighted by their MACs) instead of
        finishing late as a straggler (see :mod:`flwr_distreal.training.schedule`).
    skip_straggler_training : bool
        Do not train a round the clock says will miss the deadline (its update is discarded):
        :meth:`DistrealRound.forecast <flwr_distreal.training.loop.DistrealRound.forecast>` predicts it.
    torch_device : str
        Where to train.
    seed : int, optional
        Run seed: the random draws of round ``t`` (dropped filters, batch order) are seeded from
        ``(seed, t, device_id)``, so a seeded run is reproducible. ``None``: torch's global
        generator.
    precision : {"fp32", "bf16", "fp16"} (default: "fp32")
        Autocast dtype of every forward pass (:mod:`flwr_distreal.core.precision`). Checked here:
        ``bf16`` on a CPU without native bf16, or ``fp16`` off CUDA, is a ``ValueError``.
    clock : SimulatedClock or MeasuredClock, optional
        The round's clock (:mod:`flwr_distreal.training.clock`); default
        ``SimulatedClock(resources, r_max)``. With a clock, ``resources`` and ``r_max`` are
        ``None`` (theirs). ``MeasuredClock(...)``: the wall-clock mode
        (:class:`~flwr_distreal.training.wallclock.MeasuredDistrealTrainer`).

    Notes
    -----
    A step whose loss is not finite ends the round: it is discarded
    (:meth:`DistrealRound.discard <flwr_distreal.training.loop.DistrealRound.discard>`: not in ``c``,
    ``num_batches`` or the examples; its time stays on the clock), ``train_loss`` is NaN and
    ``incomplete`` counts the mini-batches left.
    """

    def __init__(
        self,
        model: DropoutModel,
        train_loader: DataLoader,
        device_id: int,
        lut: LUT,
        resources: ResourceModel | None,
        *,
        policy: str = D.POLICY,
        stop_at_deadline: bool = D.STOP_AT_DEADLINE,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, train_loader, device_id, resources, **kwargs)
        self.stop_at_deadline = bool(stop_at_deadline)
        if policy not in POLICIES:
            raise ValueError(f"unknown selection policy {policy!r}; valid: {list(POLICIES)}")
        lut.check_model(model)
        self.lut = lut
        self.policy = policy

    def begin_round(self, server_round: int, config: Mapping[str, Scalar]) -> DistrealRound:
        """The round's :class:`~flwr_distreal.training.loop.DistrealRound` on this device's clock
        (:meth:`clock`; none when unlimited), over its planned mini-batches."""
        return DistrealRound(
            self.model,
            self.lut,
            self.round_clock(server_round, config),
            device_id=self.device_id,
            server_round=server_round,
            policy=self.policy,
            stop_at_deadline=self.stop_at_deadline,
            step_macs_factor=self.step_macs_factor,
            batch_size=int(self.train_loader.batch_size or 1),
            planned_sizes=self.sizes,
            lr=self.recipe.lr_at(server_round),
            config=config,
            precision=self.precision,
        )

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:
        """The round the clock predicts (:meth:`DistrealRound.forecast
        <flwr_distreal.training.loop.DistrealRound.forecast>`)."""
        return self.begin_round(server_round, config).forecast()

    def simulated_fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """The round on the simulated clock: load the global arrays, then train inside
        :meth:`DistrealRound.batches <flwr_distreal.training.loop.DistrealRound.batches>` (see
        :meth:`DeviceTrainer.fit` for the parameters and the result)."""
        self.load(arrays)
        server_round = int(config.get(C.SERVER_ROUND, 1))
        self.reseed(server_round)
        rnd = self.begin_round(server_round, config)
        if self.skip_straggler_training:
            forecast = rnd.forecast()
            if forecast.straggler:  # the server discards the update: do not train it
                metrics = self.metrics(forecast, float("nan"))
                metrics[C.LR] = rnd.lr
                return TrainResult(get_weights(self.model), int(sum(forecast.batch_sizes)), metrics)
        self.train_round(rnd, server_round)
        metrics = self.metrics(rnd.plan, rnd.train_loss)
        metrics[C.LR] = rnd.lr
        return TrainResult(get_weights(self.model), rnd.num_examples, metrics)

    def train_round(self, rnd: DistrealRound, server_round: int) -> None:
        """Train the round's mini-batches with the round's :class:`LocalStep` inside
        ``rnd.batches``; the losses go to ``rnd.record_loss``. A non-finite loss is discarded
        and ends the round."""
        self.model.train()
        step = self.local_step(server_round)
        batches = rnd.batches(self._batches())
        try:
            for x, y in batches:
                loss = step(x.to(self.torch_device), y.to(self.torch_device), rnd.vector)
                rnd.record_loss(loss)
                if not math.isfinite(loss):
                    log.warning(
                        "Device %s, round %s: the loss of mini-batch %s is %s; training stops here",
                        self.device_id, server_round, len(rnd.steps) - 1, loss,
                    )
                    rnd.discard()
                    break
        finally:
            batches.close()  # clears the dropout vector

    def calibration_lut(self) -> LUT:
        """The LUT itself: the measured clock times its vectors."""
        return self.lut

    def measured_choice(
        self, clock: MeasuredClock, start: float, deadline: float
    ) -> tuple[Callable[[int, float, Sequence[int]], Pick | None], bool]:
        """On the measured clock, before every mini-batch: the LUT vector that fits the time
        left (:meth:`MeasuredClock.pick <flwr_distreal.training.clock.MeasuredClock.pick>`), the
        full model when unlimited. Calibrates the step-time table first if there is none."""
        unlimited = math.isinf(deadline)
        if not unlimited and clock.time_table is None:
            clock.calibrate(self, self.calibration_lut())
        table = clock.time_table
        sizes_total = int(sum(self.sizes))
        lut_rates = [float(np.mean(v)) for v in self.lut.vectors]

        def choose(j: int, now: float, left: Sequence[int]) -> Pick | None:
            if unlimited:
                return Pick(None, -1, 0.0, clock.full_macs, 1.0)
            assert table is not None
            c = clock.pick(
                now, deadline, left, policy=self.policy, round_time=deadline - start, round_samples=sizes_total,
                stop_at_deadline=self.stop_at_deadline,
            )
            if c is None:
                return None
            i = int(c.index)  # type: ignore[arg-type]
            return Pick(self.lut.vectors[i], i, lut_rates[i], int(table.macs[i]), table.rel_time[i], c.predicted, c.budget)

        return choose, self.stop_at_deadline


class BaselineTrainer(DeviceTrainer):
    """Device of the baselines: a (sub)model fixed for the whole round.

    * no ``"fixed-subsets"`` in the fit config: the full model (full resources with
      ``"unlimited"``; the small-network baseline builds the small model and is limited);
    * ``"fixed-subsets"`` (Federated Dropout, HeteroFL): the submodel the server assigned
      at round start. The clock decides whether it finishes by the deadline; a drop in
      resources during the round makes it a straggler.

    Parameters are those of :class:`DistrealTrainer` without ``lut`` and ``policy``.
    """

    _kept: list[int] | None = None  # kept channels per dropout group of the round's submodel (None: full)

    def prepare(self, config: Mapping[str, Scalar]) -> None:
        text = config.get(C.FIXED_SUBSETS)
        if text is None:
            self.model.set_fixed_subsets(None)
            self._kept = None
            return
        subsets = C.decode_subsets(str(text), self.model.layer_widths)
        self.model.set_fixed_subsets(subsets)
        self._kept = [m.out_channels if s is None else int(s.numel()) for s, m in zip(subsets, self.model.dropout_layers)]

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:
        clock = self.round_clock(server_round, config)
        self.prepare(config)
        fwd = count_macs(self.model) if self._kept is None else macs_of_counts(self.model, self._kept)
        return plan_fixed_round(clock, fwd, self.sizes, self.step_macs_factor)

    def metrics(self, plan: RoundPlan, loss: float) -> dict[str, Scalar]:
        out = super().metrics(plan, loss)
        if self._kept is not None:
            widths = self.model.layer_widths
            out[C.MEAN_DROPOUT] = float(np.mean([1 - k / w for k, w in zip(self._kept, widths)]))
        return out

    def calibration_lut(self) -> LUT:
        """Equal-rate submodels: what the fixed-subset baselines train (a table over them is
        interpolated in MACs for any submodel)."""
        return LUT.uniform(self.model)

    def measured_choice(
        self, clock: MeasuredClock, start: float, deadline: float
    ) -> tuple[Callable[[int, float, Sequence[int]], Pick | None], bool]:
        """On the measured clock: the round's fixed (sub)model on every mini-batch, however long
        it takes (never stops at the deadline). Without a step-time table the step time is taken
        as proportional to MACs."""
        kept = self._kept
        fwd = clock.full_macs if kept is None else int(macs_of_counts(self.model, kept))
        if kept is None:
            rel, rate = 1.0, 0.0
        else:
            table = clock.time_table
            rel = table.rel_time_of_macs(fwd) if table is not None else max(fwd, 1) / clock.full_macs
            rate = float(np.mean([1 - k / w for k, w in zip(kept, self.model.layer_widths)]))

        def choose(j: int, now: float, left: Sequence[int]) -> Pick:
            return Pick(None, -1, rate, fwd, rel)

        return choose, False
