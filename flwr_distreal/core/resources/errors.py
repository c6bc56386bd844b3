"""The errors of the resource model and the checks of its arguments.

Part of :mod:`flwr_distreal.core.resources` (import the public names from there).
"""

from __future__ import annotations

import math

import numpy as np


class ResourceError(ValueError):
    """A resource model or trace was given invalid parameters or was asked an invalid question."""


class TraceFileError(ResourceError):
    """A resource trace file is missing, malformed, or does not cover a requested device."""


def _check_finite(name: str, value: float, *, minimum: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as float after checking that it is finite and above ``minimum``."""
    try:
        val = float(value)
    except (TypeError, ValueError) as err:
        raise ResourceError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(val):
        raise ResourceError(f"{name} must be finite, got {val}")
    if minimum is not None:
        if strict and val <= minimum:
            raise ResourceError(f"{name} must be > {minimum}, got {val}")
        if not strict and val < minimum:
            raise ResourceError(f"{name} must be >= {minimum}, got {val}")
    return val


def _check_device_id(device_id: int) -> int:
    """Return ``device_id`` as a non-negative ``int``."""
    if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)):
        raise ResourceError(f"device_id must be an int, got {device_id!r}")
    if device_id < 0:
        raise ResourceError(f"device_id must be >= 0, got {device_id}")
    return int(device_id)


def _check_seed(seed: int) -> int:
    """Return ``seed`` as a non-negative ``int`` (numpy's SeedSequence needs >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ResourceError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ResourceError(f"seed must be >= 0, got {seed}")
    return int(seed)
