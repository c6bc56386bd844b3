"""flwr-distreal: DISTREAL (Rapp et al., AAAI 2022) for Flower.

The core (dropout, models, MACs, LUT) is imported eagerly and has no Flower or Hydra imports.
The Flower pieces (strategies, clients) are exported lazily, so ``import flwr_distreal`` and
the core modules never import Flower. ``flwr_distreal.Distreal`` and the baselines at the top
level are the legacy-API strategies; the Message-API ones are in :mod:`flwr_distreal.flower.serverapp`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Every dropout vector gives the convolutions new shapes, and PyTorch's CPU convolutions
# (oneDNN) cache one compiled kernel per shape: 1024 by default, fewer than DenseNet-BC-40
# needs for 8 vectors (39 layers x 3 passes x 8). Switching vectors every mini-batch then
# recompiles kernels (+11% step time measured by scripts/bench_dropout.py); 8192 makes it
# free. It is read at the first convolution; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from .core.dropout import (
    DroppableModel,
    DroppedWeightGuard,
    UnsupportedModelError,
    kept_count,
    make_droppable,
    parameter_masks,
    validate_vector,
)
from .core.lut import LUT, BudgetError, LUTError
from .core.macs import count_macs, kept_counts
from .models import build_model, list_models

__version__ = "0.1.0"

_LAZY = {
    "Distreal": "flower.legacy.strategy",
    "FullResources": "flower.legacy.strategy",
    "SmallNetwork": "flower.legacy.strategy",
    "FederatedDropout": "flower.legacy.strategy",
    "HeteroFL": "flower.legacy.strategy",
    "make_evaluate_fn": "flower.legacy.strategy",
    "fit_metrics_aggregation": "flower.legacy.strategy",
    "DistrealClient": "flower.legacy.client",
    "BaselineClient": "flower.legacy.client",
    "TrainerClient": "flower.legacy.client",
    "DistrealRound": "training.loop",
    "MeasuredDistrealRound": "training.wallclock",
    "DeviceTrainer": "training.trainers",
    "DistrealTrainer": "training.trainers",
    "BaselineTrainer": "training.trainers",
    "MeasuredDistrealTrainer": "training.wallclock",
    "MeasuredBaselineTrainer": "training.wallclock",
    "build_client_app": "flower.clientapp",
    "SeededClientManager": "flower.legacy.client_manager",
    "ResourceModel": "core.resources",
    "load_federated": "data",
    "FederatedData": "data",
}

__all__ = [
    "LUT",
    "BudgetError",
    "DroppableModel",
    "DroppedWeightGuard",
    "UnsupportedModelError",
    "LUTError",
    "build_model",
    "count_macs",
    "kept_count",
    "kept_counts",
    "list_models",
    "make_droppable",
    "parameter_masks",
    "validate_vector",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flwr_distreal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
