"""flwr-distreal: DISTREAL (Rapp et al., AAAI 2022) for Flower."""

from .dropout import DroppedWeightGuard, kept_count, parameter_masks, validate_vector
from .lut import LUT, BudgetError, LUTError
from .macs import count_macs, kept_counts
from .models import build_model, list_models

__version__ = "0.1.0"

__all__ = [
    "LUT",
    "BudgetError",
    "DroppedWeightGuard",
    "LUTError",
    "build_model",
    "count_macs",
    "kept_count",
    "kept_counts",
    "list_models",
    "parameter_masks",
    "validate_vector",
]
