"""The data package's error type and its integer check (shared by every other module here)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset is missing, malformed, or was asked for with invalid parameters."""



def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
