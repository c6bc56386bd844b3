"""A client's reply, whatever the Flower API it came through, and what the gate made of it.

Both strategy families (:mod:`flwr_distreal.flower.legacy.strategy`, legacy ``FitIns``/``FitRes``;
:mod:`flwr_distreal.flower.serverapp`, Flower's ``Message`` API) unpack Flower's types into the
neutral :class:`Reply` this module defines, so that the Flower-free server layer
(:mod:`flwr_distreal.server`) decides the same way for both APIs. No Flower or Hydra imports.

Pieces
------
:class:`Reply`, :func:`reply_order`
    A client's reply, and the order replies are combined in (by device id, then node key):
    summing in a fixed order makes a seeded run reproducible to the last bit.
:class:`Accepted`, :class:`Refusal`, :class:`RoundOutcome`
    A reply that passed the gate (:class:`flwr_distreal.server.gate.ReplyGate`), one it refused
    and why, and the round's outcome (new model, counts, accepted and refused replies).
:func:`fit_metrics_aggregation`
    The round's resource metrics (``mean_macs``, ``mean_utilisation``) over the replies.
:func:`as_device_id`
    A device id from a metric or property value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core import contract as C
from ..core.contract import is_number, is_straggler
from .validation import ValidationResult

__all__ = [
    "Accepted",
    "Refusal",
    "Reply",
    "RoundOutcome",
    "as_device_id",
    "fit_metrics_aggregation",
    "reply_order",
]

#: A model as its ``state_dict`` values, in order.
Arrays = list[np.ndarray]


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
        The reason code (a :class:`flwr_distreal.server.validation.RefusalReason` value, e.g.
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
