"""What a round of local training records, and the train metrics it reports: shared by the
per-batch rounds (:mod:`flwr_distreal.training.loop`, :mod:`flwr_distreal.training.wallclock`) and
every trainer (:mod:`flwr_distreal.training.trainers`).

:class:`BatchStep` is one mini-batch as a round handed it out; :func:`round_metrics` the train
metrics of :mod:`flwr_distreal.core.contract` for a round's :class:`~flwr_distreal.training.schedule.RoundPlan`;
:func:`batch_len` the size of a mini-batch. Re-exported by :mod:`flwr_distreal.training.loop`
(their public home, ``flwr_distreal.loop``). No Flower or Hydra imports.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import contract as C
from .schedule import RoundPlan

__all__ = ["BatchStep", "batch_len", "round_metrics"]


@dataclass(frozen=True)
class BatchStep:
    """One mini-batch of a round, as the iterator handed it out.

    Attributes
    ----------
    index : int
        Position in the round (0-based, over all local epochs).
    batch_size : int
        Samples in the mini-batch (read from the batch).
    vector : np.ndarray or None
        The dropout vector set for it (``None``: the full model).
    forward_macs : int
        ``MACs(d)``: forward MACs per sample of the (sub)model; Algorithm 1 adds it to ``c``.
    step_macs : float
        MACs of the training step (``step_macs_factor * batch_size * forward_macs``) in the
        simulated mode; full-model-equivalent MACs in the wall-clock mode.
    rate : float
        The availability the vector was chosen for: ``r(t)`` in MACs/s (simulated; ``inf``
        when unlimited), the throughput estimate in full-model MACs/s (wall clock; NaN before
        the first estimate).
    start, end : float
        When the step started and ended: simulated seconds (global, as the resource model's),
        or wall seconds from the round's start (``end`` is NaN until the step ends).
    discarded : bool
        Taken back with :meth:`DistrealRound.discard` (not in ``c``).
    """

    index: int
    batch_size: int
    vector: np.ndarray | None
    forward_macs: int
    step_macs: float
    rate: float
    start: float
    end: float
    discarded: bool = False

    @property
    def dropout_rate(self) -> float:
        """Mean dropout rate of the vector over the dropout groups (0 for the full model)."""
        return 0.0 if self.vector is None else float(np.mean(self.vector))


@dataclass(frozen=True)
class _Choice:
    vector: np.ndarray | None
    forward_macs: int
    cost: float
    rate: float
    index: int = -1  # LUT row (wall clock)
    predicted: float = math.nan
    budget: float = math.nan


def batch_len(batch: Any) -> int:
    """Samples in a mini-batch: the first dimension of its first tensor.

    Handles a tensor, a tuple or list (``(inputs, labels)``: the first element), a mapping (its
    first value) and anything with ``len()``.

    Raises
    ------
    TypeError
        When the size cannot be told (pass ``size_of`` to :meth:`DistrealRound.batches`).
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise TypeError("a 0-d tensor is not a mini-batch; pass size_of= to batches()")
        return int(batch.shape[0])
    if isinstance(batch, np.ndarray) and batch.ndim > 0:
        return int(batch.shape[0])
    if isinstance(batch, Mapping) and batch:
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_len(batch[0])
    if hasattr(batch, "__len__"):
        return len(batch)
    raise TypeError(
        f"cannot tell the number of samples of a mini-batch of type {type(batch).__name__}; "
        "pass size_of=<callable batch -> int> to batches()"
    )


def round_metrics(
    plan: RoundPlan,
    *,
    train_loss: float,
    device_id: int,
    step_macs_factor: float = 3.0,
    batch_size: int = 1,
) -> dict[str, Any]:
    """The train metrics of :mod:`flwr_distreal.core.contract` for a round that did ``plan``.

    Shared by :class:`DistrealRound` and every trainer of :mod:`flwr_distreal.training.trainers`.

    Parameters
    ----------
    plan : RoundPlan
        The mini-batches trained (vectors, MACs, sizes) and the timing.
    train_loss : float
        Mean training loss (NaN when unknown or when a loss was not finite).
    device_id : int
        The device (``partition-id``).
    step_macs_factor : float (default: 3.0)
        Training-step cost relative to the forward pass.
    batch_size : int (default: 1)
        The nominal mini-batch size: converts ``available_macs`` to the unit of ``c`` when the
        round trained nothing.

    Returns
    -------
    dict
        ``macs``, ``num_batches``, ``sim_time``, ``straggler``, ``mean_dropout``,
        ``available_macs``, ``utilisation``, ``train_loss``, ``partition-id``, ``incomplete``.
    """
    res = plan.result
    # available_macs in the unit of c (forward MACs per sample, summed per mini-batch), so
    # that macs / available_macs is the real utilisation spent / available.
    if res.spent_macs > 0 and plan.macs > 0:
        scale = res.spent_macs / plan.macs
    else:
        scale = step_macs_factor * (batch_size or 1)
    return {
        C.MACS: plan.macs,
        C.NUM_BATCHES: len(plan.vectors),
        C.SIM_TIME: float(res.finish_time - res.start),
        C.STRAGGLER: bool(plan.straggler),
        C.MEAN_DROPOUT: plan.mean_dropout,
        C.AVAILABLE_MACS: float(res.available_macs / scale),
        C.UTILISATION: float(res.utilisation),
        C.TRAIN_LOSS: train_loss,
        C.PARTITION_ID: device_id,
        C.INCOMPLETE: plan.incomplete,
    }


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(float(value)) and float(value) > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _config_round(config: Mapping[str, Any]) -> int:
    value = config.get(C.SERVER_ROUND, 1)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _int_arg(f"train config {C.SERVER_ROUND!r}", value, 1)
