"""The wall-clock resource mode (``resources=measured``): DISTREAL against a real deadline.

On a real device the availability r(t) of the simulated mode (:mod:`flwr_distreal.core.resources`)
is unknown. A device in this mode measures the wall time of its own training steps, estimates
its current throughput from them and, before every mini-batch, budgets the time left until a
real-seconds deadline over the mini-batches left (Algorithm 1 of Rapp et al., AAAI 2022, with
the ``"deadline"`` policy of :mod:`flwr_distreal.training.schedule`, in real time). No Flower or Hydra
imports.

Pieces
------
:class:`ThroughputEstimator`
    Current throughput (MACs per second) from recent ``(seconds, MACs)`` step measurements:
    the median of a short window (robust to noise and to one-off spikes such as the first use
    of a new kernel shape) with change detection (a run of consecutive steps that all disagree
    with the estimate in the same direction by more than a threshold replaces the window), so
    a real change is followed within ``change_steps`` steps.
:class:`StepTimeTable`
    The per-device calibration: the step time of every LUT vector relative to the full model's
    step (``rel_time``, the full model is 1), measured once per device.
:func:`choose_vector`
    The selection rule: the LUT vector with the most MACs whose predicted step time fits the
    step's time budget, or ``None`` (stop) when not even the fastest one would end before the
    deadline.
:class:`MeasuredDistrealTrainer`, :class:`MeasuredBaselineTrainer`
    The trainers of :mod:`flwr_distreal.training.trainers` on the wall clock.

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

import copy
import dataclasses
import json
import logging
import math
import numbers
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core import contract as C
from ..core.dropout import DroppableModel, DropoutModel
from ..core.lut import LUT
from ..core.macs import count_macs, macs_of_counts
from .recipe import Recipe
from ..core.resources import RoundResult, step_macs
from .schedule import POLICIES, RoundPlan
from .trainers import BaselineTrainer, DistrealTrainer, LocalStep, NDArrays, Scalar, TrainResult, get_weights
from .trainers import forward_backward as _forward_backward
from .loop import BatchStep, _Choice, _config_round, _positive, _Round

__all__ = [
    "ROUND_DEADLINE_AT",
    "Choice",
    "MeasuredBaselineTrainer",
    "MeasuredDistrealTrainer",
    "StepRecord",
    "StepTimeTable",
    "ThroughputEstimator",
    "WallclockError",
    "choose_vector",
]

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

TABLE_FORMAT = "flwr-distreal-step-times"
TABLE_VERSION = 1


class WallclockError(ValueError):
    """Invalid input to the wall-clock mode: a deadline, a step time, a table."""


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float, refusing bools, non-numbers, NaN, infinities (and <= 0 if asked)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise WallclockError(f"{name} must be a number, got {value!r}")
    val = float(value)
    if not math.isfinite(val):
        raise WallclockError(f"{name} must be finite, got {val}")
    if positive and val <= 0:
        raise WallclockError(f"{name} must be > 0, got {val}")
    return val


# ---------------------------------------------------------------------------------------------
# Throughput estimation
# ---------------------------------------------------------------------------------------------


class ThroughputEstimator:
    """Running estimate of a device's throughput (MACs per second) from its step times.

    Each completed training step gives one sample ``macs / seconds``. The estimate is the
    median of the last ``window`` accepted samples: a single slow step (a page fault, the first
    use of a kernel shape, a burst of another process) moves it little. A sample whose ratio to
    the estimate is beyond ``1 + change_threshold`` (either way, in log scale) is held back as a
    possible outlier; when ``change_steps`` consecutive samples all deviate in the same
    direction, the device's speed has really changed and the window is replaced by them, so the
    estimate follows a change after ``change_steps`` steps instead of after half a window
    of mixed old and new samples. A deviating run broken by an agreeing sample is discarded.

    Defaults: ``window=7`` (about the noise of consecutive femnist_cnn steps on a shared CPU,
    +-20 %, averages out), ``change_threshold=0.3`` (above that noise, well below a halving,
    a 50 % drop is a log-ratio of 0.69 vs. 0.26), ``change_steps=3`` (two coincident outliers
    are common, three in a row in the same direction are not).

    Parameters
    ----------
    window : int (default: 7)
        Samples the median is taken over (>= 1).
    change_threshold : float (default: 0.3)
        Relative deviation from the estimate that marks a sample as disagreeing (> 0).
    change_steps : int (default: 3)
        Consecutive disagreeing samples, same direction, that confirm a change (>= 1, <= window).
    initial : float, optional
        A prior throughput (e.g. from the calibration), counted as one sample.

    Raises
    ------
    WallclockError
        For parameters outside these ranges.
    """

    def __init__(
        self,
        window: int = 7,
        change_threshold: float = 0.3,
        change_steps: int = 3,
        initial: float | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise WallclockError(f"window must be an int >= 1, got {window!r}")
        if isinstance(change_steps, bool) or not isinstance(change_steps, (int, np.integer)):
            raise WallclockError(f"change_steps must be an int, got {change_steps!r}")
        if not 1 <= change_steps <= window:
            raise WallclockError(f"change_steps must be in [1, window={window}], got {change_steps}")
        self.window = int(window)
        self.change_threshold = _finite("change_threshold", change_threshold, positive=True)
        self.change_steps = int(change_steps)
        self._log_threshold = math.log1p(self.change_threshold)
        self._samples: deque[float] = deque(maxlen=self.window)
        self._run: list[float] = []
        self._run_sign = 0
        self.updates = 0
        self.changes = 0
        self.change_detected = False
        self._estimate: float | None = None
        if initial is not None:
            self._samples.append(_finite("initial throughput", initial, positive=True))
            self._refresh()

    def _refresh(self) -> None:
        # statistics.median on <= window floats: ~1 us, np.median: ~20 us (called every step)
        self._estimate = float(statistics.median(self._samples)) if self._samples else None

    @property
    def throughput(self) -> float | None:
        """Current estimate in MACs per second (``None`` before any sample or prior)."""
        return self._estimate

    def update(self, seconds: float, macs: float) -> float:
        """Feed one completed step.

        Parameters
        ----------
        seconds : float
            The step's wall time (finite, > 0).
        macs : float
            The step's cost (finite, > 0), e.g. ``step_macs(forward_macs, batch, factor)`` or,
            in the trainers, the full-model-equivalent cost of the step.

        Returns
        -------
        float
            The new estimate. ``change_detected`` tells whether this sample confirmed a change.

        Raises
        ------
        WallclockError
            If ``seconds`` or ``macs`` is NaN, infinite, not a number or not positive.
        """
        sec = _finite("step time (seconds)", seconds, positive=True)
        cost = _finite("step cost (MACs)", macs, positive=True)
        sample = cost / sec
        self.updates += 1
        self.change_detected = False
        estimate = self._estimate
        if estimate is None:
            self._samples.append(sample)
            self._refresh()
            return sample
        deviation = math.log(sample / estimate)
        if abs(deviation) <= self._log_threshold:
            self._run.clear()
            self._samples.append(sample)
            self._refresh()
        else:
            sign = 1 if deviation > 0 else -1
            if sign != self._run_sign:
                self._run.clear()
            self._run_sign = sign
            self._run.append(sample)
            if len(self._run) >= self.change_steps:
                self._samples.clear()
                self._samples.extend(self._run)
                self._run.clear()
                self._refresh()
                self.changes += 1
                self.change_detected = True
        return float(self._estimate)  # type: ignore[arg-type]

    def reset(self, initial: float | None = None) -> None:
        """Forget all samples (and counters), optionally keeping a prior."""
        self._samples.clear()
        self._run.clear()
        self._run_sign = 0
        self.updates = self.changes = 0
        self.change_detected = False
        if initial is not None:
            self._samples.append(_finite("initial throughput", initial, positive=True))
        self._refresh()

    def __repr__(self) -> str:
        return (
            f"ThroughputEstimator(window={self.window}, change_threshold={self.change_threshold}, "
            f"change_steps={self.change_steps}, throughput={self.throughput})"
        )


# ---------------------------------------------------------------------------------------------
# Calibration: per-vector step times
# ---------------------------------------------------------------------------------------------


def _sgd(
    model: DropoutModel, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, precision: str = "fp32"
) -> LocalStep:
    """Default calibration step: plain SGD (the trainers pass their own recipe's step)."""
    return LocalStep(model, Recipe.constant(lr, momentum, weight_decay), precision=precision)


def _sync(torch_device: str | torch.device) -> None:
    if torch.device(torch_device).type == "cuda":
        torch.cuda.synchronize(torch_device)


@dataclass(frozen=True)
class StepTimeTable:
    """Per-device step times of a LUT's vectors, relative to the full model's step.

    Attributes
    ----------
    macs : tuple of int
        Forward MACs per sample of each LUT row (the LUT's order, ascending).
    rel_time : tuple of float
        Step time of each row over the full model's step time on the same batch (full = 1);
        never below the row's MAC fraction ``macs / full_macs``.
    full_macs : int
        Forward MACs per sample of the full model.
    batch_size : int
        Mini-batch size of the calibration (predictions scale step time with the batch size).
    full_step_seconds : float
        Median full-model step time at ``batch_size`` during the calibration (NaN for a
        :meth:`proportional` table, which measured nothing).
    measured : tuple of bool
        Which rows were measured (the others are interpolated in MACs).
    meta : dict
        What the table is valid for (model, LUT, batch size, threads, device, torch, host)
        and how it was measured.
    """

    macs: tuple[int, ...]
    rel_time: tuple[float, ...]
    full_macs: int
    batch_size: int
    full_step_seconds: float = math.nan
    measured: tuple[bool, ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.macs) == 0 or len(self.macs) != len(self.rel_time):
            raise WallclockError(
                f"step-time table needs one rel_time per LUT row, got {len(self.macs)} MACs "
                f"and {len(self.rel_time)} times"
            )
        if self.full_macs <= 0 or self.batch_size < 1:
            raise WallclockError(f"need full_macs > 0 and batch_size >= 1, got {self.full_macs}, {self.batch_size}")
        for i, r in enumerate(self.rel_time):
            if not (math.isfinite(r) and r > 0):
                raise WallclockError(f"rel_time of row {i} must be finite and > 0, got {r}")
        if any(b - a < 0 for a, b in zip(self.macs, self.macs[1:])):
            raise WallclockError("step-time table MACs must be ascending (the LUT's order)")
        object.__setattr__(self, "_rel", np.asarray(self.rel_time, dtype=np.float64))
        object.__setattr__(self, "_fastest", int(np.argmin(self._rel)))

    @property
    def fastest(self) -> int:
        """Row with the shortest step time."""
        return self._fastest  # type: ignore[attr-defined]

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def key(model: DropoutModel, lut: LUT, batch_size: int, torch_device: str = "cpu", precision: str = "fp32") -> dict:
        """What a table is valid for: model, LUT, batch size, threads, device, torch, host, and the
        precision and memory layout of the step (both change relative step times)."""
        from .layout import model_layout

        return {
            "model": model.model_name,
            "widths": [int(w) for w in model.layer_widths],
            "lut_macs": [int(m) for m in lut.macs],
            "batch_size": int(batch_size),
            "threads": int(torch.get_num_threads()),
            "device": str(torch_device),
            "torch": torch.__version__,
            "host": platform.node(),
            "precision": str(precision),
            "layout": model_layout(model),
        }

    @classmethod
    def proportional(cls, lut: LUT, full_macs: int, batch_size: int) -> "StepTimeTable":
        """Step time proportional to MACs (``rel_time = macs / full_macs``): no measurement.

        Right for the simulated mode's cost model and for tests; on a CPU the measured table
        is better (see the module docstring).
        """
        full = int(full_macs)
        return cls(
            macs=tuple(int(m) for m in lut.macs),
            rel_time=tuple(max(int(m), 1) / full for m in lut.macs),
            full_macs=full,
            batch_size=int(batch_size),
            measured=tuple(False for _ in lut.macs),
            meta={"kind": "proportional"},
        )

    @classmethod
    def measure(
        cls,
        model: DropoutModel,
        lut: LUT,
        batch_size: int,
        *,
        make_optimizer: Callable[[DropoutModel], Any] | None = None,
        repeats: int = 3,
        warmup: int = 1,
        max_points: int = 16,
        torch_device: str = "cpu",
        clock: Callable[[], float] = time.perf_counter,
        seed: int = 0,
        precision: str = "fp32",
    ) -> "StepTimeTable":
        """Measure the step time of the full model and of the LUT's vectors.

        Trains on a deep copy of ``model`` (the model itself, its weights, statistics and
        random generators are untouched) with random inputs of the model's shape. Every point
        first runs ``warmup`` steps (kernels for its shapes get compiled), then ``repeats``
        rounds visit all points in turn, rotated each round; the median of a point's times
        over the full model's is its ``rel_time``.

        Parameters
        ----------
        model : DropoutModel
            The device's model.
        lut : LUT
            Its lookup table.
        batch_size : int
            The round's mini-batch size.
        make_optimizer : callable, optional
            ``model -> step`` as the trainer builds it (its recipe's
            :class:`~flwr_distreal.training.trainers.LocalStep`, clipping included; default plain SGD).
        repeats : int (default: 3)
            Timed steps per point.
        warmup : int (default: 1)
            Untimed steps per point before timing.
        max_points : int (default: 16)
            LUT rows measured at most (evenly spread over the rows, both ends included); the
            others are interpolated linearly in MACs.
        torch_device : str (default: "cpu")
            Where to train.
        clock : callable (default: time.perf_counter)
            Monotonic clock in seconds.
        seed : int (default: 0)
            Seed of the random inputs and dropped filters of the copy.
        precision : str (default: "fp32")
            The precision of the steps (:mod:`flwr_distreal.core.precision`): the default optimiser's,
            and part of the table's key; ``make_optimizer``'s step carries its own.

        Returns
        -------
        StepTimeTable
        """
        if repeats < 1 or warmup < 0 or max_points < 2:
            raise WallclockError(
                f"need repeats >= 1, warmup >= 0, max_points >= 2; got {repeats}, {warmup}, {max_points}"
            )
        if batch_size < 1:
            raise WallclockError(f"batch_size must be >= 1, got {batch_size}")
        started = clock()
        # The generators are not copied: the copy gets its own.
        saved = [m.generator for m in model.dropout_layers]
        for m in model.dropout_layers:
            m.generator = None
        try:
            work = copy.deepcopy(model)
        finally:
            for m, g in zip(model.dropout_layers, saved):
                m.generator = g
        work.set_fixed_subsets(None)
        work.seed_dropout(seed)
        work.train()
        opt = make_optimizer(work) if make_optimizer is not None else _sgd(work, precision=precision)
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand((int(batch_size), *work.input_shape), generator=gen).to(torch_device)
        y = torch.randint(0, work.num_classes, (int(batch_size),), generator=gen).to(torch_device)
        n = len(lut)
        rows = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, max_points))})
        points: list[Any] = [None] + [lut.vectors[i] for i in rows]  # None: the full model

        def step(vector: Any) -> float:
            _sync(torch_device)
            t = clock()
            _forward_backward(work, opt, x, y, vector)
            opt.step()
            _sync(torch_device)
            return clock() - t

        for vector in points:
            for _ in range(warmup):
                step(vector)
        times: list[list[float]] = [[] for _ in points]
        for r in range(repeats):
            shift = r % len(points)
            for k in list(range(shift, len(points))) + list(range(shift)):
                times[k].append(step(points[k]))
        medians = [float(np.median(t)) for t in times]
        full_s = medians[0]
        if not (math.isfinite(full_s) and full_s > 0):
            raise WallclockError(f"calibration measured a full-model step time of {full_s} s; is the clock monotonic?")
        lut_macs = np.asarray(lut.macs, dtype=np.float64)
        full_macs = int(count_macs(work))
        rel = np.interp(lut_macs, lut_macs[rows], np.asarray(medians[1:]) / full_s)
        for k, i in enumerate(rows):
            rel[i] = medians[k + 1] / full_s
        rel = np.maximum(rel, np.maximum(lut_macs, 1.0) / full_macs)
        meta = {
            "kind": "measured",
            **cls.key(model, lut, batch_size, torch_device, precision),
            "repeats": int(repeats),
            "warmup": int(warmup),
            "seconds": float(clock() - started),
            "measured_at": time.time(),
        }
        measured = set(rows)
        table = cls(
            macs=tuple(int(m) for m in lut.macs),
            rel_time=tuple(float(r) for r in rel),
            full_macs=full_macs,
            batch_size=int(batch_size),
            full_step_seconds=full_s,
            measured=tuple(i in measured for i in range(n)),
            meta=meta,
        )
        log.info(
            "Calibrated step times of %s LUT vectors in %.2f s: full model %.1f ms at batch %s, rel_time %.2f..%.2f",
            len(rows), meta["seconds"], full_s * 1e3, batch_size, min(table.rel_time), max(table.rel_time),
        )
        return table

    # -- use ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.macs)

    def rel_time_of_macs(self, forward_macs: float) -> float:
        """``rel_time`` of a (sub)model that is not a LUT row (a baseline's fixed submodel):
        1 for the full model, else interpolated in MACs (at least the MAC fraction)."""
        m = float(forward_macs)
        if m >= self.full_macs:
            return 1.0
        xs = np.asarray(self.macs + (self.full_macs,), dtype=np.float64)
        ys = np.asarray(self.rel_time + (1.0,), dtype=np.float64)
        return float(max(np.interp(m, xs, ys), max(m, 1.0) / self.full_macs))

    def full_step_macs(self, batch_size: int, step_macs_factor: float = 3.0) -> float:
        """MACs of a full-model training step on ``batch_size`` samples."""
        return step_macs(self.full_macs, int(batch_size), step_macs_factor)

    def reference_throughput(self, step_macs_factor: float = 3.0) -> float | None:
        """Full-model MACs per second measured by the calibration (``None`` if not measured)."""
        if not math.isfinite(self.full_step_seconds):
            return None
        return self.full_step_macs(self.batch_size, step_macs_factor) / self.full_step_seconds

    def matches(self, key: Mapping[str, Any]) -> bool:
        """Whether the table was measured for ``key`` (see :meth:`key`)."""
        return all(self.meta.get(k) == v for k, v in key.items())

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the table as JSON."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "macs": list(self.macs),
            "rel_time": list(self.rel_time),
            "full_macs": self.full_macs,
            "batch_size": self.batch_size,
            "full_step_seconds": None if not math.isfinite(self.full_step_seconds) else self.full_step_seconds,
            "measured": list(self.measured),
            "meta": self.meta,
        }
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "StepTimeTable":
        """Read a table written by :meth:`save`.

        Raises
        ------
        WallclockError
            If the file is not such a table.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise WallclockError(f"cannot read step-time table {p}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
            raise WallclockError(f"{p} is not a {TABLE_FORMAT} v{TABLE_VERSION} file")
        try:
            fss = data.get("full_step_seconds")
            return cls(
                macs=tuple(int(m) for m in data["macs"]),
                rel_time=tuple(float(r) for r in data["rel_time"]),
                full_macs=int(data["full_macs"]),
                batch_size=int(data["batch_size"]),
                full_step_seconds=math.nan if fss is None else float(fss),
                measured=tuple(bool(b) for b in data.get("measured", [])),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise WallclockError(f"step-time table {p} is malformed: {err}") from err


# ---------------------------------------------------------------------------------------------
# Selection against a real-seconds deadline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_vector` decided for the next mini-batch.

    Attributes
    ----------
    index : int or None
        LUT row to train with; ``None``: stop (not even the fastest vector ends by the deadline).
    predicted : float
        Predicted seconds of the step (without the margin; of the fastest vector on a stop).
    budget : float
        The step's time budget in seconds.
    """

    index: int | None
    predicted: float
    budget: float


def choose_vector(
    table: StepTimeTable,
    throughput: float,
    time_left: float,
    sizes_left: Sequence[int],
    *,
    step_macs_factor: float = 3.0,
    overhead: float = 0.0,
    margin: float = 0.1,
    policy: str = "deadline",
    round_time: float | None = None,
    round_samples: int | None = None,
) -> Choice:
    """Pick the LUT vector for the next mini-batch against a real-seconds deadline.

    The predicted time of row v on a batch of ``b`` samples is
    ``rel_time[v] * step_macs(full, b) / throughput``. The step's budget is, for the
    ``"deadline"`` policy, ``(time_left - (n - 1) * overhead) * b / samples_left`` (time left
    times throughput times this batch's samples over the samples left, in seconds), for
    ``"paper"`` ``(round_time - N * overhead) * b / round_samples`` (the paper's ``r T / B``).
    The choice is the row with the most MACs whose padded prediction ``(1 + margin) * time``
    fits the budget; if none does, the fastest row; and ``None`` (stop) if even that padded
    prediction exceeds ``time_left``.

    Parameters
    ----------
    table : StepTimeTable
        The device's step times (one row per LUT vector).
    throughput : float
        Estimated throughput in full-model MACs per second (> 0).
    time_left : float
        Seconds until the deadline (may be <= 0: then stop; ``inf``: no deadline).
    sizes_left : sequence of int
        Sizes of the mini-batches left, this one first (non-empty).
    step_macs_factor : float (default: 3.0)
        Training-step cost relative to the forward pass.
    overhead : float (default: 0.0)
        Seconds spent between steps (data loading, selection), budgeted for each step left.
    margin : float (default: 0.1)
        Relative safety pad on predictions (>= 0).
    policy : {"deadline", "paper"} (default: "deadline")
        Budget rule.
    round_time, round_samples : float, int, optional
        Round duration and samples of the round; required for ``"paper"``.

    Returns
    -------
    Choice

    Raises
    ------
    WallclockError
        If the throughput is not a positive finite number, ``time_left`` is NaN, no batch is
        left, the margin or overhead is negative, or the policy is unknown.
    """
    rate = _finite("throughput", throughput, positive=True)
    tl = float(time_left)
    if math.isnan(tl):
        raise WallclockError("time_left is NaN")
    if len(sizes_left) == 0:
        raise WallclockError("sizes_left is empty: no mini-batch left to choose for")
    if overhead < 0 or margin < 0 or not (math.isfinite(overhead) and math.isfinite(margin)):
        raise WallclockError(f"overhead and margin must be finite and >= 0, got {overhead}, {margin}")
    if policy not in POLICIES:
        raise WallclockError(f"unknown selection policy {policy!r}; valid: {list(POLICIES)}")
    b = int(sizes_left[0])
    full_s = table.full_step_macs(b, step_macs_factor) / rate
    pred = table._rel * full_s  # type: ignore[attr-defined]
    padded = pred * (1.0 + margin)
    if policy == "deadline":
        budget = (tl - (len(sizes_left) - 1) * overhead) * b / float(sum(sizes_left))
    else:
        if round_time is None or round_samples is None or round_samples <= 0:
            raise WallclockError("policy 'paper' needs round_time and round_samples > 0")
        steps = max(1, math.ceil(round_samples / b))
        budget = (float(round_time) - steps * overhead) * b / float(round_samples)
    fits = np.flatnonzero(padded <= budget)
    index = int(fits[-1]) if fits.size else table.fastest  # rows ascend in MACs
    if padded[index] > tl:
        return Choice(None, float(pred[table.fastest]), float(budget))
    return Choice(index, float(pred[index]), float(budget))


# ---------------------------------------------------------------------------------------------
# Trainers
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
class _Pick:
    vector: Any
    index: int
    rate: float
    forward_macs: int
    rel_time: float
    predicted: float = math.nan
    budget: float = math.nan


class _MeasuredMixin:
    """Shared wall-clock machinery of the measured trainers (round window, timing, metrics)."""

    # set by _init_measured; the rest comes from DeviceTrainer
    model: DropoutModel
    lut: LUT

    def _init_measured(
        self,
        time_table: StepTimeTable | Literal["measure", "proportional"] | None,
        table_path: str | Path | None,
        estimator: ThroughputEstimator | None,
        margin: float,
        clock: Callable[[], float],
        unix_clock: Callable[[], float],
    ) -> None:
        if not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
            raise WallclockError(f"margin must be a finite number >= 0, got {margin!r}")
        if isinstance(time_table, str) and time_table not in ("measure", "proportional"):
            raise WallclockError(f"time_table must be a StepTimeTable, 'measure' or 'proportional', got {time_table!r}")
        self.time_table: StepTimeTable | None = time_table if isinstance(time_table, StepTimeTable) else None
        self._table_mode = "given" if self.time_table is not None else (time_table or "measure")
        self.table_path = None if table_path is None else Path(table_path)
        self.estimator = estimator if estimator is not None else ThroughputEstimator()
        self.margin = float(margin)
        self.clock = clock
        self.unix_clock = unix_clock
        self._gaps: deque[float] = deque(maxlen=7)
        self.full_macs = int(count_macs(self.model))
        self.step_log: list[StepRecord] = []
        self.round_start = math.nan
        if self.time_table is not None:
            self._prime_estimator()

    # -- clock and deadline --------------------------------------------------------------------
    def _now(self) -> float:
        _sync(self.torch_device)  # type: ignore[attr-defined]
        return float(self.clock())

    def round_deadline(self, config: Mapping[str, Scalar], start: float) -> float:
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
                log.warning(
                    "Device %s: %s %.3f is already past; training nothing",
                    self.device_id, ROUND_DEADLINE_AT, at_s,  # type: ignore[attr-defined]
                )
        return deadline

    # -- calibration ---------------------------------------------------------------------------
    def _prime_estimator(self) -> None:
        factor = self.step_macs_factor  # type: ignore[attr-defined]
        ref = self.time_table.reference_throughput(factor) if self.time_table else None
        if ref is not None and self.estimator.throughput is None:
            self.estimator.reset(initial=ref)

    def _make_optimizer(self, model: DropoutModel) -> LocalStep:
        """The recipe's step on ``model`` (the calibration times the step the rounds take)."""
        return self.local_step(getattr(self, "_server_round", 1), model)  # type: ignore[attr-defined]

    def _calibration_lut(self) -> LUT:  # pragma: no cover - subclasses
        raise NotImplementedError

    def calibrate(
        self, *, repeats: int = 3, warmup: int = 1, max_points: int = 16, force: bool = False
    ) -> StepTimeTable:
        """Measure (or load from ``table_path``) this device's step-time table.

        Called by the first :meth:`fit` when no table was given (its time then counts against
        that round's deadline); call it after construction to keep rounds free of it.
        """
        batch = int(self.train_loader.batch_size or 1)  # type: ignore[attr-defined]
        lut = self._calibration_lut()
        if self._table_mode == "proportional" and not force:
            self.time_table = StepTimeTable.proportional(lut, self.full_macs, batch)
            return self.time_table
        precision = self.precision  # type: ignore[attr-defined]
        key = StepTimeTable.key(self.model, lut, batch, self.torch_device, precision)  # type: ignore[attr-defined]
        if self.table_path is not None and self.table_path.exists() and not force:
            try:
                cached = StepTimeTable.load(self.table_path)
            except WallclockError as err:
                log.warning("Ignoring step-time table: %s", err)
            else:
                if cached.matches(key):
                    self.time_table = cached
                    self._prime_estimator()
                    return cached
                log.info("Step-time table %s was measured for another setting; measuring anew", self.table_path)
        self.time_table = StepTimeTable.measure(
            self.model,
            lut,
            batch,
            make_optimizer=self._make_optimizer,
            repeats=repeats,
            warmup=warmup,
            max_points=max_points,
            torch_device=self.torch_device,  # type: ignore[attr-defined]
            clock=self.clock,
            precision=precision,
        )
        if self.table_path is not None:
            self.time_table.save(self.table_path)
        factor = self.step_macs_factor  # type: ignore[attr-defined]
        self.estimator.reset(initial=self.time_table.reference_throughput(factor))
        return self.time_table

    # -- one step --------------------------------------------------------------------------------
    def forward_backward(self, opt: Any, x: torch.Tensor, y: torch.Tensor, vector: Any) -> torch.Tensor:
        """Set the step's dropout vector, run forward and backward (no optimiser step).

        The unit of work the wall clock measures, with the optimiser step after it; tests
        override it to advance a fake clock.
        """
        return _forward_backward(self.model, opt, x, y, vector)

    # -- the round -------------------------------------------------------------------------------
    def _run_round(
        self,
        start: float,
        deadline: float,
        choose: Callable[[int, float, Sequence[int]], _Pick | None],
        stop_at_deadline: bool,
    ) -> tuple[list[StepRecord], float, list[float], bool, float | None]:
        """Train mini-batch after mini-batch until done or stopped.

        Returns the records, the end time, the losses, whether a step was abandoned and the
        estimate at the round's start.
        """
        model = self.model
        model.train()
        opt = self._make_optimizer(model)  # the round's LocalStep: lr from the schedule, clipping
        sizes: list[int] = self.sizes  # type: ignore[attr-defined]
        est0 = self.estimator.throughput
        changes0 = self.estimator.changes
        records: list[StepRecord] = []
        losses: list[float] = []
        abandoned = False
        prev_end: float | None = None
        batches = self._batches()  # type: ignore[attr-defined]
        dev = self.torch_device  # type: ignore[attr-defined]
        factor = self.step_macs_factor  # type: ignore[attr-defined]
        for j, bs in enumerate(sizes):
            x, y = next(batches)
            x, y = x.to(dev), y.to(dev)
            pick = choose(j, self._now(), sizes[j:])
            if pick is None:
                break
            t_start = self._now()
            if prev_end is not None:
                self._gaps.append(max(0.0, t_start - prev_end))
            loss = self.forward_backward(opt, x, y, pick.vector)
            t_fb = self._now()
            cost = pick.rel_time * step_macs(self.full_macs, int(bs), factor)
            if stop_at_deadline and t_fb > deadline:
                opt.zero_grad()
                abandoned = True
                records.append(
                    StepRecord(t_start - start, t_fb - start, int(bs), pick.index, pick.rate, pick.forward_macs,
                               cost, pick.predicted, pick.budget, math.nan, completed=False)
                )
                log.info(
                    "Device %s: step %s ended %.3f s after the deadline; abandoned",
                    self.device_id, j, t_fb - deadline,  # type: ignore[attr-defined]
                )
                prev_end = t_fb
                break
            if not math.isfinite(float(loss)):
                opt.zero_grad()
                losses.append(math.nan)
                log.warning(
                    "Device %s: the loss of step %s is %s; training stops here",
                    self.device_id, j, float(loss),  # type: ignore[attr-defined]
                )
                prev_end = t_fb
                break
            opt.step()  # clip (recipe.clip_norm) and update
            t_end = self._now()
            rate = self.estimator.update(t_end - t_start, cost)
            losses.append(float(loss))
            records.append(
                StepRecord(t_start - start, t_end - start, int(bs), pick.index, pick.rate, pick.forward_macs,
                           cost, pick.predicted, pick.budget, rate)
            )
            if self.estimator.change_detected:
                self._change_steps.append(max(0, len(records) - self.estimator.change_steps))
            prev_end = t_end
        model.set_dropout(None)
        end = prev_end if prev_end is not None else self._now()
        self._round_changes = self.estimator.changes - changes0
        return records, end, losses, abandoned, est0

    def _overhead(self) -> float:
        return float(statistics.median(self._gaps)) if self._gaps else 0.0

    def _available(self, records: Sequence[StepRecord], window: float, est0: float | None) -> float:
        """Full-model-equivalent MACs the device had in ``[0, window]`` (round time): a completed
        step's own measured work, the running estimate elsewhere."""
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

    def _measured_result(
        self,
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
        factor = self.step_macs_factor  # type: ignore[attr-defined]
        spent = [step_macs(r.forward_macs, r.batch_size, factor) for r in done]
        if math.isfinite(deadline):
            available = self._available(records, window, est0)
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
        planned = len(self.sizes)  # type: ignore[attr-defined]
        plan = RoundPlan(vectors, [r.forward_macs for r in done], result, sizes, planned_batches=planned)
        loss = float(np.mean(losses)) if losses else float("nan")
        metrics = self.metrics(plan, loss)  # type: ignore[attr-defined]
        metrics[C.LR] = self.recipe.lr_at(self._server_round)  # type: ignore[attr-defined]
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
        metrics.update(_wall_metrics(done, window, wall, self.estimator))
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
        return TrainResult(get_weights(self.model), int(sum(sizes)), metrics)

    def _begin(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> tuple[float, float]:
        start = self._now()
        self.round_start = start
        deadline = self.round_deadline(config, start)
        self.load(arrays)  # type: ignore[attr-defined]
        self._server_round = int(config.get(C.SERVER_ROUND, 1))
        self.reseed(self._server_round)  # type: ignore[attr-defined]
        self._change_steps: list[int] = []
        self._round_changes = 0
        return start, deadline

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:
        """Not available: a measured device decides per mini-batch while training (see :meth:`fit`)."""
        raise WallclockError("a measured trainer cannot plan a round ahead; its fit() decides per mini-batch")


def _wall_metrics(steps: Sequence[Any], window: float, wall: float, estimator: "ThroughputEstimator") -> dict[str, float]:
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


class MeasuredDistrealTrainer(_MeasuredMixin, DistrealTrainer):
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
        (as :class:`~flwr_distreal.training.trainers.DeviceTrainer`); ``resources`` is not used.
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
        super().__init__(
            model, train_loader, device_id, lut, None, policy=policy, stop_at_deadline=stop_at_deadline, **kwargs
        )
        if isinstance(time_table, StepTimeTable) and tuple(time_table.macs) != tuple(int(m) for m in lut.macs):
            raise WallclockError("time_table was made for another LUT (its MACs differ)")
        self._init_measured(time_table, table_path, estimator, margin, clock, unix_clock)

    def _calibration_lut(self) -> LUT:
        return self.lut

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
        start, deadline = self._begin(arrays, config)
        unlimited = math.isinf(deadline)
        if not unlimited and self.time_table is None:
            self.calibrate()
        table = self.time_table
        sizes_total = int(sum(self.sizes))
        lut_rates = [float(np.mean(v)) for v in self.lut.vectors]

        def choose(j: int, now: float, left: Sequence[int]) -> _Pick | None:
            if unlimited:
                return _Pick(None, -1, 0.0, self.full_macs, 1.0)
            assert table is not None
            est = self.estimator.throughput
            if est is None:  # no prior: probe with the fastest vector, if there is time at all
                if now >= deadline:
                    return None
                i = table.fastest
                return _Pick(self.lut.vectors[i], i, lut_rates[i], int(table.macs[i]), table.rel_time[i])
            c = choose_vector(
                table, est, deadline - now, left,
                step_macs_factor=self.step_macs_factor, overhead=self._overhead(), margin=self.margin,
                policy=self.policy, round_time=deadline - start, round_samples=sizes_total,
            )
            if c.index is None:
                if self.stop_at_deadline:
                    return None
                i = table.fastest
            else:
                i = c.index
            return _Pick(
                self.lut.vectors[i], i, lut_rates[i], int(table.macs[i]), table.rel_time[i], c.predicted, c.budget
            )

        records, end, losses, abandoned, est0 = self._run_round(start, deadline, choose, self.stop_at_deadline)
        done = [r for r in records if r.completed]
        vectors = [None if r.index < 0 else self.lut.vectors[r.index] for r in done]
        steps_total = len(done) if self.stop_at_deadline else len(self.sizes)
        out = self._measured_result(records, start, end, deadline, losses, abandoned, est0, steps_total, vectors)
        out.metrics[C.STRAGGLER] = bool((not self.stop_at_deadline) and end > deadline)
        self.model.set_fixed_subsets(None)
        return out


class MeasuredBaselineTrainer(_MeasuredMixin, BaselineTrainer):
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
        As :class:`~flwr_distreal.training.trainers.DeviceTrainer` (``resources`` is not used).
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
        super().__init__(model, train_loader, device_id, None, **kwargs)
        self._kept: list[int] | None = None
        self._init_measured(time_table, None, estimator, margin, clock, unix_clock)

    def _calibration_lut(self) -> LUT:
        # equal-rate submodels: what the fixed-subset baselines train (interpolated in MACs)
        return LUT.uniform(self.model)

    def fit(self, arrays: NDArrays, config: Mapping[str, Scalar]) -> TrainResult:
        """Train the round's fixed (sub)model on every mini-batch and time it.

        Parameters and returns as :meth:`MeasuredDistrealTrainer.fit` (plus ``fixed-subsets``).
        """
        start, deadline = self._begin(arrays, config)
        try:
            self.prepare(config)
            fwd = self.full_macs if self._kept is None else int(macs_of_counts(self.model, self._kept))
            if self._kept is None:
                rel, rate = 1.0, 0.0
            else:
                table = self.time_table
                rel = table.rel_time_of_macs(fwd) if table is not None else max(fwd, 1) / self.full_macs
                rate = float(np.mean([1 - k / w for k, w in zip(self._kept, self.model.layer_widths)]))

            def choose(j: int, now: float, left: Sequence[int]) -> _Pick:
                return _Pick(None, -1, rate, fwd, rel)

            records, end, losses, abandoned, est0 = self._run_round(start, deadline, choose, False)
            vectors: list[Any] = [None] * len(records)
            out = self._measured_result(
                records, start, end, deadline, losses, abandoned, est0, len(self.sizes), vectors
            )
            out.metrics[C.STRAGGLER] = bool(end > deadline)
        finally:
            self.model.set_fixed_subsets(None)
        return out


# ------------------------------------------------------ your own loop, on a real device


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
            self.time_table = time_table
        elif time_table == "proportional":
            self.time_table = StepTimeTable.proportional(lut, self.full_macs, self.batch_size or 1)
        else:
            raise ValueError(f"time_table must be a StepTimeTable or 'proportional', got {time_table!r}")
        self.estimator = estimator if estimator is not None else ThroughputEstimator()
        if self.estimator.throughput is None:
            ref = self.time_table.reference_throughput(self.step_macs_factor)
            if ref is not None:
                self.estimator.reset(initial=ref)
        self.margin = float(margin)
        self._clock = clock
        if torch_device is None:
            first = next(model.parameters(), None)
            torch_device = first.device if first is not None else "cpu"
        self.torch_device = torch.device(torch_device)
        self.start = math.nan
        self._est0: float | None = None
        self._pending: tuple[float, _Choice] | None = None
        self._gaps: list[float] = []
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
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        return float(self._clock())

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
        deadline = self.deadline
        if est is None:  # no estimate yet: probe with the fastest vector, if there is time at all
            if now >= deadline:
                return None
            i = table.fastest
        else:
            j = len(self.steps)
            rest = self._planned[j + 1:] if self._planned is not None else []
            overhead = float(np.median(self._gaps[-7:])) if self._gaps else 0.0
            c = choose_vector(
                table, est, deadline - now, [batch_size, *rest],
                step_macs_factor=self.step_macs_factor, overhead=overhead, margin=self.margin,
                policy=self.policy, round_time=self.round_seconds, round_samples=self.planned_samples,
            )
            if c.index is None:
                if self.stop_at_deadline:
                    return None
                i = table.fastest
            else:
                i = c.index
        cost = table.rel_time[i] * step_macs(self.full_macs, batch_size, self.step_macs_factor)
        vector = self.lut.vectors[i]
        return _Choice(vector, int(table.macs[i]), cost, math.nan if est is None else est, index=i)

    def _begin(self, choice: _Choice, batch_size: int) -> None:
        t = self._now()
        if self._last_end is not None:
            self._gaps.append(max(0.0, t - self._last_end))
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
            available = _MeasuredMixin._available(None, records, window, self._est0)  # type: ignore[arg-type]
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
        out.update(_wall_metrics([s for s in self.steps if math.isfinite(s.end)], window, wall, self.estimator))
        return out
