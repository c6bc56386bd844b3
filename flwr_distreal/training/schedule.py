"""Per-mini-batch dropout selection and round planning (paper, Algorithm 1).

Before every mini-batch a device reads its current resource availability r(t), turns it into
a budget and takes the LUT vector with the most MACs that fits; its simulated clock then
advances by the step's MACs integrated over r(t). Two selection policies:

``"paper"``
    The paper's ``D[r]``: per-batch budget ``r(t) * T / B`` (round duration T, B batches).
    Batches of unequal size (a partial last batch) get their share of T by samples,
    ``r(t) * T * b_j / N``, which is ``r(t) * T / B`` when all batches are equal.
``"deadline"``
    Deadline-aware: ``(time left until the deadline) * r(t) * b_j / (samples left)``, which
    spends what earlier batches saved and catches up after resources dropped.

A device whose availability drops during its last steps can overrun the deadline by part of a
step however it plans (it cannot see the future). With ``stop_at_deadline`` (DISTREAL's default
here) the device is interrupted at the deadline: the step in flight is abandoned and the device
sends the steps it completed, with ``c`` counting only those, so Algorithm 2 weights the partial
work by what it really cost. Without it, the device finishes late and is a straggler.

The simulated clock does not depend on what the model learns, so a round can be *planned*
(vectors, times, straggler status) before any training; the client then trains the plan.
A simulation can skip training a round whose update would be discarded (a straggler).

No Flower or Hydra imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..core.resources import batch_sizes, DEADLINE_RTOL, forward_macs_budget, RoundClock, RoundResult, step_macs

if TYPE_CHECKING:  # annotations only: the schedule (its POLICIES) is imported torch-free by the config schemas
    from ..core.lut import LUT

__all__ = ["POLICIES", "RoundPlan", "batch_sizes", "plan_distreal_round", "plan_fixed_round", "select_vector"]

Policy = Literal["paper", "deadline"]
POLICIES: tuple[str, ...] = ("paper", "deadline")


@dataclass
class RoundPlan:
    """What a device does in one round, decided by the simulated clock.

    Attributes
    ----------
    vectors : list of np.ndarray or None
        Dropout vector per mini-batch (``None`` = full model).
    forward_macs : list of int
        Forward MACs per sample of each mini-batch's (sub)model: Algorithm 1 adds these up
        as the device's computation ``c``.
    result : RoundResult
        Timing: finish time, straggler status, spent and available MACs.
    """

    vectors: list[np.ndarray | None]
    forward_macs: list[int]
    result: RoundResult
    batch_sizes: list[int] = field(default_factory=list)
    planned_batches: int = -1

    @property
    def incomplete(self) -> int:
        """Mini-batches not trained because the device stopped at the deadline."""
        return max(0, self.planned_batches - len(self.vectors)) if self.planned_batches >= 0 else 0

    @property
    def macs(self) -> int:
        """The computation ``c`` of Algorithm 1: sum of MACs(d) over the mini-batches."""
        return int(sum(self.forward_macs))

    @property
    def straggler(self) -> bool:
        """The device misses the round's deadline: its update will be discarded."""
        return self.result.straggler

    @property
    def mean_dropout(self) -> float:
        """Mean dropout rate over mini-batches and layers (0 for the full model)."""
        rates = [0.0 if v is None else float(np.mean(v)) for v in self.vectors]
        return float(np.mean(rates)) if rates else 0.0


def select_vector(
    clock: RoundClock,
    lut: LUT,
    batch_size: int,
    policy: Policy,
    round_samples: float,
    samples_left: float,
    step_macs_factor: float = 3.0,
) -> tuple[np.ndarray, int, float]:
    """Algorithm 1's ``r <- r_i(t); d <- D[r]`` for the next mini-batch (does not advance the clock).

    The one place where the selection policies live: :func:`plan_distreal_round` plans a whole
    round with it and :class:`flwr_distreal.training.loop.DistrealRound` calls it batch by batch inside a
    user's own training loop.

    Parameters
    ----------
    clock : RoundClock
        The device's clock, at the moment the mini-batch starts (read, not advanced).
    lut : LUT
        The lookup table D of dropout vectors.
    batch_size : int
        Samples in this mini-batch.
    policy : {"paper", "deadline"}
        ``"paper"``: step budget ``r(t) * T * b / round_samples``; ``"deadline"``:
        ``remaining_time * r(t) * b / samples_left`` (see the module docstring).
    round_samples : float
        Samples of the whole round (all mini-batches, all local epochs).
    samples_left : float
        Samples left in the round, this mini-batch's included (> 0).
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to its forward pass.

    Returns
    -------
    tuple[np.ndarray, int, float]
        The dropout vector ``d``, its forward MACs per sample (what Algorithm 1 adds to ``c``)
        and the MACs of the training step on this mini-batch (what the clock advances by).
        When even the cheapest vector does not fit the budget, the cheapest.
    """
    r = clock.rate()
    if policy == "paper":
        step_budget = r * clock.round_duration * batch_size / round_samples
    else:
        step_budget = clock.remaining_time() * r * batch_size / samples_left
    # The same relative tolerance as the clock's deadline check: a budget that equals a
    # vector's MACs up to float rounding selects that vector.
    budget = forward_macs_budget(step_budget, batch_size, step_macs_factor) * (1.0 + DEADLINE_RTOL)
    vector, fwd = lut.select(budget, fallback_to_cheapest=True)
    return vector, fwd, step_macs(fwd, batch_size, step_macs_factor)


def plan_distreal_round(
    clock: RoundClock,
    lut: LUT,
    sizes: Sequence[int],
    policy: Policy = "paper",
    step_macs_factor: float = 3.0,
    stop_at_deadline: bool = False,
) -> RoundPlan:
    """Plan a DISTREAL round: choose a LUT vector before every mini-batch (Algorithm 1).

    Parameters
    ----------
    clock : RoundClock
        The device's simulated clock for this round (advanced in place).
    lut : LUT
        The lookup table D of dropout vectors.
    sizes : sequence of int
        Mini-batch sizes of the round (see :func:`batch_sizes`).
    policy : {"paper", "deadline"}
        Budget rule (see module docstring).
    step_macs_factor : float
        Cost of a training step relative to its forward pass.
    stop_at_deadline : bool
        Abandon the step that would end after the deadline and stop there (see module
        docstring); the plan then holds fewer steps than ``sizes``.

    Returns
    -------
    RoundPlan
        Vectors, their MACs and the timing. When even the cheapest vector does not fit the
        budget, the cheapest is used (the device may then become a straggler).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; valid: {list(POLICIES)}")
    n = len(sizes)
    total = float(sum(sizes))
    left = total
    vectors: list[np.ndarray | None] = []
    macs: list[int] = []
    for bs in sizes:
        vector, fwd, cost = select_vector(clock, lut, bs, policy, total, left, step_macs_factor)
        left -= bs
        if stop_at_deadline and not clock.fits(cost):
            done = len(vectors)
            return RoundPlan(vectors, macs, clock.result(done), list(sizes[:done]), planned_batches=n)
        vectors.append(vector)
        macs.append(int(fwd))
        clock.step(cost)
    return RoundPlan(vectors, macs, clock.result(n), list(sizes), planned_batches=n)


def plan_fixed_round(
    clock: RoundClock | None,
    forward_macs: int,
    sizes: Sequence[int],
    step_macs_factor: float = 3.0,
) -> RoundPlan:
    """Plan a round on a (sub)model fixed for the whole round (full model, Federated Dropout,
    HeteroFL, small network). ``clock=None`` means unlimited resources (never a straggler).
    """
    n = len(sizes)
    if clock is None:
        spent = float(sum(step_macs(forward_macs, bs, step_macs_factor) for bs in sizes))
        steps = tuple(step_macs(forward_macs, bs, step_macs_factor) for bs in sizes)
        result = RoundResult(0.0, 0.0, 0.0, n, n, spent, spent, steps)
        return RoundPlan([None] * n, [int(forward_macs)] * n, result, list(sizes), planned_batches=n)
    for bs in sizes:
        clock.step(step_macs(forward_macs, bs, step_macs_factor))
    return RoundPlan([None] * n, [int(forward_macs)] * n, clock.result(n), list(sizes), planned_batches=n)
