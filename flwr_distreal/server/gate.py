"""The round's gate: the part of a strategy that does not touch Flower.

:class:`ReplyGate` keeps the broadcast model, drops stragglers, validates every other reply
(:func:`flwr_distreal.server.validation.validate_reply` / ``validate_arrays``), screens the
survivors against each other (:class:`flwr_distreal.server.bounds.RoundBounds`), logs every
refusal and clip with the round, the node, the device's partition id and the reason, counts
(``received``, ``failures``, ``stragglers``, ``refused``, ``clipped``, ``accepted``,
``mean_macs``, ``mean_utilisation``) and combines the accepted replies with its subclass's
aggregation rule (:mod:`flwr_distreal.server.rules`: DISTREAL and FedAvg;
:mod:`flwr_distreal.server.submodels`: the submodel baselines). No Flower or Hydra imports.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

from ..core import contract as C
from ..core.contract import is_number, is_straggler
from .aggregate import mac_weighted_update, trimmed_mean_update, weighted_median_update
from .bounds import RoundBounds
from .replies import Accepted, Arrays, Refusal, Reply, RoundOutcome, fit_metrics_aggregation, reply_order
from .validation import ValidationResult, validate_arrays

__all__ = ["ReplyGate"]

log = logging.getLogger(__name__)


def _check_key(name: str, key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} must be a non-empty string, got {key!r}")


class ReplyGate(ABC):
    """The round's gate and aggregation: the part of a strategy that does not touch Flower.

    Keeps the broadcast model of the round (:meth:`broadcast`), then, for the round's replies
    (:meth:`aggregate`): drops stragglers, validates every other reply (:meth:`check`),
    screens the survivors against each other (:class:`~flwr_distreal.server.bounds.RoundBounds`:
    outlier updates and claims refused or clipped), logs each refusal and clip with the round,
    node, partition id and reason, combines the accepted replies in
    :func:`~flwr_distreal.server.replies.reply_order` with the subclass's rule (:meth:`combine`)
    and counts.

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
        finiteness (:func:`flwr_distreal.server.validation.validate_arrays`)."""
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
        """Combine accepted replies (non-empty, in :func:`~flwr_distreal.server.replies.reply_order`);
        None when they carry no weight."""

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
