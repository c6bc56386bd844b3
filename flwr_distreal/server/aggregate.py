"""Aggregation maths for DISTREAL and the baselines (pure NumPy, no Flower, no Hydra).

Model parameters travel as a list of NumPy arrays: the values of the model's
``state_dict()`` in ``state_dict`` order (weights, biases, BatchNorm running
statistics and the integer ``num_batches_tracked`` counters). Every function here
takes and returns arrays in that order.

Functions
---------
mac_weighted_update
    Algorithm 2 of the paper: the server averages the clients' weight updates
    weighted by the multiply-accumulate operations (MACs) each client reports.
masked_average, zero_padded_average
    The submodel baselines' (Federated Dropout, HeteroFL) two rules, named in
    :data:`SUBMODEL_RULES`: ``per_weight`` averages every entry over the clients
    whose submodel holds it; ``all_clients`` is FedAvg over the zero-padded
    updates (a client that did not train an entry counts with a zero update).
update_norms, scale_update
    The L2 norm of a reply's update (its arrays minus the broadcast model),
    per floating array, and an update scaled by a factor (norm clipping); the
    server's round-level bounds (:class:`flwr_distreal.server.bounds.RoundBounds`)
    are built on them.
weighted_median_update, trimmed_mean_update
    Coordinate-wise robust aggregation (as Flower's ``FedMedian`` and
    ``FedTrimmedAvg``), keeping the MAC (or example) weighting of Algorithm 2
    where a coordinate-wise rule allows it.

Integer arrays (BatchNorm's ``num_batches_tracked``) are averaged like every other
array, in float64, then rounded to the nearest integer (``numpy.rint``, half to
even) and cast back to their original dtype, so the aggregate always loads into
the model's ``state_dict``. Floating arrays are accumulated in float64 and cast
back to the dtype of the global array. The one validation gate a reply passes
before it gets here is :mod:`flwr_distreal.server.validation`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "SUBMODEL_RULES",
    "SubmodelAggregation",
    "mac_weighted_update",
    "masked_average",
    "scale_update",
    "trimmed_mean_update",
    "update_norms",
    "weighted_average",
    "weighted_median_update",
    "zero_padded_average",
]

#: dtype kinds that can be averaged: floating, signed and unsigned integers (also what
#: :func:`flwr_distreal.server.validation.validate_arrays` accepts).
_NUMERIC_KINDS = frozenset("fiu")


# --------------------------------------------------------------------------- helpers


def _check_same_structure(
    global_arrays: Sequence[NDArray], client_arrays: Sequence[NDArray], index: int
) -> None:
    """Raise ValueError if a client's arrays do not match the global arrays."""
    if len(client_arrays) != len(global_arrays):
        raise ValueError(
            f"client {index} sent {len(client_arrays)} arrays, expected "
            f"{len(global_arrays)} (one per state_dict entry)"
        )
    for j, (g, c) in enumerate(zip(global_arrays, client_arrays)):
        if np.shape(c) != np.shape(g):
            raise ValueError(
                f"client {index} array {j} has shape {np.shape(c)}, expected {np.shape(g)}"
            )


def _check_numeric(arrays: Sequence[NDArray]) -> None:
    for j, g in enumerate(arrays):
        if np.asarray(g).dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(
                f"global array {j} has dtype {np.asarray(g).dtype}; only floating and "
                "integer arrays can be averaged"
            )


def _check_weights(weights: Sequence[float], n_clients: int, name: str) -> NDArray[np.float64]:
    """Validate per-client weights: finite, non-negative, one per client."""
    if len(weights) != n_clients:
        raise ValueError(f"got {len(weights)} {name} for {n_clients} clients")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers, got {list(weights)!r}") from err
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative, got {w.tolist()}")
    return w


def _cast_like(value: NDArray[np.float64], like: NDArray) -> NDArray:
    """Cast a float64 result back to the dtype of ``like`` (rounding integers)."""
    dtype = np.asarray(like).dtype
    if dtype.kind in "iu":
        return np.rint(value).astype(dtype)
    return value.astype(dtype, copy=False)


def _is_real_number(value: object) -> bool:
    """True for int/float (also NumPy scalars), False for bool, str, bytes, None."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))



# ----------------------------------------------------------------------- aggregation


def mac_weighted_update(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    macs_list: Sequence[float],
) -> list[NDArray]:
    """Aggregate client models weighted by the MACs each spent (Algorithm 2).

    Computes ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i``
    entry by entry, where ``theta_{t-1}`` are the global arrays broadcast this
    round, ``theta_i`` the arrays client ``i`` returned and ``c_i`` the MACs it
    reported (Algorithm 2 of Rapp et al., AAAI 2022). With equal ``c_i`` this
    is the unweighted mean of the client models; with ``c_i`` proportional to the
    number of examples it is FedAvg.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The global model ``theta_{t-1}`` broadcast this round, as the model's
        ``state_dict`` values in order.
    client_arrays_list : Sequence[Sequence[NDArray]]
        For each client, its trained model ``theta_i`` in the same order and
        shapes as ``global_arrays``.
    macs_list : Sequence[float]
        For each client, the MACs ``c_i`` it spent in training (validated
        beforehand; must be finite and non-negative).

    Returns
    -------
    list[NDArray]
        The new global model ``theta_t``, same order, shapes and dtypes as
        ``global_arrays``. Integer arrays are rounded to the nearest integer.

    Raises
    ------
    ValueError
        If there are no clients, the number of MACs does not match the number of
        clients, a MACs value is negative or non-finite, all MACs are zero, or a
        client's arrays do not match the global arrays in count or shape.
    """
    if len(client_arrays_list) == 0:
        raise ValueError("mac_weighted_update needs at least one client")
    c = _check_weights(macs_list, len(client_arrays_list), "MACs values")
    total = float(c.sum())
    if total <= 0.0:
        raise ValueError("all clients reported zero MACs: nothing to weight the updates by")
    _check_numeric(global_arrays)
    for i, arrays in enumerate(client_arrays_list):
        _check_same_structure(global_arrays, arrays, i)

    new_arrays: list[NDArray] = []
    for j, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        delta = np.zeros_like(g64)
        for c_i, arrays in zip(c, client_arrays_list):
            if c_i == 0.0:
                continue
            delta += c_i * (np.asarray(arrays[j], dtype=np.float64) - g64)
        new_arrays.append(_cast_like(g64 + delta / total, g))
    return new_arrays


def weighted_average(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    weights: Sequence[float],
) -> list[NDArray]:
    """FedAvg: the mean of the client models weighted by ``weights``.

    The same computation as :func:`mac_weighted_update` with ``weights`` in place
    of the MACs (an update form of ``sum_i w_i theta_i / sum_i w_i``), used by the
    full-resources and small-network baselines with the clients' numbers of
    examples as weights.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The global model broadcast this round (defines order, shapes, dtypes).
    client_arrays_list : Sequence[Sequence[NDArray]]
        For each client, its trained model in the same order and shapes.
    weights : Sequence[float]
        For each client, a finite non-negative weight (e.g. its number of
        training examples); at least one must be positive.

    Returns
    -------
    list[NDArray]
        The weighted mean, same order, shapes and dtypes as ``global_arrays``.

    Raises
    ------
    ValueError
        Under the same conditions as :func:`mac_weighted_update`.
    """
    return mac_weighted_update(global_arrays, client_arrays_list, weights)


def _check_submodel_inputs(
    name: str,
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    masks_list: Sequence[Sequence[NDArray | None]],
    weights: Sequence[float] | None,
) -> NDArray[np.float64]:
    """Validate the inputs of a submodel rule; return the per-client weights."""
    n = len(client_arrays_list)
    if n == 0:
        raise ValueError(f"{name} needs at least one client")
    if len(masks_list) != n:
        raise ValueError(f"got {len(masks_list)} mask lists for {n} clients")
    w = np.ones(n) if weights is None else _check_weights(weights, n, "weights")
    _check_numeric(global_arrays)
    for i, (arrays, masks) in enumerate(zip(client_arrays_list, masks_list)):
        _check_same_structure(global_arrays, arrays, i)
        if len(masks) != len(global_arrays):
            raise ValueError(
                f"client {i} has {len(masks)} masks, expected {len(global_arrays)}"
            )
        for j, (g, m) in enumerate(zip(global_arrays, masks)):
            if m is None:
                continue
            m_arr = np.asarray(m)
            if m_arr.dtype != np.bool_:
                raise ValueError(f"client {i} mask {j} has dtype {m_arr.dtype}, expected bool")
            if m_arr.shape != np.shape(g):
                raise ValueError(
                    f"client {i} mask {j} has shape {m_arr.shape}, expected {np.shape(g)}"
                )
    return w


def _masked_sums(
    g64: NDArray[np.float64],
    j: int,
    w: NDArray[np.float64],
    client_arrays_list: Sequence[Sequence[NDArray]],
    masks_list: Sequence[Sequence[NDArray | None]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """For array ``j``: ``sum_i w_i m_i (theta_i - g)`` and ``sum_i w_i m_i``, entry by entry."""
    num = np.zeros_like(g64)
    den = np.zeros_like(g64)
    for w_i, arrays, masks in zip(w, client_arrays_list, masks_list):
        if w_i == 0.0:
            continue
        m = masks[j]
        coeff = np.full(g64.shape, w_i) if m is None else w_i * np.asarray(m, np.float64)
        num += coeff * (np.asarray(arrays[j], dtype=np.float64) - g64)
        den += coeff
    return num, den


def masked_average(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    masks_list: Sequence[Sequence[NDArray | None]],
    weights: Sequence[float] | None = None,
) -> list[NDArray]:
    """Average every entry over the clients that trained it (rule ``per_weight``).

    For each entry ``e``:
    ``theta_t[e] = sum_i w_i m_i[e] theta_i[e] / sum_i w_i m_i[e]`` where
    ``m_i[e]`` is 1 if client ``i``'s submodel trained entry ``e`` and 0 otherwise.
    An entry that no client trained (every ``w_i m_i[e]`` is zero) keeps its
    global value. This is the per-parameter averaging of HeteroFL (Diao, Ding
    and Tarokh 2021; repository ``src/fed.py``, ``Federation.combine``: a count
    per parameter) and of the DISTREAL authors' Federated Dropout and HeteroFL
    baselines (repository k1l1/SLT, ``algorithms/fd.py``, ``model_averaging``);
    both count every client once, here ``w_i`` weights them (by examples in the
    baselines, as FedAvg). An entry held by few clients moves by their mean
    update, not by the federation's: see :func:`zero_padded_average`.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The global model broadcast this round, as ``state_dict`` values in order.
    client_arrays_list : Sequence[Sequence[NDArray]]
        For each client, its returned model in full shape (entries outside its
        submodel are ignored whatever their value).
    masks_list : Sequence[Sequence[NDArray | None]]
        For each client, one boolean mask per array, of the array's shape, True
        where the client's submodel trained the entry. ``None`` for an array
        means the whole array was trained.
    weights : Sequence[float] | None, optional
        Per-client non-negative weights (e.g. numbers of examples). Defaults to
        None, meaning equal weights.

    Returns
    -------
    list[NDArray]
        The aggregated model, same order, shapes and dtypes as ``global_arrays``.

    Raises
    ------
    ValueError
        If there are no clients, the numbers of clients, masks and weights
        disagree, a weight is negative or non-finite, or an array or mask has the
        wrong count or shape, or a mask is not boolean.
    """
    w = _check_submodel_inputs("masked_average", global_arrays, client_arrays_list, masks_list, weights)
    new_arrays: list[NDArray] = []
    for j, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        num, den = _masked_sums(g64, j, w, client_arrays_list, masks_list)
        delta = np.divide(num, den, out=np.zeros_like(g64), where=den > 0)
        new_arrays.append(_cast_like(g64 + delta, g))
    return new_arrays


def zero_padded_average(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    masks_list: Sequence[Sequence[NDArray | None]],
    weights: Sequence[float] | None = None,
) -> list[NDArray]:
    """FedAvg over zero-padded submodel updates (rule ``all_clients``).

    Every accepted client counts for every entry: a client whose submodel did not
    train entry ``e`` contributes the global value unchanged (a zero update). For
    each entry ``e``:
    ``theta_t[e] = g[e] + sum_i w_i m_i[e] (theta_i[e] - g[e]) / sum_i w_i``,
    i.e. the weighted mean of the clients' models once each has been mapped back
    into the global model (entries outside its submodel filled with the global
    values). An entry trained by a fraction ``f`` of the weight moves by ``f``
    times the mean update of those that trained it (:func:`masked_average` moves
    it by the whole mean update).

    Parameters
    ----------
    global_arrays, client_arrays_list, masks_list, weights
        As for :func:`masked_average`.

    Returns
    -------
    list[NDArray]
        The aggregated model, same order, shapes and dtypes as ``global_arrays``.

    Raises
    ------
    ValueError
        As :func:`masked_average`, or if all weights are zero.
    """
    w = _check_submodel_inputs("zero_padded_average", global_arrays, client_arrays_list, masks_list, weights)
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError("all weights are zero: nothing to weight the updates by")
    new_arrays: list[NDArray] = []
    for j, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        num, _ = _masked_sums(g64, j, w, client_arrays_list, masks_list)
        new_arrays.append(_cast_like(g64 + num / total, g))
    return new_arrays


#: How the submodel baselines combine the accepted replies, by the name of the
#: ``aggregation`` option: ``per_weight`` (:func:`masked_average`) or
#: ``all_clients`` (:func:`zero_padded_average`).
SUBMODEL_RULES = {"per_weight": masked_average, "all_clients": zero_padded_average}
SubmodelAggregation = Literal["per_weight", "all_clients"]


# ------------------------------------------------------------------- update geometry


def update_norms(global_arrays: Sequence[NDArray], client_arrays: Sequence[NDArray]) -> NDArray[np.float64]:
    """L2 norm of a client's update ``theta_i - theta_{t-1}``, per floating array.

    Integer arrays (BatchNorm's ``num_batches_tracked``) are left out: they count
    steps, they do not move the model. The differences are taken and squared in
    float64, so an update of float32 weights near ``1e30`` gives a finite norm
    (``~1e30 * sqrt(size)``) instead of overflowing to inf.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The broadcast model, ``state_dict`` order.
    client_arrays : Sequence[NDArray]
        The client's arrays, same count and shapes (validated beforehand).

    Returns
    -------
    NDArray[np.float64]
        One norm per floating array of ``global_arrays``, in order; the
        whole-model norm is ``sqrt(sum(norms**2))``.
    """
    out: list[float] = []
    for g, c in zip(global_arrays, client_arrays):
        if np.asarray(g).dtype.kind != "f":
            continue
        d = np.subtract(c, g, dtype=np.float64).ravel()  # cast on the fly, no float32 overflow
        out.append(float(d @ d))
    return np.sqrt(np.asarray(out, dtype=np.float64))


def scale_update(
    global_arrays: Sequence[NDArray],
    client_arrays: Sequence[NDArray],
    factors: float | Sequence[float],
) -> list[NDArray]:
    """``theta_{t-1} + f * (theta_i - theta_{t-1})``: a client's update scaled (clipped).

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The broadcast model.
    client_arrays : Sequence[NDArray]
        The client's arrays.
    factors : float or Sequence[float]
        One factor for the whole update, or one per floating array (in the order
        of :func:`update_norms`). A factor of 1 keeps the array bit for bit.

    Returns
    -------
    list[NDArray]
        The scaled arrays, dtypes of the client's; integer arrays unchanged.
    """
    n_float = sum(1 for g in global_arrays if np.asarray(g).dtype.kind == "f")
    per = [float(factors)] * n_float if np.isscalar(factors) else [float(f) for f in factors]  # type: ignore[arg-type]
    if len(per) != n_float:
        raise ValueError(f"got {len(per)} factors for {n_float} floating arrays")
    out: list[NDArray] = []
    k = 0
    for g, c in zip(global_arrays, client_arrays):
        g, c = np.asarray(g), np.asarray(c)
        if g.dtype.kind != "f":
            out.append(c)
            continue
        f = per[k]
        k += 1
        if f == 1.0:
            out.append(c)
            continue
        g64 = g.astype(np.float64)
        out.append((g64 + f * (c.astype(np.float64) - g64)).astype(c.dtype))
    return out


# -------------------------------------------------------------- robust aggregation


def _robust_prepare(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    weights: Sequence[float] | None,
    name: str,
) -> tuple[list[Sequence[NDArray]], NDArray[np.float64]]:
    """Validate, then keep the clients with positive weight (they alone have a say)."""
    if len(client_arrays_list) == 0:
        raise ValueError(f"{name} needs at least one client")
    w = np.ones(len(client_arrays_list)) if weights is None else _check_weights(
        weights, len(client_arrays_list), "weights"
    )
    if float(w.sum()) <= 0.0:
        raise ValueError("all clients have zero weight: nothing to aggregate")
    _check_numeric(global_arrays)
    for i, arrays in enumerate(client_arrays_list):
        _check_same_structure(global_arrays, arrays, i)
    keep = [i for i in range(len(w)) if w[i] > 0]
    return [client_arrays_list[i] for i in keep], w[keep]


def _weighted_median(values: NDArray[np.float64], w: NDArray[np.float64]) -> NDArray[np.float64]:
    """Coordinate-wise weighted median of ``values`` (clients x entries)."""
    order = np.argsort(values, axis=0, kind="stable")
    v = np.take_along_axis(values, order, axis=0)
    cum = np.cumsum(w[order], axis=0)
    half = 0.5 * float(w.sum())
    eps = 1e-12 * float(w.sum())
    lo = np.argmax(cum >= half - eps, axis=0)[None, :]
    hi = np.argmax(cum > half + eps, axis=0)[None, :]
    return 0.5 * (np.take_along_axis(v, lo, axis=0) + np.take_along_axis(v, hi, axis=0))[0]


def weighted_median_update(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    weights: Sequence[float] | None = None,
) -> list[NDArray]:
    """Coordinate-wise weighted median of the client models (robust aggregation).

    Every floating entry becomes the weighted median of the clients' values: the
    value with at most half of the total weight on either side (when the
    cumulative weight hits exactly one half, the mean of the two middle values,
    so equal weights give :func:`numpy.median`, as Flower's ``FedMedian``).
    Integer arrays are averaged by weight as in :func:`mac_weighted_update`.

    With the MACs ``c_i`` as weights this keeps Algorithm 2's idea that a client's
    say grows with the compute it spent, but no client can drag a coordinate past
    the MAC-median: a client has to hold more than half the round's MACs to
    decide a coordinate alone (which the claim bounds of
    :class:`flwr_distreal.server.bounds.RoundBounds` prevent). Unlike Algorithm 2 it
    is not an average: with honest clients it converges more slowly.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The broadcast model (order, shapes, dtypes).
    client_arrays_list : Sequence[Sequence[NDArray]]
        The client models.
    weights : Sequence[float] | None, optional
        Non-negative weights (MACs, examples); clients with zero weight have no
        say. None (default): equal weights.

    Returns
    -------
    list[NDArray]
        The aggregate, dtypes of ``global_arrays``.

    Raises
    ------
    ValueError
        If there are no clients, all weights are zero, a weight is negative or
        non-finite, or a client's arrays do not match the global arrays.
    """
    clients, w = _robust_prepare(global_arrays, client_arrays_list, weights, "weighted_median_update")
    out: list[NDArray] = []
    for j, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        values = np.stack([np.asarray(c[j], dtype=np.float64).ravel() for c in clients])
        if np.asarray(g).dtype.kind == "f":
            new = _weighted_median(values, w).reshape(g64.shape)
        else:
            new = (w[:, None] * values).sum(axis=0).reshape(g64.shape) / float(w.sum())
        out.append(_cast_like(new, g))
    return out


def trimmed_mean_update(
    global_arrays: Sequence[NDArray],
    client_arrays_list: Sequence[Sequence[NDArray]],
    weights: Sequence[float] | None = None,
    beta: float = 0.2,
) -> list[NDArray]:
    """Coordinate-wise trimmed mean of the client models, weighted (robust aggregation).

    Per floating entry, the ``floor(beta * n)`` smallest and largest of the ``n``
    clients' values are dropped (by count, as Flower's ``FedTrimmedAvg``), and the
    rest is averaged weighted by ``weights``. Trimming by count means a large
    MACs claim cannot shield an extreme value from being trimmed; the MAC
    weighting of Algorithm 2 applies among the values that survive. Integer
    arrays are averaged by weight. With ``floor(beta * n) == 0`` this is the
    weighted average.

    Parameters
    ----------
    global_arrays : Sequence[NDArray]
        The broadcast model.
    client_arrays_list : Sequence[Sequence[NDArray]]
        The client models.
    weights : Sequence[float] | None, optional
        Non-negative weights; clients with zero weight are left out before
        trimming. None (default): equal weights.
    beta : float, optional
        Fraction trimmed at each end, in [0, 0.5). Defaults to 0.2 (Flower's).

    Returns
    -------
    list[NDArray]
        The aggregate, dtypes of ``global_arrays``.

    Raises
    ------
    ValueError
        As :func:`weighted_median_update`, or if ``beta`` is outside [0, 0.5).
    """
    if not _is_real_number(beta) or not 0.0 <= float(beta) < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
    clients, w = _robust_prepare(global_arrays, client_arrays_list, weights, "trimmed_mean_update")
    n = len(clients)
    cut = int(math.floor(float(beta) * n))
    out: list[NDArray] = []
    for j, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        values = np.stack([np.asarray(c[j], dtype=np.float64).ravel() for c in clients])
        if np.asarray(g).dtype.kind == "f" and cut > 0:
            order = np.argsort(values, axis=0, kind="stable")[cut : n - cut]
            v = np.take_along_axis(values, order, axis=0)
            ww = w[order]
            new = (ww * v).sum(axis=0) / ww.sum(axis=0)
        else:
            new = (w[:, None] * values).sum(axis=0) / float(w.sum())
        out.append(_cast_like(new.reshape(g64.shape), g))
    return out
