"""The federated dataset container (:class:`FederatedData`) and the helper that builds one from arrays.

Every loader returns a :class:`FederatedData`: one in-memory ``TensorDataset`` per device
(float32 images in NCHW layout, int64 labels), a centralized test set, and an optional
batch-level training augmentation on tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import getLogger

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

from .errors import DataError, _check_int
from .lazy import LazyPartitions
from .partition import split_indices
from .transforms import RandomCropFlip, distort

__all__ = ["FederatedData", "federate"]

log = getLogger(__name__)


class _AugmentingCollate:
    """Collate samples into a batch, then apply a batch-level augmentation."""

    def __init__(self, augment: Callable[[Tensor], Tensor], generator: torch.Generator | None) -> None:
        self.augment = augment
        self.generator = generator

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        x, y = default_collate(samples)
        if isinstance(self.augment, RandomCropFlip):
            x = self.augment(x, generator=self.generator)
        else:
            x = self.augment(x)
        return [x, y]


@dataclass
class FederatedData:
    """A dataset split into per-device partitions plus a centralized test set.

    Attributes
    ----------
    name : str
        Dataset name (e.g. ``"femnist"``).
    num_classes : int
        Number of classes; labels are in ``[0, num_classes)``.
    input_shape : tuple[int, int, int]
        Image shape (C, H, W).
    partitions : list[TensorDataset] or LazyPartitions
        One dataset per device, each holding ``(x, y)``: float32 images of shape
        ``(n, C, H, W)`` and int64 labels of shape ``(n,)``; or a
        :class:`~flwr_distreal.data.lazy.LazyPartitions` that builds a device's dataset when it is
        indexed (checked then), its sizes known up front (thousands of devices, none held).
    test : TensorDataset
        Centralized test set in the same format.
    augment : Callable[[Tensor], Tensor] | None
        Batch-level training augmentation on an (N, C, H, W) tensor, applied by
        :meth:`train_loader`; None for no augmentation.
    mean : tuple[float, ...] | None
        Per-channel mean the images were normalised with (None: images are in [0, 1]).
    std : tuple[float, ...] | None
        Per-channel std the images were normalised with.
    device_names : list[str] | None
        Natural ids of the devices (e.g. FEMNIST writer ids), aligned with ``partitions``.
    validation_partitions : list[TensorDataset] | None
        The samples held out of each device's training data as the validation split (aligned
        with ``partitions``, possibly empty), made by :meth:`split_validation`; None when the
        dataset has no validation split. ``partitions`` then hold only the remaining samples.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    partitions: list[TensorDataset]
    test: TensorDataset
    augment: Callable[[Tensor], Tensor] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device_names: list[str] | None = field(default=None)
    validation_partitions: list[TensorDataset] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DataError(f"{self.name}: num_classes must be an int >= 2, got {self.num_classes!r}")
        shape = tuple(int(v) for v in self.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{self.name}: input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        self.input_shape = (shape[0], shape[1], shape[2])
        if not len(self.partitions):
            raise DataError(f"{self.name}: no device partitions")
        if isinstance(self.partitions, LazyPartitions):  # each device checked when it is built
            self.partitions.check = functools.partial(self._check_split, allow_empty=False)
        else:
            for i, part in enumerate(self.partitions):
                self._check_split(part, f"partition {i}", allow_empty=False)
        self._check_split(self.test, "test set", allow_empty=False)
        if (self.mean is None) != (self.std is None):
            raise DataError(f"{self.name}: give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != self.input_shape[0] or len(self.std) != self.input_shape[0]:
                raise DataError(f"{self.name}: mean and std need one value per channel ({self.input_shape[0]})")
            if min(self.std) <= 0:
                raise DataError(f"{self.name}: std must be > 0, got {self.std}")
        if self.device_names is not None and len(self.device_names) != len(self.partitions):
            raise DataError(
                f"{self.name}: {len(self.device_names)} device names for {len(self.partitions)} partitions"
            )
        if self.validation_partitions is not None:
            if len(self.validation_partitions) != len(self.partitions):
                raise DataError(
                    f"{self.name}: {len(self.validation_partitions)} validation partitions for "
                    f"{len(self.partitions)} partitions"
                )
            for i, part in enumerate(self.validation_partitions):
                self._check_split(part, f"validation partition {i}", allow_empty=True)
            if sum(len(p) for p in self.validation_partitions) == 0:
                raise DataError(f"{self.name}: the validation split is empty")

    def _check_split(self, ds: TensorDataset, what: str, allow_empty: bool) -> None:
        if not isinstance(ds, TensorDataset) or len(ds.tensors) != 2:
            raise DataError(f"{self.name}: {what} must be a TensorDataset of (images, labels)")
        x, y = ds.tensors
        if x.dtype != torch.float32 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"{self.name}: {what} images must be float32 of shape (n, {self.input_shape}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{self.name}: {what} labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
            )
        if not allow_empty and x.shape[0] == 0:
            raise DataError(f"{self.name}: {what} is empty")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"{self.name}: {what} labels must be in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )

    @property
    def num_devices(self) -> int:
        """Number of devices (partitions)."""
        return len(self.partitions)

    def partition_sizes(self) -> list[int]:
        """Number of training samples of every device (lazy partitions: none is built)."""
        if isinstance(self.partitions, LazyPartitions):
            return self.partitions.sizes()
        return [len(p) for p in self.partitions]

    def centralized_train(self) -> TensorDataset:
        """All devices' training data concatenated (used by the DSE and by baselines)."""
        xs = [p.tensors[0] for p in self.partitions]
        ys = [p.tensors[1] for p in self.partitions]
        return TensorDataset(torch.cat(xs), torch.cat(ys))

    def distorted_train(self, factor: float = 0.5) -> TensorDataset:
        """:meth:`centralized_train` passed through :func:`distort` (the DSE's pre-training data)."""
        x, y = self.centralized_train().tensors
        return TensorDataset(distort(x, factor, self.mean, self.std), y)

    def train_loader(
        self,
        device_id: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        augment: bool = True,
        drop_last: bool = False,
    ) -> DataLoader:
        """A DataLoader over one device's training data.

        Parameters
        ----------
        device_id : int
            Index of the partition.
        batch_size : int
            Mini-batch size.
        shuffle : bool (default: True)
            Reshuffle every epoch.
        seed : int | None (default: None)
            Seed of the shuffling and augmentation generator (combined with ``device_id``);
            None uses torch's global generator.
        augment : bool (default: True)
            Apply :attr:`augment` to every batch (when the dataset has one).
        drop_last : bool (default: False)
            Skip an incomplete last batch.

        Returns
        -------
        DataLoader
            Yields ``[x, y]`` batches (single process, no workers).
        """
        if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)):
            raise DataError(f"device_id must be an int, got {device_id!r}")
        if not 0 <= device_id < self.num_devices:
            raise DataError(f"device_id {device_id} out of range: {self.name} has {self.num_devices} devices")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
        generator = None
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(int(np.random.SeedSequence([int(seed), int(device_id)]).generate_state(1)[0]))
        collate = _AugmentingCollate(self.augment, generator) if (augment and self.augment is not None) else None
        return DataLoader(
            self.partitions[device_id],
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            collate_fn=collate,
        )

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        """A DataLoader over the centralized test set (no shuffling, no augmentation)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return DataLoader(self.test, batch_size=batch_size, shuffle=False)

    def split_validation(self, fraction: float, seed: int = 0) -> FederatedData:
        """Hold out part of every device's training data as a validation split.

        Device ``i`` with ``n`` samples gives ``round(fraction * n)`` of them (Python's
        rounding, halves to even), drawn uniformly at random with a generator seeded from
        ``(seed, i)``, but always keeps at least one sample for training (a device with one
        sample keeps it). The held-out samples of all devices, pooled, are the validation
        split (:attr:`validation`, :meth:`validation_loader`); the returned dataset's
        ``partitions`` (and so :meth:`train_loader`, :meth:`partition_sizes`) hold only the
        remaining samples, in their original order. The test set is shared, untouched.

        Parameters
        ----------
        fraction : float
            Part of each device's samples to hold out, in ``(0, 1)``.
        seed : int (default: 0)
            Seed of the draws (the run's seed, so that server and clients agree).

        Returns
        -------
        FederatedData
            A new dataset; this one is left unchanged.

        Raises
        ------
        DataError
            If ``fraction`` is not in ``(0, 1)``, ``seed`` is negative, this dataset already has
            a validation split, or no device holds out a single sample.
        """
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            raise DataError(f"validation_fraction must be a number in (0, 1), got {fraction!r}") from None
        if isinstance(fraction, bool) or not 0 < f < 1:
            raise DataError(f"validation_fraction must be in (0, 1), got {fraction!r}")
        s = _check_int("seed", seed, 0)
        if self.validation_partitions is not None:
            raise DataError(f"{self.name} already has a validation split; split the original dataset once")
        train_parts: list[TensorDataset] = []
        held_parts: list[TensorDataset] = []
        for i, part in enumerate(self.partitions):
            x, y = part.tensors
            n = int(x.shape[0])
            k = min(int(round(f * n)), n - 1)
            order = np.random.default_rng([s, i]).permutation(n)
            held = torch.as_tensor(np.sort(order[:k]), dtype=torch.int64)
            kept = torch.as_tensor(np.sort(order[k:]), dtype=torch.int64)
            train_parts.append(TensorDataset(x[kept], y[kept]))
            held_parts.append(TensorDataset(x[held], y[held]))
        if sum(len(p) for p in held_parts) == 0:
            raise DataError(
                f"validation_fraction={f} holds out no sample of {self.name} (its largest device has "
                f"{max(self.partition_sizes())} samples); use a larger validation_fraction"
            )
        return dataclasses.replace(self, partitions=train_parts, validation_partitions=held_parts)

    @property
    def validation(self) -> TensorDataset | None:
        """The validation split: every device's held-out samples, pooled in device order
        (None without :meth:`split_validation`)."""
        if self.validation_partitions is None:
            return None
        xs = [p.tensors[0] for p in self.validation_partitions]
        ys = [p.tensors[1] for p in self.validation_partitions]
        return TensorDataset(torch.cat(xs), torch.cat(ys))

    def validation_loader(self, batch_size: int = 512) -> DataLoader:
        """A DataLoader over the validation split (no shuffling, no augmentation).

        Raises
        ------
        DataError
            If the dataset has no validation split (see :meth:`split_validation`).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
        validation = self.validation
        if validation is None:
            raise DataError(f"{self.name} has no validation split; set validation_fraction > 0")
        return DataLoader(validation, batch_size=batch_size, shuffle=False)

    def summary(self) -> str:
        """One line describing the dataset."""
        sizes = np.asarray(self.partition_sizes())
        held = ""
        if self.validation_partitions is not None:
            held = f" (+{sum(len(p) for p in self.validation_partitions)} held out for validation)"
        return (
            f"{self.name}: {self.num_devices} devices, {int(sizes.sum())} train samples{held} "
            f"({sizes.mean():.1f} +- {sizes.std():.1f} per device), {len(self.test)} test samples, "
            f"{self.num_classes} classes, input {self.input_shape}"
        )


def _to_dataset(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> TensorDataset:
    xt = torch.as_tensor(x, dtype=torch.float32).contiguous()
    yt = torch.as_tensor(y, dtype=torch.int64).contiguous()
    return TensorDataset(xt, yt)


def federate(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    num_devices: int,
    partition: str = "iid",
    seed: int = 0,
    samples_per_device: int | None = None,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    augment: Callable[[Tensor], Tensor] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> FederatedData:
    """A :class:`FederatedData` from train and test arrays, the training samples split over devices.

    What the built-in sources return after reading their files; a new source usually ends with it.

    Parameters
    ----------
    name : str
        Dataset name.
    x_train, y_train : np.ndarray
        Training images (N, C, H, W), converted to float32, and integer labels (N,).
    x_test, y_test : np.ndarray
        The centralized test set, in the same format.
    num_classes : int
        Number of classes; labels must be in ``[0, num_classes)``.
    num_devices : int
        Number of devices.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`~flwr_distreal.data.partition.split_indices`).
    seed : int (default: 0)
        Seed of the split.
    samples_per_device : int | None (default: None)
        Samples per device, only for ``"iid"``; None divides all samples.
    alpha : float (default: 0.5)
        Dirichlet concentration, only for ``"dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device, only for ``"shards"``.
    augment : Callable[[Tensor], Tensor] | None (default: None)
        Batch-level training augmentation (:attr:`FederatedData.augment`).
    mean, std : tuple[float, ...] | None (default: None)
        Per-channel normalisation the images were given, if any.

    Returns
    -------
    FederatedData
        One partition per device, in device order.
    """
    parts = split_indices(y_train, num_devices, partition, seed, samples_per_device, alpha, shards_per_device)
    shape = tuple(int(v) for v in x_train.shape[1:])
    data = FederatedData(
        name=name,
        num_classes=num_classes,
        input_shape=(shape[0], shape[1], shape[2]),
        partitions=[_to_dataset(x_train[idx], y_train[idx]) for idx in parts],
        test=_to_dataset(x_test, y_test),
        augment=augment,
        mean=mean,
        std=std,
    )
    log.info("Loaded %s", data.summary())
    return data
