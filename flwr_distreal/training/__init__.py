"""Local training on a device: the recipe (:mod:`.recipe`), the per-mini-batch choice of a
dropout vector (Algorithm 1: :mod:`.schedule`, :mod:`.loop`), the trainers of DISTREAL and the
baselines (:mod:`.trainers`, one local step in :mod:`.step`), the clock of a round as a strategy
of the trainers (:mod:`.clock`: simulated or measured), the wall-clock mode (:mod:`.wallclock`,
with :mod:`.throughput` and :mod:`.steptimes`), the records and metrics of a round
(:mod:`.records`) and the memory layout (:mod:`.layout`). Imports :mod:`flwr_distreal.core` only;
no Flower, no Hydra.

``from flwr_distreal.training import DistrealTrainer, evaluate_model`` (the README's examples)
keeps working: the trainers are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.lazy import lazy_exports

if TYPE_CHECKING:
    from .trainers import (
        BaselineTrainer,
        DeviceTrainer,
        DistrealTrainer,
        LocalStep,
        TrainResult,
        evaluate_model,
        forward_backward,
        get_weights,
        set_weights,
    )

#: The public trainers, re-exported on first use (PEP 562): importing a light module of this
#: package (the recipe, the schedule: the config schemas use them) loads no torch.
__all__ = [
    "BaselineTrainer",
    "DeviceTrainer",
    "DistrealTrainer",
    "LocalStep",
    "TrainResult",
    "evaluate_model",
    "forward_backward",
    "get_weights",
    "set_weights",
]


__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(__all__, ".trainers"))
