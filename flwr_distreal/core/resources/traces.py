"""Per-device availability traces ``r_i(t)`` (constant, time-varying, recorded) and trace files.

The paper's device resource model (Rapp et al., AAAI 2022, "Device Resource Model"): a
piecewise-constant, right-continuous availability in MACs per second with exact integration
(:meth:`ResourceTrace.advance`, :meth:`ResourceTrace.macs_between`); the three kinds
:class:`ConstantResources`, :class:`TimeVaryingResources` and :class:`TraceResources`; and
:func:`load_trace_csv`, which reads recorded traces. Every random trace derives its randomness
from ``numpy.random.SeedSequence([seed, device_id])``. Part of :mod:`flwr_distreal.core.resources`
(import the public names from there).
"""

from __future__ import annotations

import bisect
import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ResourceError, TraceFileError, _check_device_id, _check_finite, _check_seed


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
