"""The Flower-free server core shared by the legacy and the Message-API strategies.

Both strategy families (:mod:`flwr_distreal.strategy`, legacy ``FitIns``/``FitRes``;
:mod:`flwr_distreal.serverapp`, Flower's ``Message`` API) are thin adapters over this module:
they unpack Flower's types into a neutral :class:`Reply`, call the core and pack the result.
Everything that decides which devices train, which replies count and how they are combined
lives here, once, so that both APIs produce bit-identical global models from the same replies.
No Flower or Hydra imports: only NumPy, torch and the package's core modules.

Pieces
------
:class:`Reply`, :func:`reply_order`
    A client's reply, whatever the API it came through, and the order replies are combined
    in (by device id, then node key): summing in a fixed order makes a seeded run
    reproducible to the last bit.
:class:`ReplyGate`
    The round's gate: keeps the broadcast model, drops stragglers, validates every other
    reply (:func:`flwr_distreal.aggregate.validate_reply` / ``validate_arrays``), logs every
    refusal with the round, the node, the device's partition id and the reason, counts
    (``received``, ``failures``, ``stragglers``, ``refused``, ``accepted``, ``mean_macs``,
    ``mean_utilisation``) and combines the accepted replies with its aggregation rule.
:class:`DistrealCore`, :class:`FedAvgCore`, :class:`SubmodelCore`
    The aggregation rules: Algorithm 2 of Rapp et al. (AAAI 2022), weighted by the MACs each
    client spent; FedAvg weighted by examples; the submodel baselines' per-weight average.
:class:`FederatedDropoutPlanner`, :class:`HeteroFLPlanner`
    The submodel baselines' round-start choices from the forward budget a device's
    availability allows at round start (see :meth:`SubmodelCore.forward_budget`).
:func:`seeded_draw`, :func:`sample_size`
    The seeded client draw shared by :class:`flwr_distreal.client_manager.SeededClientManager`
    and the Message-API strategies, so both APIs train the same devices for the same seed.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from . import contract as C
from .aggregate import (
    OnExcess,
    RefusalReason,
    ValidationResult,
    mac_weighted_update,
    masked_average,
    validate_arrays,
    validate_reply,
    weighted_average,
)
from .contract import encode_subsets, is_number, is_straggler
from .dropout import DropoutModel, kept_count, parameter_masks
from .macs import macs_of_counts

__all__ = [
    "Accepted",
    "Assignment",
    "AvailabilityFn",
    "DistrealCore",
    "FedAvgCore",
    "FederatedDropoutPlanner",
    "HeteroFLPlanner",
    "Reply",
    "ReplyGate",
    "RoundOutcome",
    "SubmodelCore",
    "SubmodelPlanner",
    "as_device_id",
    "check_device",
    "fit_metrics_aggregation",
    "reply_order",
    "sample_size",
    "seeded_draw",
]

log = logging.getLogger(__name__)

#: ``availability_fn(device_id, t)``: a device's resource availability in MACs per second.
AvailabilityFn = Callable[[int, float], float]
Arrays = list[np.ndarray]
N = TypeVar("N", bound=Hashable)


# ------------------------------------------------------------------------------ replies


@dataclass(frozen=True)
class Reply:
    """One client's training reply, independent of the Flower API it came through.

    Attributes
    ----------
    node : str
        The node key: the legacy ``ClientProxy.cid``, or ``str(node_id)`` in the Message API
        (both are the node id as text, so the two APIs order ties alike).
    device_id : int | None
        The device (partition) id the reply comes from: the reported ``partition-id`` metric,
        else what the server knows of the node; None when unknown.
    arrays : list[np.ndarray]
        The trained model, as ``state_dict`` values in order.
    num_examples : float
        Examples trained: the weight of the FedAvg-type rules.
    metrics : Mapping[str, Any]
        The reply's train metrics (keys of :mod:`flwr_distreal.contract`).
    refusal : ValidationResult | None
        A refusal the adapter decided while unpacking (e.g. an ``ArrayRecord`` whose keys are
        not the global model's); the gate honours it after the straggler check. None (default)
        when the reply unpacked cleanly.
    """

    node: str
    device_id: int | None
    arrays: Arrays
    num_examples: float
    metrics: Mapping[str, Any]
    refusal: ValidationResult | None = None


@dataclass(frozen=True)
class Accepted:
    """A reply that passed the gate, with the MACs it is weighted by (Distreal) or None."""

    reply: Reply
    macs: float | None = None


@dataclass
class RoundOutcome:
    """What the gate made of one round's replies.

    Attributes
    ----------
    arrays : list[np.ndarray] | None
        The new global model, or None when no reply could be combined (the caller then keeps
        the broadcast model).
    metrics : dict[str, int | float]
        ``received``, ``failures``, ``stragglers``, ``refused``, ``accepted``, ``mean_macs``
        and ``mean_utilisation`` (over the accepted replies; NaN over none).
    accepted : list[Accepted]
        The accepted replies, in combination order.
    """

    arrays: Arrays | None
    metrics: dict[str, int | float]
    accepted: list[Accepted] = field(default_factory=list)


def as_device_id(value: object) -> int | None:
    """A device id from a metric or property value: an int (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def reply_order(reply: Reply) -> tuple[int, str]:
    """Combination order of the replies: by device id (unknown first), then node key.

    Replies arrive in completion order; combining them in a fixed order makes a seeded run
    reproducible to the last bit, and the legacy and Message-API strategies identical.
    """
    return (-1 if reply.device_id is None else reply.device_id), reply.node


def fit_metrics_aggregation(
    fit_metrics: list[tuple[int, Mapping[str, Any]]],
    *,
    macs_key: str = C.MACS,
    straggler_key: str = C.STRAGGLER,
    available_macs_key: str = C.AVAILABLE_MACS,
) -> dict[str, int | float]:
    """Aggregate clients' fit metrics into per-round resource metrics.

    Usable as legacy FedAvg's ``fit_metrics_aggregation_fn`` (its signature), and used by the
    gate on the replies it accepted.

    Parameters
    ----------
    fit_metrics : list[tuple[int, Mapping[str, Any]]]
        ``(num_examples, metrics)`` per reply.
    macs_key : str, optional
        Metric holding the MACs a client spent. Defaults to ``"macs"``.
    straggler_key : str, optional
        Metric that is true for a client that missed the round's deadline.
        Defaults to ``"straggler"``.
    available_macs_key : str, optional
        Metric holding the MACs the client could have spent in the round.
        Defaults to ``"available_macs"``.

    Returns
    -------
    dict[str, int | float]
        ``received`` (replies), ``stragglers`` (how many were stragglers), ``mean_macs`` (mean
        reported MACs over the non-stragglers that report a finite value) and
        ``mean_utilisation`` (mean of ``macs / available_macs`` over the non-stragglers that
        report both, with ``available_macs > 0``). A mean over no reply is NaN.
    """
    stragglers = 0
    macs: list[float] = []
    utilisation: list[float] = []
    for _, metrics in fit_metrics:
        if is_straggler(metrics, straggler_key):
            stragglers += 1
            continue
        c = metrics.get(macs_key)
        if not is_number(c) or not math.isfinite(float(c)):  # type: ignore[arg-type]
            continue
        macs.append(float(c))  # type: ignore[arg-type]
        avail = metrics.get(available_macs_key)
        if is_number(avail) and math.isfinite(float(avail)) and float(avail) > 0:  # type: ignore[arg-type]
            utilisation.append(float(c) / float(avail))  # type: ignore[arg-type]
    return {
        "received": len(fit_metrics),
        "stragglers": stragglers,
        "mean_macs": float(np.mean(macs)) if macs else math.nan,
        "mean_utilisation": float(np.mean(utilisation)) if utilisation else math.nan,
    }


# ------------------------------------------------------------------------------ sampling


def sample_size(num_available: int, fraction: float, min_nodes: int) -> int:
    """Clients to draw in a round, as Flower's FedAvg counts them (both APIs).

    ``max(int(num_available * fraction), min_nodes)``.
    """
    return max(int(num_available * fraction), int(min_nodes))


def seeded_draw(rng: random.Random, devices: Mapping[N, int], k: int) -> list[N]:
    """Draw ``k`` nodes reproducibly: sorted by device id, then node key, then ``rng.sample``.

    Flower draws with the global, unseeded :mod:`random` over node ids that the simulation
    engine creates at random, so two runs train different devices. Sorting by the device
    (partition) id first makes the draw a function of the seed alone; one generator serving
    all rounds makes round ``t`` of two runs with the same seed draw the same devices. Used by
    :class:`flwr_distreal.client_manager.SeededClientManager` (legacy) and the Message-API
    strategies alike, so both APIs draw the same devices for the same seed.

    Parameters
    ----------
    rng : random.Random
        The draw's generator, ``random.Random(seed)``, kept across rounds.
    devices : Mapping[N, int]
        Device id of every node that may be drawn, by node key (legacy ``cid`` or Message-API
        node id; ties between equal device ids are broken by ``str(node)``).
    k : int
        Nodes to draw, at most ``len(devices)``.

    Returns
    -------
    list[N]
        The drawn node keys, in draw order.

    Raises
    ------
    ValueError
        If ``k`` is negative or larger than the number of nodes.
    """
    ordered = sorted(devices, key=lambda n: (devices[n], str(n)))
    return rng.sample(ordered, k)


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


# ---------------------------------------------------------------------------- the gate


def _check_key(name: str, key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} must be a non-empty string, got {key!r}")


class ReplyGate(ABC):
    """The round's gate and aggregation: the part of a strategy that does not touch Flower.

    Keeps the broadcast model of the round (:meth:`broadcast`), then, for the round's replies
    (:meth:`aggregate`): drops stragglers, validates every other reply (:meth:`check`), logs
    each refusal with the round, node, partition id and reason, combines the accepted replies
    in :func:`reply_order` with the subclass's rule (:meth:`combine`) and counts.

    Parameters
    ----------
    macs_key : str, optional
        Train metric with the MACs ``c_i`` spent. Defaults to ``"macs"``.
    num_batches_key : str, optional
        Train metric with the number of mini-batches trained. Defaults to ``"num_batches"``.
    straggler_key : str, optional
        Train metric that is true for a client that missed the deadline. Defaults to
        ``"straggler"``.
    available_macs_key : str, optional
        Train metric with the MACs the client could have spent (for ``mean_utilisation``).
        Defaults to ``"available_macs"``.
    partition_id_key : str, optional
        Train metric and property with the device id. Defaults to ``"partition-id"``.

    Raises
    ------
    ValueError
        If a key is not a non-empty string.
    """

    def __init__(
        self,
        *,
        macs_key: str = C.MACS,
        num_batches_key: str = C.NUM_BATCHES,
        straggler_key: str = C.STRAGGLER,
        available_macs_key: str = C.AVAILABLE_MACS,
        partition_id_key: str = C.PARTITION_ID,
    ) -> None:
        for name, key in (
            ("macs_key", macs_key),
            ("num_batches_key", num_batches_key),
            ("straggler_key", straggler_key),
            ("available_macs_key", available_macs_key),
            ("partition_id_key", partition_id_key),
        ):
            _check_key(name, key)
        self.macs_key = macs_key
        self.num_batches_key = num_batches_key
        self.straggler_key = straggler_key
        self.available_macs_key = available_macs_key
        self.partition_id_key = partition_id_key
        self._global: Arrays | None = None
        self._global_round: int | None = None

    # -- the broadcast model -------------------------------------------------------------
    def broadcast(self, server_round: int, arrays: Sequence[np.ndarray]) -> None:
        """Keep the global model ``theta_{t-1}`` broadcast in round ``server_round``."""
        self._global = [np.asarray(a) for a in arrays]
        self._global_round = server_round

    @property
    def global_arrays(self) -> Arrays:
        """The arrays of the last :meth:`broadcast`.

        Raises
        ------
        RuntimeError
            If nothing was broadcast yet.
        """
        if self._global is None:
            raise RuntimeError(
                "no parameters were broadcast yet: configure the round (configure_fit / "
                "configure_train) before aggregating it"
            )
        return self._global

    @property
    def global_round(self) -> int | None:
        """The round of the last :meth:`broadcast`, None before the first."""
        return self._global_round

    def check_arrays(self, arrays: Sequence[np.ndarray]) -> ValidationResult:
        """Validate a reply's arrays against the broadcast model: count, shapes, dtype kinds,
        finiteness (:func:`flwr_distreal.aggregate.validate_arrays`)."""
        g = self.global_arrays
        return validate_arrays(arrays, [a.shape for a in g], [a.dtype.kind for a in g])

    # -- the rule --------------------------------------------------------------------------
    @abstractmethod
    def check(self, reply: Reply) -> ValidationResult:
        """Validate one non-straggler reply."""

    @abstractmethod
    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """Combine accepted replies (non-empty, in :func:`reply_order`); None when they carry
        no weight."""

    # -- the round -------------------------------------------------------------------------
    def aggregate(
        self,
        server_round: int,
        replies: Iterable[Reply],
        *,
        failures: int = 0,
        logger: logging.Logger | None = None,
    ) -> RoundOutcome:
        """Gate and combine one round's replies.

        Parameters
        ----------
        server_round : int
            The round the replies belong to.
        replies : Iterable[Reply]
            The replies received (in any order).
        failures : int, optional
            Replies that failed or never came (counted only). Defaults to 0.
        logger : logging.Logger | None, optional
            Where refusals and the round's summary are logged; defaults to this module's.

        Returns
        -------
        RoundOutcome
            The new global model (None when nothing could be combined), the round's counts and
            the accepted replies.

        Raises
        ------
        RuntimeError
            If nothing was broadcast yet.
        """
        logger = logger or log
        replies = sorted(replies, key=reply_order)
        global_arrays = self.global_arrays
        if self._global_round != server_round:
            logger.warning(
                "aggregating round %s, but the last broadcast was in round %s",
                server_round,
                self._global_round,
            )
        stragglers, refused = 0, 0
        accepted: list[Accepted] = []
        for reply in replies:
            if is_straggler(reply.metrics, self.straggler_key):
                stragglers += 1
                continue
            check = reply.refusal if reply.refusal is not None else self.check(reply)
            if not check.ok:
                refused += 1
                logger.warning(
                    "round %s: refused reply of node %s (%s %s): %s: %s",
                    server_round,
                    reply.node,
                    self.partition_id_key,
                    "unknown" if reply.device_id is None else reply.device_id,
                    check.reason.value if check.reason is not None else "invalid",
                    check.message,
                )
                continue
            accepted.append(Accepted(reply, check.macs))
        resource = fit_metrics_aggregation(
            [(a.reply.num_examples, a.reply.metrics) for a in accepted],  # type: ignore[misc]
            macs_key=self.macs_key,
            straggler_key=self.straggler_key,
            available_macs_key=self.available_macs_key,
        )
        metrics: dict[str, int | float] = {
            "received": len(replies),
            "failures": int(failures),
            "stragglers": stragglers,
            "refused": refused,
            "accepted": len(accepted),
            "mean_macs": resource["mean_macs"],
            "mean_utilisation": resource["mean_utilisation"],
        }
        new_arrays = self.combine(global_arrays, accepted) if accepted else None
        if new_arrays is None:
            logger.warning(
                "round %s: no update to aggregate (%s received, %s stragglers, %s refused, "
                "%s failures); keeping the previous global model",
                server_round,
                len(replies),
                stragglers,
                refused,
                failures,
            )
        else:
            logger.info(
                "round %s: aggregated %s of %s replies (%s stragglers, %s refused, %s failures)",
                server_round,
                len(accepted),
                len(replies),
                stragglers,
                refused,
                failures,
            )
        return RoundOutcome(new_arrays, metrics, accepted)


def _examples_update(global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
    """FedAvg over the accepted replies, weighted by their examples."""
    weights = [a.reply.num_examples for a in accepted]
    if sum(weights) <= 0:
        log.warning("every accepted reply reports zero examples: nothing to weight by")
        return None
    return weighted_average(global_arrays, [a.reply.arrays for a in accepted], weights)


class DistrealCore(ReplyGate):
    """DISTREAL's gate and rule: Algorithm 2 of Rapp et al. (AAAI 2022).

    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i`` over the accepted
    replies (:func:`flwr_distreal.aggregate.mac_weighted_update`), where ``c_i`` is the MACs
    client ``i`` reports. A reply is refused when its MACs are missing, not a number, NaN/inf,
    negative or above ``num_batches * full_macs_per_batch`` (or clipped to that, with
    ``on_excess="clip"``), or its arrays do not match the broadcast model
    (:func:`flwr_distreal.aggregate.validate_reply`).

    Parameters
    ----------
    full_macs_per_batch : float
        The most MACs a client can report for one mini-batch (the full model's).
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum. Defaults to "refuse".
    **keys : str
        Metric keys, see :class:`ReplyGate`.

    Raises
    ------
    ValueError
        If ``full_macs_per_batch`` is not a positive finite number or ``on_excess`` is not
        "refuse" or "clip".
    """

    def __init__(self, *, full_macs_per_batch: float, on_excess: OnExcess = "refuse", **keys: str) -> None:
        if not is_number(full_macs_per_batch) or not (
            math.isfinite(float(full_macs_per_batch)) and float(full_macs_per_batch) > 0
        ):
            raise ValueError(
                f"full_macs_per_batch must be a positive finite number, got {full_macs_per_batch!r}"
            )
        if on_excess not in ("refuse", "clip"):
            raise ValueError(f"on_excess must be 'refuse' or 'clip', got {on_excess!r}")
        super().__init__(**keys)
        self.full_macs_per_batch = float(full_macs_per_batch)
        self.on_excess: OnExcess = on_excess

    def check(self, reply: Reply) -> ValidationResult:
        """Validate the reply's MACs, mini-batches and arrays."""
        g = self.global_arrays
        return validate_reply(
            reply.arrays,
            [a.shape for a in g],
            reply.metrics.get(self.macs_key),
            reply.metrics.get(self.num_batches_key),
            self.full_macs_per_batch,
            expected_kinds=[a.dtype.kind for a in g],
            on_excess=self.on_excess,
        )

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """Algorithm 2: the MAC-weighted update; None when every reply spent zero MACs."""
        macs = [float(a.macs or 0.0) for a in accepted]
        if sum(macs) <= 0.0:
            log.warning("every accepted reply reports zero MACs: nothing to weight by")
            return None
        return mac_weighted_update(global_arrays, [a.reply.arrays for a in accepted], macs)


class FedAvgCore(ReplyGate):
    """FedAvg's gate and rule (full resources, small network): arrays validated, the accepted
    replies averaged weighted by their examples."""

    def check(self, reply: Reply) -> ValidationResult:
        """Validate the reply's examples and arrays."""
        n = reply.num_examples
        if not is_number(n) or not math.isfinite(float(n)) or float(n) < 0:
            return ValidationResult.refuse(
                RefusalReason.INVALID_WEIGHT, f"number of examples {n!r} is not a non-negative number"
            )
        return self.check_arrays(reply.arrays)

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """FedAvg weighted by examples; None when every reply has zero examples."""
        return _examples_update(global_arrays, accepted)


# ------------------------------------------------------------------ submodel baselines


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
            from .lut import LUT

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
    """The submodel baselines' round: plan at round start, then per-weight averaging.

    At round start (:meth:`plan_round`) every selected node's device gets a forward budget
    from its availability at the round's start time (:meth:`forward_budget`) and the planner
    chooses its submodel; the node's train config carries ``device-id``, ``fixed-subsets``,
    ``submodel-macs`` and the planner's keys. A reply is refused when no submodel was assigned
    to its node this round, when it reports another device than the one assigned, or when its
    arrays do not match the broadcast model. Accepted replies are averaged per weight over the
    clients whose submodel trained it (:func:`flwr_distreal.aggregate.masked_average`, weighted
    by examples, masks of :func:`flwr_distreal.dropout.parameter_masks`, cached per level).

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
    **keys : str
        Metric keys, see :class:`ReplyGate`.

    Raises
    ------
    ValueError
        If ``availability_fn`` is not callable or ``round_duration`` or ``step_macs_factor`` is
        not a positive finite number.
    """

    def __init__(
        self,
        planner: SubmodelPlanner,
        *,
        availability_fn: AvailabilityFn,
        round_duration: float,
        step_macs_factor: float = 3.0,
        **keys: str,
    ) -> None:
        self.check_args(availability_fn, round_duration, step_macs_factor)
        super().__init__(**keys)
        self.planner = planner
        self.model: DropoutModel = planner.model
        self.widths: list[int] = list(planner.widths)
        self.state_keys: list[str] = list(self.model.state_dict().keys())
        self.availability_fn = availability_fn
        self.round_duration = float(round_duration)
        self.step_macs_factor = float(step_macs_factor)
        self.assignments: dict[str, Assignment] = {}
        self._mask_cache: dict[str, list[np.ndarray]] = {}

    @staticmethod
    def check_args(availability_fn: object, round_duration: object, step_macs_factor: object) -> None:
        """Raise ValueError unless the round timing is positive and finite and
        ``availability_fn`` is callable."""
        for name, value in (("round_duration", round_duration), ("step_macs_factor", step_macs_factor)):
            if not is_number(value) or not (math.isfinite(float(value)) and float(value) > 0):  # type: ignore[arg-type]
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not callable(availability_fn):
            raise ValueError("availability_fn must be a callable (device_id, t) -> MACs per second")

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
        """Per-weight average over the clients that trained each weight, weighted by examples."""
        weights = [a.reply.num_examples for a in accepted]
        if sum(weights) <= 0:
            log.warning("every accepted reply reports zero examples: nothing to weight by")
            return None
        masks = [self.masks(self.assignments[a.reply.node]) for a in accepted]
        return masked_average(global_arrays, [a.reply.arrays for a in accepted], masks, weights)
