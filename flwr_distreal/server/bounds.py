"""Round-level bounds: replies judged against each other, and the share cap on claims.

The per-reply checks (:mod:`flwr_distreal.server.validation`) judge a reply alone;
:class:`RoundBounds` judges the replies of a round that passed them against each other and
against the broadcast model: an update whose norm lies far outside the round's, a MACs claim far
above the round's, is refused or clipped; no claim holds more than
``share_bound / (n + share_bound - 1)`` of the round's weight (:func:`share_limit`,
:func:`cap_shares`, on the MACs ``c_i`` of Algorithm 2 of Rapp et al., AAAI 2022); optional
robust aggregation. No Flower or Hydra imports.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from ..core.contract import is_number
from .aggregate import scale_update, update_norms
from .replies import Accepted, reply_order
from .validation import RefusalReason

__all__ = [
    "ROBUST_MODES",
    "SHARE_BOUND",
    "OnOutlier",
    "Robust",
    "RoundBounds",
    "Screened",
    "UpdateNorm",
    "cap_shares",
    "share_limit",
]


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

    The per-reply checks (:func:`flwr_distreal.server.validation.validate_reply`) judge a reply
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
        examples), is the per-reply check of :class:`~flwr_distreal.server.rules.DistrealCore`.
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
            The round's replies that passed :meth:`~flwr_distreal.server.gate.ReplyGate.check`, in
            combination order.
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

