"""A device's step times per LUT vector, and the choice of a vector against a real deadline
(the wall-clock mode of :mod:`flwr_distreal.training.wallclock`; the calibration is explained
in that module's docstring).

:class:`StepTimeTable`
    The per-device calibration: the step time of every LUT vector relative to the full model's
    step (``rel_time``, the full model is 1), measured once per device (:meth:`StepTimeTable.measure`),
    cached as JSON, or proportional to MACs (:meth:`StepTimeTable.proportional`).
:func:`choose_vector`
    The selection rule (Algorithm 1 of Rapp et al., AAAI 2022, in real seconds): the LUT vector
    with the most MACs whose predicted step time fits the step's time budget, or ``None`` (stop)
    when not even the fastest one would end before the deadline.

No Flower or Hydra imports.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.dropout import DropoutModel
from ..core.lut import LUT
from ..core.macs import count_macs
from ..core.resources import step_macs
from .layout import model_layout
from .recipe import Recipe
from .schedule import POLICIES
from .step import LocalStep
from .step import forward_backward as _forward_backward
from .throughput import WallclockError, _finite

__all__ = ["Choice", "StepTimeTable", "choose_vector"]

log = logging.getLogger(__name__)

TABLE_FORMAT = "flwr-distreal-step-times"
TABLE_VERSION = 1


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
