"""The clock of a device's round, a strategy of the trainers: simulated or measured.

A trainer (:class:`~flwr_distreal.training.trainers.DistrealTrainer`,
:class:`~flwr_distreal.training.trainers.BaselineTrainer`) decides *what* a mini-batch trains (a
LUT vector, a fixed submodel); its clock decides *when* the round ends and what time a step
has. The trainer takes one of two clocks (``clock=``), and :meth:`DeviceTrainer.fit
<flwr_distreal.training.trainers.DeviceTrainer.fit>` hands the round to it:

:class:`SimulatedClock`
    The resource model's availability ``r_i(t)`` (:mod:`flwr_distreal.core.resources`): the
    round's :class:`~flwr_distreal.core.resources.RoundClock`, on which a step of ``m`` MACs
    takes ``m / r(t)`` simulated seconds and every mini-batch's budget is planned
    (:mod:`flwr_distreal.training.schedule`). Deterministic: a round can be forecast before it
    is trained. The default (``resources`` given to the trainer).
:class:`MeasuredClock`
    A real deadline in wall-clock seconds (``round-deadline`` / ``round-deadline-at``), the
    device's throughput estimated from its own step times
    (:class:`~flwr_distreal.training.throughput.ThroughputEstimator`) and its step times per LUT
    vector (:class:`~flwr_distreal.training.steptimes.StepTimeTable`). It runs the round step by
    step, asks the trainer for each mini-batch's (sub)model, times it, abandons a step that
    ends after the deadline, and reports the wall-clock metrics (the module docstring of
    :mod:`flwr_distreal.training.wallclock`). :meth:`MeasuredClock.pick` is the one selection
    rule of the wall clock, used by the trainers and by
    :class:`~flwr_distreal.training.wallclock.MeasuredDistrealRound` alike.

``MeasuredDistrealTrainer`` and ``MeasuredBaselineTrainer`` (:mod:`flwr_distreal.training.wallclock`)
are the trainers with a :class:`MeasuredClock` plugged in. No Flower or Hydra imports.
"""

from __future__ import annotations

import logging
import math
import numbers
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..core import contract as C
from ..core.dropout import DropoutModel
from ..core.lut import LUT
from ..core.macs import count_macs
from ..core.resources import ResourceModel, RoundClock, RoundResult, step_macs
from .schedule import RoundPlan
from .step import NDArrays, Scalar, TrainResult, get_weights
from .steptimes import Choice, StepTimeTable, _sync, choose_vector
from .throughput import ThroughputEstimator, WallclockError, _finite

if TYPE_CHECKING:  # the trainers use the clocks; the clocks only call them back
    from .trainers import DeviceTrainer

__all__ = ["MeasuredClock", "Pick", "SimulatedClock", "StepRecord", "available_macs", "wall_metrics"]

log = logging.getLogger(__name__)

#: Train-config key proposed for :mod:`flwr_distreal.core.contract`: the absolute unix time (seconds)
#: by which the round's training must end. Optional; the earlier of it and ``round-deadline``
#: (seconds from the start of fit) applies.
ROUND_DEADLINE_AT = "round-deadline-at"

# Extra train metrics of the wall-clock mode (numbers only).
WALL_TIME = "wall_time"
ROUND_DEADLINE_METRIC = "round_deadline"
OVERRUN = "overrun"
BUSY_FRACTION = "busy_fraction"
THROUGHPUT = "throughput"
THROUGHPUT_CHANGES = "throughput_changes"
CHANGE_AT = "change_at"
MEAN_DROPOUT_BEFORE = "mean_dropout_before"
MEAN_DROPOUT_AFTER = "mean_dropout_after"
ABANDONED = "abandoned"


# ---------------------------------------------------------------------------------------------
# The simulated clock
# ---------------------------------------------------------------------------------------------


class SimulatedClock:
    """The resource model's clock: ``r_i(t)`` of the device, a simulated budget per mini-batch.

    Parameters
    ----------
    resources : ResourceModel or None
        Resource availability of all devices; ``None`` trains without limits (the full model,
        never a straggler).
    r_max : float, optional
        The device's upper availability bound (MACs/s), if it differs from the model's.
    """

    measured = False

    def __init__(self, resources: ResourceModel | None = None, r_max: float | None = None) -> None:
        if resources is not None and not isinstance(resources, ResourceModel):
            raise TypeError(f"resources must be a ResourceModel or None, got {type(resources).__name__}")
        self.resources = resources
        self.r_max = r_max

    def bind(self, trainer: "DeviceTrainer") -> None:
        """Called by the trainer that takes this clock (nothing to set up)."""

    def round_clock(self, device_id: int, server_round: int, config: Mapping[str, Scalar]) -> RoundClock | None:
        """The device's simulated clock for the round, or ``None`` when unlimited (no resource
        model, or ``unlimited`` in the train config)."""
        if self.resources is None or bool(config.get(C.UNLIMITED, False)):
            return None
        return self.resources.clock(device_id, server_round, self.r_max)

    def fit(self, trainer: "DeviceTrainer", arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Run the trainer's round on the simulated clock (its :meth:`simulated_fit`: planned
        on, or stepped through, :meth:`round_clock`)."""
        return trainer.simulated_fit(arrays, config)

    def __repr__(self) -> str:
        return f"SimulatedClock(resources={self.resources!r}, r_max={self.r_max!r})"


# ---------------------------------------------------------------------------------------------
# The measured clock
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One mini-batch of a measured round (times in seconds from the round's start).

    Attributes
    ----------
    start, end : float
        When the step started (before ``set_dropout``) and ended (after the optimiser step; for
        an abandoned step, after the backward pass).
    batch_size : int
        Samples of the mini-batch.
    index : int
        LUT row (-1: the full model or the baseline's fixed (sub)model).
    rate : float
        Mean dropout rate of the step's vector.
    forward_macs : int
        Forward MACs per sample of the step's (sub)model.
    cost : float
        Full-model-equivalent MACs of the step (what the estimator was fed).
    predicted : float
        Predicted seconds (NaN when nothing was predicted).
    budget : float
        The step's time budget (NaN when none).
    throughput : float
        The estimate after the step (NaN when the step was abandoned).
    completed : bool
        False for a step abandoned at the deadline.
    """

    start: float
    end: float
    batch_size: int
    index: int
    rate: float
    forward_macs: int
    cost: float
    predicted: float
    budget: float
    throughput: float
    completed: bool = True


@dataclass
class Pick:
    """What a trainer trains on the next mini-batch under the measured clock (its
    ``measured_choice``): the vector (``None``: the full model or the fixed subsets), the LUT
    row (-1: none), the mean dropout rate, the forward MACs per sample, the step time relative
    to the full model's, and the prediction and budget it was picked with."""

    vector: Any
    index: int
    rate: float
    forward_macs: int
    rel_time: float
    predicted: float = math.nan
    budget: float = math.nan


def wall_metrics(steps: Sequence[Any], window: float, wall: float, estimator: ThroughputEstimator) -> dict[str, float]:
    """The wall-clock round's own metrics, from its finished steps (``start``/``end`` in seconds
    of the round): ``wall_time``, ``round_deadline``, ``overrun``, ``busy_fraction`` (the share
    of the window spent in steps) and ``throughput``."""
    busy = sum(max(0.0, min(s.end, window) - s.start) for s in steps)
    return {
        WALL_TIME: float(wall),
        ROUND_DEADLINE_METRIC: float(window),
        OVERRUN: float(max(0.0, wall - window)),
        BUSY_FRACTION: float(busy / window) if window > 0 else 0.0,
        THROUGHPUT: float(estimator.throughput or 0.0),
    }


def available_macs(records: Sequence[StepRecord], window: float, est0: float | None) -> float:
    """Full-model-equivalent MACs a device had in ``[0, window]`` (round time): a completed
    step's own measured work, the running estimate (after each step; ``est0`` before the
    first) elsewhere."""
    done = [r for r in records if r.completed]
    est = est0 if est0 is not None else (done[0].throughput if done else 0.0)
    total, cursor = 0.0, 0.0

    def overlap(a: float, b: float) -> float:
        return max(0.0, min(b, window) - max(a, 0.0))

    for r in done:
        total += est * overlap(cursor, r.start)
        dur = r.end - r.start
        total += r.cost * (overlap(r.start, r.end) / dur if dur > 0 else 1.0)
        est, cursor = r.throughput, r.end
    total += est * overlap(cursor, window)
    return total


class MeasuredClock:
    """The wall clock: a real deadline, the measured throughput and the step-time table.

    Parameters
    ----------
    time_table : StepTimeTable or {"measure", "proportional"} (default: "measure")
        The device's step times per LUT vector; ``"measure"`` calibrates at the first round
        that needs it (or loads ``table_path``), ``"proportional"`` assumes time proportional
        to MACs.
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

    Attributes
    ----------
    step_log : list of StepRecord
        The last round's steps.
    round_start : float
        When the last round started, on ``clock``'s scale.

    Raises
    ------
    WallclockError
        For a negative or non-finite margin or an unknown ``time_table`` mode.
    """

    measured = True

    def __init__(
        self,
        time_table: StepTimeTable | Literal["measure", "proportional"] | None = "measure",
        *,
        table_path: str | Path | None = None,
        estimator: ThroughputEstimator | None = None,
        margin: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        unix_clock: Callable[[], float] = time.time,
    ) -> None:
        if not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
            raise WallclockError(f"margin must be a finite number >= 0, got {margin!r}")
        if isinstance(time_table, str) and time_table not in ("measure", "proportional"):
            raise WallclockError(f"time_table must be a StepTimeTable, 'measure' or 'proportional', got {time_table!r}")
        self.time_table: StepTimeTable | None = time_table if isinstance(time_table, StepTimeTable) else None
        self.table_mode = "given" if self.time_table is not None else (time_table or "measure")
        self.table_path = None if table_path is None else Path(table_path)
        self.estimator = estimator if estimator is not None else ThroughputEstimator()
        self.margin = float(margin)
        self.clock = clock
        self.unix_clock = unix_clock
        self.gaps: deque[float] = deque(maxlen=7)  # seconds between steps, the last 7
        self.torch_device: str | torch.device = "cpu"
        self.step_macs_factor = 3.0
        self.full_macs = 0
        self.step_log: list[StepRecord] = []
        self.round_start = math.nan
        self.server_round = 1
        self._change_steps: list[int] = []
        self._round_changes = 0

    def bind(self, trainer: "DeviceTrainer") -> None:
        """Take the trainer's model, torch device and step cost (called by the trainer that
        takes this clock); primes the estimator from a given table."""
        self.attach(trainer.model, trainer.torch_device, trainer.step_macs_factor)

    def attach(self, model: DropoutModel, torch_device: str | torch.device, step_macs_factor: float) -> None:
        """Set the model (its full MACs), where it trains (the clock synchronises CUDA before
        reading) and the step cost relative to the forward pass; primes the estimator from a
        given table."""
        self.torch_device = torch_device
        self.step_macs_factor = float(step_macs_factor)
        self.full_macs = int(count_macs(model))
        if self.time_table is not None:
            self.prime_estimator()

    # -- time and deadline ---------------------------------------------------------------------
    def now(self) -> float:
        """The clock's time in seconds, after the device's queued work (CUDA) is done."""
        _sync(self.torch_device)
        return float(self.clock())

    def overhead(self) -> float:
        """Median seconds between the recent steps (data loading, selection)."""
        return float(statistics.median(self.gaps)) if self.gaps else 0.0

    def round_deadline(self, config: Mapping[str, Scalar], start: float, device_id: int = -1) -> float:
        """The deadline on :attr:`clock`'s scale for a round starting at ``start``.

        ``round-deadline`` (seconds from ``start``) and/or ``round-deadline-at`` (unix time); the
        earlier applies. With ``unlimited``: ``inf``.

        Raises
        ------
        WallclockError
            If neither key is given (and not unlimited), ``round-deadline`` is not a positive
            finite number, or ``round-deadline-at`` is not a finite number.
        """
        if bool(config.get(C.UNLIMITED, False)):
            return math.inf
        rel = config.get(C.ROUND_DEADLINE)
        at = config.get(ROUND_DEADLINE_AT)
        if rel is None and at is None:
            raise WallclockError(
                f"the wall-clock mode needs {C.ROUND_DEADLINE!r} (seconds) or {ROUND_DEADLINE_AT!r} "
                f"(unix time) in the train config; got keys {sorted(config)}"
            )
        deadline = math.inf
        if rel is not None:
            deadline = start + _finite(f"train config {C.ROUND_DEADLINE!r}", rel, positive=True)
        if at is not None:
            at_s = _finite(f"train config {ROUND_DEADLINE_AT!r}", at)
            deadline = min(deadline, start + (at_s - float(self.unix_clock())))
            if deadline <= start:
                log.warning("Device %s: %s %.3f is already past; training nothing", device_id, ROUND_DEADLINE_AT, at_s)
        return deadline

    # -- calibration ---------------------------------------------------------------------------
    def prime_estimator(self) -> None:
        """Start the estimator from the table's measured full-model throughput (if it has none)."""
        ref = self.time_table.reference_throughput(self.step_macs_factor) if self.time_table else None
        if ref is not None and self.estimator.throughput is None:
            self.estimator.reset(initial=ref)

    def calibrate(
        self,
        trainer: "DeviceTrainer",
        lut: LUT,
        *,
        repeats: int = 3,
        warmup: int = 1,
        max_points: int = 16,
        force: bool = False,
    ) -> StepTimeTable:
        """Measure (or load from ``table_path``) the step-time table of ``trainer``'s device for
        ``lut``, timing the trainer's own step (its recipe's
        :class:`~flwr_distreal.training.step.LocalStep`)."""
        batch = int(trainer.train_loader.batch_size or 1)
        if self.table_mode == "proportional" and not force:
            self.time_table = StepTimeTable.proportional(lut, self.full_macs, batch)
            return self.time_table
        precision = trainer.precision
        key = StepTimeTable.key(trainer.model, lut, batch, trainer.torch_device, precision)
        if self.table_path is not None and self.table_path.exists() and not force:
            try:
                cached = StepTimeTable.load(self.table_path)
            except WallclockError as err:
                log.warning("Ignoring step-time table: %s", err)
            else:
                if cached.matches(key):
                    self.time_table = cached
                    self.prime_estimator()
                    return cached
                log.info("Step-time table %s was measured for another setting; measuring anew", self.table_path)
        self.time_table = StepTimeTable.measure(
            trainer.model,
            lut,
            batch,
            make_optimizer=lambda model: trainer.local_step(self.server_round, model),
            repeats=repeats,
            warmup=warmup,
            max_points=max_points,
            torch_device=trainer.torch_device,
            clock=self.clock,
            precision=precision,
        )
        if self.table_path is not None:
            self.time_table.save(self.table_path)
        self.estimator.reset(initial=self.time_table.reference_throughput(self.step_macs_factor))
        return self.time_table

    # -- the selection rule ----------------------------------------------------------------------
    def pick(
        self,
        now: float,
        deadline: float,
        sizes_left: Sequence[int],
        *,
        policy: str,
        round_time: float,
        round_samples: int | None,
        stop_at_deadline: bool,
    ) -> Choice | None:
        """The LUT row of the next mini-batch, or ``None`` to stop (the wall clock's Algorithm 1).

        Without a throughput estimate yet, the fastest row probes the device (if there is time
        at all). Else :func:`~flwr_distreal.training.steptimes.choose_vector` against the time
        left, with the recent overhead between steps and the margin; when it says stop and
        ``stop_at_deadline`` is off, the fastest row (the device goes on as a straggler).

        Parameters
        ----------
        now, deadline : float
            The clock's time and the round's deadline (seconds, :attr:`clock`'s scale).
        sizes_left : sequence of int
            Sizes of the mini-batches left, this one first.
        policy : {"deadline", "paper"}
            Budget rule.
        round_time : float
            The round's duration (seconds), for ``"paper"``.
        round_samples : int or None
            The round's samples, for ``"paper"``.
        stop_at_deadline : bool
            Stop rather than overrun.
        """
        table = self.time_table
        assert table is not None, "pick() needs a step-time table (calibrate first)"
        est = self.estimator.throughput
        if est is None:  # no estimate yet: probe with the fastest vector, if there is time at all
            if now >= deadline:
                return None
            return Choice(table.fastest, math.nan, math.nan)
        c = choose_vector(
            table, est, deadline - now, sizes_left,
            step_macs_factor=self.step_macs_factor, overhead=self.overhead(), margin=self.margin,
            policy=policy, round_time=round_time, round_samples=round_samples,
        )
        if c.index is None:
            if stop_at_deadline:
                return None
            return Choice(table.fastest, c.predicted, c.budget)
        return c

    # -- a trainer's round -----------------------------------------------------------------------
    def fit(self, trainer: "DeviceTrainer", arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Run ``trainer``'s round against the wall clock.

        Loads the arrays, seeds the round, sets the model up (:meth:`prepare`), then trains
        mini-batch after mini-batch, each with the (sub)model ``trainer.measured_choice``
        picks, until the plan is done or the choice says stop; a step whose backward pass ends
        after the deadline is abandoned when the trainer stops at the deadline.

        Raises
        ------
        WallclockError
            For a missing or invalid deadline.
        """
        start = self.now()
        self.round_start = start
        deadline = self.round_deadline(config, start, trainer.device_id)
        trainer.load(arrays)
        self.server_round = int(config.get(C.SERVER_ROUND, 1))
        trainer.reseed(self.server_round)
        self._change_steps = []
        self._round_changes = 0
        try:
            trainer.prepare(config)
            choose, stop = trainer.measured_choice(self, start, deadline)
            records, vectors, end, losses, abandoned, est0 = self._run_round(trainer, start, deadline, choose, stop)
            done = [r for r in records if r.completed]
            steps_total = len(done) if stop else len(trainer.sizes)
            out = self._result(trainer, records, start, end, deadline, losses, abandoned, est0, steps_total, vectors)
            out.metrics[C.STRAGGLER] = bool((not stop) and end > deadline)
        finally:
            trainer.model.set_fixed_subsets(None)
        return out

    def _run_round(
        self,
        trainer: "DeviceTrainer",
        start: float,
        deadline: float,
        choose: Callable[[int, float, Sequence[int]], Pick | None],
        stop_at_deadline: bool,
    ) -> tuple[list[StepRecord], list[Any], float, list[float], bool, float | None]:
        """Train mini-batch after mini-batch until done or stopped.

        Returns the records, the vectors of the completed steps, the end time, the losses,
        whether a step was abandoned and the estimate at the round's start.
        """
        model = trainer.model
        model.train()
        opt = trainer.local_step(self.server_round, model)  # the round's LocalStep: lr from the schedule, clipping
        sizes: list[int] = trainer.sizes
        est0 = self.estimator.throughput
        changes0 = self.estimator.changes
        records: list[StepRecord] = []
        vectors: list[Any] = []
        losses: list[float] = []
        abandoned = False
        prev_end: float | None = None
        batches = trainer._batches()
        dev = trainer.torch_device
        factor = self.step_macs_factor
        for j, bs in enumerate(sizes):
            x, y = next(batches)
            x, y = x.to(dev), y.to(dev)
            pick = choose(j, self.now(), sizes[j:])
            if pick is None:
                break
            t_start = self.now()
            if prev_end is not None:
                self.gaps.append(max(0.0, t_start - prev_end))
            loss = trainer.forward_backward(opt, x, y, pick.vector)
            t_fb = self.now()
            cost = pick.rel_time * step_macs(self.full_macs, int(bs), factor)
            if stop_at_deadline and t_fb > deadline:
                opt.zero_grad()
                abandoned = True
                records.append(
                    StepRecord(t_start - start, t_fb - start, int(bs), pick.index, pick.rate, pick.forward_macs,
                               cost, pick.predicted, pick.budget, math.nan, completed=False)
                )
                log.info("Device %s: step %s ended %.3f s after the deadline; abandoned",
                         trainer.device_id, j, t_fb - deadline)
                prev_end = t_fb
                break
            if not math.isfinite(float(loss)):
                opt.zero_grad()
                losses.append(math.nan)
                log.warning("Device %s: the loss of step %s is %s; training stops here",
                            trainer.device_id, j, float(loss))
                prev_end = t_fb
                break
            opt.step()  # clip (recipe.clip_norm) and update
            t_end = self.now()
            rate = self.estimator.update(t_end - t_start, cost)
            losses.append(float(loss))
            records.append(
                StepRecord(t_start - start, t_end - start, int(bs), pick.index, pick.rate, pick.forward_macs,
                           cost, pick.predicted, pick.budget, rate)
            )
            vectors.append(pick.vector)
            if self.estimator.change_detected:
                self._change_steps.append(max(0, len(records) - self.estimator.change_steps))
            prev_end = t_end
        model.set_dropout(None)
        end = prev_end if prev_end is not None else self.now()
        self._round_changes = self.estimator.changes - changes0
        return records, vectors, end, losses, abandoned, est0

    def _result(
        self,
        trainer: "DeviceTrainer",
        records: list[StepRecord],
        start: float,
        end: float,
        deadline: float,
        losses: list[float],
        abandoned: bool,
        est0: float | None,
        steps_total: int,
        vectors: list[Any],
    ) -> TrainResult:
        done = [r for r in records if r.completed]
        wall = end - start
        window = (deadline - start) if math.isfinite(deadline) else wall
        factor = self.step_macs_factor
        spent = [step_macs(r.forward_macs, r.batch_size, factor) for r in done]
        if math.isfinite(deadline):
            available = available_macs(records, window, est0)
        else:  # unlimited: what it spent is what it had (as the simulated mode)
            available = float(sum(r.cost for r in done))
        result = RoundResult(
            start=0.0,
            deadline=window,
            finish_time=wall,
            steps_done=len(done),
            steps_total=steps_total,
            spent_macs=float(sum(spent)),
            available_macs=float(available),
            step_macs=tuple(spent),
        )
        sizes = [r.batch_size for r in done]
        plan = RoundPlan(vectors, [r.forward_macs for r in done], result, sizes, planned_batches=len(trainer.sizes))
        loss = float(np.mean(losses)) if losses else float("nan")
        metrics = trainer.metrics(plan, loss)
        metrics[C.LR] = trainer.recipe.lr_at(self.server_round)
        metrics.pop(C.SIM_TIME, None)
        change_idx = self._change_steps[-1] if self._change_steps else None
        rates = [r.rate for r in done]
        if change_idx is not None and 0 <= change_idx <= len(done):
            before, after = rates[:change_idx], rates[change_idx:]
            change_at = done[change_idx].start if change_idx < len(done) else wall
        else:
            before = after = rates
            change_at = -1.0
        mean = float(np.mean(rates)) if rates else 0.0
        metrics.update(wall_metrics(done, window, wall, self.estimator))
        metrics.update(
            {
                THROUGHPUT_CHANGES: int(self._round_changes),
                CHANGE_AT: float(change_at),
                MEAN_DROPOUT_BEFORE: float(np.mean(before)) if before else mean,
                MEAN_DROPOUT_AFTER: float(np.mean(after)) if after else mean,
                ABANDONED: int(abandoned),
            }
        )
        self.step_log = records
        return TrainResult(get_weights(trainer.model), int(sum(sizes)), metrics)

    def __call__(self) -> float:
        """The clock's raw reading in seconds (no synchronisation)."""
        return float(self.clock())

    def __repr__(self) -> str:
        table = "given" if self.table_mode == "given" else self.table_mode
        return f"MeasuredClock(time_table={table!r}, margin={self.margin}, estimator={self.estimator!r})"
