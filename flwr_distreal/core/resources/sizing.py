"""Sizing ``r_max`` from a model and its training workload (:func:`size_resources`).

The full model's round ends exactly at the deadline on a device at ``r_max``; the result holds
what :class:`~flwr_distreal.core.resources.ResourceModel` and the DISTREAL strategy take. Part
of :mod:`flwr_distreal.core.resources` (import the public names from there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .costs import batch_sizes, r_max_for, step_macs
from .errors import ResourceError, _check_device_id, _check_finite
from .model import ResourceModel


@dataclass(frozen=True)
class ResourceSizing:
    """Resources sized from a model and its training workload, by :func:`size_resources`.

    Pass ``r_max``, ``deadline`` and ``variability`` to :class:`ResourceModel` (or call
    :meth:`resource_model`), and :meth:`strategy_kwargs` to the DISTREAL strategy.

    Attributes
    ----------
    r_max : float
        Upper bound of the availability range, MACs per second: the device with the most samples
        trains its whole round with the full model exactly by the deadline.
    deadline : float
        Round duration ``T`` in seconds of simulated time.
    variability : float
        Ratio of upper to lower bound of the range: availabilities are uniform in
        ``[r_max / variability, r_max]``.
    full_macs_per_sample : int
        The full model's forward MACs per sample (``count_macs(model)``).
    batch_size, local_epochs : int
        The clients' mini-batch size and local epochs.
    step_macs_factor : float
        Cost of a training step relative to its forward pass (:func:`step_macs`).
    round_macs : tuple of float
        Per device: training MACs of its round with the full model (all steps, forward and
        backward).
    r_max_per_device : tuple of float
        Per device: the availability at which its own full-model round ends exactly at the
        deadline (``round_macs / deadline``). ``r_max`` is their maximum.
    """

    r_max: float
    deadline: float
    variability: float
    full_macs_per_sample: int
    batch_size: int
    local_epochs: int
    step_macs_factor: float
    round_macs: tuple[float, ...]
    r_max_per_device: tuple[float, ...]

    def resource_model(self, kind: str = "constant", *, lam: float = 1.0, seed: int = 0) -> ResourceModel:
        """A :class:`ResourceModel` of ``kind`` (``"constant"``, ``"timevarying"``, ``"full"``)
        with this sizing's ``r_max``, ``deadline`` and ``variability``."""
        if kind == "trace":
            raise ResourceError("a 'trace' resource model replays a file: its levels are not sized")
        return ResourceModel(
            kind, deadline=self.deadline, r_max=self.r_max, variability=self.variability, lam=lam, seed=seed
        )

    def strategy_kwargs(self) -> dict[str, float | int]:
        """``full_macs_per_sample``, ``batch_size`` and ``local_epochs`` for the DISTREAL strategy
        (both APIs): the bound of a reply's MACs and of its mini-batches."""
        return {
            "full_macs_per_sample": self.full_macs_per_sample,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
        }

    def device_r_max(self, device_id: int) -> float:
        """The r_max of one device (``r_max_per_device[device_id]``): pass it as the trainer's
        ``r_max`` when devices hold different amounts of data, so that every device's
        full-model round ends exactly at the deadline (as this project's runs do)."""
        dev = _check_device_id(device_id)
        if dev >= len(self.r_max_per_device):
            raise ResourceError(f"device {dev} not sized: {len(self.r_max_per_device)} devices")
        return self.r_max_per_device[dev]


def _positive_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ResourceError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def size_resources(
    model: object,
    batch_size: int,
    samples_per_device: int | Sequence[int],
    *,
    local_epochs: int = 1,
    variability: float = 3.0,
    deadline: float = 1.0,
    step_macs_factor: float = 3.0,
    drop_last: bool = False,
) -> ResourceSizing:
    """Size the devices' resources from the model: the full model finishes a round by the deadline.

    The paper's device resource model draws availability uniformly from
    ``[r_max / v, r_max]``, with ``r_max`` chosen "such that training the full NN without
    dropout is possible" within a round. This computes that ``r_max`` the way the simulated
    clock charges the training (:func:`step_macs`, the convention of :mod:`flwr_distreal.training.schedule`):
    a round of ``samples`` samples is the mini-batches ``batch_sizes(samples,
    batch_size, local_epochs, drop_last)``, each costing ``step_macs_factor * b *
    full_macs_per_sample`` MACs, and ``r_max = sum / deadline`` (:func:`r_max_for`). A device at
    ``r_max`` then trains the full model and ends exactly at the deadline; a weaker one has to
    drop filters (Algorithm 1) to finish in time.

    Parameters
    ----------
    model : DroppableModel or int
        The full model (from ``build_model`` or ``make_droppable``; its forward MACs per sample
        are counted with ``count_macs``), or that count itself.
    batch_size : int
        The clients' mini-batch size.
    samples_per_device : int or sequence of int
        Training samples of one device, or of every device (index = device id). With several,
        ``r_max`` is the largest device's (every device can then train the full model by the
        deadline when its availability is high enough); ``r_max_per_device`` has each one's.
        A device with no samples counts as one MAC of work (a positive ``r_max``).
    local_epochs : int, optional
        Passes over the local data per round. Defaults to 1.
    variability : float, optional
        Ratio ``v`` of the range's bounds (the paper: 3 for FEMNIST, 4 for CIFAR). Defaults to 3.
    deadline : float, optional
        Round duration ``T`` in seconds of simulated time. Defaults to 1.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass. Defaults to 3.0 (forward plus a
        backward pass that costs about twice as much); use the trainers' value.
    drop_last : bool, optional
        Whether the clients' loaders drop an incomplete last batch. Defaults to False.

    Returns
    -------
    ResourceSizing
        ``r_max``, ``deadline``, ``variability`` for :class:`ResourceModel` (or
        :meth:`ResourceSizing.resource_model`), :meth:`ResourceSizing.strategy_kwargs` for the
        DISTREAL strategy, and the per-device values.

    Raises
    ------
    ResourceError
        (A ValueError.) If a count is not a positive int, ``deadline`` or ``step_macs_factor``
        is not positive and finite, ``variability`` is below 1, or the model's MACs are not a
        positive number.
    TypeError
        If ``model`` is neither a droppable model nor a number of MACs.

    Examples
    --------
    >>> from flwr_distreal import build_model
    >>> sizing = size_resources(build_model("femnist_cnn_small"), batch_size=10, samples_per_device=200)
    >>> resources = sizing.resource_model("timevarying", lam=2, seed=0)
    >>> strategy_kwargs = sizing.strategy_kwargs()  # Distreal(**strategy_kwargs, ...)
    """

    if isinstance(model, bool):
        raise TypeError("model must be a droppable model or its forward MACs per sample, got a bool")
    if isinstance(model, (int, float, np.integer, np.floating)):
        full = _check_finite("model's forward MACs per sample", float(model), minimum=0.0, strict=True)
    else:
        # Deferred: the rest of the resources package is NumPy (the run's checks import it torch-free).
        from ..dropout import DroppableModel
        from ..macs import count_macs

        if not isinstance(model, DroppableModel):
            raise TypeError(
                f"model must be a droppable model (flwr_distreal.build_model or make_droppable(module, "
                f"example_input)) or its forward MACs per sample, got {type(model).__name__}"
            )
        full = float(count_macs(model))
    bs = _positive_count("batch_size", batch_size)
    epochs = _positive_count("local_epochs", local_epochs)
    many = not isinstance(samples_per_device, (int, np.integer))
    counts = list(samples_per_device) if many else [samples_per_device]  # type: ignore[list-item]
    if not counts:
        raise ResourceError("samples_per_device is empty")
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            where = f"samples_per_device[{i}]" if many else "samples_per_device"
            raise ResourceError(f"{where} must be an int >= 0, got {n!r}")
    v = _check_finite("variability", variability, minimum=1.0)
    dl = _check_finite("deadline", deadline, minimum=0.0, strict=True)
    factor = _check_finite("step_macs_factor", step_macs_factor, minimum=0.0, strict=True)
    round_macs = tuple(
        max(sum(step_macs(full, b, factor) for b in batch_sizes(int(n), bs, epochs, drop_last)), 1.0)
        for n in counts
    )
    per_device = tuple(r_max_for(m, dl) for m in round_macs)
    return ResourceSizing(
        r_max=max(per_device),
        deadline=dl,
        variability=v,
        full_macs_per_sample=int(round(full)),
        batch_size=bs,
        local_epochs=epochs,
        step_macs_factor=factor,
        round_macs=round_macs,
        r_max_per_device=per_device,
    )
