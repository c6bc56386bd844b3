"""The settings of the design-time DSE's NSGA-II search (:class:`DSESettings`).

Below both the driver (:mod:`flwr_distreal.dse.driver`) and the plot (:mod:`flwr_distreal.dse.plot`),
which both read them. No Flower or Hydra imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .front import DEFAULT_REFERENCE
from .problem import MAX_RATE, DSEError

__all__ = ["DSESettings", "is_int"]

_MIN_POPULATION = 5  # pagmo's nsga2 refuses fewer individuals (verified with pygmo 2.20)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DSESettings:
    """Settings of the NSGA-II search.

    Parameters
    ----------
    population : int
        Individuals per generation (paper: 64; pagmo's NSGA-II needs at least 5).
    generations : int
        Generations after the initial population (paper: 50; 0 only evaluates the initial
        population).
    seed : int
        Seed of the initial population and of every generation's NSGA-II.
    lut_size : int
        Vectors written to the LUT (about; fewer if the front is smaller).
    cr, eta_c, m, eta_m : float
        NSGA-II crossover probability, crossover distribution index, mutation probability and
        mutation distribution index (pygmo's defaults).
    reference : tuple of float
        Hypervolume reference point in normalised objective space.
    uniform_rates : tuple of float
        Equal-rate vectors evaluated at the end for the comparison (default 0, 0.05, ..., 0.5).
    plot_generations : int
        How many generations (evenly spaced, always the first and last) the front plot shows.
    """

    population: int = 64
    generations: int = 50
    seed: int = 0
    lut_size: int = 64
    cr: float = 0.95
    eta_c: float = 10.0
    m: float = 0.01
    eta_m: float = 50.0
    reference: tuple[float, float] = DEFAULT_REFERENCE
    uniform_rates: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(11))
    plot_generations: int = 5

    def __post_init__(self) -> None:
        if not is_int(self.population) or self.population < _MIN_POPULATION:
            raise DSEError(
                f"population must be an integer >= {_MIN_POPULATION} (pygmo's NSGA-II needs at least "
                f"5 individuals), got {self.population!r}"
            )
        if not is_int(self.generations) or self.generations < 0:
            raise DSEError(f"generations must be an integer >= 0, got {self.generations!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise DSEError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not is_int(self.lut_size) or self.lut_size < 2:
            raise DSEError(f"lut_size must be an integer >= 2, got {self.lut_size!r}")
        if not 0.0 <= self.cr < 1.0:
            raise DSEError(f"cr must be in [0, 1), got {self.cr}")
        if not 0.0 <= self.eta_c < 100.0:
            raise DSEError(f"eta_c must be in [0, 100), got {self.eta_c}")
        if not 0.0 <= self.m <= 1.0:
            raise DSEError(f"m must be in [0, 1], got {self.m}")
        if not 0.0 <= self.eta_m < 100.0:
            raise DSEError(f"eta_m must be in [0, 100), got {self.eta_m}")
        ref = tuple(float(r) for r in self.reference)
        if len(ref) != 2 or not all(math.isfinite(r) for r in ref) or min(ref) <= 1.0:
            raise DSEError(
                f"reference must be two finite numbers > 1 (the extremes map to 0 and 1), got {list(self.reference)}"
            )
        object.__setattr__(self, "reference", ref)
        rates = tuple(float(r) for r in self.uniform_rates)
        if any(not (0.0 <= r <= MAX_RATE) for r in rates):
            raise DSEError(f"uniform_rates must lie in [0, {MAX_RATE}], got {list(rates)}")
        object.__setattr__(self, "uniform_rates", rates)
        if not is_int(self.plot_generations) or self.plot_generations < 1:
            raise DSEError(f"plot_generations must be an integer >= 1, got {self.plot_generations!r}")

    def search_fingerprint(self) -> dict[str, Any]:
        """Settings that determine the search path (must match to resume)."""
        return {
            "population": self.population,
            "seed": self.seed,
            "cr": self.cr,
            "eta_c": self.eta_c,
            "m": self.m,
            "eta_m": self.eta_m,
        }
