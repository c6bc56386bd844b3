"""flwr-distreal: DISTREAL (Rapp et al., AAAI 2022) for Flower.

Every public name is exported lazily: ``import flwr_distreal`` loads neither torch nor Flower,
and the core (dropout, models, MACs, LUT) never imports Flower or Hydra. ``flwr_distreal.Distreal`` and the baselines at the top
level are the legacy-API strategies; the Message-API ones are in :mod:`flwr_distreal.flower.serverapp`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .core.lazy import lazy_exports

# Every dropout vector gives the convolutions new shapes, and PyTorch's CPU convolutions
# (oneDNN) cache one compiled kernel per shape: 1024 by default, fewer than DenseNet-BC-40
# needs for 8 vectors (39 layers x 3 passes x 8). Switching vectors every mini-batch then
# recompiles kernels (+11% step time measured by scripts/bench_dropout.py); 8192 makes it
# free. It is read at the first convolution; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
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

#: Every public name, loaded on first use (PEP 562): ``import flwr_distreal`` itself loads neither
#: torch nor Flower, so a process that only needs a submodule's path (the ``flwr`` CLI finding
#: the app's components, the watchdog) stays a bare interpreter.
_LAZY = {
    "DroppableModel": "core.dropout",
    "DroppedWeightGuard": "core.dropout",
    "UnsupportedModelError": "core.dropout",
    "kept_count": "core.dropout",
    "make_droppable": "core.dropout",
    "parameter_masks": "core.dropout",
    "validate_vector": "core.dropout",
    "LUT": "core.lut",
    "BudgetError": "core.lut",
    "LUTError": "core.lut",
    "count_macs": "core.macs",
    "kept_counts": "core.macs",
    "build_model": "models",
    "list_models": "models",
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

__all__ = [  # the names of _LAZY
    "DroppableModel",
    "DroppedWeightGuard",
    "UnsupportedModelError",
    "kept_count",
    "make_droppable",
    "parameter_masks",
    "validate_vector",
    "LUT",
    "BudgetError",
    "LUTError",
    "count_macs",
    "kept_counts",
    "build_model",
    "list_models",
    "Distreal",
    "FullResources",
    "SmallNetwork",
    "FederatedDropout",
    "HeteroFL",
    "make_evaluate_fn",
    "fit_metrics_aggregation",
    "DistrealClient",
    "BaselineClient",
    "TrainerClient",
    "DistrealRound",
    "MeasuredDistrealRound",
    "DeviceTrainer",
    "DistrealTrainer",
    "BaselineTrainer",
    "MeasuredDistrealTrainer",
    "MeasuredBaselineTrainer",
    "build_client_app",
    "SeededClientManager",
    "ResourceModel",
    "load_federated",
    "FederatedData",
]


__getattr__, __dir__ = lazy_exports(globals(), {name: f".{module}" for name, module in _LAZY.items()})
