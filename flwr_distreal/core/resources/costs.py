"""What a training step costs in MACs, and the ``r_max`` at which a round's work fills the round.

A look-up table stores *forward* MACs per sample; a training step on a mini-batch of ``b``
samples costs about ``step_macs_factor * b * forward`` MACs (forward plus a backward pass of
about twice the forward's cost). Part of :mod:`flwr_distreal.core.resources` (import the public
names from there).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ResourceError, _check_finite


def batch_sizes(num_samples: int, batch_size: int, local_epochs: int = 1, drop_last: bool = False) -> list[int]:
    """Sizes of the mini-batches of a round of local training.

    Parameters
    ----------
    num_samples : int
        Samples on the device.
    batch_size : int
        Mini-batch size.
    local_epochs : int
        Passes over the local data per round.
    drop_last : bool
        Skip an incomplete last batch of each epoch.
    """
    if num_samples < 0 or batch_size < 1 or local_epochs < 1:
        raise ValueError(
            f"need num_samples >= 0, batch_size >= 1, local_epochs >= 1; got {num_samples}, {batch_size}, {local_epochs}"
        )
    full, rest = divmod(num_samples, batch_size)
    sizes = [batch_size] * full + ([rest] if rest and not drop_last else [])
    return sizes * local_epochs


def step_macs(forward_macs_per_sample: float, batch_size: int, step_macs_factor: float = 3.0) -> float:
    """MACs of one training step (forward + backward) on a mini-batch.

    Parameters
    ----------
    forward_macs_per_sample : float
        Forward MACs per sample of the (sub)model, e.g. ``count_macs(model, vector)`` or a
        LUT entry.
    batch_size : int
        Number of samples in the mini-batch.
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to a forward pass of the same batch. The
        backward pass computes gradients w.r.t. activations and w.r.t. weights, each
        about as expensive as the forward pass, hence 3.0.

    Returns
    -------
    float
        ``step_macs_factor * batch_size * forward_macs_per_sample``.
    """
    fwd = _check_finite("forward_macs_per_sample", forward_macs_per_sample, minimum=0.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ResourceError(f"batch_size must be an int >= 1, got {batch_size!r}")
    factor = _check_finite("step_macs_factor", step_macs_factor, minimum=0.0, strict=True)
    return factor * int(batch_size) * fwd


def forward_macs_budget(step_budget: float, batch_size: int, step_macs_factor: float = 3.0) -> float:
    """Convert a budget for one training step into a forward-MACs-per-sample budget.

    This is the inverse of :func:`step_macs`; use it to query a LUT (which stores forward
    MACs per sample) with a per-mini-batch budget such as Algorithm 1's ``r(t) * T / B``.

    Parameters
    ----------
    step_budget : float
        MACs available for one training step on one mini-batch (may be ``inf``).
    batch_size : int
        Number of samples in the mini-batch.
    step_macs_factor : float (default: 3.0)
        Cost of a training step relative to a forward pass, as in :func:`step_macs`.

    Returns
    -------
    float
        ``step_budget / (step_macs_factor * batch_size)``.
    """
    budget = float(step_budget)
    if math.isnan(budget) or budget < 0:
        raise ResourceError(f"step_budget must be >= 0 and not NaN, got {step_budget!r}")
    return budget / step_macs(1.0, batch_size, step_macs_factor)


def r_max_for(full_step_macs_total: float, deadline: float) -> float:
    """Upper bound of the availability range: the full model finishes exactly at the deadline.

    The paper selects the upper bound of the uniform availability range "such that
    training the full NN without dropout is possible" within a round.

    Parameters
    ----------
    full_step_macs_total : float
        Total training MACs of one round of local training with the full model (all steps,
        forward and backward: ``sum(step_macs(fwd, b) for b in batch_sizes(...))``).
    deadline : float
        Round duration ``T`` in seconds of simulated time.

    Returns
    -------
    float
        ``full_step_macs_total / deadline`` in MACs per second.
    """
    total = _check_finite("full_step_macs_total", full_step_macs_total, minimum=0.0, strict=True)
    dl = _check_finite("deadline", deadline, minimum=0.0, strict=True)
    return total / dl
