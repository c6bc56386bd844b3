"""The configuration-level resource model: every device's trace and the round timing.

Round ``t`` (1-based) runs in global simulated time ``[(t - 1) * T, t * T]``; a device's trace is
drawn deterministically from ``(seed, device_id)``. Part of :mod:`flwr_distreal.core.resources`
(import the public names from there).
"""

from __future__ import annotations

from logging import getLogger
from pathlib import Path
from typing import Literal

import numpy as np

from .clock import RoundClock
from .errors import ResourceError, TraceFileError, _check_device_id, _check_finite, _check_seed
from .traces import (
    ConstantResources,
    ResourceTrace,
    TimeVaryingResources,
    TraceResources,
    load_trace_csv,
)

#: The logger of :mod:`flwr_distreal.core.resources` (the name it had as one module).
log = getLogger(__package__)


#: Kinds of resource models understood by :class:`ResourceModel`.
ResourceKind = Literal["full", "constant", "timevarying", "trace"]
RESOURCE_KINDS: tuple[str, ...] = ("full", "constant", "timevarying", "trace")


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
