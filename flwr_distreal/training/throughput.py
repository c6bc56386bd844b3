"""Throughput of a real device, estimated from its own step times (the wall-clock mode of
:mod:`flwr_distreal.training.wallclock`).

:class:`ThroughputEstimator` turns measured ``(seconds, MACs)`` steps into the device's current
throughput (MACs per second): the measured counterpart of the resource model's availability
``r(t)`` (:mod:`flwr_distreal.core.resources`), which a real device does not know.
:class:`WallclockError` is the wall-clock mode's ``ValueError``. No Flower or Hydra imports.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import deque

import numpy as np

__all__ = ["ThroughputEstimator", "WallclockError"]


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
