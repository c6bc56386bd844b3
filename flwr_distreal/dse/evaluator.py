"""Evaluation of dropout vectors with a cache and optional process-parallel training.

A :class:`FitnessBackend` knows how to measure one vector for one seed (the expensive short
training) and its MACs (cheap, exact). :class:`CachedEvaluator` wraps a backend and

* caches every evaluated vector by its float64 bytes (same vector, same result, no second
  training);
* caches trainings one level deeper by the backend's *training key*: structured dropout keeps
  exactly ``kept_count(p, C)`` filters, so two vectors with the same kept counts train
  identically (same batches, same dropout random stream) and share one measurement;
* runs the missing ``(vector, seed)`` trainings either in-process or on a pool of worker
  processes (``workers > 1``), every training with ``threads`` torch threads. The thread
  count is part of the result's identity: float reductions are ordered differently with
  another thread count, and a short training with a high learning rate amplifies such
  rounding differences into different accuracies;
* exports and imports its whole state for checkpoints.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..core.allocator import keep_freed_memory
from .problem import DSEError, canonical_vector, vector_key

__all__ = ["FitnessBackend", "EvalRecord", "CachedEvaluator"]

log = logging.getLogger(__name__)


@runtime_checkable
class FitnessBackend(Protocol):
    """The measurement behind the DSE's objectives.

    Attributes
    ----------
    n_layers : int
        Length of a dropout vector.
    n_seeds : int
        Number of seeds a vector's accuracy gain is averaged over.
    """

    n_layers: int
    n_seeds: int

    def macs(self, vector: np.ndarray) -> int:
        """Exact forward MACs per sample under ``vector``."""
        ...  # pragma: no cover - protocol

    def training_key(self, vector: np.ndarray) -> bytes:
        """Bytes that are equal for two vectors exactly when their trainings are identical."""
        ...  # pragma: no cover - protocol

    def measure(self, vector: np.ndarray, seed_index: int) -> float:
        """Accuracy gain of the short training under ``vector`` with seed number ``seed_index``."""
        ...  # pragma: no cover - protocol

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able settings that determine the measurements (checked on resume)."""
        ...  # pragma: no cover - protocol


@dataclass
class EvalRecord:
    """Everything known about one evaluated vector.

    Parameters
    ----------
    vector : np.ndarray
        The canonical dropout vector.
    macs : int
        Exact forward MACs per sample.
    dacc : list of float
        Accuracy gain per seed.
    generation : int
        Generation in which the vector was first evaluated (0 = initial population).
    """

    vector: np.ndarray
    macs: int
    dacc: list[float] = field(default_factory=list)
    generation: int = 0

    @property
    def dacc_mean(self) -> float:
        """Mean accuracy gain over the seeds (the paper's convergence-speed measure)."""
        return float(np.mean(self.dacc))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (floats round-trip exactly through ``json``)."""
        return {
            "vector": [float(v) for v in self.vector],
            "macs": int(self.macs),
            "dacc": [float(v) for v in self.dacc],
            "dacc_mean": self.dacc_mean,
            "generation": int(self.generation),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], n_layers: int) -> EvalRecord:
        """Inverse of :meth:`to_dict`, validating the vector."""
        return cls(
            vector=canonical_vector(data["vector"], n_layers),
            macs=int(data["macs"]),
            dacc=[float(v) for v in data["dacc"]],
            generation=int(data["generation"]),
        )


# -- worker-process side ----------------------------------------------------------------------
_WORKER_BACKEND: FitnessBackend | None = None


def _init_worker(backend: FitnessBackend, threads: int) -> None:
    """Pool initialiser: pin torch threads and keep the backend for the jobs."""
    global _WORKER_BACKEND
    keep_freed_memory()
    torch.set_num_threads(threads)
    _WORKER_BACKEND = backend


def _worker_measure(vector: np.ndarray, seed_index: int) -> float:
    if _WORKER_BACKEND is None:  # pragma: no cover - only if the initialiser did not run
        raise RuntimeError("DSE worker process was not initialised")
    return _WORKER_BACKEND.measure(vector, seed_index)


class CachedEvaluator:
    """Measures vectors once, caching by vector and by training key, optionally in parallel.

    Parameters
    ----------
    backend : FitnessBackend
        The measurement.
    workers : int
        ``1`` measures in this process; ``> 1`` starts a pool of that many worker processes
        (spawned, so no forked torch thread pools) on first use.
    threads : int
        Torch threads of every short training (``torch.set_num_threads`` in each worker, or
        around each in-process training). Results are bit-identical across ``workers``
        settings for the same ``threads``.

    Attributes
    ----------
    records : dict[bytes, EvalRecord]
        Every evaluated vector by its key, in evaluation order.
    trainings : dict[bytes, list[float]]
        Accuracy gain per seed by training key.
    generation : int
        Generation stamped on newly evaluated vectors (the driver sets it).
    n_trainings : int
        Number of ``(vector, seed)`` short trainings actually run (cache misses).
    n_vector_hits : int
        Requests answered from the vector cache.
    n_training_hits : int
        New vectors answered from the training-key cache (same kept counts as an earlier one).
    """

    def __init__(self, backend: FitnessBackend, workers: int = 1, threads: int = 1) -> None:
        if not isinstance(backend, FitnessBackend):
            raise TypeError(f"backend does not implement FitnessBackend: {type(backend).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise DSEError(f"workers must be an integer >= 1, got {workers!r}")
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise DSEError(f"threads must be an integer >= 1, got {threads!r}")
        self.backend = backend
        self.workers = int(workers)
        self.threads = int(threads)
        self.records: dict[bytes, EvalRecord] = {}
        self.trainings: dict[bytes, list[float]] = {}
        self.generation = 0
        self.n_trainings = 0
        self.n_vector_hits = 0
        self.n_training_hits = 0
        self._pool: cf.ProcessPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the worker pool down (no-op without one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> CachedEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            log.info("starting %d DSE worker processes (%d torch thread(s) each)", self.workers, self.threads)
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.backend, self.threads),
            )
        return self._pool

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MACs and mean accuracy gain of each vector, training only what is not cached.

        Parameters
        ----------
        vectors : np.ndarray
            Shape ``(n, k)``; each row a dropout vector in ``[0, 0.5]^k``.

        Returns
        -------
        tuple of np.ndarray
            ``macs`` (float64, shape ``(n,)``) and ``dacc_mean`` (float64, shape ``(n,)``).

        Raises
        ------
        DSEError
            If a vector has the wrong length, a non-finite value or a rate outside [0, 0.5].
        """
        arr = np.asarray(vectors, dtype=np.float64)
        if arr.ndim != 2:
            raise DSEError(f"vectors must be a 2-D array (n, k), got shape {arr.shape}")
        records = self.evaluate_records(arr)
        macs = np.array([r.macs for r in records], dtype=np.float64)
        dacc = np.array([r.dacc_mean for r in records], dtype=np.float64)
        return macs, dacc

    def evaluate_records(self, vectors: np.ndarray) -> list[EvalRecord]:
        """Like :meth:`evaluate` but returns the full :class:`EvalRecord` of each row."""
        canon = [canonical_vector(v, self.backend.n_layers) for v in np.asarray(vectors, dtype=np.float64)]
        keys = [vector_key(v) for v in canon]
        # New vectors (first occurrence only) and the trainings they need.
        new: dict[bytes, np.ndarray] = {}
        for key, vec in zip(keys, canon):
            if key in self.records:
                self.n_vector_hits += 1
            elif key not in new:
                new[key] = vec
        need: dict[bytes, np.ndarray] = {}
        tkeys: dict[bytes, bytes] = {}
        for key, vec in new.items():
            tkey = self.backend.training_key(vec)
            tkeys[key] = tkey
            if tkey in self.trainings:
                self.n_training_hits += 1
            elif tkey not in need:
                need[tkey] = vec
        if need:
            self._train(need)
        for key, vec in new.items():
            self.records[key] = EvalRecord(
                vector=vec,
                macs=int(self.backend.macs(vec)),
                dacc=list(self.trainings[tkeys[key]]),
                generation=self.generation,
            )
        return [self.records[k] for k in keys]

    def _train(self, need: dict[bytes, np.ndarray]) -> None:
        """Run the short trainings for every (training key, seed) pair in ``need``."""
        n_seeds = self.backend.n_seeds
        jobs = [(tkey, vec, s) for tkey, vec in need.items() for s in range(n_seeds)]
        results: dict[tuple[bytes, int], float] = {}
        if self.workers == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                for tkey, vec, s in jobs:
                    results[(tkey, s)] = float(self.backend.measure(vec, s))
            finally:
                torch.set_num_threads(before)
        else:
            pool = self._get_pool()
            futures = {pool.submit(_worker_measure, vec, s): (tkey, s) for tkey, vec, s in jobs}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = float(fut.result())
        self.n_trainings += len(jobs)
        for tkey in need:
            values = [results[(tkey, s)] for s in range(n_seeds)]
            if not all(np.isfinite(values)):
                raise DSEError(f"short training returned a non-finite accuracy gain: {values}")
            self.trainings[tkey] = values

    def fingerprint(self) -> dict[str, Any]:
        """The backend's fingerprint plus the torch threads per training (results depend on it)."""
        return {**self.backend.fingerprint(), "threads_per_training": self.threads}

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able cache state (records in evaluation order, trainings, counters)."""
        return {
            "records": [r.to_dict() for r in self.records.values()],
            "trainings": {k.hex(): list(v) for k, v in self.trainings.items()},
            "counters": {
                "n_trainings": self.n_trainings,
                "n_vector_hits": self.n_vector_hits,
                "n_training_hits": self.n_training_hits,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cache written by :meth:`state_dict` (replaces the current cache)."""
        n_layers = self.backend.n_layers
        records: dict[bytes, EvalRecord] = {}
        for data in state["records"]:
            rec = EvalRecord.from_dict(data, n_layers)
            if len(rec.dacc) != self.backend.n_seeds:
                raise DSEError(
                    f"checkpoint record has {len(rec.dacc)} seeds, the fitness uses {self.backend.n_seeds}"
                )
            records[vector_key(rec.vector)] = rec
        self.records = records
        self.trainings = {bytes.fromhex(k): [float(x) for x in v] for k, v in state["trainings"].items()}
        counters = state.get("counters", {})
        self.n_trainings = int(counters.get("n_trainings", 0))
        self.n_vector_hits = int(counters.get("n_vector_hits", 0))
        self.n_training_hits = int(counters.get("n_training_hits", 0))
