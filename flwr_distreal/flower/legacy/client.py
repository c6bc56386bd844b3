"""Legacy-API Flower clients: ``NumPyClient`` adapters over :mod:`flwr_distreal.training.trainers`.

:class:`DistrealClient` (Algorithm 1) and :class:`BaselineClient` take the arguments of
:class:`~flwr_distreal.training.trainers.DistrealTrainer` and
:class:`~flwr_distreal.training.trainers.BaselineTrainer` and only translate between Flower's
``NumPyClient`` calls and the trainer: ``fit`` returns the trainer's arrays, number of examples
and metrics (keys of :mod:`flwr_distreal.core.contract`), ``get_properties`` its ``partition-id`` and
``round-samples``. The Message-API ``ClientApp`` (:mod:`flwr_distreal.flower.clientapp`) wraps the same
trainers, so both APIs train identically.

To keep your own training loop (loss, optimiser, augmentation, AMP), write the ``NumPyClient``
yourself around :class:`flwr_distreal.training.loop.DistrealRound` (``DistrealRound.from_config`` reads the
train config; ``fit`` returns ``get_weights(model), rnd.num_examples, rnd.metrics()``):
:class:`DistrealClient` is that client with the trainer's own SGD step.
"""

from __future__ import annotations

from typing import Any

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from ...training.trainers import BaselineTrainer, DeviceTrainer, DistrealTrainer, get_weights, set_weights

__all__ = ["BaselineClient", "DistrealClient", "TrainerClient", "get_weights", "set_weights"]


class TrainerClient(NumPyClient):
    """A ``NumPyClient`` that delegates to a :class:`~flwr_distreal.training.trainers.DeviceTrainer`.

    Parameters
    ----------
    trainer : DeviceTrainer
        The device's trainer (:class:`~flwr_distreal.training.trainers.DistrealTrainer` or
        :class:`~flwr_distreal.training.trainers.BaselineTrainer`).
    """

    def __init__(self, trainer: DeviceTrainer) -> None:
        if not isinstance(trainer, DeviceTrainer):
            raise TypeError(f"trainer must be a DeviceTrainer, got {type(trainer).__name__}")
        self.trainer = trainer

    @property
    def model(self):
        """The trainer's model."""
        return self.trainer.model

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self.trainer.get_weights()

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """``partition-id`` (device id) and ``round-samples`` (samples per round), used for
        seeded sampling and by the submodel baselines to size their round-start assignment."""
        return self.trainer.properties()

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        result = self.trainer.fit(parameters, config)
        return result.arrays, result.num_examples, result.metrics


class DistrealClient(TrainerClient):
    """DISTREAL client (Algorithm 1 of Rapp et al., AAAI 2022) for the legacy API.

    Takes the arguments of :class:`~flwr_distreal.training.trainers.DistrealTrainer` (``model``,
    ``train_loader``, ``device_id``, ``lut``, ``resources``, ``policy``, ``lr``, ...). Every
    round runs the trainer's step inside :meth:`DistrealRound.batches
    <flwr_distreal.training.loop.DistrealRound.batches>`: before every mini-batch the round selects the
    LUT vector that fits the device's availability and adds its MACs to ``c``; the client sends
    the weights and ``c`` (metric ``macs``), which :class:`flwr_distreal.flower.legacy.strategy.Distreal`
    weights by. Of the fit config it reads ``server-round`` and ``unlimited``; the learning rate
    is the trainer's recipe (the contract sends none) and comes back as the ``lr`` metric.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(DistrealTrainer(*args, **kwargs))


class BaselineClient(TrainerClient):
    """Client of the baselines for the legacy API: a (sub)model fixed for the whole round.

    Takes the arguments of :class:`~flwr_distreal.training.trainers.BaselineTrainer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(BaselineTrainer(*args, **kwargs))
