"""FjORD's torch side: the server's round-start planner (:class:`FjORDPlanner`), the per-batch
round plan on the simulated clock (:func:`plan_width_round`) and the client's trainer
(:class:`OrderedDropoutTrainer`). The method itself (what it does, its schema, its
registration) is :mod:`flwr_distreal.methods.fjord`, which loads this module on first use: the
schemas of every method are imported without torch (the runner of ``flwr run`` composes and
checks configs with them). Import these names from :mod:`flwr_distreal.methods.fjord`.

No Flower or Hydra imports.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core import contract as C
from ..core.dropout import DropoutModel
from ..core.macs import macs_of_counts
from ..core.resources import RoundClock, RoundResult, step_macs
from ..server import Assignment, HeteroFLPlanner, SubmodelPlanner
from ..training.clock import MeasuredClock, Pick
from ..training.schedule import RoundPlan
from ..training.trainers import BaselineTrainer, Scalar
from .fjord import FJORD_WIDTHS, WIDTHS_KEY, check_widths, format_widths, parse_widths, prefix_counts

__all__ = ["FjORDPlanner", "OrderedDropoutTrainer", "plan_width_round"]

log = logging.getLogger(__name__)


def _prefixes(layer_widths: Sequence[int], counts: Sequence[int]) -> list[Tensor | None]:
    return [None if k == c else torch.arange(k) for k, c in zip(counts, layer_widths)]


class FjORDPlanner(SubmodelPlanner):
    """FjORD's round start: each device's maximum width ``p_max`` from its budget.

    ``p_max`` is the widest width of ``widths`` whose submodel (the first ``ceil(p * C)``
    filters of every dropout group) has forward MACs within the device's budget, the narrowest
    when none fits (the rule of :meth:`HeteroFLPlanner.level_for_budget`, over the widths
    sorted widest first). The device trains (at most) the ``p_max`` prefix; its train config
    carries ``width-level`` (1 = widest), ``width`` (``p_max``) and :data:`WIDTHS_KEY` (the
    widths it draws from, those ``<= p_max``).

    Parameters
    ----------
    model : DropoutModel
        The full model.
    widths : Sequence[float], optional
        The width set ``P``, numbers in (0, 1]. Defaults to :data:`FJORD_WIDTHS`.

    Raises
    ------
    ValueError
        If ``widths`` is empty, repeats a width or holds one outside (0, 1].
    """

    def __init__(self, model: DropoutModel, *, widths: Sequence[float] = FJORD_WIDTHS) -> None:
        width_set = check_widths(widths)
        super().__init__(model)
        self.width_set: tuple[float, ...] = width_set  # ascending
        self.level_widths: list[float] = sorted(width_set, reverse=True)  # level p = 1 is the widest
        self.levels = len(self.level_widths)
        self.level_counts: list[list[int]] = [self.counts_for_width(w) for w in self.level_widths]
        self.level_macs: list[int] = [int(macs_of_counts(model, c)) for c in self.level_counts]

    # The shared round-start rules of the width-level baselines (one definition, HeteroFL's).
    counts_for_width = HeteroFLPlanner.counts_for_width
    level_for_budget = HeteroFLPlanner.level_for_budget

    def p_max_for_budget(self, budget: float) -> float:
        """The widest width whose submodel fits ``budget`` forward MACs per sample (the
        narrowest when none fits)."""
        return self.level_widths[self.level_for_budget(budget) - 1]

    def assign(self, device_id: int, budget: float, server_round: int) -> tuple[Assignment, dict[str, Any]]:
        """``p_max`` from the budget; its prefix of every group (the mask it is averaged over)."""
        p = self.level_for_budget(budget)
        p_max = self.level_widths[p - 1]
        kept = tuple(None if k == c else np.arange(k) for k, c in zip(self.level_counts[p - 1], self.widths))
        allowed = [w for w in self.width_set if w <= p_max]
        config = {C.WIDTH_LEVEL: p, C.WIDTH: p_max, WIDTHS_KEY: format_widths(allowed)}
        return Assignment(device_id, kept, f"fjord-{p}"), config


def plan_width_round(
    clock: RoundClock | None,
    forward_macs: Sequence[int],
    sizes: Sequence[int],
    step_macs_factor: float = 3.0,
) -> RoundPlan:
    """Plan a round whose mini-batches train (sub)models of different MACs, fixed in advance.

    :func:`flwr_distreal.training.schedule.plan_fixed_round` with one forward-MACs value per
    mini-batch: the clock advances by each step's MACs; ``clock=None`` means unlimited resources
    (never a straggler). Like the other submodel baselines the device does not stop at the
    deadline: a round that ends late is a straggler's.

    Raises
    ------
    ValueError
        If ``forward_macs`` and ``sizes`` differ in length.
    """
    if len(forward_macs) != len(sizes):
        raise ValueError(f"got {len(forward_macs)} MACs values for {len(sizes)} mini-batches")
    n = len(sizes)
    steps = tuple(step_macs(f, bs, step_macs_factor) for f, bs in zip(forward_macs, sizes))
    macs = [int(f) for f in forward_macs]
    if clock is None:
        spent = float(sum(steps))
        result = RoundResult(0.0, 0.0, 0.0, n, n, spent, spent, steps)
        return RoundPlan([None] * n, macs, result, list(sizes), planned_batches=n)
    for cost in steps:
        clock.step(cost)
    return RoundPlan([None] * n, macs, clock.result(n), list(sizes), planned_batches=n)


@dataclasses.dataclass(frozen=True)
class _Width:
    """One width a device may draw: its kept filters (on the training device) and MACs."""

    width: float
    counts: tuple[int, ...]
    subsets: tuple[Tensor | None, ...]
    macs: int


class OrderedDropoutTrainer(BaselineTrainer):
    """FjORD's device: ordered dropout with one width drawn per mini-batch.

    From the train config it reads the widths it may draw (:data:`WIDTHS_KEY`; without it, the
    trainer's own ``widths`` up to ``width``, ``p_max``, or all of them) and checks that
    ``fixed-subsets``, when given, is the prefix of the widest of them (the slice the server
    averages its update over). Before the round it draws one width per mini-batch, uniformly,
    seeded by ``(seed, round, device id)``, and plans the round on the clock with each
    mini-batch's MACs (:func:`plan_width_round`); each mini-batch then trains the first
    ``ceil(p * C)`` filters of every dropout group. The ``macs`` metric sums the MACs of the
    widths actually trained; ``mean_dropout`` is the mean over mini-batches and groups of
    ``1 - k / C``; ``submodel-macs`` (server side) is that of ``p_max``, an upper bound.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`~flwr_distreal.training.trainers.BaselineTrainer`.
    widths : Sequence[float], optional
        The width set used when the config has no :data:`WIDTHS_KEY`. Defaults to
        :data:`FJORD_WIDTHS`.

    Raises
    ------
    ValueError
        If ``widths`` is not a valid width set (see :func:`check_widths`).
    """

    def __init__(self, *args: Any, widths: Sequence[float] = FJORD_WIDTHS, **kwargs: Any) -> None:
        self.width_set = check_widths(widths)
        super().__init__(*args, **kwargs)
        self._table: list[_Width] = []
        self._draws: list[int] = []
        self._cache: dict[float, _Width] = {}

    # -- the round's widths ----------------------------------------------------------------
    def allowed_widths(self, config: Mapping[str, Scalar]) -> tuple[float, ...]:
        """The widths this device draws from this round (ascending).

        Raises
        ------
        ValueError
            If :data:`WIDTHS_KEY` or ``width`` is malformed, or no width of the trainer's set is
            at most ``width``.
        """
        if WIDTHS_KEY in config:
            return parse_widths(config[WIDTHS_KEY])
        p_max = config.get(C.WIDTH)
        if p_max is None:
            return self.width_set
        if not C.is_number(p_max) or not 0.0 < float(p_max) <= 1.0:  # type: ignore[arg-type]
            raise ValueError(f"{C.WIDTH} must be a width in (0, 1], got {p_max!r}")
        allowed = tuple(w for w in self.width_set if w <= float(p_max) + 1e-12)
        if not allowed:
            raise ValueError(f"no width of {list(self.width_set)} is at most {C.WIDTH}={p_max!r}")
        return allowed

    def _width(self, width: float) -> _Width:
        entry = self._cache.get(width)
        if entry is None:
            layer_widths = self.model.layer_widths
            counts = prefix_counts(layer_widths, width)
            subsets = tuple(
                None if s is None else s.to(self.torch_device) for s in _prefixes(layer_widths, counts)
            )
            entry = _Width(width, tuple(counts), subsets, int(macs_of_counts(self.model, counts)))
            self._cache[width] = entry
        return entry

    def prepare(self, config: Mapping[str, Scalar]) -> None:
        """The round's width table; the fixed subsets, when sent, must be the widest prefix."""
        self._table = [self._width(w) for w in self.allowed_widths(config)]
        widest = self._table[-1]
        text = config.get(C.FIXED_SUBSETS)
        if text is not None:
            sent = C.decode_subsets(str(text), self.model.layer_widths)
            expected = _prefixes(self.model.layer_widths, widest.counts)
            same = all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(sent, expected)
            )
            if not same:
                raise ValueError(
                    f"{C.FIXED_SUBSETS} is not the ordered-dropout prefix of width {widest.width} "
                    f"(the widest of {WIDTHS_KEY}): the server and the device disagree on the submodel"
                )
        self.model.set_fixed_subsets(None)
        self._kept = None

    def _rng(self, server_round: int) -> np.random.Generator:
        if self.seed is None:  # torch's global generator, like the other draws without a seed
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        # the tag keeps the width draws apart from the filter and batch-order seeds of reseed()
        return np.random.default_rng([self.seed, server_round, self.device_id, 0x464A4F5244])

    def plan(self, server_round: int, config: Mapping[str, Scalar]) -> RoundPlan:
        """Draw a width per mini-batch and plan the round with their MACs."""
        self.prepare(config)
        rng = self._rng(server_round)
        self._draws = [int(i) for i in rng.integers(0, len(self._table), size=len(self.sizes))]
        macs = [self._table[i].macs for i in self._draws]
        clock = self.round_clock(server_round, config)
        return plan_width_round(clock, macs, self.sizes, self.step_macs_factor)

    @property
    def batch_widths(self) -> list[float]:
        """The width drawn for each mini-batch of the last planned round."""
        return [self._table[i].width for i in self._draws]

    def _use(self, entry: _Width) -> None:
        # The subsets were validated when the table was built (prefixes of the model's groups):
        # set them directly, already on the training device, instead of re-validating per step.
        for group, subset in zip(self.model.dropout_groups, entry.subsets):
            group.fixed_subset = subset

    def train(self, plan: RoundPlan, server_round: int = 1) -> tuple[float, int]:
        """Train the planned mini-batches, each at its drawn width (see
        :meth:`DeviceTrainer.train <flwr_distreal.training.trainers.DeviceTrainer.train>`)."""
        model = self.model
        model.train()
        step = self.local_step(server_round)
        losses: list[float] = []
        batches = self._batches()
        try:
            for index in self._draws[: len(plan.vectors)]:
                x, y = next(batches)
                self._use(self._table[index])
                loss = step(x.to(self.torch_device), y.to(self.torch_device), None)
                if not math.isfinite(loss):
                    log.warning(
                        "Device %s, round %s: the loss of mini-batch %s is %s; training stops here",
                        self.device_id, server_round, len(losses), loss,
                    )
                    return float("nan"), len(losses)
                losses.append(loss)
        finally:
            model.set_fixed_subsets(None)
        return (float(np.mean(losses)) if losses else float("nan")), len(losses)

    def measured_choice(
        self, clock: MeasuredClock, start: float, deadline: float
    ) -> tuple[Callable[[int, float, Sequence[int]], Pick | None], bool]:
        """On the measured (wall) clock: each mini-batch trains its drawn width (drawn as on the
        simulated clock), however long the round takes (it never stops at the deadline: a late
        device is a straggler). Without a step-time table the step time is taken as
        proportional to MACs."""
        self._draws = [int(i) for i in self._rng(clock.server_round).integers(0, len(self._table), size=len(self.sizes))]
        table = clock.time_table
        widths = self.model.layer_widths

        def choose(j: int, now: float, left: Sequence[int]) -> Pick:
            entry = self._table[self._draws[j]]
            self._use(entry)  # set right before the step of mini-batch j
            rel = table.rel_time_of_macs(entry.macs) if table is not None else max(entry.macs, 1) / clock.full_macs
            rate = float(np.mean([1 - k / c for k, c in zip(entry.counts, widths)]))
            return Pick(None, -1, rate, entry.macs, rel)

        return choose, False

    def metrics(self, plan: RoundPlan, loss: float) -> dict[str, Scalar]:
        """The contract's metrics; ``mean_dropout`` over the widths of the batches trained."""
        out = super().metrics(plan, loss)  # no fixed subsets kept (prepare): the round's metrics as they are
        widths = self.model.layer_widths
        drawn = [self._table[i] for i in self._draws[: len(plan.vectors)]]
        if drawn:
            out[C.MEAN_DROPOUT] = float(np.mean([np.mean([1 - k / c for k, c in zip(e.counts, widths)]) for e in drawn]))
        return out
