"""The Flower-free server core shared by the legacy and the Message-API strategies.

Both strategy families (:mod:`flwr_distreal.flower.legacy.strategy`, legacy ``FitIns``/``FitRes``;
:mod:`flwr_distreal.flower.serverapp`, Flower's ``Message`` API) are thin adapters over this module:
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
    reply (:func:`flwr_distreal.server.aggregate.validate_reply` / ``validate_arrays``), screens the
    survivors against each other (:class:`RoundBounds`), logs every refusal and clip with the
    round, the node, the device's partition id and the reason, counts (``received``,
    ``failures``, ``stragglers``, ``refused``, ``clipped``, ``accepted``, ``mean_macs``,
    ``mean_utilisation``) and combines the accepted replies with its aggregation rule.
:class:`RoundBounds`, :func:`cap_shares`, :func:`share_limit`
    The round-level bounds: an update whose norm lies far outside the round's, a MACs claim
    far above the round's, is refused or clipped; no claim holds more than
    ``share_bound / (n + share_bound - 1)`` of the round's weight; optional robust aggregation.
:class:`DistrealCore`, :class:`FedAvgCore`, :class:`SubmodelCore`
    The aggregation rules: Algorithm 2 of Rapp et al. (AAAI 2022), weighted by the MACs each
    client spent; FedAvg weighted by examples; the submodel baselines' ``per_weight`` or
    ``all_clients`` rule (:data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`).
:class:`FederatedDropoutPlanner`, :class:`HeteroFLPlanner`
    The submodel baselines' round-start choices from the forward budget a device's
    availability allows at round start (see :meth:`SubmodelCore.forward_budget`).
:func:`seeded_draw`, :func:`sample_size`
    The seeded client draw shared by :class:`flwr_distreal.flower.legacy.client_manager.SeededClientManager`
    and the Message-API strategies, so both APIs train the same devices for the same seed.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from ..core import contract as C
from .aggregate import (
    SUBMODEL_RULES,
    OnExcess,
    RefusalReason,
    SubmodelAggregation,
    ValidationResult,
    mac_weighted_update,
    scale_update,
    trimmed_mean_update,
    update_norms,
    validate_arrays,
    validate_reply,
    weighted_median_update,
)
from ..core.contract import encode_subsets, is_number, is_straggler
from ..core.dropout import DropoutModel, kept_count, parameter_masks
from ..core.macs import macs_of_counts

__all__ = [
    "Accepted",
    "Assignment",
    "AvailabilityFn",
    "DistrealCore",
    "FedAvgCore",
    "FederatedDropoutPlanner",
    "HeteroFLPlanner",
    "Refusal",
    "Reply",
    "ReplyGate",
    "RoundBounds",
    "RoundOutcome",
    "Screened",
    "SubmodelCore",
    "SubmodelPlanner",
    "as_device_id",
    "SHARE_BOUND",
    "brief_list",
    "cap_shares",
    "check_device",
    "fit_metrics_aggregation",
    "full_macs_argument",
    "max_batches_for",
    "reply_order",
    "sample_size",
    "seeded_draw",
    "share_limit",
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
        The reply's train metrics (keys of :mod:`flwr_distreal.core.contract`).
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
    """A reply that passed the gate.

    Attributes
    ----------
    reply : Reply
        The reply (its arrays scaled when its update was clipped).
    macs : float | None
        The MACs it is weighted by (Distreal; clipped when its claim was), else None.
    clipped : tuple[str, ...]
        What the gate clipped, as reason codes (``excess-macs``, ``excess-batches``,
        ``outlier-claim``, ``outlier-update``, ``clip-to-median``); empty when nothing.
    """

    reply: Reply
    macs: float | None = None
    clipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """A reply the gate refused: which, and why.

    Attributes
    ----------
    node : str
        The node key of the reply.
    device_id : int | None
        Its device (partition) id; None when unknown.
    reason : str
        The reason code (a :class:`flwr_distreal.server.aggregate.RefusalReason` value, e.g.
        ``"missing-macs"``).
    message : str
        The gate's explanation, as logged.
    """

    node: str
    device_id: int | None
    reason: str
    message: str


@dataclass
class RoundOutcome:
    """What the gate made of one round's replies.

    Attributes
    ----------
    arrays : list[np.ndarray] | None
        The new global model, or None when no reply could be combined (the caller then keeps
        the broadcast model).
    metrics : dict[str, int | float]
        ``received``, ``failures``, ``stragglers``, ``refused``, ``clipped`` (accepted replies
        whose claim or update the gate clipped), ``accepted``, ``mean_macs`` and
        ``mean_utilisation`` (over the accepted replies, with the MACs they are weighted by,
        clipped where clipped; NaN over none).
    accepted : list[Accepted]
        The accepted replies, in combination order.
    refusals : list[Refusal]
        The refused replies with their reasons, in the order they were refused.
    """

    arrays: Arrays | None
    metrics: dict[str, int | float]
    accepted: list[Accepted] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def uniform_refusal(self) -> Refusal | None:
        """The first refusal when every reply received was refused, all for the same reason;
        else None (some reply accepted or a straggler, no reply, or several reasons)."""
        if not self.refusals or self.metrics.get("accepted", 0) or self.metrics.get("received") != len(self.refusals):
            return None
        reasons = {r.reason for r in self.refusals}
        return self.refusals[0] if len(reasons) == 1 else None


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


def seeded_draw(
    rng: random.Random, devices: Mapping[N, int], k: int, unidentified: Iterable[N] = ()
) -> list[N]:
    """Draw ``k`` nodes reproducibly: sorted by device id, then node key, then ``rng.sample``.

    Flower draws with the global, unseeded :mod:`random` over node ids that the simulation
    engine creates at random, so two runs train different devices. Sorting by the device
    (partition) id first makes the draw a function of the seed alone; one generator serving
    all rounds makes round ``t`` of two runs with the same seed draw the same devices. Used by
    :class:`flwr_distreal.flower.legacy.client_manager.SeededClientManager` (legacy) and the Message-API
    strategies alike, so both APIs draw the same devices for the same seed.

    Parameters
    ----------
    rng : random.Random
        The draw's generator, ``random.Random(seed)``, kept across rounds.
    devices : Mapping[N, int]
        Device id of every node that may be drawn, by node key (legacy ``cid`` or Message-API
        node id; ties between equal device ids are broken by ``str(node)``).
    k : int
        Nodes to draw, at most ``len(devices)`` plus the unidentified nodes.
    unidentified : Iterable[N], optional
        Nodes that may be drawn but reported no device id (a ClientApp without a query
        handler): they follow the identified ones, sorted by node id (numerically for
        non-negative integer ids), so the draw is as reproducible as the node ids are.
        Defaults to none; without them the draw is exactly the one by device id.

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
    # (length, text) orders non-negative integer ids numerically, and text ids deterministically
    ordered += sorted(set(unidentified) - set(devices), key=lambda n: (len(str(n)), str(n)))
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


# ----------------------------------------------------------------------- round bounds

#: ``on_outlier`` / ``on_claim_outlier``: refuse an implausible reply or clip it to the bound.
OnOutlier = Literal["refuse", "clip"]
#: ``update_norm``: compare whole-model update norms, or every floating array's.
UpdateNorm = Literal["model", "layer"]
#: ``robust``: optional robust aggregation for adversarial settings.
Robust = Literal["clip-to-median", "median", "trimmed-mean"]
ROBUST_MODES: tuple[str, ...] = ("clip-to-median", "median", "trimmed-mean")


def _median_or_none(values: Iterable[float], min_count: int) -> float | None:
    """Median of the positive finite values, None when fewer than ``min_count``."""
    v = [float(x) for x in values if math.isfinite(float(x)) and float(x) > 0]
    return float(np.median(v)) if len(v) >= min_count else None


def _model_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of the floating arrays, accumulated in float64."""
    total = 0.0
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind == "f":
            v = a.astype(np.float64, copy=False).ravel()
            total += float(np.dot(v, v))
    return math.sqrt(total)


def _bound_arg(name: str, value: object) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not (math.isfinite(float(value)) and float(value) > 1.0):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be None or a finite number > 1, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _share_bound_arg(value: object) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not (math.isfinite(float(value)) and float(value) >= 1.0):  # type: ignore[arg-type]
        raise ValueError(f"share_bound must be None or a finite number >= 1, got {value!r}")
    return float(value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- weight shares

#: Default ``share_bound`` ``k``: no reply weighs more than ``k`` times the mean of the round's
#: other accepted replies, i.e. holds at most ``k / (n + k - 1)`` of the weight of ``n``
#: replies (50 %, 31 %, 10.5 % of 5, 10, 35). Measured on honest rounds of the real resources
#: model (``scripts/claim_share.py``: time-varying availability at lambda = 2, devices doing 0.3x
#: to 1x of the full model's MACs per batch on partitions of 39 to 112 (digits) or 4 to 165
#: (FEMNIST) samples, 500 rounds each of 5 and 10 (digits), 5 and 35 devices (FEMNIST)), 4
#: clipped 1 of the 27,500 honest claims (in one 5-device digits round, by 5 % of its weight; the
#: largest ratio to the others' mean seen was 4.2); 3 clipped up to 0.5 % of them (2.4 % of the
#: 5-device digits rounds), 2 up to 5.7 % (34 % of the 10-device digits rounds), 5 none.
SHARE_BOUND = 4.0


def share_limit(n: int, share_bound: float) -> float:
    """The most of a round's weight one of ``n`` replies may hold: ``k / (n + k - 1)``.

    A reply holds at most this share exactly when its weight is at most ``k`` times the mean
    of the ``n - 1`` others' weights: ``w_i <= k (S - w_i) / (n - 1)`` is
    ``w_i / S <= k / (n - 1 + k)``. ``k = 1`` allows no more than an equal share, ``1 / n``.

    Parameters
    ----------
    n : int
        Replies that carry weight (>= 1).
    share_bound : float
        ``k`` (>= 1).

    Returns
    -------
    float
        The share limit, in ``[1 / n, 1]`` (1 for a single reply).

    Raises
    ------
    ValueError
        If ``n`` is not an int >= 1 or ``share_bound`` not a finite number >= 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    k = _share_bound_arg(share_bound)
    if k is None:
        raise ValueError("share_bound must be a finite number >= 1, got None")
    return k / (int(n) + k - 1.0)


def cap_shares(weights: Sequence[float], max_share: float) -> np.ndarray:
    """Cap every weight so that none holds more than ``max_share`` of the total (water-filling).

    The capped weights are ``min(w_i, tau)`` with the one level ``tau`` at which the capped
    replies hold exactly ``max_share`` each: ``tau = max_share * sum_j min(w_j, tau)``. Weights
    at or below ``tau`` are unchanged, their order is kept, and a capped reply still weighs at
    least as much as every uncapped one. Used on the MACs ``c_i`` of Algorithm 2 (Rapp et al.,
    AAAI 2022: ``C <- sum c_i``, ``dTheta <- sum c_i dtheta_i``, ``dtheta <- dTheta / C``), it
    bounds what one reply can pull, whatever it claims.

    Parameters
    ----------
    weights : Sequence[float]
        Non-negative finite weights.
    max_share : float
        The largest share one weight may hold, in ``[1 / p, 1]`` with ``p`` the number of
        positive weights (:func:`share_limit` gives one).

    Returns
    -------
    np.ndarray
        The capped weights (float64); the input unchanged when no weight holds more than
        ``max_share`` or at most one is positive.

    Raises
    ------
    ValueError
        If a weight is negative or not finite, or ``max_share`` is outside ``[1 / p, 1]``.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be non-negative and finite, got {w.tolist()}")
    p = int(np.count_nonzero(w))
    if not is_number(max_share) or not math.isfinite(float(max_share)) or float(max_share) > 1.0:
        raise ValueError(f"max_share must be a number in [1/p, 1], got {max_share!r}")
    share = float(max_share)
    if p <= 1 or share >= 1.0:
        return w.copy()
    if share * p < 1.0 - 1e-12:
        raise ValueError(f"max_share {share:g} is below 1/{p}: {p} positive weights cannot all fit under it")
    total = float(w.sum())
    if float(w.max()) <= share * total:
        return w.copy()
    asc = np.sort(w)
    below = np.cumsum(asc)  # below[j]: sum of the j + 1 smallest (summed from the small end: exact enough)
    desc = asc[::-1]
    tau = float(desc[0])
    for c in range(1, p):  # c largest capped at tau; the others keep their weight
        rest = float(below[len(w) - c - 1])
        tau = share * rest / (1.0 - c * share)
        if float(desc[c]) <= tau:
            break
    else:  # every positive weight capped: equal shares (share == 1/p up to rounding)
        tau = float(desc[p - 1])
    return np.minimum(w, tau)


@dataclass
class Screened:
    """What :meth:`RoundBounds.screen` made of a round's candidates.

    Attributes
    ----------
    accepted : list[Accepted]
        The candidates kept, in their order, with clipped arrays and MACs where clipped.
    refused : list[tuple[Accepted, RefusalReason, str]]
        The candidates refused, with the reason and a message.
    clips : list[tuple[Accepted, str, str]]
        Every clip applied: the reply as accepted, the reason code and a message (a reply
        clipped twice appears twice).
    """

    accepted: list[Accepted]
    refused: list[tuple[Accepted, RefusalReason, str]] = field(default_factory=list)
    clips: list[tuple[Accepted, str, str]] = field(default_factory=list)


class RoundBounds:
    """Round-level plausibility bounds on updates and MACs claims (both APIs, every rule).

    The per-reply checks (:func:`flwr_distreal.server.aggregate.validate_reply`) judge a reply
    alone; a client can still send finite but absurd weights (``1e30``), an update scaled
    50 times, or a MACs claim that is possible for its ``num_batches`` but far above what
    the others spent. :meth:`screen` judges the replies that passed those checks against
    each other and against the broadcast model ``theta_{t-1}``:

    Claims (DISTREAL only, the MACs ``c_i`` that weight Algorithm 2)
        A claim above ``claim_bound`` times the round's median claim is clipped to that
        (default) or refused. Clipping keeps the reply's update at a bounded weight: a
        device with much more data and full resources can legitimately claim several
        times the median, so it loses weight, not its update. The hard bound, MACs over
        ``num_batches * full_macs_per_sample`` and ``num_batches`` over what the server
        configured (batch size, local epochs, the device's ``round-samples`` or the reply's
        examples), is the per-reply check of :class:`DistrealCore`.
    Shares (DISTREAL only, after every other bound)
        No accepted reply weighs more than ``share_bound`` (``k``) times the mean of the
        others' weights: the claims are capped by :func:`cap_shares` at the share
        :func:`share_limit` ``k / (n + k - 1)`` of the ``n`` replies that carry weight. This
        holds whatever a reply claims and whether or not the server knows the batch size
        (the median bound alone lets one claim of ``m`` times the median hold
        ``m / (m + n - 1)`` of a round of equal honest claims: 71 % of 5 replies at
        ``m = 10``). The price: an honest reply above ``k`` times the others' mean (a device
        with much more data than the others at full resources) loses weight, not its update.
    Updates
        The update ``u_i = theta_i - theta_{t-1}`` (floating arrays only; integer
        counters do not move the model) is compared by its L2 norm normalised by the
        square root of the mini-batches the reply trained, ``s_i = |u_i| / sqrt(b_i)``.
        A reply is an outlier when ``s_i > update_bound * median_j(s_j)``. An outlier is
        refused (default) or its update scaled down to the bound (``on_outlier="clip"``).
        Without a median to compare with (see *Tiny rounds*), the fallback is the broadcast
        model itself: ``|u_i| > update_bound * |theta_{t-1}|`` (a local round does not move
        a trained model by ten times its own norm; this catches ``1e30`` weights in a round
        of one, but could refuse an honest first update of a model initialised near zero).

    Parameters
    ----------
    update_bound : float | None, optional
        ``k`` (> 1) of the update bounds; None disables them. Defaults to 10.
    on_outlier : {"refuse", "clip"}, optional
        What to do with an outlier update. Defaults to "refuse".
    update_norm : {"model", "layer"}, optional
        Whole-model norm, or every floating array's norm against that array's median.
        Defaults to "model".
    claim_bound : float | None, optional
        ``m`` (> 1) of the claim bound (MACs claims and the batches that normalise the
        update norms); None disables it. Defaults to 10.
    on_claim_outlier : {"refuse", "clip"}, optional
        What to do with a claim above ``m`` times the median. Defaults to "clip".
    share_bound : float | None, optional
        ``k`` (>= 1): no reply weighs more than ``k`` times the mean of the round's other
        accepted replies (at most ``k / (n + k - 1)`` of the weight); None disables it.
        Defaults to :data:`SHARE_BOUND` (4).
    robust : {"clip-to-median", "median", "trimmed-mean"} | None, optional
        Robust aggregation. Defaults to None.
    trim_beta : float, optional
        Fraction trimmed at each end by ``robust="trimmed-mean"``, in (0, 0.5). Defaults to
        0.2.
    history : int, optional
        Rounds whose medians are the reference of a tiny round (>= 1). Defaults to 5.
    min_replies : int, optional
        Positive values a round's median needs to be a reference (>= 3). Defaults to 3.

    Raises
    ------
    ValueError
        If an argument is out of range.

    Notes
    -----
    Why these choices for DISTREAL: sub-networks legitimately move by different amounts, a
    device that trained 2 mini-batches less than one that trained 40, and per-batch dropout
    changes which weights move. The norm of ``b`` SGD steps grows between ``sqrt(b)`` (noisy steps) and
    ``b`` (coherent drift); dividing by ``sqrt(b)`` leaves a legitimate 2-vs-40 gap of at
    most ``sqrt(20) = 4.5``, and none for noisy steps. (Dividing by ``b`` has the same worst
    case the other way round; by the MACs, it would also reward heavy dropout.) Measured
    on FEMNIST (105 devices, 35 per round, DISTREAL, 6 rounds), the largest ``s_i`` was 2.1
    to 3.3 times the round's median, the raw norm up to 3.5 times, and MACs claims up to
    2 times; so ``update_bound=10`` and ``claim_bound=10`` leave a margin of about 3 on
    honest rounds while a 50x scaled update, ``1e30`` weights and a ``1e9`` batches claim
    stand out. The batches ``b_i`` a reply may invoke are its ``num_batches`` capped by
    the server's limit for its device and by ``claim_bound`` times the round's median, so
    a reply cannot excuse a large update with an inflated count. The whole-model norm is
    the default (``update_norm="model"``): per-layer norms vary more between honest
    sub-networks (up to 5x the median measured, since dropout rates differ per layer), so
    ``"layer"`` catches an attack concentrated in one small layer at the price of more
    false alarms. Replies with a zero update or zero claim (a device that trained no
    batch) do not enter the medians.

    Tiny rounds
        A median of fewer than ``min_replies`` (3) positive values is no reference (with
        two replies, the median is their mean and an outlier drags it along). Such rounds
        compare against the median of the last ``history`` rounds' medians (of the replies
        those rounds accepted); in the very first rounds with too few replies only the
        ``|theta_{t-1}|`` bound applies.
    Robust aggregation (``robust``, off by default)
        ``"clip-to-median"`` scales every update whose ``s_i`` exceeds the round's median
        down to it (norm bounding, Sun et al. 2019): honest large updates lose part of their
        length, so convergence slows, but no reply moves the model more than a median one
        of the same work. ``"median"`` and ``"trimmed-mean"`` replace the average by a
        coordinate-wise weighted median or trimmed mean
        (:func:`flwr_distreal.server.aggregate.weighted_median_update`,
        :func:`~flwr_distreal.server.aggregate.trimmed_mean_update`), still weighted by the MACs
        (DISTREAL) or examples (FedAvg), for rules without per-weight masks.
    """

    def __init__(
        self,
        *,
        update_bound: float | None = 10.0,
        on_outlier: OnOutlier = "refuse",
        update_norm: UpdateNorm = "model",
        claim_bound: float | None = 10.0,
        on_claim_outlier: OnOutlier = "clip",
        robust: Robust | None = None,
        trim_beta: float = 0.2,
        history: int = 5,
        min_replies: int = 3,
        share_bound: float | None = SHARE_BOUND,
    ) -> None:
        self.update_bound = _bound_arg("update_bound", update_bound)
        self.claim_bound = _bound_arg("claim_bound", claim_bound)
        self.share_bound = _share_bound_arg(share_bound)
        for name, value in (("on_outlier", on_outlier), ("on_claim_outlier", on_claim_outlier)):
            if value not in ("refuse", "clip"):
                raise ValueError(f"{name} must be 'refuse' or 'clip', got {value!r}")
        if update_norm not in ("model", "layer"):
            raise ValueError(f"update_norm must be 'model' or 'layer', got {update_norm!r}")
        if robust is not None and robust not in ROBUST_MODES:
            raise ValueError(f"robust must be None or one of {ROBUST_MODES}, got {robust!r}")
        if not is_number(trim_beta) or not 0.0 < float(trim_beta) < 0.5:
            raise ValueError(f"trim_beta must be in (0, 0.5), got {trim_beta!r}")
        for name, value, low in (("history", history, 1), ("min_replies", min_replies, 3)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.on_outlier: OnOutlier = on_outlier
        self.update_norm: UpdateNorm = update_norm
        self.on_claim_outlier: OnOutlier = on_claim_outlier
        self.robust: Robust | None = robust
        self.trim_beta = float(trim_beta)
        self.history = int(history)
        self.min_replies = int(min_replies)
        self._model_history: deque[float] = deque(maxlen=self.history)
        self._layer_history: deque[np.ndarray] = deque(maxlen=self.history)
        self._claim_history: deque[float] = deque(maxlen=self.history)

    def __repr__(self) -> str:
        return (
            f"RoundBounds(update_bound={self.update_bound}, on_outlier={self.on_outlier!r}, "
            f"update_norm={self.update_norm!r}, claim_bound={self.claim_bound}, "
            f"on_claim_outlier={self.on_claim_outlier!r}, share_bound={self.share_bound}, robust={self.robust!r})"
        )

    # -- references ----------------------------------------------------------------------
    def _reference(self, values: Sequence[float], history: Iterable[float]) -> tuple[float | None, str]:
        ref = _median_or_none(values, self.min_replies)
        if ref is not None:
            return ref, "the round's median"
        ref = _median_or_none(history, 1)
        return ref, "the recent rounds' median"

    # -- the screen ----------------------------------------------------------------------
    def screen(
        self,
        global_arrays: Sequence[np.ndarray],
        candidates: Sequence[Accepted],
        work: Sequence[float | None],
        *,
        claims: bool,
        weights: Sequence[float] | None = None,
    ) -> Screened:
        """Judge a round's candidates (replies that passed the per-reply checks).

        Parameters
        ----------
        global_arrays : Sequence[np.ndarray]
            The broadcast model ``theta_{t-1}``.
        candidates : Sequence[Accepted]
            The round's replies that passed :meth:`ReplyGate.check`, in combination order.
        work : Sequence[float | None]
            Mini-batches each candidate trained, as far as the server accepts the claim
            (None: unknown, counted as 1).
        claims : bool
            True when ``Accepted.macs`` weights the reply (DISTREAL): its claim is bounded.
        weights : Sequence[float] | None, optional
            Each candidate's weight in the rule when it does not weigh by claims (examples);
            None: all positive. A reply of zero weight cannot move the model: its update is
            neither bounded nor part of the medians.

        Returns
        -------
        Screened
            The accepted candidates (clipped where clipped), the refused ones and the clips.
        """
        out = Screened(accepted=[])
        items: list[list[Any]] = [[a, w] for a, w in zip(candidates, work)]
        others = [1.0] * len(items) if weights is None else [float(w) for w in weights]
        zero_weight = {id(a) for (a, _), w in zip(items, others) if not claims and not w > 0}
        if not items:
            return out
        m = self.claim_bound

        # 1. claims: no reply outweighs the round by claiming more than m x the median
        if claims:
            values = [float(a.macs or 0.0) for a, _ in items]
            ref, where = self._reference(values, self._claim_history)
            if m is not None and ref is not None:
                kept = []
                for a, w in items:
                    c = float(a.macs or 0.0)
                    if c <= m * ref:
                        kept.append([a, w])
                        continue
                    msg = f"claims {c:g} MACs, more than {m:g} x {where} {ref:g}"
                    if self.on_claim_outlier == "refuse":
                        out.refused.append((a, RefusalReason.OUTLIER_CLAIM, msg))
                        continue
                    a = Accepted(a.reply, m * ref, (*a.clipped, RefusalReason.OUTLIER_CLAIM.value))
                    out.clips.append((a, RefusalReason.OUTLIER_CLAIM.value, msg + f"; weighted by {m * ref:g}"))
                    kept.append([a, w])
                items = kept

        # 2. the batches a reply may invoke: at least 1, at most m x the round's median
        bmed = _median_or_none([w for _, w in items if w is not None], self.min_replies)
        for item in items:
            b = 1.0 if item[1] is None else max(1.0, float(item[1]))
            if m is not None and bmed is not None:
                b = min(b, m * bmed)
            item[1] = b

        # 3. update norms (only when a bound or clip-to-median needs them); a reply of zero
        #    weight cannot move the model and is neither bounded nor part of the medians
        def weightless(a: Accepted) -> bool:
            return not float(a.macs or 0.0) > 0 if claims else id(a) in zero_weight

        passive = [a for a, _ in items if weightless(a)]
        items = [item for item in items if not weightless(item[0])]
        k = self.update_bound
        if k is None and self.robust != "clip-to-median":
            return self._finish(out, [a for a, _ in items], passive, None, claims)
        kept = []
        for a, b in items:
            layer = update_norms(global_arrays, a.reply.arrays)
            if not math.isfinite(float(np.sqrt(np.sum(layer**2)))):
                out.refused.append((a, RefusalReason.OUTLIER_UPDATE, "update norm overflows float64"))
                continue
            kept.append([a, b, layer])
        items = kept
        if k is not None and items:
            items = self._bound_updates(global_arrays, items, k, out)

        # 4. robust: clip every update to the median normalised norm
        if self.robust == "clip-to-median" and items:
            s = [float(np.sqrt(np.sum(layer**2))) / math.sqrt(b) for _, b, layer in items]
            ref, where = self._reference(s, self._model_history)
            if ref is not None:
                for item, si in zip(items, s):
                    if si <= ref:
                        continue
                    a, b, layer = item
                    f = ref / si
                    a = Accepted(
                        replace(a.reply, arrays=scale_update(global_arrays, a.reply.arrays, f)),
                        a.macs,
                        (*a.clipped, "clip-to-median"),
                    )
                    out.clips.append(
                        (a, "clip-to-median", f"normalised update norm {si:.4g} clipped to {where} {ref:.4g}")
                    )
                    item[0], item[2] = a, layer * f

        # 5. history: this round's medians, the reference of later tiny rounds
        normalised = np.stack([layer / math.sqrt(b) for _, b, layer in items]) if items else None
        return self._finish(out, [a for a, _, _ in items], passive, normalised, claims)

    def _cap_claims(self, out: Screened, accepted: list[Accepted]) -> list[Accepted]:
        """Cap the accepted claims at the round's share limit (:func:`cap_shares`), logging each cap."""
        k = self.share_bound
        claims = [float(a.macs or 0.0) for a in accepted]
        n = sum(1 for c in claims if c > 0)
        if k is None or n < 2:
            return accepted
        limit = share_limit(n, k)
        capped = cap_shares(claims, limit)
        total = sum(claims)
        code = "excess-share"
        result = []
        for a, c, w in zip(accepted, claims, capped):
            if w >= c:
                result.append(a)
                continue
            a = Accepted(a.reply, float(w), (*a.clipped, code))
            out.clips.append(
                (
                    a,
                    code,
                    f"claims {c:g} MACs, {c / total:.1%} of the round's weight, more than share_bound "
                    f"{k:g} / ({n} + {k:g} - 1) = {limit:.1%}; weighted by {float(w):g} ({k:g} x the others' mean)",
                )
            )
            result.append(a)
        return result

    def _finish(
        self,
        out: Screened,
        accepted: list[Accepted],
        passive: list[Accepted],
        normalised: np.ndarray | None,
        claims: bool,
    ) -> Screened:
        """Cap the claims' shares, record the round's medians (of the accepted replies) and
        order the accepted."""
        if claims:
            accepted = self._cap_claims(out, accepted)
        if normalised is not None:
            model_median = _median_or_none(np.sqrt(np.sum(normalised**2, axis=1)), 1)
            if model_median is not None:
                self._model_history.append(model_median)
            self._layer_history.append(np.median(normalised, axis=0))
        if claims:
            c = _median_or_none([float(a.macs or 0.0) for a in accepted], 1)
            if c is not None:
                self._claim_history.append(c)
        out.accepted = sorted(accepted + passive, key=lambda a: reply_order(a.reply))
        return out

    def _bound_updates(
        self,
        global_arrays: Sequence[np.ndarray],
        items: list[list[Any]],
        k: float,
        out: Screened,
    ) -> list[list[Any]]:
        """Refuse or clip the outlier updates of ``items`` (``[accepted, batches, layer norms]``)."""
        layer_mode = self.update_norm == "layer"
        g_norm: float | None = None
        refs: list[float | None] = []
        ref: float | None = None
        where = ""
        if layer_mode:
            stacked = np.stack([layer / math.sqrt(b) for _, b, layer in items])
            hist = [v for v in self._layer_history if v.shape == (stacked.shape[1],)]
            for j in range(stacked.shape[1]):
                r, where_j = self._reference(stacked[:, j].tolist(), [float(v[j]) for v in hist])
                refs.append(r)
                where = where or where_j
        else:
            s = [float(np.sqrt(np.sum(layer**2))) / math.sqrt(b) for _, b, layer in items]
            ref, where = self._reference(s, self._model_history)
        kept = []
        for a, b, layer in items:
            total = float(np.sqrt(np.sum(layer**2)))
            factors = np.ones_like(layer)
            reasons: list[str] = []
            if layer_mode:
                for j, r in enumerate(refs):
                    if r is not None and layer[j] / math.sqrt(b) > k * r:
                        factors[j] = k * r * math.sqrt(b) / layer[j]
                if (factors < 1).any():
                    worst = int(np.argmin(factors))
                    reasons.append(
                        f"{int((factors < 1).sum())} arrays' normalised update norms exceed {k:g} x {where} "
                        f"(floating array {worst}: {layer[worst] / math.sqrt(b):.4g} vs {refs[worst]:.4g})"
                    )
            elif ref is not None and total / math.sqrt(b) > k * ref:
                factors[:] = k * ref * math.sqrt(b) / total
                reasons.append(
                    f"update norm {total:.4g} over sqrt({b:g} batches) = {total / math.sqrt(b):.4g} exceeds "
                    f"{k:g} x {where} {ref:.4g}"
                )
            no_reference = all(r is None for r in refs) if layer_mode else ref is None
            if no_reference and g_norm is None:
                g_norm = _model_norm(global_arrays)
            if no_reference and g_norm and total > k * g_norm:
                factors = np.minimum(factors, k * g_norm / total)
                reasons.append(f"update norm {total:.4g} exceeds {k:g} x the global model's norm {g_norm:.4g}")
            if not reasons:
                kept.append([a, b, layer])
                continue
            message = "; ".join(reasons)
            if self.on_outlier == "refuse":
                out.refused.append((a, RefusalReason.OUTLIER_UPDATE, message))
                continue
            code = RefusalReason.OUTLIER_UPDATE.value
            arrays = scale_update(global_arrays, a.reply.arrays, factors)
            a = Accepted(replace(a.reply, arrays=arrays), a.macs, (*a.clipped, code))
            out.clips.append((a, code, message + f"; scaled by {float(factors.min()):.3g}"))
            kept.append([a, b, layer * factors])
        return kept


# ---------------------------------------------------------------------------- the gate


def _check_key(name: str, key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} must be a non-empty string, got {key!r}")


class ReplyGate(ABC):
    """The round's gate and aggregation: the part of a strategy that does not touch Flower.

    Keeps the broadcast model of the round (:meth:`broadcast`), then, for the round's replies
    (:meth:`aggregate`): drops stragglers, validates every other reply (:meth:`check`),
    screens the survivors against each other (:class:`RoundBounds`: outlier updates and
    claims refused or clipped), logs each refusal and clip with the round, node, partition id
    and reason, combines the accepted replies in :func:`reply_order` with the subclass's rule
    (:meth:`combine`) and counts.

    Parameters
    ----------
    bounds : RoundBounds | None, optional
        The round-level bounds; None (default) uses ``RoundBounds()`` (updates more than 10x
        the round's median refused, claims more than 10x the median clipped, then capped at 4x
        the others' mean).
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
        bounds: RoundBounds | None = None,
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
        if bounds is not None and not isinstance(bounds, RoundBounds):
            raise ValueError(f"bounds must be a RoundBounds or None, got {type(bounds).__name__}")
        self.bounds = bounds if bounds is not None else RoundBounds()
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
        finiteness (:func:`flwr_distreal.server.aggregate.validate_arrays`)."""
        g = self.global_arrays
        return validate_arrays(arrays, [a.shape for a in g], [a.dtype.kind for a in g])

    # -- the rule --------------------------------------------------------------------------
    @abstractmethod
    def check(self, reply: Reply) -> ValidationResult:
        """Validate one non-straggler reply."""

    #: True when the rule weights replies by their MACs claim (``Accepted.macs``).
    weighs_by_claim: bool = False

    def work_of(self, reply: Reply) -> float | None:
        """Mini-batches a reply trained, as far as the server accepts it (None: unknown).

        The reported ``num_batches`` when it is a non-negative finite number; subclasses cap
        it by what the server configured.
        """
        b = reply.metrics.get(self.num_batches_key)
        if not is_number(b) or not math.isfinite(float(b)) or float(b) < 0:  # type: ignore[arg-type]
            return None
        return float(b)  # type: ignore[arg-type]

    def weighted_rule(self, global_arrays: Arrays, accepted: list[Accepted], weights: Sequence[float]) -> Arrays:
        """Combine with ``weights``: the weighted average (Algorithm 2 / FedAvg), or the
        coordinate-wise weighted median or trimmed mean when ``bounds.robust`` asks."""
        arrays = [a.reply.arrays for a in accepted]
        if self.bounds.robust == "median":
            return weighted_median_update(global_arrays, arrays, weights)
        if self.bounds.robust == "trimmed-mean":
            return trimmed_mean_update(global_arrays, arrays, weights, self.bounds.trim_beta)
        return mac_weighted_update(global_arrays, arrays, weights)

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
        stragglers = 0
        refusals: list[Refusal] = []
        candidates: list[Accepted] = []
        clips: list[tuple[Accepted, str, str]] = []

        def device(reply: Reply) -> object:
            return "unknown" if reply.device_id is None else reply.device_id

        def refuse(reply: Reply, reason: str, message: str) -> None:
            refusals.append(Refusal(reply.node, reply.device_id, reason, message))
            logger.warning(
                "round %s: refused reply of node %s (%s %s): %s: %s",
                server_round, reply.node, self.partition_id_key, device(reply), reason, message,
            )

        for reply in replies:
            if is_straggler(reply.metrics, self.straggler_key):
                stragglers += 1
                continue
            check = reply.refusal if reply.refusal is not None else self.check(reply)
            if not check.ok:
                refuse(reply, check.reason.value if check.reason is not None else "invalid", check.message)
                continue
            clipped: tuple[str, ...] = ()
            if check.clipped:
                clipped = (check.reason.value if check.reason is not None else "clipped",)
                clips.append((Accepted(reply, check.macs, clipped), clipped[0], check.message))
            candidates.append(Accepted(reply, check.macs, clipped))
        screened = self.bounds.screen(
            global_arrays,
            candidates,
            [self.work_of(a.reply) for a in candidates],
            claims=self.weighs_by_claim,
            weights=None if self.weighs_by_claim else [float(a.reply.num_examples) for a in candidates],
        )
        for a, reason, message in screened.refused:
            refuse(a.reply, reason.value, message)
        for a, code, message in clips + screened.clips:
            level = logging.INFO if code == "clip-to-median" else logging.WARNING
            logger.log(
                level,
                "round %s: clipped reply of node %s (%s %s): %s: %s",
                server_round, a.reply.node, self.partition_id_key, device(a.reply), code, message,
            )
        accepted = screened.accepted
        refused = len(refusals)
        resource = fit_metrics_aggregation(  # over the MACs weighted by (clipped claims clipped)
            [
                (a.reply.num_examples, a.reply.metrics if a.macs is None else {**a.reply.metrics, self.macs_key: a.macs})
                for a in accepted
            ],  # type: ignore[misc]
            macs_key=self.macs_key,
            straggler_key=self.straggler_key,
            available_macs_key=self.available_macs_key,
        )
        metrics: dict[str, int | float] = {
            "received": len(replies),
            "failures": int(failures),
            "stragglers": stragglers,
            "refused": refused,
            "clipped": sum(1 for a in accepted if a.clipped),
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
                "round %s: aggregated %s of %s replies (%s stragglers, %s refused, %s clipped, %s failures)",
                server_round,
                len(accepted),
                len(replies),
                stragglers,
                refused,
                metrics["clipped"],
                failures,
            )
        return RoundOutcome(new_arrays, metrics, accepted, refusals)


def _examples_update(gate: ReplyGate, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
    """FedAvg over the accepted replies, weighted by their examples (or the gate's robust rule)."""
    weights = [a.reply.num_examples for a in accepted]
    if sum(weights) <= 0:
        log.warning("every accepted reply reports zero examples: nothing to weight by")
        return None
    return gate.weighted_rule(global_arrays, accepted, weights)


def max_batches_for(round_samples: int, batch_size: int, local_epochs: int = 1) -> int:
    """The most mini-batches a round of local training can have.

    ``round_samples`` is the ``round-samples`` property: the samples of one round over all
    local epochs (:meth:`flwr_distreal.training.trainers.DeviceTrainer.properties`), so an epoch has
    ``ceil(round_samples / local_epochs)`` samples, hence at most
    ``local_epochs * ceil(ceil(round_samples / local_epochs) / batch_size)`` mini-batches (a
    partial last batch per epoch included).
    """
    per_epoch = -(-int(round_samples) // int(local_epochs))
    return int(local_epochs) * -(-per_epoch // int(batch_size))


def brief_list(items: Sequence[object], most: int = 10) -> str:
    """``a, b, c`` (the first ``most``, then how many more), for a log line."""
    shown = ", ".join(str(i) for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _positive_int(name: str, value: object, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= 1, got {value!r}")
    return int(value)


def full_macs_argument(full_macs_per_sample: object, full_macs_per_batch: object, *, stacklevel: int = 3) -> object:
    """The value of ``full_macs_per_sample``, or of its deprecated name ``full_macs_per_batch``.

    The bound of a DISTREAL reply's MACs is ``num_batches * full_macs_per_sample``: Algorithm 1
    adds, once per mini-batch, the forward MACs *per sample* of the (sub)model it trained, so
    the most one mini-batch adds is the full model's forward MACs per sample,
    ``count_macs(model)``. The old name said "per batch" of that per-sample count.

    Parameters
    ----------
    full_macs_per_sample, full_macs_per_batch : object
        The two keywords as given (None: not given).
    stacklevel : int, optional
        ``warnings.warn``'s stack level: 3 points at the caller of the constructor that calls
        this. Defaults to 3.

    Returns
    -------
    object
        The value given (validated by the caller).

    Raises
    ------
    TypeError
        If both or neither are given.
    """
    if full_macs_per_batch is not None:
        if full_macs_per_sample is not None:
            raise TypeError("pass full_macs_per_sample only: full_macs_per_batch is its deprecated name")
        warnings.warn(
            "full_macs_per_batch is deprecated, pass full_macs_per_sample: the value is the full model's "
            "forward MACs per sample (count_macs(model)), the most Algorithm 1 adds to 'macs' per mini-batch",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return full_macs_per_batch
    if full_macs_per_sample is None:
        raise TypeError(
            "missing keyword argument full_macs_per_sample: the full model's forward MACs per sample, "
            "count_macs(model)"
        )
    return full_macs_per_sample


class DistrealCore(ReplyGate):
    """DISTREAL's gate and rule: Algorithm 2 of Rapp et al. (AAAI 2022).

    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i`` over the accepted
    replies (:func:`flwr_distreal.server.aggregate.mac_weighted_update`), where ``c_i`` is the MACs
    client ``i`` reports. A reply is refused when its MACs are missing, not a number, NaN/inf,
    negative or above ``num_batches * full_macs_per_sample`` (or clipped to that, with
    ``on_excess="clip"``), or its arrays do not match the broadcast model
    (:func:`flwr_distreal.server.aggregate.validate_reply`).

    The client's ``num_batches`` is bounded by what the server knows, not only by the client's
    word: with ``max_batches_fn`` or ``batch_size`` (and ``local_epochs``) and the node's
    ``round-samples`` (handed over by the strategy, :meth:`limit_round`), or with
    ``batch_size`` and the reply's example count when the node's ``round-samples`` is unknown
    (:meth:`limit_of`), a reply claiming more mini-batches than its device could train is
    refused (``excess-batches``), or with ``on_excess="clip"`` weighted by at most
    ``max_batches * full_macs_per_sample``. Every train message states the batch size and
    local epochs the server bounds by (:meth:`train_config`). The round-level bounds
    (:class:`RoundBounds`) then bound the claim against the round's median, its share of the
    round's weight (``share_bound``) and the update norm.

    Parameters
    ----------
    full_macs_per_sample : float
        The full model's forward MACs per sample, ``count_macs(model)``: Algorithm 1 adds the
        (sub)model's forward MACs per sample once per mini-batch, so this is the most one
        mini-batch can add to a reply's ``macs`` (in the unit of the clients' MACs metric).
    full_macs_per_batch : float, optional
        Deprecated name of ``full_macs_per_sample`` (a ``DeprecationWarning``; the value is
        the same per-sample count).
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum, and with ``num_batches`` above the server's
        limit. Defaults to "refuse".
    batch_size : int | None, optional
        The mini-batch size the clients train with (the run's configuration); with the node's
        ``round-samples`` it bounds ``num_batches`` (:func:`max_batches_for`). None (default):
        no such bound unless ``max_batches_fn`` is given.
    local_epochs : int, optional
        Local epochs per round (with ``batch_size``). Defaults to 1.
    max_batches_fn : Callable[[int], int] | None, optional
        ``max_batches_fn(device_id)``: the most mini-batches a device can train in a round;
        takes precedence over ``batch_size``. Defaults to None.
    bounds : RoundBounds | None, optional
        The round-level bounds; None (default) uses ``RoundBounds()``.
    **keys : str
        Metric keys, see :class:`ReplyGate`.

    Raises
    ------
    ValueError
        If ``full_macs_per_sample`` is not a positive finite number, ``on_excess`` is not
        "refuse" or "clip", ``batch_size`` or ``local_epochs`` is not a positive int, or
        ``max_batches_fn`` is not callable.
    TypeError
        If both or neither of ``full_macs_per_sample`` and ``full_macs_per_batch`` are given.
    """

    weighs_by_claim = True

    def __init__(
        self,
        *,
        full_macs_per_sample: float | None = None,
        on_excess: OnExcess = "refuse",
        batch_size: int | None = None,
        local_epochs: int = 1,
        max_batches_fn: Callable[[int], int] | None = None,
        bounds: RoundBounds | None = None,
        full_macs_per_batch: float | None = None,
        **keys: str,
    ) -> None:
        full = full_macs_argument(full_macs_per_sample, full_macs_per_batch)
        if not is_number(full) or not (math.isfinite(float(full)) and float(full) > 0):  # type: ignore[arg-type]
            raise ValueError(
                f"full_macs_per_sample must be a positive finite number (the full model's forward MACs "
                f"per sample, count_macs(model)), got {full!r}"
            )
        if on_excess not in ("refuse", "clip"):
            raise ValueError(f"on_excess must be 'refuse' or 'clip', got {on_excess!r}")
        self.check_limits(batch_size, local_epochs, max_batches_fn)
        super().__init__(bounds=bounds, **keys)
        self.full_macs_per_sample = float(full)  # type: ignore[arg-type]
        self.on_excess: OnExcess = on_excess
        self.batch_size = None if batch_size is None else int(batch_size)
        self.local_epochs = int(local_epochs)
        self.max_batches_fn = max_batches_fn
        self.limits: dict[str, tuple[int, str]] = {}
        self._unbounded: set[str] = set()

    @property
    def full_macs_per_batch(self) -> float:
        """Deprecated name of :attr:`full_macs_per_sample` (a ``DeprecationWarning``)."""
        warnings.warn(
            "full_macs_per_batch is deprecated, read full_macs_per_sample", DeprecationWarning, stacklevel=2
        )
        return self.full_macs_per_sample

    @staticmethod
    def check_limits(batch_size: object, local_epochs: object, max_batches_fn: object) -> None:
        """Raise ValueError unless ``batch_size`` is None or an int >= 1, ``local_epochs`` an
        int >= 1 and ``max_batches_fn`` None or callable."""
        _positive_int("batch_size", batch_size, allow_none=True)
        _positive_int("local_epochs", local_epochs, allow_none=False)
        if max_batches_fn is not None and not callable(max_batches_fn):
            raise ValueError("max_batches_fn must be None or a callable (device_id) -> max mini-batches")

    @property
    def bounds_batches(self) -> bool:
        """True when the server can bound ``num_batches`` (``batch_size`` or ``max_batches_fn``)."""
        return self.batch_size is not None or self.max_batches_fn is not None

    def limit_round(
        self,
        server_round: int,
        nodes: Mapping[str, tuple[object, object]],
        *,
        logger: logging.Logger | None = None,
    ) -> dict[str, int]:
        """Set the round's ``num_batches`` limit of every selected node from what the server knows.

        Parameters
        ----------
        server_round : int
            The round.
        nodes : Mapping[str, tuple[object, object]]
            ``(device id, round samples)`` of every selected node, by node key, as the server
            learnt them (properties; unvalidated, None when unknown).
        logger : logging.Logger | None, optional
            Where a node without a limit is logged (once per node).

        Returns
        -------
        dict[str, int]
            The limit of every node that has one.
        """
        logger = logger or log
        self.limits = {}
        unbounded: list[str] = []
        for node, (raw_device, raw_samples) in nodes.items():
            limit: int | None = None
            why = ""
            if self.max_batches_fn is not None and as_device_id(raw_device) is not None:
                value = self.max_batches_fn(int(raw_device))  # type: ignore[arg-type]
                if is_number(value) and math.isfinite(float(value)) and float(value) >= 0:
                    limit, why = int(value), f"max_batches_fn({raw_device})"
            elif self.batch_size is not None and is_number(raw_samples) and float(raw_samples) >= 0:  # type: ignore[arg-type]
                samples = int(math.ceil(float(raw_samples)))  # type: ignore[arg-type]
                limit = max_batches_for(samples, self.batch_size, self.local_epochs)
                why = (
                    f"round-samples {samples}, batch size {self.batch_size}, "
                    f"{self.local_epochs} local epoch{'s' if self.local_epochs != 1 else ''}"
                )
            if limit is not None:
                self.limits[node] = (limit, why)
            elif self.bounds_batches and node not in self._unbounded:
                self._unbounded.add(node)
                unbounded.append(f"{node} (device {raw_device})")
        if unbounded:  # one line per round, each node named once per run
            logger.warning(
                "round %s: %s node%s with no known %s, num_batches bounded only by the reply's own %s: %s",
                server_round,
                len(unbounded),
                "s" if len(unbounded) != 1 else "",
                "device id" if self.max_batches_fn is not None else "round-samples",
                "claim" if self.max_batches_fn is not None else "num-examples",
                brief_list(unbounded),
            )
        return {node: limit for node, (limit, _) in self.limits.items()}

    def check(self, reply: Reply) -> ValidationResult:
        """Validate the reply's MACs, mini-batches (also against the server's limit) and arrays."""
        g = self.global_arrays
        result = validate_reply(
            reply.arrays,
            [a.shape for a in g],
            reply.metrics.get(self.macs_key),
            reply.metrics.get(self.num_batches_key),
            self.full_macs_per_sample,
            expected_kinds=[a.dtype.kind for a in g],
            on_excess=self.on_excess,
        )
        found = self.limit_of(reply) if result.ok else None
        if found is None:
            return result
        limit, why = found
        batches = int(float(reply.metrics[self.num_batches_key]))  # validated above
        if batches <= limit:
            return result
        message = f"reports {batches} mini-batches, the server's configuration allows at most {limit} ({why})"
        if self.on_excess == "refuse":
            return ValidationResult.refuse(RefusalReason.EXCESS_BATCHES, message)
        macs = min(float(result.macs or 0.0), limit * self.full_macs_per_sample)
        return ValidationResult(
            ok=True,
            reason=RefusalReason.EXCESS_BATCHES,
            message=f"{message}; weighted by at most {limit} x {self.full_macs_per_sample:g} MACs",
            macs=macs,
            clipped=True,
        )

    def limit_of(self, reply: Reply) -> tuple[int, str] | None:
        """The most mini-batches the server allows a reply, and why; None when it knows none.

        The node's round limit (:meth:`limit_round`: ``round-samples`` or ``max_batches_fn``);
        else, with ``batch_size`` known, the reply's own examples: ``n`` samples in batches of
        at most ``batch_size``, at most one partial batch per local epoch, make at most
        ``local_epochs * (floor(n / batch_size) + 1)`` mini-batches, whether ``n`` counts one
        epoch's samples (Flower's quickstart) or every epoch's (:class:`~flwr_distreal.training.loop.DistrealRound`).
        A reply without a positive example count has no such limit.
        """
        if reply.node in self.limits:
            return self.limits[reply.node]
        n = reply.num_examples
        if self.batch_size is None or self.max_batches_fn is not None:
            return None
        if not is_number(n) or not math.isfinite(float(n)) or float(n) <= 0:
            return None
        limit = self.local_epochs * (int(float(n)) // self.batch_size + 1)
        return limit, (
            f"{int(float(n))} examples in batches of at most {self.batch_size}, "
            f"{self.local_epochs} local epoch{'s' if self.local_epochs != 1 else ''}"
        )

    def train_config(self) -> dict[str, int]:
        """What every train message states of the server's configuration: ``batch-size`` and
        ``local-epochs`` (:data:`flwr_distreal.core.contract.BATCH_SIZE`, ``LOCAL_EPOCHS``) when
        ``batch_size`` is known, the numbers ``num_batches`` is bounded by; else nothing."""
        if self.batch_size is None:
            return {}
        return {C.BATCH_SIZE: self.batch_size, C.LOCAL_EPOCHS: self.local_epochs}

    def work_of(self, reply: Reply) -> float | None:
        """``num_batches``, capped by the server's limit for the reply (:meth:`limit_of`)."""
        b = super().work_of(reply)
        found = self.limit_of(reply)
        if b is not None and found is not None:
            b = min(b, float(found[0]))
        return b

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """Algorithm 2: the MAC-weighted update (or the robust rule); None when every reply
        spent zero MACs."""
        macs = [float(a.macs or 0.0) for a in accepted]
        if sum(macs) <= 0.0:
            log.warning("every accepted reply reports zero MACs: nothing to weight by")
            return None
        return self.weighted_rule(global_arrays, accepted, macs)


class FedAvgCore(ReplyGate):
    """FedAvg's gate and rule (full resources, small network): arrays validated, the round's
    bounds applied (:class:`RoundBounds`, without claims), the accepted replies averaged
    weighted by their examples (or by the robust rule)."""

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
        return _examples_update(self, global_arrays, accepted)


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
            from ..core.lut import LUT

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
        Metric keys, see :class:`ReplyGate`.

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
        """The ``aggregation`` rule over the accepted replies' submodels, weighted by examples."""
        weights = [a.reply.num_examples for a in accepted]
        if sum(weights) <= 0:
            log.warning("every accepted reply reports zero examples: nothing to weight by")
            return None
        masks = [self.masks(self.assignments[a.reply.node]) for a in accepted]
        rule = SUBMODEL_RULES[self.aggregation]
        return rule(global_arrays, [a.reply.arrays for a in accepted], masks, weights)
