"""Resource availability r_i(t) and the simulated clock.

The paper's device resource model ("System Model" / "Device Resource Model" sections of
Rapp et al., AAAI 2022) abstracts a device's compute as the number of multiply-accumulate
operations (MACs) it can execute per second, ``r_i(t)``. Availability differs between
devices and changes over time, also in the middle of a round. This module provides:

* :class:`ResourceTrace`, the per-device availability ``r_i(t)`` as a piecewise-constant,
  right-continuous function of simulated time (seconds), with exact integration:
  :meth:`ResourceTrace.advance` answers "when are ``m`` MACs done if I start at ``t0``" and
  :meth:`ResourceTrace.macs_between` answers "how many MACs fit into ``[t0, t1]``".
* Three kinds of traces: :class:`ConstantResources` (one level per device, drawn uniformly
  from ``[r_max / v, r_max]``, the paper's "Heterogeneity Across Devices"),
  :class:`TimeVaryingResources` (a new level from the same range after exponentially
  distributed waits with rate ``lam`` changes per round, the paper's "Heterogeneity Across
  Devices and Over Time") and :class:`TraceResources` (replay of a recorded trace, see
  :func:`load_trace_csv`).
* :class:`ResourceModel`, the configuration-level object: it hands out a device's trace,
  deterministically from ``(seed, device_id)``, and defines the round timing (round ``t``
  runs in global simulated time ``[(t - 1) * T, t * T]``).
* :func:`size_resources`, one call that sizes ``r_max`` from a model and its workload (the
  full model's round ends exactly at the deadline) and returns what :class:`ResourceModel` and
  the DISTREAL strategy take.
* :class:`RoundClock`, the straggler logic: a device trains mini-batch after mini-batch, its
  clock advances by ``MACs(step) / r(t)`` integrated across level changes, and it is a
  straggler when its training does not finish by the round's deadline. The rounds the
  clients run are planned on this clock by :mod:`flwr_distreal.training.schedule`
  (``plan_distreal_round``, ``plan_fixed_round``).

Time is in seconds of simulated time; availability in MACs per second; work in MACs.
Nothing here imports Flower or Hydra, and nothing keeps module-level state: Ray reuses
worker processes across clients, so every trace derives its randomness from its own
``numpy.random.SeedSequence([seed, device_id])``.

Cost of a training step. A look-up table stores *forward* MACs per sample. A training
step on a mini-batch of ``b`` samples costs about ``step_macs_factor * b * forward`` MACs,
where ``step_macs_factor = 3.0`` accounts for the forward pass plus a backward pass that
costs about twice the forward pass (gradients w.r.t. activations and w.r.t. weights); see
:func:`step_macs` and :func:`forward_macs_budget`.
"""

from __future__ import annotations

import bisect
import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "DEADLINE_RTOL",
    "ConstantResources",
    "ResourceError",
    "batch_sizes",
    "ResourceModel",
    "ResourceSizing",
    "ResourceTrace",
    "RoundClock",
    "RoundResult",
    "TimeVaryingResources",
    "TraceFileError",
    "TraceResources",
    "forward_macs_budget",
    "load_trace_csv",
    "r_max_for",
    "size_resources",
    "step_macs",
]

log = getLogger(__name__)

#: Relative tolerance of the deadline test. The clock sums ``macs / rate`` step by step in
#: floating point, so a device that needs exactly the whole round (the full model at
#: ``r_max``) may end a few ulps after the deadline; finishing within
#: ``deadline + DEADLINE_RTOL * max(1, |deadline|)`` counts as on time.
DEADLINE_RTOL = 1e-9

#: Kinds of resource models understood by :class:`ResourceModel`.
ResourceKind = Literal["full", "constant", "timevarying", "trace"]
RESOURCE_KINDS: tuple[str, ...] = ("full", "constant", "timevarying", "trace")


class ResourceError(ValueError):
    """A resource model or trace was given invalid parameters or was asked an invalid question."""


class TraceFileError(ResourceError):
    """A resource trace file is missing, malformed, or does not cover a requested device."""


def _check_finite(name: str, value: float, *, minimum: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as float after checking that it is finite and above ``minimum``."""
    try:
        val = float(value)
    except (TypeError, ValueError) as err:
        raise ResourceError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(val):
        raise ResourceError(f"{name} must be finite, got {val}")
    if minimum is not None:
        if strict and val <= minimum:
            raise ResourceError(f"{name} must be > {minimum}, got {val}")
        if not strict and val < minimum:
            raise ResourceError(f"{name} must be >= {minimum}, got {val}")
    return val


def _check_device_id(device_id: int) -> int:
    """Return ``device_id`` as a non-negative ``int``."""
    if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)):
        raise ResourceError(f"device_id must be an int, got {device_id!r}")
    if device_id < 0:
        raise ResourceError(f"device_id must be >= 0, got {device_id}")
    return int(device_id)


def _check_seed(seed: int) -> int:
    """Return ``seed`` as a non-negative ``int`` (numpy's SeedSequence needs >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ResourceError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ResourceError(f"seed must be >= 0, got {seed}")
    return int(seed)


# ---------------------------------------------------------------------------------------
# Step cost helpers
# ---------------------------------------------------------------------------------------


def batch_sizes(num_samples: int, batch_size: int, local_epochs: int = 1, drop_last: bool = False) -> list[int]:
    """Sizes of the mini-batches of a round of local training.

    Parameters
    ----------
    num_samples : int
        Samples on the device.
    batch_size : int
        Mini-batch size.
    local_epochs : int
        Passes over the local data per round.
    drop_last : bool
        Skip an incomplete last batch of each epoch.
    """
    if num_samples < 0 or batch_size < 1 or local_epochs < 1:
        raise ValueError(
            f"need num_samples >= 0, batch_size >= 1, local_epochs >= 1; got {num_samples}, {batch_size}, {local_epochs}"
        )
    full, rest = divmod(num_samples, batch_size)
    sizes = [batch_size] * full + ([rest] if rest and not drop_last else [])
    return sizes * local_epochs


def step_macs(forward_macs_per_sample: float, batch_size: int, step_macs_factor: float = 3.0) -> float:
    """MACs of one training step (forward + backward) on a mini-batch.

    Parameters
    ----------
    forward_macs_per_sample : float
        Forward MACs per sample of the (sub)model, e.g. ``count_macs(model, vector)`` or a
        LUT entry.
    batch_size : int
        Number of samples in the mini-batch.
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to a forward pass of the same batch. The
        backward pass computes gradients w.r.t. activations and w.r.t. weights, each
        about as expensive as the forward pass, hence 3.0.

    Returns
    -------
    float
        ``step_macs_factor * batch_size * forward_macs_per_sample``.
    """
    fwd = _check_finite("forward_macs_per_sample", forward_macs_per_sample, minimum=0.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ResourceError(f"batch_size must be an int >= 1, got {batch_size!r}")
    factor = _check_finite("step_macs_factor", step_macs_factor, minimum=0.0, strict=True)
    return factor * int(batch_size) * fwd


def forward_macs_budget(step_budget: float, batch_size: int, step_macs_factor: float = 3.0) -> float:
    """Convert a budget for one training step into a forward-MACs-per-sample budget.

    This is the inverse of :func:`step_macs`; use it to query a LUT (which stores forward
    MACs per sample) with a per-mini-batch budget such as Algorithm 1's ``r(t) * T / B``.

    Parameters
    ----------
    step_budget : float
        MACs available for one training step on one mini-batch (may be ``inf``).
    batch_size : int
        Number of samples in the mini-batch.
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to a forward pass, as in :func:`step_macs`.

    Returns
    -------
    float
        ``step_budget / (step_macs_factor * batch_size)``.
    """
    budget = float(step_budget)
    if math.isnan(budget) or budget < 0:
        raise ResourceError(f"step_budget must be >= 0 and not NaN, got {step_budget!r}")
    return budget / step_macs(1.0, batch_size, step_macs_factor)


def r_max_for(full_step_macs_total: float, deadline: float) -> float:
    """Upper bound of the availability range: the full model finishes exactly at the deadline.

    The paper selects the upper bound of the uniform availability range "such that
    training the full NN without dropout is possible" within a round.

    Parameters
    ----------
    full_step_macs_total : float
        Total training MACs of one round of local training with the full model (all steps,
        forward and backward: ``sum(step_macs(fwd, b) for b in batch_sizes(...))``).
    deadline : float
        Round duration ``T`` in seconds of simulated time.

    Returns
    -------
    float
        ``full_step_macs_total / deadline`` in MACs per second.
    """
    total = _check_finite("full_step_macs_total", full_step_macs_total, minimum=0.0, strict=True)
    dl = _check_finite("deadline", deadline, minimum=0.0, strict=True)
    return total / dl


# ---------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------


class ResourceTrace(ABC):
    """Availability ``r(t)`` of one device, piecewise constant and right-continuous.

    Subclasses implement :meth:`_segment`; integration (:meth:`advance`,
    :meth:`macs_between`) is shared and exact up to floating-point rounding. Time starts
    at 0; asking about negative times is an error.
    """

    @abstractmethod
    def _segment(self, t: float) -> tuple[float, float]:
        """Return ``(level, end)``: the level in force at ``t`` and when it ends (may be ``inf``).

        ``end`` is strictly greater than ``t``.
        """

    @staticmethod
    def _check_time(name: str, t: float) -> float:
        val = float(t)
        if math.isnan(val) or val < 0 or math.isinf(val):
            raise ResourceError(f"{name} must be a finite time >= 0, got {t!r}")
        return val

    def rate_at(self, t: float) -> float:
        """Availability in MACs per second at simulated time ``t`` (seconds, >= 0).

        At a change time the new level is returned (right-continuous).
        """
        return self._segment(self._check_time("t", t))[0]

    def change_points(self, t0: float, t1: float) -> list[float]:
        """Times strictly inside ``(t0, t1)`` at which the level changes, in order.

        Parameters
        ----------
        t0 : float
            Start of the interval (seconds).
        t1 : float
            End of the interval (seconds), ``t1 >= t0``.

        Returns
        -------
        list[float]
            Segment boundaries inside the interval. A boundary where the new level equals
            the old one (possible in replayed traces) is listed too.
        """
        start = self._check_time("t0", t0)
        end = self._check_time("t1", t1)
        if end < start:
            raise ResourceError(f"t1 must be >= t0, got t0={t0}, t1={t1}")
        points: list[float] = []
        t = start
        while True:
            _, seg_end = self._segment(t)
            if seg_end >= end:
                return points
            points.append(seg_end)
            t = seg_end

    def advance(self, t0: float, macs: float) -> float:
        """Time at which ``macs`` MACs are done when starting at ``t0``.

        Device time advances by ``macs / r(t)`` piecewise: within a segment of level ``r``
        the device does ``r * dt`` MACs in ``dt`` seconds. Segments with zero availability
        are skipped over.

        Parameters
        ----------
        t0 : float
            Start time (seconds, >= 0).
        macs : float
            Work to do (MACs, >= 0).

        Returns
        -------
        float
            Finish time in seconds; ``inf`` when the availability drops to zero forever
            before the work is done.
        """
        t = self._check_time("t0", t0)
        remaining = _check_finite("macs", macs, minimum=0.0)
        if remaining == 0.0:
            return t
        while True:
            level, end = self._segment(t)
            if level > 0.0:
                dt = remaining / level
                if math.isinf(end) or t + dt <= end:
                    return t + dt
                remaining -= level * (end - t)
                if remaining <= 0.0:
                    return end
            elif math.isinf(end):
                return math.inf
            t = end

    def macs_between(self, t0: float, t1: float) -> float:
        """MACs the device can compute in ``[t0, t1]`` (the integral of ``r`` over it).

        Parameters
        ----------
        t0 : float
            Start of the window (seconds, >= 0).
        t1 : float
            End of the window (seconds, ``t1 >= t0``).

        Returns
        -------
        float
            ``integral_{t0}^{t1} r(t) dt``.
        """
        t = self._check_time("t0", t0)
        stop = self._check_time("t1", t1)
        if stop < t:
            raise ResourceError(f"t1 must be >= t0, got t0={t0}, t1={t1}")
        total = 0.0
        while t < stop:
            level, end = self._segment(t)
            seg_stop = min(end, stop)
            total += level * (seg_stop - t)
            t = seg_stop
        return total


class ConstantResources(ResourceTrace):
    """A device whose availability never changes.

    Parameters
    ----------
    level : float
        Availability in MACs per second (> 0).
    """

    def __init__(self, level: float) -> None:
        self.level = _check_finite("level", level, minimum=0.0, strict=True)

    @classmethod
    def draw(cls, r_max: float, variability: float, seed: int, device_id: int) -> ConstantResources:
        """Draw the device's level uniformly from ``[r_max / variability, r_max]``.

        Parameters
        ----------
        r_max : float
            Upper bound of the range in MACs per second (see :func:`r_max_for`).
        variability : float
            Ratio of upper to lower bound, ``v >= 1`` (paper: 3 for FEMNIST, 4 for CIFAR).
        seed : int
            Experiment seed (>= 0).
        device_id : int
            Device index (>= 0). The level depends only on ``(seed, device_id)``.

        Returns
        -------
        ConstantResources
            The device's trace. Its level equals the initial level of
            :class:`TimeVaryingResources` with the same ``(seed, device_id)``.
        """
        low, high = _level_range(r_max, variability)
        rng = _device_rng(seed, device_id)
        return cls(float(rng.uniform(low, high)))

    def _segment(self, t: float) -> tuple[float, float]:
        return self.level, math.inf

    def __repr__(self) -> str:
        return f"ConstantResources(level={self.level!r})"


class TimeVaryingResources(ResourceTrace):
    """A device whose level is redrawn after exponentially distributed waits.

    The paper models resource changes as random, "with the time between changes following
    an exponential distribution with rate parameter lambda", and samples every level from
    the same uniform range ``[r_max / v, r_max]`` as in the constant case. ``lam`` counts
    changes per round duration, so the mean wait is ``round_duration / lam`` and changes
    fall inside rounds. The change sequence is generated lazily, on demand, from
    ``SeedSequence([seed, device_id])``: the trace is the same whichever process asks and
    in whichever order its times are queried.

    Parameters
    ----------
    r_max : float
        Upper bound of the availability range (MACs per second).
    variability : float
        Ratio of upper to lower bound, ``v >= 1``.
    lam : float
        Expected number of level changes per round duration (paper: 0.5, 1, 2, 4). 0 gives
        a constant trace.
    round_duration : float
        Round duration ``T`` in seconds (the deadline).
    seed : int
        Experiment seed (>= 0).
    device_id : int
        Device index (>= 0).
    """

    def __init__(
        self,
        r_max: float,
        variability: float,
        lam: float,
        round_duration: float,
        seed: int,
        device_id: int,
    ) -> None:
        self.low, self.high = _level_range(r_max, variability)
        self.lam = _check_finite("lam", lam, minimum=0.0)
        self.round_duration = _check_finite("round_duration", round_duration, minimum=0.0, strict=True)
        self.seed = _check_seed(seed)
        self.device_id = _check_device_id(device_id)
        self._rng = _device_rng(self.seed, self.device_id)
        # _starts[i] is when _levels[i] starts; _starts[0] == 0.
        self._starts: list[float] = [0.0]
        self._levels: list[float] = [float(self._rng.uniform(self.low, self.high))]
        self._mean_wait = math.inf if self.lam == 0.0 else self.round_duration / self.lam

    @property
    def mean_wait(self) -> float:
        """Mean time between level changes, ``round_duration / lam`` (``inf`` for lam = 0)."""
        return self._mean_wait

    def _extend_past(self, t: float) -> None:
        """Generate changes until the last known change lies strictly after ``t``."""
        if math.isinf(self._mean_wait):
            return
        while self._starts[-1] <= t:
            wait = float(self._rng.exponential(self._mean_wait))
            level = float(self._rng.uniform(self.low, self.high))
            nxt = self._starts[-1] + wait
            if nxt <= self._starts[-1]:
                # A wait that underflows to zero would create an empty segment; fold it
                # into the previous one by replacing its level (same law: memoryless).
                self._levels[-1] = level
                continue
            self._starts.append(nxt)
            self._levels.append(level)

    def _segment(self, t: float) -> tuple[float, float]:
        self._extend_past(t)
        idx = bisect.bisect_right(self._starts, t) - 1
        end = self._starts[idx + 1] if idx + 1 < len(self._starts) else math.inf
        return self._levels[idx], end

    def __repr__(self) -> str:
        return (
            f"TimeVaryingResources(range=[{self.low!r}, {self.high!r}], lam={self.lam!r}, "
            f"round_duration={self.round_duration!r}, seed={self.seed}, device_id={self.device_id})"
        )


class TraceResources(ResourceTrace):
    """Replay of a recorded, piecewise-constant availability trace.

    ``levels[i]`` is in force from ``times[i]`` until ``times[i + 1]``; the last level
    holds forever and the first level also applies before ``times[0]``. A level of 0 means
    the device cannot train in that interval.

    Parameters
    ----------
    times : Sequence[float]
        Strictly increasing start times in seconds (>= 0).
    levels : Sequence[float]
        Availability in MACs per second for each start time (>= 0, finite).
    """

    def __init__(self, times: Sequence[float], levels: Sequence[float]) -> None:
        t = np.asarray(times, dtype=np.float64)
        r = np.asarray(levels, dtype=np.float64)
        if t.ndim != 1 or r.ndim != 1 or t.shape != r.shape or t.size == 0:
            raise ResourceError(
                f"times and levels must be non-empty 1-D sequences of equal length, got shapes {t.shape} and {r.shape}"
            )
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise ResourceError("times must be finite and >= 0")
        if not np.all(np.isfinite(r)) or np.any(r < 0):
            raise ResourceError("levels must be finite and >= 0")
        if np.any(np.diff(t) <= 0):
            raise ResourceError("times must be strictly increasing")
        self._starts = [float(v) for v in t]
        self._levels = [float(v) for v in r]

    @property
    def times(self) -> list[float]:
        """Segment start times (seconds)."""
        return list(self._starts)

    @property
    def levels(self) -> list[float]:
        """Segment levels (MACs per second)."""
        return list(self._levels)

    def _segment(self, t: float) -> tuple[float, float]:
        idx = bisect.bisect_right(self._starts, t) - 1
        if idx < 0:
            return self._levels[0], self._starts[0]
        end = self._starts[idx + 1] if idx + 1 < len(self._starts) else math.inf
        return self._levels[idx], end

    def __repr__(self) -> str:
        return f"TraceResources({len(self._starts)} segments)"


def _level_range(r_max: float, variability: float) -> tuple[float, float]:
    """Return ``(r_max / variability, r_max)`` after validating both."""
    high = _check_finite("r_max", r_max, minimum=0.0, strict=True)
    var = _check_finite("variability", variability, minimum=1.0)
    return high / var, high


def _device_rng(seed: int, device_id: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, device_id)``."""
    return np.random.default_rng(np.random.SeedSequence([_check_seed(seed), _check_device_id(device_id)]))


# ---------------------------------------------------------------------------------------
# Trace files
# ---------------------------------------------------------------------------------------

TRACE_COLUMNS: tuple[str, str, str] = ("device", "time", "macs_per_s")


def load_trace_csv(path: str | Path) -> dict[int, TraceResources]:
    """Read per-device availability traces from a CSV file.

    The file has a header row with at least the columns ``device`` (int >= 0), ``time``
    (seconds, >= 0) and ``macs_per_s`` (MACs per second, >= 0); other columns are
    ignored. Each row starts a new level for its device at its time (piecewise constant,
    see :class:`TraceResources`). Rows of different devices may be interleaved, but each
    device's times must be strictly increasing in file order.

    Parameters
    ----------
    path : str | Path
        The CSV file.

    Returns
    -------
    dict[int, TraceResources]
        One trace per device id found in the file.

    Raises
    ------
    TraceFileError
        If the file is missing, not a text file, empty, lacks a column, or holds a value that is
        not a number, negative, NaN or infinite, a non-integer device id, or unsorted times.
    """
    file = Path(path)
    if not file.is_file():
        raise TraceFileError(f"resource trace file {file} does not exist or is not a file")
    try:
        return _read_trace_csv(file)
    except (UnicodeDecodeError, csv.Error) as err:
        raise TraceFileError(
            f"resource trace file {file} is not a CSV text file ({err}); expected UTF-8 text with a header "
            f"{','.join(TRACE_COLUMNS)} and one row per level change"
        ) from err


def _read_trace_csv(file: Path) -> dict[int, TraceResources]:
    """The body of :func:`load_trace_csv` (a binary file raises ``UnicodeDecodeError`` or
    ``csv.Error`` here)."""
    with file.open("rb") as raw:
        if b"\x00" in raw.read(65536):  # valid UTF-8, but no text file holds NUL bytes
            raise csv.Error("it holds NUL bytes")
    rows: dict[int, tuple[list[float], list[float]]] = {}
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise TraceFileError(
                f"resource trace file {file}: missing column(s) {missing}; expected a header with "
                f"{list(TRACE_COLUMNS)}, got {header}"
            )
        reader.fieldnames = header
        for line_no, row in enumerate(reader, start=2):
            raw = {c: (row.get(c) or "").strip() for c in TRACE_COLUMNS}
            try:
                device_f = float(raw["device"])
                time = float(raw["time"])
                level = float(raw["macs_per_s"])
            except ValueError as err:
                raise TraceFileError(f"resource trace file {file}, line {line_no}: not a number in {raw}") from err
            if not math.isfinite(device_f) or device_f < 0 or device_f != int(device_f):
                raise TraceFileError(
                    f"resource trace file {file}, line {line_no}: device must be an integer >= 0, got {raw['device']!r}"
                )
            if not math.isfinite(time) or time < 0:
                raise TraceFileError(
                    f"resource trace file {file}, line {line_no}: time must be finite and >= 0, got {raw['time']!r}"
                )
            if not math.isfinite(level) or level < 0:
                raise TraceFileError(
                    f"resource trace file {file}, line {line_no}: macs_per_s must be finite and >= 0, "
                    f"got {raw['macs_per_s']!r}"
                )
            device = int(device_f)
            times, levels = rows.setdefault(device, ([], []))
            if times and time <= times[-1]:
                raise TraceFileError(
                    f"resource trace file {file}, line {line_no}: times of device {device} must be strictly "
                    f"increasing, got {time} after {times[-1]}"
                )
            times.append(time)
            levels.append(level)
    if not rows:
        raise TraceFileError(f"resource trace file {file} has a header but no rows")
    return {dev: TraceResources(t, r) for dev, (t, r) in sorted(rows.items())}


# ---------------------------------------------------------------------------------------
# The config-level resource model
# ---------------------------------------------------------------------------------------


class ResourceModel:
    """Resource availability of all devices and the round timing.

    Round ``t`` (1-based) runs from ``(t - 1) * deadline`` to ``t * deadline`` in global
    simulated time, so a device's trace continues across rounds: a device selected in
    rounds 3 and 7 sees the availability its trace has at those times.

    Parameters
    ----------
    kind : {"full", "constant", "timevarying", "trace"}
        ``"full"``: every device has ``r_max`` (the paper's full-resources upper bound).
        ``"constant"``: one level per device, uniform in ``[r_max / variability, r_max]``.
        ``"timevarying"``: levels from the same range, redrawn after exponential waits
        with ``lam`` changes per round. ``"trace"``: replay ``trace_path``.
    deadline : float
        Round duration ``T`` in seconds of simulated time (> 0).
    r_max : float | None (default: None)
        Upper bound of the availability range in MACs per second; required for every kind
        except ``"trace"``. Usually ``r_max_for(full-model round MACs, deadline)``.
    variability : float (default: 4.0)
        Ratio of upper to lower bound of the range (paper: 3 for FEMNIST, 4 for CIFAR).
    lam : float (default: 1.0)
        Changes per round duration for ``"timevarying"`` (paper: 0.5, 1, 2, 4).
    seed : int (default: 0)
        Experiment seed; every device's trace depends only on ``(seed, device_id)``.
    trace_path : str | Path | None (default: None)
        CSV file for ``"trace"`` (see :func:`load_trace_csv`).
    """

    def __init__(
        self,
        kind: str,
        deadline: float,
        r_max: float | None = None,
        variability: float = 4.0,
        lam: float = 1.0,
        seed: int = 0,
        trace_path: str | Path | None = None,
    ) -> None:
        if kind not in RESOURCE_KINDS:
            raise ResourceError(f"unknown resource kind {kind!r}; valid kinds: {list(RESOURCE_KINDS)}")
        self.kind = kind
        self.deadline = _check_finite("deadline", deadline, minimum=0.0, strict=True)
        self.variability = _check_finite("variability", variability, minimum=1.0)
        self.lam = _check_finite("lam", lam, minimum=0.0)
        self.seed = _check_seed(seed)
        self.r_max: float | None = None
        if kind != "trace":
            if r_max is None:
                raise ResourceError(f"resource kind {kind!r} needs r_max (MACs per second)")
            self.r_max = _check_finite("r_max", r_max, minimum=0.0, strict=True)
        self.trace_path: Path | None = None
        self._file_traces: dict[int, TraceResources] | None = None
        if kind == "trace":
            if trace_path is None:
                raise ResourceError("resource kind 'trace' needs trace_path (a CSV file)")
            self.trace_path = Path(trace_path)
            self._file_traces = load_trace_csv(self.trace_path)
            log.info("Loaded resource traces of %s devices from %s", len(self._file_traces), self.trace_path)

    @property
    def devices_in_file(self) -> list[int]:
        """Device ids covered by the trace file (empty unless kind is ``"trace"``)."""
        return sorted(self._file_traces) if self._file_traces is not None else []

    def trace(self, device_id: int, r_max: float | None = None) -> ResourceTrace:
        """The availability trace of one device.

        Parameters
        ----------
        device_id : int
            Device index (>= 0).
        r_max : float | None (default: None)
            Per-device override of the range's upper bound, e.g. when devices hold
            different amounts of data and each device's full-model round should fit the
            deadline exactly. The random draws do not depend on it (levels scale with it).
            Ignored for ``"trace"``.

        Returns
        -------
        ResourceTrace
            A fresh trace object; two calls with the same arguments give equal traces.

        Raises
        ------
        TraceFileError
            If the kind is ``"trace"`` and the file has no rows for ``device_id``.
        """
        dev = _check_device_id(device_id)
        if self._file_traces is not None:
            if dev not in self._file_traces:
                raise TraceFileError(
                    f"resource trace file {self.trace_path} has no rows for device {dev}; "
                    f"it covers {len(self._file_traces)} devices: {self.devices_in_file[:20]}"
                )
            return self._file_traces[dev]
        if r_max is not None:
            high = _check_finite("r_max", r_max, minimum=0.0, strict=True)
        elif self.r_max is not None:
            high = self.r_max
        else:  # unreachable: __init__ requires r_max for every kind but "trace"
            raise ResourceError(f"resource kind {self.kind!r} has no r_max")
        if self.kind == "full":
            return ConstantResources(high)
        if self.kind == "constant":
            return ConstantResources.draw(high, self.variability, self.seed, dev)
        return TimeVaryingResources(high, self.variability, self.lam, self.deadline, self.seed, dev)

    def round_start(self, server_round: int) -> float:
        """Global simulated time at which round ``server_round`` (1-based) starts."""
        return (self._check_round(server_round) - 1) * self.deadline

    def round_deadline(self, server_round: int) -> float:
        """Global simulated time by which round ``server_round`` (1-based) must finish."""
        return self._check_round(server_round) * self.deadline

    def round_window(self, server_round: int) -> tuple[float, float]:
        """``(start, deadline)`` of round ``server_round``."""
        return self.round_start(server_round), self.round_deadline(server_round)

    def clock(self, device_id: int, server_round: int, r_max: float | None = None) -> RoundClock:
        """A :class:`RoundClock` for ``device_id`` in round ``server_round``.

        Parameters
        ----------
        device_id : int
            Device index.
        server_round : int
            Round number, 1-based.
        r_max : float | None (default: None)
            Per-device override of the range's upper bound, as in :meth:`trace`.
        """
        start, deadline = self.round_window(server_round)
        return RoundClock(self.trace(device_id, r_max), start, deadline)

    @staticmethod
    def _check_round(server_round: int) -> int:
        if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 1:
            raise ResourceError(f"server_round must be an int >= 1, got {server_round!r}")
        return int(server_round)

    def __repr__(self) -> str:
        return (
            f"ResourceModel(kind={self.kind!r}, deadline={self.deadline!r}, r_max={self.r_max!r}, "
            f"variability={self.variability!r}, lam={self.lam!r}, seed={self.seed}, trace_path={self.trace_path!r})"
        )


# ---------------------------------------------------------------------------------------
# Sizing the resources from the model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceSizing:
    """Resources sized from a model and its training workload, by :func:`size_resources`.

    Pass ``r_max``, ``deadline`` and ``variability`` to :class:`ResourceModel` (or call
    :meth:`resource_model`), and :meth:`strategy_kwargs` to the DISTREAL strategy.

    Attributes
    ----------
    r_max : float
        Upper bound of the availability range, MACs per second: the device with the most samples
        trains its whole round with the full model exactly by the deadline.
    deadline : float
        Round duration ``T`` in seconds of simulated time.
    variability : float
        Ratio of upper to lower bound of the range: availabilities are uniform in
        ``[r_max / variability, r_max]``.
    full_macs_per_sample : int
        The full model's forward MACs per sample (``count_macs(model)``).
    batch_size, local_epochs : int
        The clients' mini-batch size and local epochs.
    step_macs_factor : float
        Cost of a training step relative to its forward pass (:func:`step_macs`).
    round_macs : tuple of float
        Per device: training MACs of its round with the full model (all steps, forward and
        backward).
    r_max_per_device : tuple of float
        Per device: the availability at which its own full-model round ends exactly at the
        deadline (``round_macs / deadline``). ``r_max`` is their maximum.
    """

    r_max: float
    deadline: float
    variability: float
    full_macs_per_sample: int
    batch_size: int
    local_epochs: int
    step_macs_factor: float
    round_macs: tuple[float, ...]
    r_max_per_device: tuple[float, ...]

    def resource_model(self, kind: str = "constant", *, lam: float = 1.0, seed: int = 0) -> ResourceModel:
        """A :class:`ResourceModel` of ``kind`` (``"constant"``, ``"timevarying"``, ``"full"``)
        with this sizing's ``r_max``, ``deadline`` and ``variability``."""
        if kind == "trace":
            raise ResourceError("a 'trace' resource model replays a file: its levels are not sized")
        return ResourceModel(
            kind, deadline=self.deadline, r_max=self.r_max, variability=self.variability, lam=lam, seed=seed
        )

    def strategy_kwargs(self) -> dict[str, float | int]:
        """``full_macs_per_sample``, ``batch_size`` and ``local_epochs`` for the DISTREAL strategy
        (both APIs): the bound of a reply's MACs and of its mini-batches."""
        return {
            "full_macs_per_sample": self.full_macs_per_sample,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
        }

    def device_r_max(self, device_id: int) -> float:
        """The r_max of one device (``r_max_per_device[device_id]``): pass it as the trainer's
        ``r_max`` when devices hold different amounts of data, so that every device's
        full-model round ends exactly at the deadline (as this project's runs do)."""
        dev = _check_device_id(device_id)
        if dev >= len(self.r_max_per_device):
            raise ResourceError(f"device {dev} not sized: {len(self.r_max_per_device)} devices")
        return self.r_max_per_device[dev]


def _positive_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ResourceError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def size_resources(
    model: object,
    batch_size: int,
    samples_per_device: int | Sequence[int],
    *,
    local_epochs: int = 1,
    variability: float = 3.0,
    deadline: float = 1.0,
    step_macs_factor: float = 3.0,
    drop_last: bool = False,
) -> ResourceSizing:
    """Size the devices' resources from the model: the full model finishes a round by the deadline.

    The paper's device resource model draws availability uniformly from
    ``[r_max / v, r_max]``, with ``r_max`` chosen "such that training the full NN without
    dropout is possible" within a round. This computes that ``r_max`` the way the simulated
    clock charges the training (:func:`step_macs`, the convention of :mod:`flwr_distreal.training.schedule`):
    a round of ``samples`` samples is the mini-batches ``batch_sizes(samples,
    batch_size, local_epochs, drop_last)``, each costing ``step_macs_factor * b *
    full_macs_per_sample`` MACs, and ``r_max = sum / deadline`` (:func:`r_max_for`). A device at
    ``r_max`` then trains the full model and ends exactly at the deadline; a weaker one has to
    drop filters (Algorithm 1) to finish in time.

    Parameters
    ----------
    model : DroppableModel or int
        The full model (from ``build_model`` or ``make_droppable``; its forward MACs per sample
        are counted with ``count_macs``), or that count itself.
    batch_size : int
        The clients' mini-batch size.
    samples_per_device : int or sequence of int
        Training samples of one device, or of every device (index = device id). With several,
        ``r_max`` is the largest device's (every device can then train the full model by the
        deadline when its availability is high enough); ``r_max_per_device`` has each one's.
        A device with no samples counts as one MAC of work (a positive ``r_max``).
    local_epochs : int, optional
        Passes over the local data per round. Defaults to 1.
    variability : float, optional
        Ratio ``v`` of the range's bounds (the paper: 3 for FEMNIST, 4 for CIFAR). Defaults to 3.
    deadline : float, optional
        Round duration ``T`` in seconds of simulated time. Defaults to 1.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass. Defaults to 3.0 (forward plus a
        backward pass that costs about twice as much); use the trainers' value.
    drop_last : bool, optional
        Whether the clients' loaders drop an incomplete last batch. Defaults to False.

    Returns
    -------
    ResourceSizing
        ``r_max``, ``deadline``, ``variability`` for :class:`ResourceModel` (or
        :meth:`ResourceSizing.resource_model`), :meth:`ResourceSizing.strategy_kwargs` for the
        DISTREAL strategy, and the per-device values.

    Raises
    ------
    ResourceError
        (A ValueError.) If a count is not a positive int, ``deadline`` or ``step_macs_factor``
        is not positive and finite, ``variability`` is below 1, or the model's MACs are not a
        positive number.
    TypeError
        If ``model`` is neither a droppable model nor a number of MACs.

    Examples
    --------
    >>> from flwr_distreal import build_model
    >>> sizing = size_resources(build_model("femnist_cnn_small"), batch_size=10, samples_per_device=200)
    >>> resources = sizing.resource_model("timevarying", lam=2, seed=0)
    >>> strategy_kwargs = sizing.strategy_kwargs()  # Distreal(**strategy_kwargs, ...)
    """

    if isinstance(model, bool):
        raise TypeError("model must be a droppable model or its forward MACs per sample, got a bool")
    if isinstance(model, (int, float, np.integer, np.floating)):
        full = _check_finite("model's forward MACs per sample", float(model), minimum=0.0, strict=True)
    else:
        from .dropout import DroppableModel
        from .macs import count_macs

        if not isinstance(model, DroppableModel):
            raise TypeError(
                f"model must be a droppable model (flwr_distreal.build_model or make_droppable(module, "
                f"example_input)) or its forward MACs per sample, got {type(model).__name__}"
            )
        full = float(count_macs(model))
    bs = _positive_count("batch_size", batch_size)
    epochs = _positive_count("local_epochs", local_epochs)
    many = not isinstance(samples_per_device, (int, np.integer))
    counts = list(samples_per_device) if many else [samples_per_device]  # type: ignore[list-item]
    if not counts:
        raise ResourceError("samples_per_device is empty")
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            where = f"samples_per_device[{i}]" if many else "samples_per_device"
            raise ResourceError(f"{where} must be an int >= 0, got {n!r}")
    v = _check_finite("variability", variability, minimum=1.0)
    dl = _check_finite("deadline", deadline, minimum=0.0, strict=True)
    factor = _check_finite("step_macs_factor", step_macs_factor, minimum=0.0, strict=True)
    round_macs = tuple(
        max(sum(step_macs(full, b, factor) for b in batch_sizes(int(n), bs, epochs, drop_last)), 1.0)
        for n in counts
    )
    per_device = tuple(r_max_for(m, dl) for m in round_macs)
    return ResourceSizing(
        r_max=max(per_device),
        deadline=dl,
        variability=v,
        full_macs_per_sample=int(round(full)),
        batch_size=bs,
        local_epochs=epochs,
        step_macs_factor=factor,
        round_macs=round_macs,
        r_max_per_device=per_device,
    )


# ---------------------------------------------------------------------------------------
# Straggler logic
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """Outcome of one device's local training in one round.

    Attributes
    ----------
    start : float
        Round start (global simulated seconds).
    deadline : float
        Round deadline (global simulated seconds).
    finish_time : float
        When the last completed step ended (``start`` when no step completed; may exceed
        ``deadline`` when training was not aborted).
    steps_done : int
        Number of completed training steps.
    steps_total : int
        Number of steps the device was asked to train.
    spent_macs : float
        MACs of the completed steps (DISTREAL's ``c`` in Algorithm 1 counts these).
    available_macs : float
        MACs the device could compute in ``[start, deadline]``.
    step_macs : tuple[float, ...]
        MACs of each completed step, in order.
    """

    start: float
    deadline: float
    finish_time: float
    steps_done: int
    steps_total: int
    spent_macs: float
    available_macs: float
    step_macs: tuple[float, ...]

    @property
    def finished(self) -> bool:
        """All steps completed by the deadline (within :data:`DEADLINE_RTOL`)."""
        return self.steps_done == self.steps_total and _on_time(self.finish_time, self.deadline)

    @property
    def straggler(self) -> bool:
        """The device did not finish by the deadline; the server discards its update."""
        return not self.finished

    @property
    def utilisation(self) -> float:
        """``spent_macs / available_macs`` (0 when nothing was available)."""
        return self.spent_macs / self.available_macs if self.available_macs > 0 else 0.0


def _on_time(finish: float, deadline: float) -> bool:
    return finish <= deadline + DEADLINE_RTOL * max(1.0, abs(deadline))


class RoundClock:
    """The simulated clock of one device during one round.

    The client of Algorithm 1 uses it like this::

        clock = resource_model.clock(device_id, server_round)
        for step in range(num_batches):
            r = clock.rate()                              # r <- r_i(t)
            budget = clock.remaining_time() * r / (num_batches - step)   # or r * T / B
            vector, fwd = lut.select(forward_macs_budget(budget, batch_size))
            ...train one mini-batch with vector...
            clock.step(step_macs(fwd, batch_size))        # t <- t + MACs / r(t), integrated
        result = clock.result(num_batches)

    Parameters
    ----------
    trace : ResourceTrace
        The device's availability.
    start : float
        Round start in global simulated seconds.
    deadline : float
        Round deadline in global simulated seconds (> ``start``).
    """

    def __init__(self, trace: ResourceTrace, start: float, deadline: float) -> None:
        if not isinstance(trace, ResourceTrace):
            raise ResourceError(f"trace must be a ResourceTrace, got {type(trace).__name__}")
        self.trace = trace
        self.start = ResourceTrace._check_time("start", start)
        self.deadline = _check_finite("deadline", deadline)
        if self.deadline <= self.start:
            raise ResourceError(f"deadline must be after start, got start={start}, deadline={deadline}")
        self.now = self.start
        self.spent_macs = 0.0
        self._steps: list[float] = []

    @property
    def round_duration(self) -> float:
        """``deadline - start`` (the paper's T)."""
        return self.deadline - self.start

    @property
    def steps_done(self) -> int:
        """Number of steps completed so far."""
        return len(self._steps)

    def rate(self) -> float:
        """Current availability ``r(now)`` in MACs per second."""
        return self.trace.rate_at(self.now)

    def remaining_time(self) -> float:
        """Seconds left until the deadline (0 when past it)."""
        return max(0.0, self.deadline - self.now)

    def remaining_macs(self) -> float:
        """MACs the device can still compute before the deadline (knows the future trace;
        for analysis, not for a device's decisions)."""
        if self.now >= self.deadline:
            return 0.0
        return self.trace.macs_between(self.now, self.deadline)

    def time_for(self, macs: float) -> float:
        """When a step of ``macs`` MACs started now would end (does not advance)."""
        return self.trace.advance(self.now, macs)

    def fits(self, macs: float) -> bool:
        """Whether a step of ``macs`` MACs started now ends by the deadline."""
        return _on_time(self.time_for(macs), self.deadline)

    def step(self, macs: float) -> bool:
        """Advance the clock by one training step of ``macs`` MACs.

        Returns
        -------
        bool
            Whether the clock is still on time (``now`` within the deadline) after the step.
        """
        self.now = self.trace.advance(self.now, macs)
        self.spent_macs += float(macs)
        self._steps.append(float(macs))
        return _on_time(self.now, self.deadline)

    def result(self, steps_total: int | None = None) -> RoundResult:
        """Summarise the round so far.

        Parameters
        ----------
        steps_total : int | None (default: None)
            Number of steps the device had to train; defaults to the steps done.
        """
        done = len(self._steps)
        total = done if steps_total is None else int(steps_total)
        if total < done:
            raise ResourceError(f"steps_total ({total}) is smaller than the steps already done ({done})")
        return RoundResult(
            start=self.start,
            deadline=self.deadline,
            finish_time=self.now,
            steps_done=done,
            steps_total=total,
            spent_macs=self.spent_macs,
            available_macs=self.trace.macs_between(self.start, self.deadline),
            step_macs=tuple(self._steps),
        )
