"""The training recipe: the one local-optimiser setting every method trains with.

A comparison of DISTREAL with its baselines (full resources, small network, Federated
Dropout, HeteroFL) is only fair when they differ in *what* each device trains (which
(sub)model, which dropout vector per mini-batch) and not in *how* it trains. The
:class:`Recipe` is that "how": the SGD settings (``lr``, ``momentum``, ``weight_decay``), the
gradient-norm clipping of every local step (``clip_norm``) and the learning-rate schedule
over the server rounds. Every trainer of :mod:`flwr_distreal.training.trainers` and
:mod:`flwr_distreal.training.wallclock` takes the same recipe and applies it through one step helper
(:class:`flwr_distreal.training.trainers.LocalStep`), so DISTREAL and every baseline train with exactly
the same one.

The defaults of :class:`Recipe` are the run configuration's (:mod:`flwr_distreal.core.defaults`,
read by the schema :class:`flwr_distreal.run.config.RunConfig` too): ``Recipe()`` is the recipe of
``python -m flwr_distreal.main`` without overrides (lr 0.1, gradient-norm clipping at 1.0, no
momentum, no weight decay, constant lr). The paper trains with plain SGD (no momentum, no weight
decay, no clipping) and a constant learning rate: :meth:`Recipe.constant`. The schedule is per
*server round*: all local steps of round ``t`` use :meth:`Recipe.lr_at` ``(t)``.

The recipe's values are validated here, once: the schema's range checks of ``lr``,
``momentum``, ``weight_decay``, ``clip_norm``, ``lr_schedule``, ``lr_min``, ``lr_step_rounds``
and ``lr_gamma`` are :meth:`Recipe.from_config`'s.

:func:`resolve_device` turns the ``device`` setting (``auto``, ``cpu``, ``cuda``) into the
torch device a trainer and the server's evaluation run on.

No Flower or Hydra imports.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


from ..core import defaults as D

__all__ = ["DEVICES", "SCHEDULES", "Recipe", "resolve_device"]

#: Learning-rate schedules over the server rounds.
SCHEDULES = ("constant", "cosine", "step")

#: Values of the ``device`` setting.
DEVICES = ("auto", "cpu", "cuda")


def _real(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Recipe:
    """How every device trains locally, whatever the method.

    Parameters
    ----------
    lr : float (default: 0.1, the run config's ``lr``)
        Learning rate of round 1 (and of every round with ``schedule="constant"``); > 0.
    momentum : float (default: 0.0)
        SGD momentum, >= 0 (the paper: 0).
    weight_decay : float (default: 0.0)
        SGD weight decay (L2), >= 0 (the paper: 0).
    clip_norm : float or None (default: 1.0, the run config's ``clip_norm``)
        Clip the gradient of every local step to this global L2 norm (over all parameters)
        after the backward pass and before the optimiser step; ``None``: no clipping (the
        paper).
    schedule : {"constant", "cosine", "step"} (default: "constant")
        How the learning rate changes over the server rounds (see :meth:`lr_at`).
    lr_min : float (default: 0.0)
        Learning rate of the last round with ``schedule="cosine"``; in ``[0, lr]``.
    step_rounds : int (default: 50)
        Rounds between two decays with ``schedule="step"``; >= 1.
    gamma : float (default: 0.1)
        Decay factor with ``schedule="step"``; in ``(0, 1]``.
    total_rounds : int (default: 1)
        Rounds of the run: the cosine schedule reaches ``lr_min`` at this round; >= 1.

    Raises
    ------
    ValueError
        Naming the field that is out of range or of the wrong type.

    Notes
    -----
    Every default is :mod:`flwr_distreal.core.defaults`' (the schema's). Until 2026-12 ``Recipe()``
    had lr 0.05 and no clipping while the runner trained with lr 0.1 and ``clip_norm=1.0``; a
    library user now gets the runner's recipe. The old one: ``Recipe(lr=0.05, clip_norm=None)``.
    """

    lr: float = D.LR
    momentum: float = D.MOMENTUM
    weight_decay: float = D.WEIGHT_DECAY
    clip_norm: float | None = D.CLIP_NORM
    schedule: str = D.LR_SCHEDULE
    lr_min: float = D.LR_MIN
    step_rounds: int = D.LR_STEP_ROUNDS
    gamma: float = D.LR_GAMMA
    total_rounds: int = 1

    def __post_init__(self) -> None:
        sgd = "need lr > 0, momentum >= 0, weight_decay >= 0"
        lr = _real("lr", self.lr)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r} ({sgd})")
        for name in ("momentum", "weight_decay"):
            if not _real(name, getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r} ({sgd})")
        if self.clip_norm is not None and not _real("clip_norm", self.clip_norm) > 0:
            raise ValueError(f"clip_norm must be > 0 (or None: no clipping), got {self.clip_norm!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= _real("lr_min", self.lr_min) <= lr:
            raise ValueError(f"lr_min must be in [0, lr={lr}], got {self.lr_min!r}")
        if _integer("step_rounds", self.step_rounds) < 1:
            raise ValueError(f"step_rounds must be >= 1, got {self.step_rounds!r}")
        if not 0 < _real("gamma", self.gamma) <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if _integer("total_rounds", self.total_rounds) < 1:
            raise ValueError(f"total_rounds must be >= 1, got {self.total_rounds!r}")

    @classmethod
    def constant(
        cls, lr: float = D.LR, momentum: float = D.MOMENTUM, weight_decay: float = D.WEIGHT_DECAY,
        clip_norm: float | None = None,
    ) -> "Recipe":
        """A recipe with a constant learning rate: the paper's plain SGD (no clipping unless
        ``clip_norm`` is given; momentum and weight decay 0) at the run config's lr by default."""
        return cls(lr=lr, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm)

    @classmethod
    def from_config(cls, cfg: Any) -> "Recipe":
        """The recipe of a run config.

        Parameters
        ----------
        cfg : RunConfig or any object with the same attributes
            Reads ``lr``, ``momentum``, ``weight_decay``, ``clip_norm``, ``lr_schedule``,
            ``lr_min``, ``lr_step_rounds``, ``lr_gamma`` and ``rounds``.

        Raises
        ------
        ValueError
            If an attribute is missing (naming it) or out of range (naming the config key). The
            schema's conversion (:func:`flwr_distreal.run.config.to_run_config`) raises it as a
            ``ConfigError``: this is where the recipe keys of a run config are validated.
        """
        keys = {
            "lr": "lr",
            "momentum": "momentum",
            "weight_decay": "weight_decay",
            "clip_norm": "clip_norm",
            "lr_schedule": "schedule",
            "lr_min": "lr_min",
            "lr_step_rounds": "step_rounds",
            "lr_gamma": "gamma",
            "rounds": "total_rounds",
        }
        values = {}
        for key, field_name in keys.items():
            if not hasattr(cfg, key):
                raise ValueError(f"the run config has no {key!r}: a recipe needs {list(keys)}")
            values[field_name] = getattr(cfg, key)
        try:
            return cls(**values)
        except ValueError as err:
            # name the config key the user wrote (lr_schedule, not schedule)
            text = str(err)
            for key, field_name in keys.items():
                if key != field_name and text.startswith(field_name + " "):
                    text = key + text[len(field_name):]
            raise ValueError(text) from None

    def lr_at(self, server_round: int) -> float:
        """The learning rate of every local step in round ``server_round`` (1-based).

        * ``constant``: ``lr``;
        * ``cosine``: half a cosine from ``lr`` at round 1 to ``lr_min`` at ``total_rounds``
          (``lr`` when ``total_rounds`` is 1; ``lr_min`` after the last round);
        * ``step``: ``lr * gamma ** ((server_round - 1) // step_rounds)``.

        Raises
        ------
        ValueError
            If ``server_round`` is not an integer >= 1.
        """
        t = _integer("server_round", server_round)
        if t < 1:
            raise ValueError(f"server_round must be >= 1, got {server_round!r}")
        if self.schedule == "constant":
            return float(self.lr)
        if self.schedule == "step":
            return float(self.lr * self.gamma ** ((t - 1) // self.step_rounds))
        if self.total_rounds == 1:
            return float(self.lr)
        progress = min(1.0, (t - 1) / (self.total_rounds - 1))
        return float(self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def resolve_device(name: str) -> str:
    """The torch device of the ``device`` setting.

    Parameters
    ----------
    name : {"auto", "cpu", "cuda"}
        ``auto``: ``cuda`` when a CUDA device is visible, else ``cpu``.

    Returns
    -------
    str
        ``"cuda"`` or ``"cpu"``.

    Raises
    ------
    ValueError
        For another name, or ``cuda`` when no CUDA device is visible.
    """
    if name not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    import torch  # deferred: the recipe is part of the config schemas, which import without torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible (use device=auto or cpu)")
    return name
