"""The submodel baselines' server side: Federated Dropout and HeteroFL.

At round start a planner (:class:`FederatedDropoutPlanner`, Caldas et al. 2018;
:class:`HeteroFLPlanner`, Diao, Ding and Tarokh 2021) chooses every selected device's submodel
from the forward budget its availability allows (:meth:`SubmodelCore.forward_budget`);
:class:`SubmodelCore` (a :class:`flwr_distreal.server.gate.ReplyGate`) then combines the
accepted replies with the ``per_weight`` or ``all_clients`` rule
(:data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`) over the masks of the weights each
submodel trained. No Flower or Hydra imports.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import contract as C
from ..core.contract import encode_subsets, is_number
from ..core.dropout import DropoutModel, kept_count, parameter_masks
from ..core.lut import LUT
from ..core.macs import macs_of_counts
from .aggregate import SUBMODEL_RULES, SubmodelAggregation
from .bounds import RoundBounds
from .gate import ReplyGate
from .replies import Accepted, Arrays, Reply
from .validation import RefusalReason, ValidationResult

__all__ = [
    "Assignment",
    "AvailabilityFn",
    "FederatedDropoutPlanner",
    "HeteroFLPlanner",
    "SubmodelCore",
    "SubmodelPlanner",
    "check_device",
]

log = logging.getLogger(__name__)

#: ``availability_fn(device_id, t)``: a device's resource availability in MACs per second.
AvailabilityFn = Callable[[int, float], float]


def check_device(node: str, device_id: object, round_samples: object) -> tuple[int, int]:
    """Validate a node's device id and round workload (submodel baselines).

    Returns
    -------
    tuple[int, int]
        ``(device id, round samples)``.

    Raises
    ------
    ValueError
        If either is not a non-negative integer, or the device has no samples.
    """
    for name, value in (("device id", device_id), ("round samples", round_samples)):
        if not is_number(value) or float(value) != int(value) or int(value) < 0:  # type: ignore[arg-type]
            raise ValueError(f"node {node} has invalid {name} {value!r}")
    if int(round_samples) == 0:  # type: ignore[arg-type]
        raise ValueError(f"node {node} has no training samples")
    return int(device_id), int(round_samples)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Assignment:
    """The submodel a device trains in one round.

    Attributes
    ----------
    device_id : int
        The device it was assigned to.
    kept : tuple[np.ndarray | None, ...]
        Per dropout layer, the kept filter indices (None: all).
    mask_key : str | None
        Cache key for masks that repeat (HeteroFL levels); None: not cached.
    """

    device_id: int
    kept: tuple[np.ndarray | None, ...]
    mask_key: str | None


class SubmodelPlanner(ABC):
    """Chooses a device's submodel at round start from its forward budget.

    Parameters
    ----------
    model : DropoutModel
        The full model the clients train (for widths and MACs).
    """

    def __init__(self, model: DropoutModel) -> None:
        self.model = model
        self.widths: list[int] = list(model.layer_widths)

    @abstractmethod
    def assign(self, device_id: int, budget: float, server_round: int) -> tuple[Assignment, dict[str, Any]]:
        """The submodel for a device with ``budget`` forward MACs per sample, and the
        train-config keys that describe the choice (for logs)."""

    def client_weights(self, examples: Sequence[float]) -> list[float]:
        """The aggregation weights of the accepted replies from their examples: the examples
        (FedAvg's weights; a method weighting its clients otherwise overrides this)."""
        return [float(n) for n in examples]


class FederatedDropoutPlanner(SubmodelPlanner):
    """Federated Dropout (Caldas et al. 2018), extended as in the paper.

    ONE dropout rate for all layers per device, the lowest whose submodel fits the budget
    (0.5 when none fits), and a random subset of ``kept_count(rate, C)`` filters per layer,
    fixed for the round and seeded by ``(seed, server_round, device_id)``.

    Parameters
    ----------
    model : DropoutModel
        The full model.
    rate_for_budget : Callable[[float], float] | None, optional
        Maps a forward-MACs-per-sample budget to a rate in [0, 0.5]. None (default) uses a
        uniform LUT over ``rates``.
    rates : Sequence[float] | None, optional
        Candidate rates of the default selection. Defaults to 0, 0.01, ..., 0.5.
    seed : int, optional
        Seed of the filter subsets. Defaults to 0.

    Raises
    ------
    ValueError
        If a rate is outside [0, 0.5] or there is none.
    """

    def __init__(
        self,
        model: DropoutModel,
        *,
        rate_for_budget: Callable[[float], float] | None = None,
        rates: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        self.seed = int(seed)
        if rate_for_budget is None:
            grid = np.round(np.linspace(0.0, 0.5, 51), 10) if rates is None else np.asarray(rates, float)
            if grid.size == 0 or not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 0.5:
                raise ValueError(f"rates must be non-empty and within [0, 0.5], got {list(grid)}")
            lut = LUT.uniform(model, grid.tolist())

            def rate_for_budget(budget: float) -> float:
                vector, _ = lut.select(budget, fallback_to_cheapest=True)
                return float(vector[0])

        self.rate_for_budget = rate_for_budget

    def assign(self, device_id: int, budget: float, server_round: int) -> tuple[Assignment, dict[str, Any]]:
        """A rate from the budget and a seeded random filter subset per layer."""
        rate = float(self.rate_for_budget(budget))
        if not (math.isfinite(rate) and 0.0 <= rate <= 0.5):
            raise ValueError(f"rate_for_budget returned {rate!r}, expected a rate in [0, 0.5]")
        rng = np.random.default_rng([self.seed, server_round, device_id])
        kept: list[np.ndarray | None] = []
        for width in self.widths:
            k = kept_count(rate, width)
            kept.append(None if k == width else np.sort(rng.choice(width, size=k, replace=False)))
        return Assignment(device_id, tuple(kept), None), {C.DROPOUT_RATE: rate}


class HeteroFLPlanner(SubmodelPlanner):
    """HeteroFL (Diao, Ding and Tarokh 2021) as in the paper.

    Width level ``p = 1 .. levels`` keeps the FIRST ``ceil(s**(p-1) * C)`` filters of every
    dropout layer with ``C`` filters; a device gets the widest level whose forward MACs fit its
    budget, or the narrowest when none fits.

    Parameters
    ----------
    model : DropoutModel
        The full model.
    shrink : float, optional
        Shrinking ratio ``s`` in (0, 1). Defaults to 0.7 (the paper's choice).
    levels : int, optional
        Number of width levels (>= 1). Defaults to 5.

    Raises
    ------
    ValueError
        If ``shrink`` or ``levels`` is out of range.
    """

    def __init__(self, model: DropoutModel, *, shrink: float = 0.7, levels: int = 5) -> None:
        self.check_args(shrink, levels)
        super().__init__(model)
        self.shrink = float(shrink)
        self.levels = int(levels)
        self.level_counts: list[list[int]] = [
            self.counts_for_width(self.shrink ** (p - 1)) for p in range(1, self.levels + 1)
        ]
        self.level_macs: list[int] = [int(macs_of_counts(model, c)) for c in self.level_counts]

    @staticmethod
    def check_args(shrink: object, levels: object) -> None:
        """Raise ValueError unless ``0 < shrink < 1`` and ``levels`` is an int >= 1."""
        if not is_number(shrink) or not 0.0 < float(shrink) < 1.0:  # type: ignore[arg-type]
            raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")

    def counts_for_width(self, width: float) -> list[int]:
        """Filters kept per dropout layer at width fraction ``width``: ``ceil(width * C)``."""
        return [min(c, max(1, math.ceil(round(width * c, 9)))) for c in self.widths]

    def level_for_budget(self, budget: float) -> int:
        """The widest level (smallest ``p``) whose MACs fit ``budget``; the last if none fits."""
        for p, macs in enumerate(self.level_macs, start=1):
            if macs <= budget:
                return p
        return self.levels

    def assign(self, device_id: int, budget: float, server_round: int) -> tuple[Assignment, dict[str, Any]]:
        """The level from the budget; its first channels."""
        p = self.level_for_budget(budget)
        counts = self.level_counts[p - 1]
        kept = tuple(None if k == c else np.arange(k) for k, c in zip(counts, self.widths))
        config = {C.WIDTH_LEVEL: p, C.WIDTH: round(self.shrink ** (p - 1), 12)}
        return Assignment(device_id, kept, f"level-{p}"), config


class SubmodelCore(ReplyGate):
    """The submodel baselines' round: plan at round start, then the submodel rule.

    At round start (:meth:`plan_round`) every selected node's device gets a forward budget
    from its availability at the round's start time (:meth:`forward_budget`) and the planner
    chooses its submodel; the node's train config carries ``device-id``, ``fixed-subsets``,
    ``submodel-macs`` and the planner's keys. A reply is refused when no submodel was assigned
    to its node this round, when it reports another device than the one assigned, or when its
    arrays do not match the broadcast model. Accepted replies are combined, weighted by examples,
    with the ``aggregation`` rule over the masks of the weights each submodel trained
    (:func:`flwr_distreal.core.dropout.parameter_masks`, cached per level): ``per_weight`` averages
    every weight over the clients whose submodel holds it
    (:func:`flwr_distreal.server.aggregate.masked_average`); ``all_clients`` counts every accepted
    client for every weight, one that did not train a weight with a zero update
    (:func:`flwr_distreal.server.aggregate.zero_padded_average`).

    Parameters
    ----------
    planner : SubmodelPlanner
        Chooses the submodels (its model is the full model the clients train).
    availability_fn : Callable[[int, float], float]
        ``availability_fn(device_id, t)``: MACs per second at simulated time ``t``.
    round_duration : float
        Round duration ``T`` in seconds of simulated time.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass. Defaults to 3.0.
    bounds : RoundBounds | None, optional
        The round-level bounds (no claims: the rule weights by examples); None (default) uses
        ``RoundBounds()``. ``robust="median"`` and ``"trimmed-mean"`` are not available: the
        submodel rules over the clients that trained a weight have no coordinate-wise twin
        here; ``"clip-to-median"`` is.
    aggregation : {"per_weight", "all_clients"}, optional
        The rule combining the accepted replies (see above). Defaults to ``"per_weight"``
        (HeteroFL's and the DISTREAL authors' baselines; README, "Baseline conventions").
    **keys : str
        Metric keys, see :class:`~flwr_distreal.server.gate.ReplyGate`.

    Raises
    ------
    ValueError
        If ``availability_fn`` is not callable, ``round_duration`` or ``step_macs_factor`` is
        not a positive finite number, ``bounds.robust`` is a coordinate-wise rule, or
        ``aggregation`` is not a rule of :data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`.
    """

    def __init__(
        self,
        planner: SubmodelPlanner,
        *,
        availability_fn: AvailabilityFn,
        round_duration: float,
        step_macs_factor: float = 3.0,
        bounds: RoundBounds | None = None,
        aggregation: SubmodelAggregation = "per_weight",
        **keys: str,
    ) -> None:
        self.check_args(availability_fn, round_duration, step_macs_factor, aggregation)
        if bounds is not None and bounds.robust in ("median", "trimmed-mean"):
            raise ValueError(
                f"robust={bounds.robust!r} is not available for the submodel baselines (masked "
                "averaging rules); use robust='clip-to-median' or None"
            )
        super().__init__(bounds=bounds, **keys)
        self.planner = planner
        self.model: DropoutModel = planner.model
        self.widths: list[int] = list(planner.widths)
        self.state_keys: list[str] = list(self.model.state_dict().keys())
        self.availability_fn = availability_fn
        self.round_duration = float(round_duration)
        self.step_macs_factor = float(step_macs_factor)
        self.aggregation: SubmodelAggregation = aggregation
        self.assignments: dict[str, Assignment] = {}
        self._mask_cache: dict[str, list[np.ndarray]] = {}

    @staticmethod
    def check_args(
        availability_fn: object, round_duration: object, step_macs_factor: object, aggregation: object = "per_weight"
    ) -> None:
        """Raise ValueError unless the round timing is positive and finite, ``availability_fn``
        is callable and ``aggregation`` names a submodel rule."""
        for name, value in (("round_duration", round_duration), ("step_macs_factor", step_macs_factor)):
            if not is_number(value) or not (math.isfinite(float(value)) and float(value) > 0):  # type: ignore[arg-type]
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not callable(availability_fn):
            raise ValueError("availability_fn must be a callable (device_id, t) -> MACs per second")
        if not isinstance(aggregation, str) or aggregation not in SUBMODEL_RULES:
            raise ValueError(f"aggregation must be one of {list(SUBMODEL_RULES)}, got {aggregation!r}")

    # -- round start -------------------------------------------------------------------
    def round_start(self, server_round: int) -> float:
        """Simulated time at which round ``server_round`` starts, ``(server_round - 1) * T``."""
        return (server_round - 1) * self.round_duration

    def forward_budget(self, device_id: int, server_round: int, round_samples: int) -> float:
        """Forward MACs per sample a device can afford this round, judged at round start.

        Returns
        -------
        float
            ``r(t0) * T / (step_macs_factor * round_samples)``: the availability at round start
            is assumed to last the whole round.

        Raises
        ------
        ValueError
            If the availability is negative, NaN or not a number.
        """
        rate = self.availability_fn(device_id, self.round_start(server_round))
        if not is_number(rate) or math.isnan(float(rate)) or float(rate) < 0:
            raise ValueError(f"availability of device {device_id} is {rate!r}, expected MACs/s >= 0")
        return float(rate) * self.round_duration / (self.step_macs_factor * round_samples)

    def plan_round(
        self,
        server_round: int,
        devices: Mapping[str, tuple[object, object]],
        *,
        logger: logging.Logger | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Assign a submodel to every selected node at round start.

        Parameters
        ----------
        server_round : int
            The round.
        devices : Mapping[str, tuple[object, object]]
            ``(device id, round samples)`` of every selected node, by node key, as known
            (unvalidated).
        logger : logging.Logger | None, optional
            Where skipped nodes are logged; defaults to this module's.

        Returns
        -------
        dict[str, dict[str, Any]]
            The train-config keys of every node that gets a submodel: ``device-id``,
            ``fixed-subsets``, ``submodel-macs`` and the planner's. A node whose device or
            availability is invalid is logged and left out (it is not trained).

        Raises
        ------
        RuntimeError
            If nothing was broadcast yet.
        ValueError
            If the broadcast model does not match the strategy's model.
        """
        logger = logger or log
        g = self.global_arrays
        if len(g) != len(self.state_keys):
            raise ValueError(
                f"the global parameters have {len(g)} arrays but the strategy's model has "
                f"{len(self.state_keys)} state_dict entries"
            )
        self.assignments = {}
        configs: dict[str, dict[str, Any]] = {}
        for node, (raw_device, raw_samples) in devices.items():
            try:
                device_id, samples = check_device(node, raw_device, raw_samples)
                budget = self.forward_budget(device_id, server_round, samples)
            except ValueError as err:
                logger.warning("round %s: node %s not trained: %s", server_round, node, err)
                continue
            assignment, extra = self.planner.assign(device_id, budget, server_round)
            self.assignments[node] = assignment
            counts = [self.widths[i] if k is None else len(k) for i, k in enumerate(assignment.kept)]
            configs[node] = {
                C.DEVICE_ID: device_id,
                C.FIXED_SUBSETS: encode_subsets(assignment.kept),
                C.SUBMODEL_MACS: int(macs_of_counts(self.model, counts)),
                **extra,
            }
        return configs

    # -- aggregation -------------------------------------------------------------------
    def check(self, reply: Reply) -> ValidationResult:
        """Refuse unassigned nodes, device mismatches and bad arrays; validate examples."""
        assignment = self.assignments.get(reply.node)
        if assignment is None:
            return ValidationResult.refuse(
                RefusalReason.UNASSIGNED_CLIENT, "no submodel was assigned to this node this round"
            )
        reported = reply.metrics.get(self.partition_id_key)
        if reported is not None and (
            not is_number(reported) or int(reported) != assignment.device_id  # type: ignore[arg-type]
        ):
            return ValidationResult.refuse(
                RefusalReason.DEVICE_MISMATCH,
                f"reply reports {self.partition_id_key}={reported!r} but the submodel was "
                f"assigned to device {assignment.device_id}",
            )
        n = reply.num_examples
        if not is_number(n) or not math.isfinite(float(n)) or float(n) < 0:
            return ValidationResult.refuse(
                RefusalReason.INVALID_WEIGHT, f"number of examples {n!r} is not a non-negative number"
            )
        return self.check_arrays(reply.arrays)

    def masks(self, assignment: Assignment) -> list[np.ndarray]:
        """Boolean masks (``state_dict`` order) of the weights a submodel trains; cached per
        ``mask_key``."""
        key = assignment.mask_key
        if key is not None and key in self._mask_cache:
            return self._mask_cache[key]
        kept = [None if k is None else torch.as_tensor(k, dtype=torch.long) for k in assignment.kept]
        by_key = parameter_masks(self.model, kept)
        masks = [by_key[k] for k in self.state_keys]
        if key is not None:
            self._mask_cache[key] = masks
        return masks

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """The ``aggregation`` rule over the accepted replies' submodels, weighted by examples
        (or as the planner's :meth:`SubmodelPlanner.client_weights` says)."""
        weights = self.planner.client_weights([a.reply.num_examples for a in accepted])
        if sum(weights) <= 0:
            log.warning("every accepted reply reports zero examples: nothing to weight by")
            return None
        masks = [self.masks(self.assignments[a.reply.node]) for a in accepted]
        rule = SUBMODEL_RULES[self.aggregation]
        return rule(global_arrays, [a.reply.arrays for a in accepted], masks, weights)
