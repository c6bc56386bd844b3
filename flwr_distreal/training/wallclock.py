"""The wall-clock resource mode (``resources=measured``): DISTREAL against a real deadline.

On a real device the availability r(t) of the simulated mode (:mod:`flwr_distreal.core.resources`)
is unknown. A device in this mode measures the wall time of its own training steps, estimates
its current throughput from them and, before every mini-batch, budgets the time left until a
real-seconds deadline over the mini-batches left (Algorithm 1 of Rapp et al., AAAI 2022, with
the ``"deadline"`` policy of :mod:`flwr_distreal.training.schedule`, in real time). No Flower or Hydra
imports.

Pieces
------
:class:`ThroughputEstimator` (:mod:`flwr_distreal.training.throughput`)
    Current throughput (MACs per second) from recent ``(seconds, MACs)`` step measurements:
    the median of a short window (robust to noise and to one-off spikes such as the first use
    of a new kernel shape) with change detection (a run of consecutive steps that all disagree
    with the estimate in the same direction by more than a threshold replaces the window), so
    a real change is followed within ``change_steps`` steps.
:class:`StepTimeTable` (:mod:`flwr_distreal.training.steptimes`)
    The per-device calibration: the step time of every LUT vector relative to the full model's
    step (``rel_time``, the full model is 1), measured once per device.
:func:`choose_vector` (:mod:`flwr_distreal.training.steptimes`)
    The selection rule: the LUT vector with the most MACs whose predicted step time fits the
    step's time budget, or ``None`` (stop) when not even the fastest one would end before the
    deadline.
:class:`~flwr_distreal.training.clock.MeasuredClock` (:mod:`flwr_distreal.training.clock`)
    The wall clock as the trainers' clock strategy: deadline, estimator, table, the selection
    before every mini-batch (:meth:`~flwr_distreal.training.clock.MeasuredClock.pick`), the
    timed round and its metrics. The simulated mode's counterpart is
    :class:`~flwr_distreal.training.clock.SimulatedClock`.
:class:`MeasuredDistrealTrainer`, :class:`MeasuredBaselineTrainer`
    :class:`~flwr_distreal.training.trainers.DistrealTrainer` and
    :class:`~flwr_distreal.training.trainers.BaselineTrainer` with a ``MeasuredClock`` plugged
    in (the arguments of the clock are theirs).
:class:`MeasuredDistrealRound`
    The per-batch API of :mod:`flwr_distreal.training.loop` on the wall clock.

Every name of these modules that was public here is still importable from this module.

Calibration: a per-vector time table times one scalar
-----------------------------------------------------
Step time is not proportional to MACs on a CPU: narrow convolutions are less efficient per
MAC and the compact execution gathers kept channels. Measured for femnist_cnn (batch 32, one
thread, ``scripts/demo_wallclock_slowdown.py``): the full model 27 ms; uniform rate 0.5 (30 % of
the MACs) 0.68 of that; rates 0.05 to 0.2 (68-90 % of the MACs) 1.4-1.7 times *slower* than the
full model. A model "time = MACs / throughput" would pick vectors that miss the deadline and
waste the fast full model. Warm-up steps at every round start would cost round time every
round and only cover the vectors they run, so:

* once per device (model, LUT, batch size, torch threads, torch device), every LUT vector (up
  to ``max_points``, evenly spread; the rest interpolated in MACs) and the full model train a
  few steps on a copy of the model, interleaved round-robin (so a load change during the
  calibration hits all vectors alike), and the median step time of each vector divided by the
  full model's gives ``rel_time``. The table can be cached on disk (JSON, keyed by model, LUT,
  batch size, threads, device, torch version, host, precision and memory layout) and is kept by
  the trainer; the steps run at the trainer's ``precision`` (:mod:`flwr_distreal.core.precision`);
* a slowdown of the device (another process, thermal throttling, a lower clock) scales every
  vector's time alike, so online only one scalar is tracked: the throughput in *full-model
  MACs per second*, the device's r(t) in the unit of the simulated mode. A step of vector v
  on b samples costs ``rel_time[v] * step_macs(full, b)`` full-model-equivalent MACs; the
  estimator is fed these and the step's seconds; the predicted time of vector v is that cost
  over the estimated throughput. A single scalar is identifiable from whatever vectors the
  device happens to run (an online affine model ``a + b * MACs`` is not: DISTREAL runs nearly
  the same vector step after step, and a slowdown scales ``a`` as well as ``b``).

``rel_time`` is never below the vector's MAC fraction (a vector is never assumed to do more
MACs per second than the full model), so the MACs a device spends never exceed the
full-model-equivalent MACs it was measured to have (utilisation <= 1). The table is not
forced monotone: a vector that is slower than a vector with more MACs is simply never chosen
while the faster one fits. A consequence worth knowing: a device that trains narrow vectors all
round has a utilisation below its busy fraction, because those vectors do fewer MACs per
second than the full model (on the CPU above, rate 0.5 does 0.30 / 0.68 = 44 % of them).

Without a given table, the first :meth:`~MeasuredDistrealTrainer.fit` measures it (or loads
``table_path``), and that time counts against the first round; call
:meth:`~MeasuredDistrealTrainer.calibrate` after construction to keep rounds free of it.

Stop rule and the step in flight
--------------------------------
A step is started only if its predicted time, padded by ``margin``, ends before the deadline.
A running kernel cannot be preempted: when a step's forward and backward pass end after the
deadline (an unforeseen slowdown), its update is abandoned (no optimiser step, not counted in
``c``) and the device stops, as ``stop_at_deadline`` does in the simulated mode. So ``macs``
counts exactly the work done by the deadline, and the reply is late by at most the part of
one step that overran plus the reply itself.

Round window and metrics
------------------------
The round runs from the start of :meth:`~MeasuredDistrealTrainer.fit` (it receives the train
message) for ``round-deadline`` seconds; an absolute ``round-deadline-at`` unix time, when
given, ends it earlier if it comes first (it covers the time the message spent on its way;
proposed for :mod:`flwr_distreal.core.contract` as :data:`ROUND_DEADLINE_AT`). ``available_macs``
integrates the throughput over the round window: during a completed step the step's own
measured work, between and after steps (data loading, the unused tail) the estimate of the
moment, converted to the unit of ``macs`` as in the simulated mode; ``utilisation`` is
``macs / available_macs``. Extra metrics (all numbers): ``wall_time`` (fit start to end of
training), ``round_deadline`` (the window in seconds), ``overrun`` (seconds past the deadline),
``busy_fraction`` (time in completed steps over the window), ``throughput`` (final estimate,
full-model MACs/s), ``throughput_changes`` (changes detected in the round), ``change_at``
(seconds into the round at which the last detected change began, -1 without one),
``mean_dropout_before`` / ``mean_dropout_after`` (mean rate of the vectors before / after that
change) and ``abandoned`` (1 when a step in flight at the deadline was abandoned).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from ..core import contract as C
from ..core.dropout import DroppableModel, DropoutModel
from ..core.lut import LUT
from ..core.macs import count_macs
from ..core.resources import RoundResult, step_macs
from .clock import (  # noqa: F401  (the wall-clock metric keys, public here as before)
    ABANDONED,
    BUSY_FRACTION,
    CHANGE_AT,
    MEAN_DROPOUT_AFTER,
    MEAN_DROPOUT_BEFORE,
    OVERRUN,
    ROUND_DEADLINE_AT,
    ROUND_DEADLINE_METRIC,
    THROUGHPUT,
    THROUGHPUT_CHANGES,
    WALL_TIME,
    MeasuredClock,
    StepRecord,
    available_macs,
    wall_metrics,
)
from .loop import _Round
from .records import BatchStep, _Choice, _config_round, _positive
from .step import NDArrays, Scalar, TrainResult
from .steptimes import TABLE_FORMAT, TABLE_VERSION, Choice, StepTimeTable, choose_vector  # noqa: F401
from .throughput import ThroughputEstimator, WallclockError
from .trainers import BaselineTrainer, DistrealTrainer

__all__ = [
    "ROUND_DEADLINE_AT",
    "Choice",
    "MeasuredBaselineTrainer",
    "MeasuredDistrealRound",
    "MeasuredDistrealTrainer",
    "StepRecord",
    "StepTimeTable",
    "ThroughputEstimator",
    "WallclockError",
    "choose_vector",
]


class _MeasuredTrainer:
    """The measured clock's state, read through the trainer as before the clock was a strategy
    (``trainer.time_table``, ``trainer.estimator``, ``trainer.step_log``, ...), and
    :meth:`calibrate`."""

    clock: MeasuredClock

    @property
    def time_table(self) -> StepTimeTable | None:
        """The device's step-time table (``None`` until calibrated)."""
        return self.clock.time_table

    @time_table.setter
    def time_table(self, table: StepTimeTable | None) -> None:
        self.clock.time_table = table

    @property
    def estimator(self) -> ThroughputEstimator:
        """The throughput estimator, kept across rounds."""
        return self.clock.estimator

    @property
    def margin(self) -> float:
        """Relative safety pad on predicted step times."""
        return self.clock.margin

    @property
    def table_path(self) -> Path | None:
        """JSON cache of the measured table."""
        return self.clock.table_path

    @property
    def unix_clock(self) -> Callable[[], float]:
        """Unix time, for ``round-deadline-at``."""
        return self.clock.unix_clock

    @property
    def full_macs(self) -> int:
        """Forward MACs per sample of the full model."""
        return self.clock.full_macs

    @property
    def step_log(self) -> list[StepRecord]:
        """The last round's steps."""
        return self.clock.step_log

    @property
    def round_start(self) -> float:
        """When the last round started, on the clock's scale."""
        return self.clock.round_start

    def round_deadline(self, config: Mapping[str, Any], start: float) -> float:
        """The deadline for a round starting at ``start`` (:meth:`MeasuredClock.round_deadline
        <flwr_distreal.training.clock.MeasuredClock.round_deadline>`)."""
        return self.clock.round_deadline(config, start, self.device_id)  # type: ignore[attr-defined]

    def calibrate(
        self, *, repeats: int = 3, warmup: int = 1, max_points: int = 16, force: bool = False
    ) -> StepTimeTable:
        """Measure (or load from ``table_path``) this device's step-time table.

        Called by the first :meth:`fit` when no table was given (its time then counts against
        that round's deadline); call it after construction to keep rounds free of it.
        """
        return self.clock.calibrate(
            self, self.calibration_lut(), repeats=repeats, warmup=warmup, max_points=max_points, force=force,  # type: ignore[arg-type,attr-defined]
        )


class MeasuredDistrealTrainer(_MeasuredTrainer, DistrealTrainer):
    """DISTREAL device on the wall clock (Algorithm 1 with measured throughput).

    Before every mini-batch it reads the time left until the round's real deadline and the
    estimated throughput and picks the LUT vector with :func:`choose_vector`; it never starts a
    step predicted to end after the deadline, abandons a step whose backward pass ends after
    it, and reports ``c`` (``macs``) over the completed steps. ``straggler`` is False (it sends
    what it finished by the deadline) unless ``stop_at_deadline=False``.

    Parameters
    ----------
    model, train_loader, device_id, lut
        As :class:`~flwr_distreal.training.trainers.DistrealTrainer`.
    policy : {"deadline", "paper"} (default: "deadline")
        Budget rule (see :func:`choose_vector`).
    time_table : StepTimeTable or {"measure", "proportional"} (default: "measure")
        The device's step times; ``"measure"`` calibrates at the first fit (or loads
        ``table_path``), ``"proportional"`` assumes time proportional to MACs.
    table_path : str or Path, optional
        JSON cache of the measured table (reused when it matches model, LUT, batch size,
        threads, device, torch and host).
    estimator : ThroughputEstimator, optional
        Default ``ThroughputEstimator()``; kept across rounds.
    margin : float (default: 0.1)
        Relative safety pad on predicted step times.
    clock : callable (default: time.perf_counter)
        Monotonic clock in seconds (inject a fake one in tests).
    unix_clock : callable (default: time.time)
        Unix time, for ``round-deadline-at``.
    stop_at_deadline : bool (default: True)
        False: keep training the fastest vector after the deadline and report a straggler.
    **kwargs
        recipe (or lr, momentum, weight_decay), local_epochs, step_macs_factor, torch_device, seed
        (as :class:`~flwr_distreal.training.trainers.DeviceTrainer`); ``resources`` and ``r_max``
        are not used.

    Notes
    -----
    A :class:`~flwr_distreal.training.trainers.DistrealTrainer` whose clock is a
    :class:`~flwr_distreal.training.clock.MeasuredClock` of ``time_table``, ``table_path``,
    ``estimator``, ``margin``, ``clock`` and ``unix_clock``: ``DistrealTrainer(model, loader, i,
    lut, None, clock=MeasuredClock(...))`` trains the same rounds. The clock's state reads
    through the trainer (``time_table``, ``estimator``, ``step_log``, ...); :attr:`clock` is
    the ``MeasuredClock`` (calling it reads the time, as the callable did).
    """

    def __init__(
        self,
        model: DropoutModel,
        train_loader: DataLoader,
        device_id: int,
        lut: LUT,
        *,
        policy: str = "deadline",
        time_table: StepTimeTable | Literal["measure", "proportional"] = "measure",
        table_path: str | Path | None = None,
        estimator: ThroughputEstimator | None = None,
        margin: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        unix_clock: Callable[[], float] = time.time,
        stop_at_deadline: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("resources", None)
        kwargs.pop("r_max", None)
        wall = MeasuredClock(
            time_table, table_path=table_path, estimator=estimator, margin=margin, clock=clock, unix_clock=unix_clock
        )
        if isinstance(time_table, StepTimeTable) and tuple(time_table.macs) != tuple(int(m) for m in lut.macs):
            raise WallclockError("time_table was made for another LUT (its MACs differ)")
        super().__init__(
            model, train_loader, device_id, lut, None, policy=policy, stop_at_deadline=stop_at_deadline, clock=wall,
            **kwargs,
        )

    def fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Train one round against the wall clock (see the class docstring).

        Parameters
        ----------
        arrays : list of np.ndarray
            The global model (``state_dict`` order).
        config : Mapping
            The train config: ``round-deadline`` (seconds from now) and/or
            ``round-deadline-at`` (unix time), or ``unlimited``; ``server-round``.

        Returns
        -------
        TrainResult
            Trained arrays, samples trained and metrics (module docstring).

        Raises
        ------
        WallclockError
            For a missing or invalid deadline.
        """
        return super().fit(arrays, config)


class MeasuredBaselineTrainer(_MeasuredTrainer, BaselineTrainer):
    """Baseline device on the wall clock: a (sub)model fixed at round start, trained on all its
    mini-batches however long it takes; ``straggler`` is True when it ends after the deadline.

    The (sub)model is the full model, or the ``fixed-subsets`` the server assigned
    (:meth:`~flwr_distreal.training.trainers.BaselineTrainer.prepare`). Metrics as
    :class:`MeasuredDistrealTrainer`; ``available_macs`` covers the round window only, so a
    straggler's utilisation exceeds 1 (as in the simulated mode).

    Parameters
    ----------
    model, train_loader, device_id
        As :class:`~flwr_distreal.training.trainers.BaselineTrainer`.
    time_table : StepTimeTable, optional
        The device's step-time table (e.g. shared with its DISTREAL trainer): puts
        ``available_macs`` in full-model-equivalent MACs as in the DISTREAL trainer. Without
        it, time is taken as proportional to MACs (utilisation is then the busy fraction).
    estimator, margin, clock, unix_clock
        As :class:`MeasuredDistrealTrainer`.
    **kwargs
        As :class:`~flwr_distreal.training.trainers.DeviceTrainer` (``resources`` and ``r_max``
        are not used).

    Notes
    -----
    A :class:`~flwr_distreal.training.trainers.BaselineTrainer` with a
    :class:`~flwr_distreal.training.clock.MeasuredClock` (see :class:`MeasuredDistrealTrainer`);
    it never calibrates by itself (a given table, else time proportional to MACs).
    """

    def __init__(
        self,
        model: DropoutModel,
        train_loader: DataLoader,
        device_id: int,
        *,
        time_table: StepTimeTable | None = None,
        estimator: ThroughputEstimator | None = None,
        margin: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        unix_clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("resources", None)
        kwargs.pop("r_max", None)
        wall = MeasuredClock(time_table, estimator=estimator, margin=margin, clock=clock, unix_clock=unix_clock)
        super().__init__(model, train_loader, device_id, None, clock=wall, **kwargs)

    def fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Train the round's fixed (sub)model on every mini-batch and time it.

        Parameters and returns as :meth:`MeasuredDistrealTrainer.fit` (plus ``fixed-subsets``).
        """
        return super().fit(arrays, config)


class MeasuredDistrealRound(_Round):
    """DISTREAL inside your own loop on a real device: a wall-clock deadline and measured step
    times (the wall-clock mode of :mod:`flwr_distreal.training.wallclock`).

    Before every mini-batch it reads the time left until the deadline and the estimated
    throughput (full-model MACs per second, from the steps so far) and picks the vector with
    :func:`~flwr_distreal.training.wallclock.choose_vector`; it hands out no mini-batch whose predicted
    step would end after the deadline. The time of a step is what your loop body takes between
    two mini-batches (on CUDA the clock synchronises first).

    Unlike :class:`~flwr_distreal.training.wallclock.MeasuredDistrealTrainer`, it cannot abandon a step
    in flight (your optimiser step is in your loop): a step that overruns the deadline (an
    unforeseen slowdown) is kept and counted, and the ``overrun`` metric says by how much.

    Parameters
    ----------
    model, lut
        As :class:`~flwr_distreal.training.loop.DistrealRound`.
    deadline : float
        Seconds the round may take, from the first call of :meth:`batches` (``inf``: no
        deadline, the full model on every mini-batch).
    time_table : StepTimeTable or "proportional" (default: "proportional")
        The device's step times per LUT vector relative to the full model
        (:meth:`StepTimeTable.measure <flwr_distreal.training.wallclock.StepTimeTable.measure>`, once per
        device); ``"proportional"`` assumes time proportional to MACs.
    estimator : ThroughputEstimator, optional
        Keep one across rounds so that a round starts from the last estimate. Without an
        estimate the first step probes the fastest vector.
    margin : float (default: 0.1)
        Relative safety pad on predicted step times.
    clock : callable (default: time.perf_counter)
        Monotonic clock in seconds.
    device_id, server_round, stop_at_deadline, step_macs_factor, batch_size, round_samples, planned_sizes, lr, config
        As :class:`~flwr_distreal.training.loop.DistrealRound`.
    policy : {"deadline", "paper"} (default: "deadline")
        Budget rule of :func:`~flwr_distreal.training.wallclock.choose_vector`.
    torch_device : str or torch.device, optional
        Where the model trains (the clock synchronises CUDA before reading); default: the
        device of the model's first parameter.
    precision : {"fp32", "bf16", "fp16"} (default: "fp32")
        As :class:`~flwr_distreal.training.loop.DistrealRound`: run your forward pass in
        ``with rnd.autocast():``.

    Notes
    -----
    Metrics: those of :class:`~flwr_distreal.training.loop.DistrealRound` without ``sim_time``, plus ``wall_time``,
    ``round_deadline``, ``overrun``, ``busy_fraction`` and ``throughput`` (as
    :class:`~flwr_distreal.training.wallclock.MeasuredDistrealTrainer`). ``available_macs`` integrates
    the throughput over the round window as the trainer does.
    """

    _choose_before_loading = False  # the time left is read after the batch is loaded

    def __init__(
        self,
        model: DroppableModel,
        lut: LUT,
        *,
        deadline: float,
        time_table: "StepTimeTable | str" = "proportional",
        estimator: "ThroughputEstimator | None" = None,
        margin: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        device_id: int,
        server_round: int = 1,
        policy: str = "deadline",
        stop_at_deadline: bool = True,
        step_macs_factor: float = 3.0,
        batch_size: int | None = None,
        round_samples: int | None = None,
        planned_sizes: Sequence[int] | None = None,
        lr: float | None = None,
        config: Mapping[str, Any] | None = None,
        torch_device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> None:

        super().__init__(
            model, lut, device_id=device_id, server_round=server_round, policy=policy,
            stop_at_deadline=stop_at_deadline, step_macs_factor=step_macs_factor, batch_size=batch_size,
            round_samples=round_samples, planned_sizes=planned_sizes, lr=lr, config=config, precision=precision,
        )
        if isinstance(deadline, bool) or not isinstance(deadline, numbers.Real) or not float(deadline) > 0:
            raise ValueError(f"deadline must be a number of seconds > 0 (or inf), got {deadline!r}")
        if not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        self.round_seconds = float(deadline)
        self.full_macs = int(count_macs(model))
        if isinstance(time_table, StepTimeTable):
            if tuple(time_table.macs) != tuple(int(m) for m in lut.macs):
                raise ValueError("time_table was made for another LUT (its MACs differ)")
        elif time_table == "proportional":
            time_table = StepTimeTable.proportional(lut, self.full_macs, self.batch_size or 1)
        else:
            raise ValueError(f"time_table must be a StepTimeTable or 'proportional', got {time_table!r}")
        if torch_device is None:
            first = next(model.parameters(), None)
            torch_device = first.device if first is not None else "cpu"
        self.torch_device = torch.device(torch_device)
        #: The wall clock (the trainers' :class:`~flwr_distreal.training.clock.MeasuredClock`):
        #: the table, the estimator, the margin, the overhead between steps and the selection rule.
        self.wall = MeasuredClock(time_table, estimator=estimator, margin=margin, clock=clock)
        self.wall.attach(model, self.torch_device, self.step_macs_factor)
        self.time_table: StepTimeTable = time_table
        self.estimator = self.wall.estimator
        self.margin = self.wall.margin
        self.start = math.nan
        self._est0: float | None = None
        self._pending: tuple[float, _Choice] | None = None
        self._last_end: float | None = None
        self._estimates: list[float] = []  # the throughput estimate after each completed step

    @classmethod
    def from_config(
        cls, model: DroppableModel, lut: LUT, config: Mapping[str, Any], *, device_id: int, **kwargs: Any
    ) -> "MeasuredDistrealRound":
        """The round the server's train config asks for: ``round-deadline`` seconds (``inf``
        with ``unlimited``), ``server-round``; the config is kept as :attr:`config`.

        Raises
        ------
        ValueError
            Without ``round-deadline`` (and not ``unlimited``), or when it is not a number > 0.
        """
        server_round = _config_round(config)
        if bool(config.get(C.UNLIMITED, False)):
            deadline = math.inf
        elif C.ROUND_DEADLINE not in config:
            raise ValueError(
                f"the wall-clock round needs {C.ROUND_DEADLINE!r} (seconds) in the train config; got keys {sorted(config)}"
            )
        else:
            deadline = _positive(f"train config {C.ROUND_DEADLINE!r}", config[C.ROUND_DEADLINE])
        return cls(model, lut, deadline=deadline, device_id=device_id, server_round=server_round, config=config, **kwargs)

    def _now(self) -> float:
        return self.wall.now()

    @property
    def deadline(self) -> float:
        """The round's deadline on :attr:`clock`'s scale (NaN before the round starts)."""
        return self.start + self.round_seconds

    def _needs_plan(self) -> bool:
        return math.isfinite(self.round_seconds)

    def _on_plan(self) -> None:
        self.start = self._now()
        self._est0 = self.estimator.throughput

    def _choose(self, batch_size: int) -> _Choice | None:

        now = self._now()
        if not math.isfinite(self.round_seconds):
            return _Choice(None, self.full_macs, step_macs(self.full_macs, batch_size, self.step_macs_factor),
                           math.nan)
        table = self.time_table
        est = self.estimator.throughput
        j = len(self.steps)
        rest = self._planned[j + 1:] if self._planned is not None else []
        c = self.wall.pick(
            now, self.deadline, [batch_size, *rest], policy=self.policy, round_time=self.round_seconds,
            round_samples=self.planned_samples, stop_at_deadline=self.stop_at_deadline,
        )
        if c is None:
            return None
        i = int(c.index)  # type: ignore[arg-type]
        cost = table.rel_time[i] * step_macs(self.full_macs, batch_size, self.step_macs_factor)
        vector = self.lut.vectors[i]
        return _Choice(vector, int(table.macs[i]), cost, math.nan if est is None else est, index=i)

    def _begin(self, choice: _Choice, batch_size: int) -> None:
        t = self._now()
        if self._last_end is not None:
            self.wall.gaps.append(max(0.0, t - self._last_end))
        self._seen += batch_size
        self.steps.append(
            BatchStep(len(self.steps), batch_size, choice.vector, choice.forward_macs, choice.cost, choice.rate,
                      t - self.start, math.nan)
        )
        self._pending = (t, choice)

    def _end(self) -> None:
        if self._pending is None:
            return
        t0, choice = self._pending
        self._pending = None
        t = self._now()
        self._last_end = t
        self._estimates.append(self.estimator.update(max(t - t0, 1e-9), choice.cost))
        self.steps[-1] = dataclasses.replace(self.steps[-1], end=t - self.start)

    def _window(self) -> tuple[float, float]:
        """(round window, wall time so far) in seconds."""
        ends = [s.end for s in self.steps if math.isfinite(s.end)]
        wall = max(ends) if ends else 0.0
        return (self.round_seconds if math.isfinite(self.round_seconds) else wall), wall

    def _result(self, kept: list[BatchStep]) -> RoundResult:

        window, wall = self._window()
        done = [s for s in kept if math.isfinite(s.end)]
        spent = tuple(step_macs(s.forward_macs, s.batch_size, self.step_macs_factor) for s in done)
        if math.isfinite(self.round_seconds):
            records = [  # every step that ended (discarded ones too: the device worked), with the estimate after it
                StepRecord(s.start, s.end, s.batch_size, -1, s.dropout_rate, s.forward_macs, s.step_macs,
                           math.nan, math.nan, est)
                for s, est in zip([s for s in self.steps if math.isfinite(s.end)], self._estimates)
            ]
            # the trainer's integration of the throughput over the round window
            available = available_macs(records, window, self._est0)
        else:
            available = float(sum(s.step_macs for s in done))
        return RoundResult(0.0, window, wall, len(done), len(done), float(sum(spent)), float(available), spent)

    def metrics(self) -> dict[str, Any]:
        """As :meth:`~flwr_distreal.training.loop.DistrealRound.metrics` without ``sim_time``, plus ``wall_time``,
        ``round_deadline``, ``overrun``, ``busy_fraction`` and ``throughput``."""

        out = super().metrics()
        out.pop(C.SIM_TIME, None)
        window, wall = self._window()
        out[C.STRAGGLER] = int((not self.stop_at_deadline) and wall > window)
        out.update(wall_metrics([s for s in self.steps if math.isfinite(s.end)], window, wall, self.estimator))
        return out
