"""The simulated clock of one device in one round, and the straggler logic.

A device trains mini-batch after mini-batch; its clock advances by ``MACs(step) / r(t)``
integrated across level changes (:class:`RoundClock`), and it is a straggler when its training
does not finish by the round's deadline (:class:`RoundResult`). Part of
:mod:`flwr_distreal.core.resources` (import the public names from there).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ResourceError, _check_finite
from .traces import ResourceTrace


#: Relative tolerance of the deadline test. The clock sums ``macs / rate`` step by step in
#: floating point, so a device that needs exactly the whole round (the full model at
#: ``r_max``) may end a few ulps after the deadline; finishing within
#: ``deadline + DEADLINE_RTOL * max(1, |deadline|)`` counts as on time.
DEADLINE_RTOL = 1e-9


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
