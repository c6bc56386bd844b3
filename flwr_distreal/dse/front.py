"""Pareto-front utilities of the DSE: non-dominated points, hypervolume, even spreading, the
fronts of a search's history.

All functions work on minimised two-objective points ``F`` of shape ``(n, 2)``, i.e. the
normalised ``(f1, f2)`` of the paper's equation (1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pygmo as pg

from .problem import DSEError

__all__ = [
    "DEFAULT_REFERENCE",
    "non_dominated",
    "hypervolume",
    "spread_evenly",
    "best_gain_at_budget",
    "front_history",
]

#: Hypervolume reference point in normalised objective space.
DEFAULT_REFERENCE: tuple[float, float] = (1.1, 1.1)


def _as_points(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DSEError(f"objective points must have shape (n, 2), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DSEError("objective points contain NaN or infinity")
    return arr


def non_dominated(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Indices of the non-dominated points (first Pareto front), sorted by ``f1`` ascending.

    Identical points are reported once (the first occurrence), so the returned points are
    pairwise distinct with ``f1`` strictly increasing and ``f2`` strictly decreasing.

    Parameters
    ----------
    points : array-like
        Minimised objectives, shape ``(n, 2)``.

    Returns
    -------
    np.ndarray
        int64 indices into ``points``.
    """
    arr = _as_points(points)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    # Stable lexicographic sort: f1, then f2, then original index.
    order = np.lexsort((np.arange(arr.shape[0]), arr[:, 1], arr[:, 0]))
    keep: list[int] = []
    best_f2 = np.inf
    for i in order:
        if arr[i, 1] < best_f2:
            keep.append(int(i))
            best_f2 = arr[i, 1]
    return np.asarray(keep, dtype=np.int64)


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]],
    reference: Sequence[float] = DEFAULT_REFERENCE,
) -> float:
    """Hypervolume dominated by ``points`` up to ``reference`` (pygmo's exact algorithm).

    Points that do not strictly dominate the reference point contribute nothing and are left
    out (pygmo refuses them).

    Parameters
    ----------
    points : array-like
        Minimised objectives, shape ``(n, 2)``.
    reference : sequence of float
        Reference point, default ``(1.1, 1.1)``.

    Returns
    -------
    float
        The hypervolume; 0.0 when no point dominates the reference.
    """
    arr = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (2,) or not np.all(np.isfinite(ref)):
        raise DSEError(f"reference point must be two finite numbers, got {list(reference)}")
    inside = arr[np.all(arr < ref, axis=1)]
    if inside.shape[0] == 0:
        return 0.0
    front = inside[non_dominated(inside)]
    return float(pg.hypervolume(front).compute(ref))


def spread_evenly(points: np.ndarray | Sequence[Sequence[float]], n: int) -> np.ndarray:
    """Choose ``n`` points spread evenly by arc length along a front.

    Parameters
    ----------
    points : array-like
        A front sorted by ``f1`` (as returned by ``points[non_dominated(points)]``), shape
        ``(m, 2)``.
    n : int
        Number of points wanted (``>= 2``).

    Returns
    -------
    np.ndarray
        Sorted int64 indices into ``points``: all of them if ``m <= n``; otherwise ``n``
        distinct indices that always include both ends, each the unused point nearest (by arc
        length along the polyline) to one of ``n`` equally spaced positions.
    """
    arr = _as_points(points)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise DSEError(f"number of points to spread must be an integer >= 2, got {n!r}")
    m = arr.shape[0]
    if m <= n:
        return np.arange(m, dtype=np.int64)
    seg = np.linalg.norm(np.diff(arr, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.linspace(0.0, s[-1], int(n))
    used = np.zeros(m, dtype=bool)
    chosen: list[int] = []
    # Ends first so they are never taken by a neighbouring target.
    for t_idx in [0, len(targets) - 1, *range(1, len(targets) - 1)]:
        dist = np.abs(s - targets[t_idx])
        dist[used] = np.inf
        i = int(np.argmin(dist))
        used[i] = True
        chosen.append(i)
    return np.asarray(sorted(chosen), dtype=np.int64)


def best_gain_at_budget(
    front_macs: np.ndarray, front_dacc: np.ndarray, budgets: np.ndarray
) -> np.ndarray:
    """Best accuracy gain a front offers within each MAC budget (``-inf`` if none fits).

    This is what a client's LUT lookup gets for a budget: the front vector with the most MACs
    that fit, which on a Pareto front is also the one with the highest gain.

    Parameters
    ----------
    front_macs, front_dacc : np.ndarray
        MACs and mean accuracy gains of the front's vectors, shape ``(m,)``.
    budgets : np.ndarray
        MAC budgets, shape ``(b,)``.

    Returns
    -------
    np.ndarray
        Shape ``(b,)``.
    """
    macs = np.asarray(front_macs, dtype=np.float64)
    dacc = np.asarray(front_dacc, dtype=np.float64)
    out = np.full(len(budgets), -np.inf)
    for j, b in enumerate(np.asarray(budgets, dtype=np.float64)):
        fits = macs <= b
        if fits.any():
            out[j] = float(dacc[fits].max())
    return out


def front_history(history: Sequence[dict[str, Any]], count: int) -> list[tuple[int, np.ndarray]]:
    """``count`` evenly spaced generations (first and last included) with their population's
    non-dominated objectives."""
    if not history:
        return []
    idx = np.unique(np.round(np.linspace(0, len(history) - 1, max(1, count))).astype(int))
    out = []
    for i in idx:
        F = np.asarray(history[i]["population_f"], dtype=np.float64)
        out.append((int(history[i]["generation"]), F[non_dominated(F)]))
    return out
