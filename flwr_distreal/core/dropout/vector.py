"""The dropout vector and the dropout groups it sets: the range of a rate, the number of filters a
rate keeps, and the group that draws its kept filters anew for every training forward.

Part of :mod:`flwr_distreal.core.dropout` (import the public names from there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


#: Highest dropout rate of the design space [0, 0.5] (paper, "Design-Time DSE").
MAX_RATE = 0.5


def kept_count(rate: float, channels: int) -> int:
    """Number of filters a group keeps under dropout rate ``rate``.

    ``channels - round(rate * channels)``, rounding halves up, and never fewer than one.

    Parameters
    ----------
    rate : float
        Dropout rate of the group, in [0, 0.5].
    channels : int
        Number of filters (output channels) of the group.

    Returns
    -------
    int
        Exact number of filters computed in a training step.
    """
    dropped = math.floor(rate * channels + 0.5)
    return max(1, channels - dropped)


def validate_vector(vector: Sequence[float] | np.ndarray | Tensor, n_layers: int) -> np.ndarray:
    """Check a dropout vector and return it as a float64 array.

    Parameters
    ----------
    vector : sequence of float
        One dropout rate per dropout group, in the model's group order.
    n_layers : int
        Number of dropout groups of the model.

    Returns
    -------
    np.ndarray
        The rates as a 1-D float64 array of length ``n_layers``.

    Raises
    ------
    ValueError
        If the vector is not 1-D, has the wrong length, holds NaN/inf, or a rate lies outside
        [0, 0.5].
    """
    if isinstance(vector, Tensor):
        vector = vector.detach().cpu().numpy()
    try:
        arr = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"dropout vector must be a sequence of numbers, got {vector!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"dropout vector must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n_layers:
        raise ValueError(
            f"dropout vector has {arr.shape[0]} rates but the model has {n_layers} dropout layers"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"dropout vector holds a non-finite rate {arr[i]} at layer {i}")
    out = (arr < 0.0) | (arr > MAX_RATE)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"dropout rate {arr[i]} at layer {i} is outside [0, {MAX_RATE}]"
        )
    return arr


class DropoutGroup:
    """Coupled convolution outputs that share one rate and one kept set per mini-batch.

    Attributes
    ----------
    name : str
        Qualified name of the group's first producer (a convolution), its name in LUTs.
    out_channels : int
        Channels of the full model.
    members : list of str
        Every convolution whose output channels belong to the group.
    rate, kept : float, int
        The rate set by the dropout vector and the number of filters it keeps.
    fixed_subset : Tensor or None
        Kept filters fixed by :meth:`DroppableModel.set_fixed_subsets` (baselines).
    last_kept : Tensor or None
        Filters kept in the last training forward (``None`` = all).
    generator : torch.Generator or None
        Where random subsets are drawn from (``None``: PyTorch's global generator).
    """

    __slots__ = ("name", "out_channels", "members", "rate", "kept", "fixed_subset", "last_kept", "generator")

    def __init__(self, name: str, out_channels: int, members: Sequence[str]) -> None:
        self.name = name
        self.out_channels = int(out_channels)
        self.members = list(members)
        self.rate = 0.0
        self.kept = self.out_channels
        self.fixed_subset: Tensor | None = None
        self.last_kept: Tensor | None = None
        self.generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"DropoutGroup({self.name!r}, channels={self.out_channels}, members={len(self.members)}, rate={self.rate:g})"

    def set_rate(self, rate: float) -> None:
        """Set the group's dropout rate (validated by the model)."""
        self.rate = float(rate)
        self.kept = kept_count(self.rate, self.out_channels)

    def select(self, device: torch.device) -> Tensor | None:
        """Filters computed in this training step (sorted), or ``None`` for all."""
        if self.fixed_subset is not None:
            sub = self.fixed_subset
            return sub if sub.device == device else sub.to(device)
        if self.kept >= self.out_channels:
            return None
        perm = torch.randperm(self.out_channels, generator=self.generator)
        return perm[: self.kept].sort().values.to(device)
