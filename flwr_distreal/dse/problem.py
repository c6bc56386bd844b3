"""The pygmo user-defined problem (UDP) of the design-time DSE.

The DSE searches per-layer dropout vectors ``d`` in ``[0, 0.5]^k`` (``k`` = the model's
dropout layers) and minimises the two normalised objectives of the paper's equation (1)::

    f1(d) = (MACs(d) - MACs(0.5)) / (MACs(0) - MACs(0.5))
    f2(d) = (dAcc(0) - dAcc(d)) / (dAcc(0) - dAcc(0.5))

so that the all-zero vector maps to ``(1, 0)`` and the all-0.5 vector to ``(0, 1)``.

The UDP is deliberately thin: pygmo deep-copies (and, for multiprocessing batch evaluators,
pickles) it, so it holds no heavy state. The expensive part, measuring ``MACs(d)`` and
``dAcc(d)``, is delegated to an injected :class:`VectorEvaluator` that is shared by all
copies (see :class:`SharedEvaluator`) and owns the evaluation cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "MAX_RATE",
    "DSEError",
    "Normaliser",
    "VectorEvaluator",
    "SharedEvaluator",
    "DropoutProblem",
    "canonical_vector",
    "vector_key",
]

#: Upper bound of every per-layer dropout rate (the paper's search space is [0, 0.5]^k).
MAX_RATE: float = 0.5


class DSEError(ValueError):
    """A DSE setting, input or intermediate result that makes the search meaningless."""


def canonical_vector(vector: Any, n_layers: int) -> np.ndarray:
    """Return ``vector`` as a canonical float64 array, refusing invalid dropout vectors.

    Parameters
    ----------
    vector : array-like
        Per-layer dropout rates, one per dropout layer.
    n_layers : int
        Number of dropout layers the vector must have.

    Returns
    -------
    np.ndarray
        A contiguous float64 copy of shape ``(n_layers,)``; ``-0.0`` is turned into ``0.0`` so
        that equal vectors have equal bytes (see :func:`vector_key`).

    Raises
    ------
    DSEError
        If the shape is wrong, a value is not finite, or a rate lies outside ``[0, 0.5]``.
    """
    arr = np.asarray(vector, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_layers:
        raise DSEError(
            f"dropout vector must have shape ({n_layers},), got {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)):
        raise DSEError(f"dropout vector contains NaN or infinity: {arr.tolist()}")
    if np.any(arr < 0.0) or np.any(arr > MAX_RATE):
        bad = [float(v) for v in arr if v < 0.0 or v > MAX_RATE]
        raise DSEError(f"dropout rates must lie in [0, {MAX_RATE}], got {bad}")
    return np.ascontiguousarray(arr + 0.0)


def vector_key(vector: np.ndarray) -> bytes:
    """Cache key of a canonical vector (see :func:`canonical_vector`): its float64 bytes."""
    return np.ascontiguousarray(vector, dtype=np.float64).tobytes()


@dataclass(frozen=True)
class Normaliser:
    """The normalisation of equation (1), fixed by the all-0 and all-0.5 extremes.

    Parameters
    ----------
    macs_full : float
        ``MACs({0, ..., 0})``: forward MACs of the full model.
    macs_half : float
        ``MACs({0.5, ..., 0.5})``.
    dacc_full : float
        ``dAcc({0, ..., 0})``: accuracy gain of the short training without dropout.
    dacc_half : float
        ``dAcc({0.5, ..., 0.5})``.

    Raises
    ------
    DSEError
        If a value is not finite, ``macs_full <= macs_half``, or ``dacc_full <= dacc_half``
        (the short training then does not distinguish vectors; train more batches, raise the
        learning rate or use a less trained snapshot).
    """

    macs_full: float
    macs_half: float
    dacc_full: float
    dacc_half: float

    def __post_init__(self) -> None:
        values = (self.macs_full, self.macs_half, self.dacc_full, self.dacc_half)
        if not all(math.isfinite(v) for v in values):
            raise DSEError(f"normalisation extremes must be finite, got {values}")
        if self.macs_full <= self.macs_half:
            raise DSEError(
                "MACs of the all-0 vector must exceed those of the all-0.5 vector, got "
                f"{self.macs_full} <= {self.macs_half}"
            )
        if self.dacc_full <= self.dacc_half:
            raise DSEError(
                "the short training gives the all-0 vector no accuracy advantage over the "
                f"all-0.5 vector (dAcc(0) = {self.dacc_full:.6f} <= dAcc(0.5) = "
                f"{self.dacc_half:.6f}), so equation (1) cannot be normalised; train more "
                "batches, use more seeds, raise the learning rate or use a less trained snapshot"
            )

    def normalise(self, macs: np.ndarray | float, dacc: np.ndarray | float) -> np.ndarray:
        """Map raw ``(MACs, dAcc)`` to the minimised objectives ``(f1, f2)`` of equation (1).

        Parameters
        ----------
        macs : array-like or float
            Forward MACs per sample, shape ``(n,)`` or scalar.
        dacc : array-like or float
            Mean accuracy gains, same shape as ``macs``.

        Returns
        -------
        np.ndarray
            Shape ``(n, 2)`` (or ``(2,)`` for scalars): ``f1`` in ``[0, 1]`` for valid vectors,
            ``f2`` 0 at the all-0 vector and 1 at the all-0.5 vector (it may leave ``[0, 1]``
            for vectors that train better than no dropout or worse than 0.5 everywhere).
        """
        macs_arr = np.asarray(macs, dtype=np.float64)
        dacc_arr = np.asarray(dacc, dtype=np.float64)
        f1 = (macs_arr - self.macs_half) / (self.macs_full - self.macs_half)
        f2 = (self.dacc_full - dacc_arr) / (self.dacc_full - self.dacc_half)
        return np.stack([f1, f2], axis=-1)

    def to_dict(self) -> dict[str, float]:
        """Plain-dict form for JSON files."""
        return {
            "macs_full": float(self.macs_full),
            "macs_half": float(self.macs_half),
            "dacc_full": float(self.dacc_full),
            "dacc_half": float(self.dacc_half),
        }


@runtime_checkable
class VectorEvaluator(Protocol):
    """What the DSE needs to know about a batch of dropout vectors.

    Implementations: :class:`flwr_distreal.dse.evaluator.CachedEvaluator` (real) and any
    object with this method (tests use a cheap analytic one).
    """

    def evaluate(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(macs, dacc_mean)`` arrays of shape ``(n,)`` for ``vectors`` ``(n, k)``."""
        ...  # pragma: no cover - protocol


class SharedEvaluator:
    """A handle that pygmo's deep copies of the UDP share instead of duplicating.

    pygmo deep-copies every UDP it is given (``pg.problem``, populations, algorithms). The
    evaluator behind the handle carries the evaluation cache and maybe a process pool, which
    must not be duplicated: ``copy.deepcopy`` of this handle returns the handle itself, so
    every copy of the UDP talks to the one evaluator and every result reaches its cache.

    Parameters
    ----------
    evaluator : VectorEvaluator
        The object that measures vectors.
    """

    def __init__(self, evaluator: VectorEvaluator) -> None:
        if not isinstance(evaluator, VectorEvaluator):
            raise TypeError(
                f"evaluator must have an evaluate(vectors) method, got {type(evaluator).__name__}"
            )
        self.evaluator = evaluator

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedEvaluator:
        return self

    def evaluate(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward to the shared evaluator."""
        return self.evaluator.evaluate(vectors)


class DropoutProblem:
    """pygmo UDP: minimise the normalised ``(f1, f2)`` of equation (1) over ``[0, 0.5]^k``.

    Parameters
    ----------
    n_layers : int
        Number of dropout layers ``k`` (the decision vector's dimension).
    evaluator : SharedEvaluator
        Shared handle to the evaluator that returns raw MACs and mean ``dAcc``.
    normaliser : Normaliser
        Equation (1)'s scaling, fixed by the all-0 and all-0.5 extremes.

    Notes
    -----
    ``batch_fitness`` lets ``pg.bfe()`` (the default batch evaluator, which prefers a UDP's
    own ``batch_fitness``) hand a whole generation's offspring to the evaluator at once, which
    then trains the uncached ones in parallel.
    """

    def __init__(self, n_layers: int, evaluator: SharedEvaluator, normaliser: Normaliser) -> None:
        if not isinstance(n_layers, (int, np.integer)) or isinstance(n_layers, bool) or n_layers < 1:
            raise DSEError(f"n_layers must be a positive integer, got {n_layers!r}")
        if not isinstance(evaluator, SharedEvaluator):
            raise TypeError("evaluator must be wrapped in a SharedEvaluator")
        if not isinstance(normaliser, Normaliser):
            raise TypeError("normaliser must be a Normaliser")
        self.n_layers = int(n_layers)
        self.evaluator = evaluator
        self.normaliser = normaliser

    def get_bounds(self) -> tuple[list[float], list[float]]:
        """Box bounds ``[0, 0.5]`` for every layer's rate."""
        return [0.0] * self.n_layers, [MAX_RATE] * self.n_layers

    def get_nobj(self) -> int:
        """Two objectives: normalised MACs and normalised convergence loss."""
        return 2

    def get_name(self) -> str:
        """Name shown by pygmo."""
        return f"DISTREAL dropout DSE ({self.n_layers} layers)"

    def fitness(self, x: np.ndarray) -> np.ndarray:
        """Objectives ``(f1, f2)`` of one decision vector (equation (1))."""
        return self.batch_fitness(np.asarray(x, dtype=np.float64))

    def batch_fitness(self, dvs: np.ndarray) -> np.ndarray:
        """Objectives of ``n`` decision vectors given flat (``n * k``), returned flat (``n * 2``)."""
        flat = np.asarray(dvs, dtype=np.float64)
        if flat.size % self.n_layers != 0:
            raise DSEError(
                f"batch of decision vectors has {flat.size} values, not a multiple of {self.n_layers}"
            )
        vectors = np.clip(flat.reshape(-1, self.n_layers), 0.0, MAX_RATE)
        macs, dacc = self.evaluator.evaluate(vectors)
        return self.normaliser.normalise(macs, dacc).ravel()
