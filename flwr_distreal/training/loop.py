"""DISTREAL inside your own training loop: a per-batch API for Algorithm 1 (Rapp et al., AAAI 2022).

:class:`DistrealRound` is one device's round of DISTREAL as an iterator over *your* data loader.
Before it hands you a mini-batch it does what Algorithm 1 does before every update step: it reads
the device's resource availability ``r(t)``, takes the dropout vector ``d <- D[r]`` from the LUT,
sets it on the model (``model.set_dropout(d)``), adds ``MACs(d)`` to the round's computation ``c``
and advances the device's clock by the step's cost. You write the update step: your loss, your
optimiser, your augmentation, ``torch.autocast``, gradient clipping, anything::

    from flwr_distreal.loop import DistrealRound

    rnd = DistrealRound(model, lut, resources, device_id=3, server_round=7, policy="deadline")
    for x, y in rnd.batches(trainloader):           # d from the LUT and r(t), MACs counted, stops at the deadline
        opt.zero_grad()
        loss = my_loss(model(x), y)
        loss.backward()
        opt.step()
        rnd.record_loss(loss)                       # optional: the train_loss metric
    metrics = rnd.metrics()                         # macs (c), num_batches, straggler, sim_time, ...
    num_examples = rnd.num_examples

``model`` is a :class:`~flwr_distreal.core.dropout.DroppableModel` (``make_droppable(my_module,
example_input)`` or :func:`~flwr_distreal.models.build_model`), ``lut`` its
:class:`~flwr_distreal.core.lut.LUT` and ``resources`` the device's availability
(:class:`~flwr_distreal.core.resources.ResourceModel`; ``None``: unlimited, the full model on every
mini-batch). In a Flower client, :meth:`DistrealRound.from_config` reads the server's train
config (``server-round``, ``unlimited``). :meth:`metrics` holds exactly the train metrics of
:mod:`flwr_distreal.core.contract` that :class:`~flwr_distreal.training.trainers.DistrealTrainer` sends, so the
DISTREAL strategies (legacy and Message API) accept the reply; ``DistrealTrainer`` itself is one
use of this class (its own SGD step inside :meth:`DistrealRound.batches`).

What it decides for you
-----------------------
* The vector of every mini-batch: :func:`flwr_distreal.training.schedule.select_vector`, the one place of
  the selection policies (``"paper"``: ``r(t) T b / N``; ``"deadline"``: time left times ``r(t)``
  over the samples left), on the simulated clock of :mod:`flwr_distreal.core.resources`.
* The stop: with ``stop_at_deadline`` (default) the iterator ends before a step that would end
  after the round's deadline; that step is never handed out. Without it the round runs over the
  deadline and the device is a straggler (its update is discarded by the server).
* The true size of every mini-batch is read from the batch itself (a last partial batch, uneven
  batches), for the budget, the clock and ``num_examples``.

Conventions
-----------
* A mini-batch the iterator hands out counts as trained (its MACs are in ``c``, its time on the
  clock), so :meth:`metrics` is correct at any moment, inside the loop too, and after a
  ``break``. A mini-batch you did not train (you skipped the update, e.g. for a non-finite loss)
  is taken back with :meth:`DistrealRound.discard`: it leaves ``c``, ``num_batches`` and
  ``num_examples``; its time stays on the clock (the device spent it).
* ``c`` (metric ``macs``) is the contract's: the forward MACs per sample of each mini-batch's
  (sub)model, summed over the mini-batches (Algorithm 1's ``c <- c + MACs(d)``; not multiplied by
  the batch size). The clock charges ``step_macs_factor * b * MACs(d)`` per step.
* The round needs to know how many samples it has (the ``"paper"`` budget is ``T`` split by
  samples; ``"deadline"`` divides the time left by the samples left). It takes them from a
  ``DataLoader`` (its sampler's length, batch size and ``drop_last``), else from ``len(loader)``
  and ``batch_size``; for a loader of unknown length give ``round_samples`` (or
  ``planned_sizes``). The round ends at the planned samples even if the loader has more.
* The model is put in training mode for the round if it is not (the dropout vector acts on
  training forwards only) and given back in the mode it had; when the iterator ends (exhausted,
  stopped at the deadline, or left with ``break``) the vector is cleared (``set_dropout(None)``),
  so evaluation always runs the full model. A ``break`` closes the iterator at once when nothing
  else holds it (CPython); :meth:`DistrealRound.close` (or ``with DistrealRound(...) as rnd:``)
  closes it explicitly.
* The learning rate: the train config of :mod:`flwr_distreal.core.contract` carries **no** learning rate
  (the server sends ``server-round``, ``unlimited`` and, for other methods or modes,
  ``fixed-subsets``, ``submodel-macs``, ``dropout-rate``, ``width-level``, ``width``,
  ``round-deadline``). Your optimiser's lr is yours; pass ``lr=`` to report it in the ``lr``
  metric. Every key the server sent is in :attr:`DistrealRound.config` for your loop to read.
* Precision: ``precision="bf16"`` (or ``"fp16"`` on CUDA) is checked against the model's device
  and held by the round; your forward pass runs in ``with rnd.autocast():`` (the loss in float32,
  ``F.cross_entropy(logits.float(), y)``), as ``DistrealTrainer``'s step does.

:class:`flwr_distreal.training.wallclock.MeasuredDistrealRound` is the same on a real device: a wall-clock deadline in seconds and
measured step times instead of the simulated clock (the selection of
:func:`flwr_distreal.training.wallclock.choose_vector`, the throughput of
:class:`~flwr_distreal.training.wallclock.ThroughputEstimator`).

No Flower or Hydra imports.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import numbers
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core import contract as C
from ..core import defaults as D
from ..core.dropout import DroppableModel
from ..core.lut import LUT
from ..core.macs import count_macs
from ..core.precision import autocast, check_precision
from ..core.resources import ResourceModel, RoundClock, RoundResult, step_macs
from .records import BatchStep, _Choice, _config_round, _int_arg, _positive, batch_len, round_metrics
from .schedule import POLICIES, RoundPlan, batch_sizes, plan_distreal_round, plan_fixed_round, select_vector

__all__ = ["BatchStep", "DistrealRound", "batch_len", "round_metrics"]

log = logging.getLogger(__name__)

B = TypeVar("B")


class _Round:
    """What the simulated and the wall-clock rounds share: the plan of mini-batch sizes, the
    iterator, the records, the metrics."""

    #: Decide on the planned size before loading the next batch, so that a round that stops
    #: loads no batch it will not train (the simulated clock does not care when).
    _choose_before_loading = True

    def __init__(
        self,
        model: DroppableModel,
        lut: LUT,
        *,
        device_id: int,
        server_round: int,
        policy: str,
        stop_at_deadline: bool,
        step_macs_factor: float,
        batch_size: int | None,
        round_samples: int | None,
        planned_sizes: Sequence[int] | None,
        lr: float | None,
        config: Mapping[str, Any] | None,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, DroppableModel):
            raise TypeError(
                f"model must be a DroppableModel (make_droppable(module, example_input) or build_model(name)), "
                f"got {type(model).__name__}"
            )
        if not isinstance(lut, LUT):
            raise TypeError(f"lut must be a LUT, got {type(lut).__name__}")
        lut.check_model(model)
        if policy not in POLICIES:
            raise ValueError(f"unknown selection policy {policy!r}; valid: {list(POLICIES)}")
        self.model = model
        self.lut = lut
        self.device_id = _int_arg("device_id", device_id, 0)
        self.server_round = _int_arg("server_round", server_round, 1)
        self.policy = policy
        self.stop_at_deadline = bool(stop_at_deadline)
        self.step_macs_factor = _positive("step_macs_factor", step_macs_factor)
        self.batch_size = None if batch_size is None else _int_arg("batch_size", batch_size, 1)
        self.round_samples = None if round_samples is None else _int_arg("round_samples", round_samples, 0)
        self._planned: list[int] | None = None
        if planned_sizes is not None:
            self._planned = [_int_arg("planned_sizes entry", b, 1) for b in planned_sizes]
        self.lr = None if lr is None else _positive("lr", lr)
        self.config: dict[str, Any] = dict(config or {})
        param = next(model.parameters(), None)
        self.torch_device_type = "cpu" if param is None else param.device.type
        self.precision = check_precision(precision, self.torch_device_type)
        self.steps: list[BatchStep] = []
        self.stopped_at_deadline = False
        self._losses: list[float] = []
        self._seen = 0  # samples handed out (discarded ones included)
        self._planned_total: int | None = None
        self._iterator: weakref.ReferenceType[Generator[Any, None, None]] | None = None  # weak: a break frees it
        self._started = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context your forward pass runs in for the round's ``precision``: nothing for
        ``fp32``, else :func:`torch.autocast` with bf16 or fp16 (:mod:`flwr_distreal.core.precision`)::

            for x, y in rnd.batches(loader):
                with rnd.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)   # the loss in float32
        """
        return autocast(self.precision, self.torch_device_type)

    # -- the plan of mini-batch sizes ------------------------------------------------------------
    def _resolve_plan(self, loader: Any, epochs: int) -> list[int] | None:
        if self._planned is not None:
            return self._planned
        bs = self.batch_size if self.batch_size is not None else getattr(loader, "batch_size", None)
        drop_last = bool(getattr(loader, "drop_last", False))
        if self.round_samples is not None:
            if bs is None:
                raise ValueError("round_samples needs batch_size= (the loader does not tell its batch size)")
            return batch_sizes(self.round_samples, int(bs), 1, drop_last)
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            try:
                n = len(loader.sampler)  # type: ignore[arg-type]
            except TypeError:
                n = None
            if n is not None:
                return batch_sizes(n, int(loader.batch_size), epochs, bool(loader.drop_last))
        try:
            num_batches = len(loader)
        except TypeError:
            return None
        return [int(bs)] * num_batches * epochs if bs is not None else None

    @property
    def planned_sizes(self) -> list[int] | None:
        """Sizes of the round's planned mini-batches (``None`` until known)."""
        return None if self._planned is None else list(self._planned)

    @property
    def planned_samples(self) -> int | None:
        """Samples of the round as planned (all local epochs)."""
        return None if self._planned is None else int(sum(self._planned))

    def _needs_plan(self) -> bool:
        return True

    # -- the iterator ---------------------------------------------------------------------------
    def batches(
        self, loader: Iterable[B], *, epochs: int = 1, size_of: Callable[[B], int] | None = None
    ) -> Iterator[B]:
        """Iterate over the round's mini-batches, each with its dropout vector set on the model.

        Parameters
        ----------
        loader : iterable
            Your data: a ``DataLoader`` or any iterable of mini-batches (iterated ``epochs``
            times; a one-shot iterator with ``epochs=1``).
        epochs : int (default: 1)
            Passes over ``loader`` (local epochs).
        size_of : callable, optional
            ``batch -> samples``; default :func:`batch_len` (the first dimension of the first
            tensor).

        Yields
        ------
        batch
            The loader's mini-batches, unchanged, until the loader is exhausted, the planned
            samples are trained or (``stop_at_deadline``) the next step would miss the deadline.

        Raises
        ------
        RuntimeError
            On a second call (one iteration per round: make a new round for the next one).
        ValueError
            When the round's samples cannot be told (give ``round_samples`` or
            ``planned_sizes``), or a mini-batch is empty.
        """
        if self._started:
            raise RuntimeError("a round's batches() runs once; make a new round for the next round")
        epochs = _int_arg("epochs", epochs, 1)
        planned = self._resolve_plan(loader, epochs)
        if planned is None and self._needs_plan():
            raise ValueError(
                "cannot tell how many samples this round has (the loader has no length): pass "
                "round_samples= and batch_size=, or planned_sizes=, to the round"
            )
        self._planned = planned
        self._planned_total = None if planned is None else int(sum(planned))
        self._started = True
        self._on_plan()
        iterator = self._iterate(loader, epochs, size_of or batch_len)
        self._iterator = weakref.ref(iterator)
        return iterator

    def _on_plan(self) -> None:
        """Hook: the plan is known (the loop is about to start)."""

    def _done(self) -> bool:
        return self._planned_total is not None and self._seen >= self._planned_total

    def _next_planned(self) -> int | None:
        j = len(self.steps)
        return self._planned[j] if self._planned is not None and j < len(self._planned) else None

    def _iterate(self, loader: Iterable[B], epochs: int, size_of: Callable[[B], int]) -> Generator[B, None, None]:
        model = self.model
        was_training = model.training
        if not was_training:
            model.train()
        try:
            for _ in range(epochs):
                it = iter(loader)
                while not self._done():
                    planned = self._next_planned() if self._choose_before_loading else None
                    early = self._choose(planned) if planned is not None else None
                    if planned is not None and early is None:
                        self._stop()
                        return
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    bs = size_of(batch)
                    if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
                        raise ValueError(f"mini-batch {len(self.steps)} has {bs!r} samples; a step needs >= 1")
                    choice = early if bs == planned else self._choose(int(bs))
                    if choice is None:
                        self._stop()
                        return
                    self._begin(choice, int(bs))
                    model.set_dropout(choice.vector)
                    if not model.training:  # the loop body switched to eval (e.g. a validation)
                        model.train()
                    yield batch
                    self._end()
        finally:
            self._end()
            model.set_dropout(None)
            if not was_training:
                model.eval()

    def _stop(self) -> None:
        self.stopped_at_deadline = True
        log.debug(
            "Device %s, round %s: stopped at the deadline after %s mini-batches",
            self.device_id, self.server_round, len(self.steps),
        )

    # -- hooks of the two clocks ----------------------------------------------------------------
    def _choose(self, batch_size: int) -> _Choice | None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _begin(self, choice: _Choice, batch_size: int) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _end(self) -> None:
        """Hook: the step of the last mini-batch handed out is over (the loop asked for more)."""

    def _result(self, kept: list[BatchStep]) -> RoundResult:  # pragma: no cover - subclasses
        raise NotImplementedError

    # -- what the loop may call -----------------------------------------------------------------
    @property
    def vector(self) -> np.ndarray | None:
        """The dropout vector of the current mini-batch (``None``: full model, or none yet)."""
        return self.steps[-1].vector if self.steps else None

    @property
    def forward_macs(self) -> int:
        """``MACs(d)`` of the current mini-batch (0 before the first)."""
        return self.steps[-1].forward_macs if self.steps else 0

    @property
    def num_examples(self) -> int:
        """Samples trained so far (discarded mini-batches excluded): the reply's example count."""
        return int(sum(s.batch_size for s in self.steps if not s.discarded))

    @property
    def macs(self) -> int:
        """The computation ``c`` so far (Algorithm 1): sum of ``MACs(d)`` over the mini-batches."""
        return int(sum(s.forward_macs for s in self.steps if not s.discarded))

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Note the loss of the current mini-batch; the ``train_loss`` metric is their mean (NaN
        when one is not finite). Optional. A tensor is read with ``float()`` (a device sync)."""
        self._losses.append(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))

    def discard(self) -> None:
        """Take back the mini-batch just handed out: it did not train the model (you skipped the
        update, e.g. its loss was not finite). It leaves ``c``, ``num_batches`` and
        ``num_examples``; its time stays on the clock.

        Raises
        ------
        RuntimeError
            When no mini-batch was handed out or the last one was already discarded.
        """
        if not self.steps or self.steps[-1].discarded:
            raise RuntimeError("no mini-batch to discard: discard() takes back the one just handed out")
        self.steps[-1] = dataclasses.replace(self.steps[-1], discarded=True)

    @property
    def plan(self) -> RoundPlan:
        """What the round did so far, as a :class:`~flwr_distreal.training.schedule.RoundPlan`
        (vectors, MACs, sizes of the mini-batches trained, and the timing)."""
        kept = [s for s in self.steps if not s.discarded]
        planned = len(self._planned) if self._planned is not None else len(kept)
        return RoundPlan(
            [s.vector for s in kept],
            [s.forward_macs for s in kept],
            self._result(kept),
            [s.batch_size for s in kept],
            planned_batches=planned,
        )

    @property
    def train_loss(self) -> float:
        """Mean of the recorded losses (NaN when none was recorded)."""
        return float(np.mean(self._losses)) if self._losses else float("nan")

    def metrics(self) -> dict[str, Any]:
        """The train metrics the DISTREAL strategies expect (:mod:`flwr_distreal.core.contract`),
        for the mini-batches handed out so far: ``macs`` (``c``), ``num_batches``, ``straggler``,
        ``sim_time``, ``mean_dropout``, ``available_macs``, ``utilisation``, ``train_loss``,
        ``partition-id``, ``incomplete`` and, when the round knows it, ``lr``.

        The values are numbers as Flower's ``MetricRecord`` takes them (bools as 0/1,
        :func:`flwr_distreal.core.contract.metric_values`), so ``MetricRecord({**rnd.metrics(), ...})``
        and a ``NumPyClient``'s metrics both take them as they are. The number of examples is
        :attr:`num_examples` (the legacy API returns it beside the metrics; a Message-API reply
        adds it as ``num-examples``).
        """
        bs = self.batch_size or (max(self._planned) if self._planned else 1)
        out = round_metrics(
            self.plan,
            train_loss=self.train_loss,
            device_id=self.device_id,
            step_macs_factor=self.step_macs_factor,
            batch_size=bs,
        )
        if self.lr is not None:
            out[C.LR] = self.lr
        return C.metric_values(out)

    def close(self) -> None:
        """End the iteration now (if running): the vector is cleared, the model's mode restored."""
        iterator = None if self._iterator is None else self._iterator()
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> "_Round":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DistrealRound(_Round):
    """One device's DISTREAL round inside your own training loop (Algorithm 1), on the simulated
    clock of :mod:`flwr_distreal.core.resources`.

    Parameters
    ----------
    model : DroppableModel
        Your model made droppable (:func:`~flwr_distreal.core.dropout.make_droppable`) or one from
        :func:`~flwr_distreal.models.build_model`.
    lut : LUT
        Its lookup table ``D`` of dropout vectors (checked against the model).
    resources : ResourceModel, RoundClock or None
        The devices' availability (the round's clock is ``resources.clock(device_id,
        server_round, r_max)``), or a clock of your own (advanced in place); ``None``:
        unlimited, the full model on every mini-batch and never a straggler.
    device_id : int
        The device (partition): selects its availability trace; the ``partition-id`` metric.
    server_round : int (default: 1)
        The round (1-based): places it on the device's clock (``[(t-1) T, t T]``).
    r_max : float, optional
        This device's upper availability bound, if it differs from the resource model's.
    policy : {"paper", "deadline"} (default: "deadline", the run config's ``strategy.policy``)
        Per-batch budget rule (:func:`~flwr_distreal.training.schedule.select_vector`): the paper's
        ``r(t) T / B``, or deadline-aware (time left times ``r(t)`` over the samples left).
        Until 2026-12 the default here was ``paper``.
    stop_at_deadline : bool (default: True)
        End the round before a step that would end after the deadline (the device sends what
        it trained, not a straggler). False: the paper's device, which trains every mini-batch
        and is a straggler when late.
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to its forward pass (forward + backward ~ 3x).
    batch_size : int, optional
        Nominal mini-batch size, when the loader does not tell it (with ``round_samples``, or a
        sized loader that is not a ``DataLoader``).
    round_samples : int, optional
        Samples of the round (all local epochs), for a loader of unknown length.
    planned_sizes : sequence of int, optional
        The sizes of the round's mini-batches (e.g. :func:`~flwr_distreal.training.schedule.batch_sizes`);
        overrides ``batch_size`` and ``round_samples``.
    lr : float, optional
        The learning rate of your optimiser in this round: reported as the ``lr`` metric.
    config : Mapping, optional
        The server's train config, kept as :attr:`config` (see :meth:`from_config`).
    precision : {"fp32", "bf16", "fp16"} (default: "fp32")
        The run's precision (:mod:`flwr_distreal.core.precision`; checked against the model's device):
        your loop runs its forward pass in :meth:`autocast` (``DistrealTrainer`` does).

    Attributes
    ----------
    clock : RoundClock or None
        The device's simulated clock (``None`` when unlimited).
    steps : list of BatchStep
        Every mini-batch handed out, in order.
    stopped_at_deadline : bool
        The round ended because the next step would have missed the deadline.

    Examples
    --------
    A hand-written loop with Adam and label smoothing on a model of your own:

    >>> model = make_droppable(my_cnn, torch.zeros(1, 1, 8, 8))     # doctest: +SKIP
    >>> lut = LUT.uniform(model)                                      # doctest: +SKIP
    >>> rnd = DistrealRound(model, lut, resources, device_id=0, server_round=1)  # doctest: +SKIP
    >>> for x, y in rnd.batches(loader):                              # doctest: +SKIP
    ...     opt.zero_grad()
    ...     F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
    ...     opt.step()
    >>> rnd.metrics()["macs"] == sum(s.forward_macs for s in rnd.steps)  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        model: DroppableModel,
        lut: LUT,
        resources: ResourceModel | RoundClock | None,
        *,
        device_id: int,
        server_round: int = 1,
        r_max: float | None = None,
        policy: str = D.POLICY,
        stop_at_deadline: bool = D.STOP_AT_DEADLINE,
        step_macs_factor: float = D.STEP_MACS_FACTOR,
        batch_size: int | None = None,
        round_samples: int | None = None,
        planned_sizes: Sequence[int] | None = None,
        lr: float | None = None,
        config: Mapping[str, Any] | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(
            model, lut, device_id=device_id, server_round=server_round, policy=policy,
            stop_at_deadline=stop_at_deadline, step_macs_factor=step_macs_factor, batch_size=batch_size,
            round_samples=round_samples, planned_sizes=planned_sizes, lr=lr, config=config, precision=precision,
        )
        if resources is None or isinstance(resources, RoundClock):
            self.clock: RoundClock | None = resources
        elif isinstance(resources, ResourceModel):
            self.clock = resources.clock(self.device_id, self.server_round, r_max)
        else:
            raise TypeError(f"resources must be a ResourceModel, a RoundClock or None, got {type(resources).__name__}")
        self._full_macs: int | None = None
        self._total = self._left = 0.0

    @classmethod
    def from_config(
        cls,
        model: DroppableModel,
        lut: LUT,
        config: Mapping[str, Any],
        *,
        resources: ResourceModel | None,
        device_id: int,
        **kwargs: Any,
    ) -> "DistrealRound":
        """The round the server's train config asks for.

        Reads ``server-round`` (default 1) and ``unlimited`` (full resources: no clock); keeps
        the whole config as :attr:`config`. The other keys of :mod:`flwr_distreal.core.contract` are
        not DISTREAL's: ``fixed-subsets``, ``submodel-macs``, ``device-id``, ``dropout-rate``,
        ``width-level`` and ``width`` configure the submodel baselines, ``round-deadline`` the
        wall-clock mode (:meth:`flwr_distreal.training.wallclock.MeasuredDistrealRound.from_config`); the simulated round's
        deadline is the resource model's. The contract sends no learning rate.

        Parameters
        ----------
        model, lut
            As the constructor.
        config : Mapping
            The train config (a ``NumPyClient.fit`` config, or a Message's ``"config"`` record).
        resources : ResourceModel or None
            The devices' availability.
        device_id : int
            This device.
        **kwargs
            The constructor's other arguments (``policy``, ``stop_at_deadline``, ``lr``, ...).

        Raises
        ------
        ValueError
            When ``server-round`` is not an integer >= 1.
        """
        server_round = _config_round(config)
        unlimited = bool(config.get(C.UNLIMITED, False))
        return cls(
            model, lut, None if unlimited else resources, device_id=device_id, server_round=server_round,
            config=config, **kwargs,
        )

    @property
    def deadline(self) -> float:
        """The round's deadline on the device's clock (global simulated seconds; ``inf`` when
        unlimited)."""
        return math.inf if self.clock is None else self.clock.deadline

    @property
    def now(self) -> float:
        """The device's simulated time after the mini-batches handed out so far."""
        return 0.0 if self.clock is None else self.clock.now

    def _needs_plan(self) -> bool:
        return self.clock is not None

    def _full(self) -> int:
        if self._full_macs is None:
            self._full_macs = int(count_macs(self.model))
        return self._full_macs

    def _on_plan(self) -> None:
        self._total = float(sum(self._planned)) if self._planned is not None else 0.0
        self._left = self._total

    def forecast(self, loader: Iterable[Any] | None = None, *, epochs: int = 1) -> RoundPlan:
        """The round the clock predicts if every planned mini-batch is trained: vectors, MACs,
        finish time, straggler status (on a copy of the clock; nothing is advanced).

        The simulated clock does not depend on what the model learns, so a round can be
        predicted before training, e.g. to skip a round whose update the server will discard.

        Parameters
        ----------
        loader : iterable, optional
            Tells the planned sizes when the round was not given them.
        epochs : int (default: 1)
            Local epochs, with ``loader``.

        Raises
        ------
        RuntimeError
            Once a mini-batch was handed out.
        ValueError
            When the planned sizes are unknown.
        """
        if self.steps:
            raise RuntimeError("forecast() predicts a round before its first mini-batch")
        sizes = self._planned if self._planned is not None else (
            None if loader is None else self._resolve_plan(loader, _int_arg("epochs", epochs, 1))
        )
        if sizes is None:
            raise ValueError("forecast() needs the planned sizes: planned_sizes=, round_samples= or a loader")
        if self.clock is None:
            return plan_fixed_round(None, self._full(), sizes, self.step_macs_factor)
        return plan_distreal_round(
            copy.deepcopy(self.clock), self.lut, sizes, self.policy,  # type: ignore[arg-type]
            self.step_macs_factor, self.stop_at_deadline,
        )

    def _choose(self, batch_size: int) -> _Choice | None:
        if self.clock is None:
            full = self._full()
            return _Choice(None, full, step_macs(full, batch_size, self.step_macs_factor), math.inf)
        left = max(self._left, float(batch_size))  # more data than planned: this batch is the last
        vector, fwd, cost = select_vector(
            self.clock, self.lut, batch_size, self.policy, self._total, left, self.step_macs_factor  # type: ignore[arg-type]
        )
        if self.stop_at_deadline and not self.clock.fits(cost):
            return None
        return _Choice(vector, int(fwd), cost, self.clock.rate())

    def _begin(self, choice: _Choice, batch_size: int) -> None:
        start = self.now
        if self.clock is not None:
            self.clock.step(choice.cost)
        self._left -= batch_size
        self._seen += batch_size
        self.steps.append(
            BatchStep(len(self.steps), batch_size, choice.vector, choice.forward_macs, choice.cost, choice.rate,
                      start, self.now)
        )

    def _result(self, kept: list[BatchStep]) -> RoundResult:
        costs = tuple(s.step_macs for s in kept)
        if self.clock is None:  # unlimited: what it spent is what it had (plan_fixed_round's convention)
            spent = float(sum(costs))
            return RoundResult(0.0, 0.0, 0.0, len(kept), len(kept), spent, spent, costs)
        res = self.clock.result()
        if len(kept) != len(self.steps):  # discarded steps: their time stays, their MACs leave c
            res = dataclasses.replace(
                res, steps_done=len(kept), steps_total=len(kept), spent_macs=float(sum(costs)), step_macs=costs
            )
        return res
