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

Both plan the round on the simulated clock first (see :mod:`flwr_distreal.training.schedule`; DISTREAL
with :meth:`DistrealRound.forecast <flwr_distreal.training.loop.DistrealRound.forecast>`) and, with
``skip_straggler_training`` (default), do not spend wall time training an update the server will
discard anyway. Arrays are the ``state_dict()`` values in order.

Every trainer kind (these two and the wall-clock ones of :mod:`flwr_distreal.training.wallclock`) trains
with the run's :class:`~flwr_distreal.training.recipe.Recipe` through one step helper, :class:`LocalStep`:
the round's learning rate from the schedule, SGD with the recipe's momentum and weight decay
(in a :class:`~flwr_distreal.core.dropout.DroppedWeightGuard`), and gradient-norm clipping between the
backward pass and the optimiser step. A step whose loss is not finite ends the round's training:
the device reports the steps before it, ``train_loss`` NaN and ``incomplete`` for the rest.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core import contract as C
from ..core import defaults as D
from ..core.dropout import DroppedWeightGuard, DropoutModel
from .loop import DistrealRound, round_metrics
from ..core.lut import LUT
from ..core.macs import count_macs, macs_of_counts
from ..core.precision import autocast, check_precision, make_grad_scaler
from .recipe import Recipe
from ..core.resources import ResourceModel
from .schedule import POLICIES, RoundPlan, batch_sizes, plan_fixed_round

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

NDArrays = list[np.ndarray]
Scalar = Any  # bool, int, float, str: what a train config or a metric holds


@dataclass
class TrainResult:
    """What a device sends back after a round: trained arrays, examples trained, metrics."""

    arrays: NDArrays
    num_examples: int
    metrics: dict[str, Scalar]

log = logging.getLogger(__name__)


def get_weights(model: torch.nn.Module) -> NDArrays:
    """The model's ``state_dict`` values as C-ordered NumPy arrays (whatever the tensors' memory
    layout, e.g. channels-last), in order."""
    return [v.detach().cpu().numpy().copy(order="C") for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, arrays: NDArrays) -> None:
    """Load arrays (``state_dict`` order) into the model, refusing a mismatch."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(
            f"got {len(arrays)} arrays for a model with {len(state)} state entries: one array for each "
            "of its state_dict entries, in order (wrong model for these parameters?)"
        )
    new = {}
    for (key, ref), arr in zip(state.items(), arrays):
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"array for {key} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        new[key] = torch.as_tensor(np.asarray(arr), dtype=ref.dtype)
    model.load_state_dict(new, strict=True)


def evaluate_model(
    model: DropoutModel,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[float, float, int]:
    """Mean cross-entropy loss, accuracy and sample count of the full model (eval mode, no
    dropout, no fixed subsets) on ``loader``.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): the forward pass runs under autocast
    (:func:`flwr_distreal.core.precision.autocast`); the loss is computed in float32.

    Raises
    ------
    ValueError
        If the loader yields no samples.
    """
    model.set_dropout(None)
    model.set_fixed_subsets(None)
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast(precision, device):
                logits = model(inputs)
            logits = logits.float()
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            n += int(labels.shape[0])
    if n == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return total_loss / n, correct / n, n


def forward_backward(
    model: DropoutModel, opt: Any, x: torch.Tensor, y: torch.Tensor, vector: Any, precision: str | None = None
) -> torch.Tensor:
    """A local step up to (not including) the optimiser step: set the step's dropout vector,
    forward (under autocast unless fp32), cross-entropy in float32, clear the gradients,
    backward (of the scaled loss when ``opt`` has a GradScaler). Returns the detached loss.

    Parameters
    ----------
    model : DropoutModel
        The model, in training mode.
    opt : LocalStep or optimiser
        Anything with ``zero_grad()``.
    x, y : Tensor
        The mini-batch, on the model's device.
    vector : array-like or None
        The dropout vector of the step (``None``: no random dropout).
    precision : str, optional
        ``"fp32"``, ``"bf16"`` or ``"fp16"``; default: ``opt.precision`` (a :class:`LocalStep`'s),
        else ``"fp32"``.
    """
    if precision is None:
        precision = getattr(opt, "precision", "fp32")
    model.set_dropout(vector)
    with autocast(precision, x.device):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # outside autocast: the loss is float32
    opt.zero_grad()
    scaler = getattr(opt, "scaler", None)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


class LocalStep:
    """One local SGD step under a :class:`~flwr_distreal.training.recipe.Recipe`: the single place where
    every trainer kind (DISTREAL, the baselines, and their wall-clock versions) trains.

    Built once per round: SGD at the round's learning rate ``recipe.lr_at(server_round)`` with
    the recipe's momentum and weight decay, wrapped in a :class:`DroppedWeightGuard`. A step is
    :meth:`forward_backward` then :meth:`step` (clip the gradient norm to ``clip_norm`` when
    set, then the optimiser step); calling the object does both, skipping the update when the
    loss is not finite. It has the ``zero_grad``/``step``/``param_groups`` of an optimiser, so
    the wall-clock calibration times the very same step.

    Parameters
    ----------
    model : DropoutModel
        The model it trains.
    recipe : Recipe
        The run's training recipe.
    server_round : int (default: 1)
        The round (1-based): picks the learning rate.
    precision : {"fp32", "bf16", "fp16"} (default: "fp32")
        The forward pass's autocast dtype (:mod:`flwr_distreal.core.precision`; checked by the
        trainer at start-up). ``fp16`` adds a GradScaler: the loss is scaled before backward and
        the gradients unscaled before clipping; a step with non-finite gradients is skipped.

    Attributes
    ----------
    lr : float
        The round's learning rate.
    scaler : torch.amp.GradScaler or None
        The loss scaler (``fp16`` only).
    last_grad_norm : float or None
        Global L2 norm of the last step's gradient before clipping (``None`` without clipping).
    """

    def __init__(self, model: DropoutModel, recipe: Recipe, server_round: int = 1, precision: str = "fp32") -> None:
        self.model = model
        self.recipe = recipe
        self.precision = precision
        device = next(model.parameters()).device
        self.scaler = make_grad_scaler(precision, device)
        self.lr = recipe.lr_at(server_round)
        self.clip_norm = recipe.clip_norm
        self.optimizer = DroppedWeightGuard(
            torch.optim.SGD(model.parameters(), lr=self.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay),
            model,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.last_grad_norm: float | None = None

    @property
    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Clear the gradients."""
        self.optimizer.zero_grad()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, vector: Any) -> torch.Tensor:
        """Set ``vector``, forward, backward (no update); returns the detached loss."""
        return forward_backward(self.model, self, x, y, vector)

    def step(self) -> None:
        """Clip the gradient's global norm to ``clip_norm`` (when set), then update (through the
        GradScaler with ``fp16``)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, vector: Any) -> float:
        """One whole step; returns its loss. A non-finite loss clears the gradients and does not
        update (the caller ends the round)."""
        loss = float(self.forward_backward(x, y, vector))
        if not math.isfinite(loss):
            self.zero_grad()
            return loss
        self.step()
        return loss


class DeviceTrainer:
    """One device's local training: data, simulated clock, training a plan, metrics.

    Subclasses implement :meth:`plan` (which (sub)model each mini-batch trains and when the
    round ends on the device's clock); :meth:`fit` runs a whole round.
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
    ) -> None:
        self.precision = check_precision(precision, torch_device)
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
        """Run one round: load the global arrays, plan on the clock, train, report.

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

    def clock(self, server_round: int, config: Mapping[str, Scalar]):
        """The device's simulated clock for the round, or ``None`` when unlimited."""
        if self.resources is None or bool(config.get(C.UNLIMITED, False)):
            return None
        return self.resources.clock(self.device_id, server_round, self.r_max)

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:  # pragma: no cover
        raise NotImplementedError

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
            self.clock(server_round, config),
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

    def fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Run one round: load the global arrays, then train inside
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


class BaselineTrainer(DeviceTrainer):
    """Device of the baselines: a (sub)model fixed for the whole round.

    * no ``"fixed-subsets"`` in the fit config: the full model (full resources with
      ``"unlimited"``; the small-network baseline builds the small model and is limited);
    * ``"fixed-subsets"`` (Federated Dropout, HeteroFL): the submodel the server assigned
      at round start. The clock decides whether it finishes by the deadline; a drop in
      resources during the round makes it a straggler.

    Parameters are those of :class:`DistrealTrainer` without ``lut`` and ``policy``.
    """

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
        self.prepare(config)
        fwd = count_macs(self.model) if self._kept is None else macs_of_counts(self.model, self._kept)
        return plan_fixed_round(self.clock(server_round, config), fwd, self.sizes, self.step_macs_factor)

    def metrics(self, plan: RoundPlan, loss: float) -> dict[str, Scalar]:
        out = super().metrics(plan, loss)
        if self._kept is not None:
            widths = self.model.layer_widths
            out[C.MEAN_DROPOUT] = float(np.mean([1 - k / w for k, w in zip(self._kept, widths)]))
        return out
