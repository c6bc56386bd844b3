"""One local training step, and what a round sends back: the pieces every trainer kind shares.

:class:`LocalStep` is the single place where DISTREAL, the baselines and their wall-clock
versions train (the run's :class:`~flwr_distreal.training.recipe.Recipe`: the round's learning
rate, SGD with momentum and weight decay in a :class:`~flwr_distreal.core.dropout.DroppedWeightGuard`,
gradient-norm clipping); :func:`forward_backward` is the step up to the optimiser step (what the
wall clock times); :func:`evaluate_model` the full model's loss and accuracy; :class:`TrainResult`,
:func:`get_weights` and :func:`set_weights` the arrays of a reply. Re-exported by
:mod:`flwr_distreal.training.trainers` (their public home). No Flower or Hydra imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.dropout import DroppedWeightGuard, DropoutModel
from ..core.precision import autocast, make_grad_scaler
from .recipe import Recipe

__all__ = [
    "LocalStep",
    "NDArrays",
    "Scalar",
    "TrainResult",
    "evaluate_model",
    "forward_backward",
    "get_weights",
    "set_weights",
]

NDArrays = list[np.ndarray]
Scalar = Any  # bool, int, float, str: what a train config or a metric holds


@dataclass
class TrainResult:
    """What a device sends back after a round: trained arrays, examples trained, metrics."""

    arrays: NDArrays
    num_examples: int
    metrics: dict[str, Scalar]



def get_weights(model: torch.nn.Module) -> NDArrays:
    """The model's ``state_dict`` values as C-ordered NumPy arrays (whatever the tensors' memory
    layout, e.g. channels-last), in order."""
    return [v.detach().cpu().numpy().copy(order="C") for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, arrays: NDArrays) -> None:
    """Load arrays (``state_dict`` order) into the model, refusing a mismatch."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(
            f"got {len(arrays)} arrays for a model with {len(state)} state entries: one array for each "
            "of its state_dict entries, in order (wrong model for these parameters?)"
        )
    new = {}
    for (key, ref), arr in zip(state.items(), arrays):
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"array for {key} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        new[key] = torch.as_tensor(np.asarray(arr), dtype=ref.dtype)
    model.load_state_dict(new, strict=True)


def evaluate_model(
    model: DropoutModel,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[float, float, int]:
    """Mean cross-entropy loss, accuracy and sample count of the full model (eval mode, no
    dropout, no fixed subsets) on ``loader``.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): the forward pass runs under autocast
    (:func:`flwr_distreal.core.precision.autocast`); the loss is computed in float32.

    Raises
    ------
    ValueError
        If the loader yields no samples.
    """
    model.set_dropout(None)
    model.set_fixed_subsets(None)
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast(precision, device):
                logits = model(inputs)
            logits = logits.float()
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            n += int(labels.shape[0])
    if n == 0:
        raise ValueError("the evaluation loader yielded no samples")
    return total_loss / n, correct / n, n


def forward_backward(
    model: DropoutModel, opt: Any, x: torch.Tensor, y: torch.Tensor, vector: Any, precision: str | None = None
) -> torch.Tensor:
    """A local step up to (not including) the optimiser step: set the step's dropout vector,
    forward (under autocast unless fp32), cross-entropy in float32, clear the gradients,
    backward (of the scaled loss when ``opt`` has a GradScaler). Returns the detached loss.

    Parameters
    ----------
    model : DropoutModel
        The model, in training mode.
    opt : LocalStep or optimiser
        Anything with ``zero_grad()``.
    x, y : Tensor
        The mini-batch, on the model's device.
    vector : array-like or None
        The dropout vector of the step (``None``: no random dropout).
    precision : str, optional
        ``"fp32"``, ``"bf16"`` or ``"fp16"``; default: ``opt.precision`` (a :class:`LocalStep`'s),
        else ``"fp32"``.
    """
    if precision is None:
        precision = getattr(opt, "precision", "fp32")
    model.set_dropout(vector)
    with autocast(precision, x.device):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # outside autocast: the loss is float32
    opt.zero_grad()
    scaler = getattr(opt, "scaler", None)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


class LocalStep:
    """One local SGD step under a :class:`~flwr_distreal.training.recipe.Recipe`: the single place where
    every trainer kind (DISTREAL, the baselines, and their wall-clock versions) trains.

    Built once per round: SGD at the round's learning rate ``recipe.lr_at(server_round)`` with
    the recipe's momentum and weight decay, wrapped in a :class:`DroppedWeightGuard`. A step is
    :meth:`forward_backward` then :meth:`step` (clip the gradient norm to ``clip_norm`` when
    set, then the optimiser step); calling the object does both, skipping the update when the
    loss is not finite. It has the ``zero_grad``/``step``/``param_groups`` of an optimiser, so
    the wall-clock calibration times the very same step.

    Parameters
    ----------
    model : DropoutModel
        The model it trains.
    recipe : Recipe
        The run's training recipe.
    server_round : int (default: 1)
        The round (1-based): picks the learning rate.
    precision : {"fp32", "bf16", "fp16"} (default: "fp32")
        The forward pass's autocast dtype (:mod:`flwr_distreal.core.precision`; checked by the
        trainer at start-up). ``fp16`` adds a GradScaler: the loss is scaled before backward and
        the gradients unscaled before clipping; a step with non-finite gradients is skipped.

    Attributes
    ----------
    lr : float
        The round's learning rate.
    scaler : torch.amp.GradScaler or None
        The loss scaler (``fp16`` only).
    last_grad_norm : float or None
        Global L2 norm of the last step's gradient before clipping (``None`` without clipping).
    """

    def __init__(self, model: DropoutModel, recipe: Recipe, server_round: int = 1, precision: str = "fp32") -> None:
        self.model = model
        self.recipe = recipe
        self.precision = precision
        device = next(model.parameters()).device
        self.scaler = make_grad_scaler(precision, device)
        self.lr = recipe.lr_at(server_round)
        self.clip_norm = recipe.clip_norm
        self.optimizer = DroppedWeightGuard(
            torch.optim.SGD(model.parameters(), lr=self.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay),
            model,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.last_grad_norm: float | None = None

    @property
    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Clear the gradients."""
        self.optimizer.zero_grad()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, vector: Any) -> torch.Tensor:
        """Set ``vector``, forward, backward (no update); returns the detached loss."""
        return forward_backward(self.model, self, x, y, vector)

    def step(self) -> None:
        """Clip the gradient's global norm to ``clip_norm`` (when set), then update (through the
        GradScaler with ``fp16``)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, vector: Any) -> float:
        """One whole step; returns its loss. A non-finite loss clears the gradients and does not
        update (the caller ends the round)."""
        loss = float(self.forward_backward(x, y, vector))
        if not math.isfinite(loss):
            self.zero_grad()
            return loss
        self.step()
        return loss
