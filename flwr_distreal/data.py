"""Datasets and federated partitions.

Every loader returns a :class:`FederatedData`: one in-memory ``TensorDataset`` per device
(float32 images in NCHW layout, int64 labels), a centralized test set, and an optional
batch-level training augmentation on tensors. The paper's settings (Table 1 of Rapp et
al., AAAI 2022):

* FEMNIST, partitioned by writer (non-IID, 181 +- 70.7 samples per device, 62 classes):
  :func:`load_femnist` reads LEAF json shards offline, or ``flwrlabs/femnist`` through
  ``flwr_datasets`` with a natural-id partitioner when online.
* CIFAR-10/100, IID with 500 samples per device, standard augmentation (random crop 32
  with padding 4, horizontal flip) and channel normalisation: :func:`load_cifar10`,
  :func:`load_cifar100` read the extracted python-pickle archives, downloading them
  through torchvision when asked.

Beyond the paper: :func:`load_mnist` (torchvision's raw idx files, gzipped or not),
:func:`load_npz` (any array file) and :func:`load_digits`, the embedded default that needs
no download (scikit-learn's bundled 8x8 digits upsampled to 28x28, so the FEMNIST CNN runs
on it unchanged). :func:`load_federated` dispatches by name. :func:`distort` implements
the DSE's distorted copy of the data (brightness, contrast and saturation scaled by 0.5,
section "Convergence Speed" of the paper's DSE).

:meth:`FederatedData.split_validation` holds out a seeded part of every device's training
data as a validation split (what learning-rate tuning judges by, never the test set).

Nothing here imports Flower or Hydra. ``flwr_datasets`` and ``torchvision`` are imported
lazily, only for downloads.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DataError",
    "FederatedData",
    "RandomCropFlip",
    "dirichlet_partition",
    "distort",
    "iid_partition",
    "list_datasets",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_federated",
    "load_femnist",
    "load_mnist",
    "load_npz",
    "node_data_from_npz",
    "regroup",
    "shard_partition",
    "split_indices",
]

log = getLogger(__name__)

#: Per-channel mean and standard deviation of the CIFAR-10 training images (in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and standard deviation of the CIFAR-100 training images (in [0, 1]).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

#: Partition schemes understood by :func:`split_indices`.
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")

_LUMA = (0.299, 0.587, 0.114)


class DataError(ValueError):
    """A dataset is missing, malformed, or was asked for with invalid parameters."""


# ---------------------------------------------------------------------------------------
# Augmentation and distortion (tensor ops, batch-wise)
# ---------------------------------------------------------------------------------------


class RandomCropFlip:
    """Random crop with zero padding plus random horizontal flip, applied batch-wise.

    The standard CIFAR training augmentation (``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``), but on a whole NCHW tensor batch at once, each sample
    getting its own crop offset and flip.

    Parameters
    ----------
    padding : int (default: 4)
        Pixels added on every side before cropping back to the input size.
    flip : bool (default: True)
        Whether to flip each sample horizontally with probability 0.5.
    fill : Sequence[float] | None (default: None)
        Per-channel value of the padding. For normalised images pass the normalised value
        of black, ``(0 - mean) / std``, which is what torchvision's pipeline (pad before
        normalising) produces. None pads with 0.
    """

    def __init__(self, padding: int = 4, flip: bool = True, fill: Sequence[float] | None = None) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise DataError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.fill = None if fill is None else tuple(float(v) for v in fill)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch.

        Parameters
        ----------
        x : Tensor
            Images, shape (N, C, H, W).
        generator : torch.Generator | None (default: None)
            Source of randomness; None uses torch's global generator.

        Returns
        -------
        Tensor
            Augmented images, same shape and dtype.
        """
        if x.ndim != 4:
            raise DataError(f"RandomCropFlip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if self.fill is not None and len(self.fill) != c:
            raise DataError(f"fill has {len(self.fill)} values but the batch has {c} channels")
        out = x
        if self.padding > 0 and n > 0:
            p = self.padding
            padded = x.new_empty((n, c, h + 2 * p, w + 2 * p))
            if self.fill is None:
                padded.zero_()
            else:
                padded.copy_(torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).expand_as(padded))
            padded[:, :, p : p + h, p : p + w] = x
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            rows = (oy[:, None] + torch.arange(h)[None, :]).to(x.device)
            cols = (ox[:, None] + torch.arange(w)[None, :]).to(x.device)
            idx_n = torch.arange(n, device=x.device)[:, None, None, None]
            idx_c = torch.arange(c, device=x.device)[None, :, None, None]
            out = padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip and n > 0:
            mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
            out = torch.where(mask, out.flip(3), out)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill})"


def _grayscale(x: Tensor) -> Tensor:
    """Luma of an (N, C, H, W) batch as (N, 1, H, W); identity for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def distort(
    x: Tensor,
    factor: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """The DSE's distorted copy of the data: brightness, contrast and saturation times ``factor``.

    The paper pre-trains the DSE's snapshot "on a distorted version of the dataset", with
    "brightness, contrast, and saturation [reduced] to 0.5 of the original value" for
    CIFAR. The operations follow torchvision's ``adjust_brightness``, ``adjust_contrast``
    and ``adjust_saturation`` (in this order) on images in [0, 1]: brightness blends with
    black, contrast with the image's mean grey level, saturation with the image's
    greyscale version; each clamps to [0, 1]. Greyscale images get brightness and contrast
    only.

    Parameters
    ----------
    x : Tensor
        Images, shape (N, C, H, W) with C = 1 or 3.
    factor : float (default: 0.5)
        Blend factor of every operation: 1 leaves the images unchanged, 0.5 halves
        brightness, contrast and saturation.
    mean : Sequence[float] | None (default: None)
        Per-channel normalisation mean when ``x`` is normalised (``FederatedData.mean``);
        the images are un-normalised, distorted and normalised again.
    std : Sequence[float] | None (default: None)
        Per-channel normalisation std, given together with ``mean``.

    Returns
    -------
    Tensor
        Distorted images, same shape and dtype as ``x``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"distort expects an (N, C, H, W) float tensor with C in (1, 3), got {shape}")
    if not x.is_floating_point():
        raise DataError(f"distort expects float images in [0, 1], got dtype {x.dtype}")
    fac = float(factor)
    if not math.isfinite(fac) or fac < 0:
        raise DataError(f"factor must be finite and >= 0, got {factor!r}")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither")
    c = x.shape[1]
    if mean is not None and std is not None:
        if len(mean) != c or len(std) != c:
            raise DataError(f"mean and std need {c} values, got {len(mean)} and {len(std)}")
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        img = x * s + m
    else:
        img = x
    img = (img * fac).clamp(0.0, 1.0)  # brightness
    grey_mean = _grayscale(img).mean(dim=(1, 2, 3), keepdim=True)
    img = (fac * img + (1.0 - fac) * grey_mean).clamp(0.0, 1.0)  # contrast
    if c == 3:
        img = (fac * img + (1.0 - fac) * _grayscale(img)).clamp(0.0, 1.0)  # saturation
    if mean is not None and std is not None:
        img = (img - m) / s
    return img


# ---------------------------------------------------------------------------------------
# The federated dataset container
# ---------------------------------------------------------------------------------------


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
    partitions : list[TensorDataset]
        One dataset per device, each holding ``(x, y)``: float32 images of shape
        ``(n, C, H, W)`` and int64 labels of shape ``(n,)``.
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
        if not self.partitions:
            raise DataError(f"{self.name}: no device partitions")
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
        """Number of training samples of every device."""
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


# ---------------------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def iid_partition(
    num_samples: int, num_devices: int, seed: int = 0, samples_per_device: int | None = None
) -> list[np.ndarray]:
    """Split sample indices uniformly at random into equally sized device shards.

    Parameters
    ----------
    num_samples : int
        Number of samples to split.
    num_devices : int
        Number of devices.
    seed : int (default: 0)
        Seed of the permutation.
    samples_per_device : int | None (default: None)
        Samples per device (paper: 500 for CIFAR; left-over samples are unused); None
        splits all samples, device sizes differing by at most one.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint.
    """
    n = _check_int("num_samples", num_samples, 0)
    k = _check_int("num_devices", num_devices, 1)
    if samples_per_device is None:
        if n < k:
            raise DataError(f"cannot give {k} devices at least one sample each from {n} samples")
        perm = np.random.default_rng(seed).permutation(n)
        return [np.sort(chunk).astype(np.int64) for chunk in np.array_split(perm, k)]
    per = _check_int("samples_per_device", samples_per_device, 1)
    if per * k > n:
        raise DataError(f"cannot give {k} devices {per} samples each from {n} samples")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i * per : (i + 1) * per]).astype(np.int64) for i in range(k)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Non-IID split: each class is divided among devices with Dirichlet(alpha) proportions.

    Smaller ``alpha`` gives more skewed label distributions per device. Every sample is
    assigned to exactly one device. Splits leaving a device with fewer than
    ``min_samples`` samples are redrawn (up to ``max_tries`` times).

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    alpha : float
        Dirichlet concentration (> 0).
    seed : int (default: 0)
        Seed of the draws.
    min_samples : int (default: 1)
        Minimum number of samples per device.
    max_tries : int (default: 100)
        Redraws before giving up.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint, covering all samples.
    """
    y = np.asarray(labels)
    k = _check_int("num_devices", num_devices, 1)
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise DataError(f"alpha must be finite and > 0, got {alpha!r}")
    _check_int("min_samples", min_samples, 0)
    if y.ndim != 1 or y.size < k * min_samples:
        raise DataError(f"need a 1-D label array with at least {k * min_samples} samples, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(_check_int("max_tries", max_tries, 1)):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(k, a))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(np.int64)
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(o.size for o in out) >= min_samples:
            return out
    raise DataError(
        f"dirichlet_partition: could not give every one of {k} devices >= {min_samples} samples "
        f"with alpha={a} in {max_tries} tries; use fewer devices or a larger alpha"
    )


def shard_partition(
    labels: np.ndarray, num_devices: int, shards_per_device: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Label-sorted shards (McMahan et al. 2017): each device gets a few label-homogeneous shards.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    shards_per_device : int (default: 2)
        Shards per device; the sorted data is cut into ``num_devices * shards_per_device``
        equal shards (a remainder of samples is left out).
    seed : int (default: 0)
        Seed of the shard assignment.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint.
    """
    y = np.asarray(labels)
    k = _check_int("num_devices", num_devices, 1)
    s = _check_int("shards_per_device", shards_per_device, 1)
    n_shards = k * s
    if y.ndim != 1 or y.size < n_shards:
        raise DataError(f"need a 1-D label array with at least {n_shards} samples, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    # sort by label, ties broken randomly
    order = np.lexsort((rng.random(y.size), y))
    size = y.size // n_shards
    shards = [order[i * size : (i + 1) * size] for i in range(n_shards)]
    assign = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([shards[j] for j in assign[d * s : (d + 1) * s]])).astype(np.int64) for d in range(k)
    ]


def split_indices(
    labels: np.ndarray,
    num_devices: int,
    partition: str = "iid",
    seed: int = 0,
    samples_per_device: int | None = None,
    alpha: float = 0.5,
    shards_per_device: int = 2,
) -> list[np.ndarray]:
    """Split samples into devices with one of the schemes in :data:`PARTITIONS`.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Scheme: :func:`iid_partition`, :func:`dirichlet_partition` or :func:`shard_partition`.
    seed : int (default: 0)
        Seed of the split.
    samples_per_device : int | None (default: None)
        Samples per device, only for ``"iid"``.
    alpha : float (default: 0.5)
        Dirichlet concentration, only for ``"dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device, only for ``"shards"``.

    Returns
    -------
    list[np.ndarray]
        One index array per device.
    """
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition scheme {partition!r}; valid: {list(PARTITIONS)}")
    if samples_per_device is not None and partition != "iid":
        raise DataError(f"samples_per_device applies to the 'iid' partition only, not {partition!r}")
    y = np.asarray(labels)
    if partition == "iid":
        return iid_partition(y.size, num_devices, seed, samples_per_device)
    if partition == "dirichlet":
        return dirichlet_partition(y, num_devices, alpha, seed)
    return shard_partition(y, num_devices, shards_per_device, seed)


def _to_dataset(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> TensorDataset:
    xt = torch.as_tensor(x, dtype=torch.float32).contiguous()
    yt = torch.as_tensor(y, dtype=torch.int64).contiguous()
    return TensorDataset(xt, yt)


def _federate(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    num_devices: int,
    partition: str,
    seed: int,
    samples_per_device: int | None,
    alpha: float,
    shards_per_device: int,
    augment: Callable[[Tensor], Tensor] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> FederatedData:
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


# ---------------------------------------------------------------------------------------
# FEMNIST
# ---------------------------------------------------------------------------------------

FEMNIST_CLASSES = 62


def _natural_key(path: Path) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def _read_leaf_dir(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every LEAF json shard of one split; returns writer -> (x (n, 784), y (n,))."""
    if not directory.is_dir():
        raise DataError(f"FEMNIST LEAF directory {directory} not found; expected a folder of LEAF json shards")
    files = sorted(directory.glob("*.json"), key=_natural_key)
    if not files:
        raise DataError(f"FEMNIST LEAF directory {directory} holds no *.json shards")
    users: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for file in files:
        try:
            with file.open(encoding="utf-8") as fh:
                shard = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"FEMNIST LEAF shard {file} is not readable json: {err}") from err
        if not isinstance(shard, dict) or "users" not in shard or "user_data" not in shard:
            keys = sorted(shard) if isinstance(shard, dict) else type(shard).__name__
            raise DataError(f"FEMNIST LEAF shard {file}: expected keys 'users' and 'user_data', got {keys}")
        names, user_data = shard["users"], shard["user_data"]
        if not isinstance(names, list) or not isinstance(user_data, dict):
            raise DataError(f"FEMNIST LEAF shard {file}: 'users' must be a list and 'user_data' a mapping")
        counts = shard.get("num_samples")
        if counts is not None and (not isinstance(counts, list) or len(counts) != len(names)):
            raise DataError(f"FEMNIST LEAF shard {file}: 'num_samples' must list one count per user")
        for pos, user in enumerate(names):
            record = user_data.get(user)
            if not isinstance(record, dict) or "x" not in record or "y" not in record:
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} needs 'x' and 'y' in 'user_data'")
            try:
                x = np.asarray(record["x"], dtype=np.float32)
                y = np.asarray(record["y"], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} has ragged or non-numeric x/y") from err
            if x.size == 0 and y.size == 0:  # a user without samples in this split
                x, y = x.reshape(0, 784), y.reshape(0)
            if x.ndim != 2 or x.shape[1] != 784 or y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} needs x of shape (n, 784) and y of shape (n,), "
                    f"got {x.shape} and {y.shape}"
                )
            if counts is not None and counts[pos] != x.shape[0]:
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} has {x.shape[0]} samples "
                    f"but num_samples says {counts[pos]}"
                )
            if not np.all(np.isfinite(x)) or (x.size and (x.min() < 0 or x.max() > 1)):
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} has pixel values outside [0, 1]")
            if y.size and (np.any(y != np.round(y)) or y.min() < 0 or y.max() >= FEMNIST_CLASSES):
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} has labels outside the integers 0..{FEMNIST_CLASSES - 1}"
                )
            xs, ys = users.setdefault(str(user), ([], []))
            xs.append(x)
            ys.append(y.astype(np.int64))
    return {u: (np.concatenate(xs), np.concatenate(ys)) for u, (xs, ys) in users.items()}


def _load_femnist_leaf(root: Path, max_devices: int | None) -> FederatedData:
    if not root.is_dir():
        raise DataError(f"FEMNIST LEAF root {root} not found; expected a folder with train/ and test/ json shards")
    train = _read_leaf_dir(root / "train")
    test = _read_leaf_dir(root / "test")
    writers = list(train)
    if max_devices is not None:
        writers = writers[: _check_int("max_devices", max_devices, 1)]
    parts = []
    for w in writers:
        x, y = train[w]
        if x.shape[0] == 0:
            raise DataError(f"FEMNIST LEAF root {root}: writer {w!r} has no training samples")
        parts.append(_to_dataset(x.reshape(-1, 1, 28, 28), y))
    if sum(y.size for _, y in test.values()) == 0:
        raise DataError(
            f"FEMNIST LEAF test split {root / 'test'} holds no samples (its json shards list no users or only "
            "users without samples); the server evaluates on it, so it needs at least one sample"
        )
    x_test = np.concatenate([x for x, _ in test.values()]).reshape(-1, 1, 28, 28)
    y_test = np.concatenate([y for _, y in test.values()])
    data = FederatedData(
        name="femnist",
        num_classes=FEMNIST_CLASSES,
        input_shape=(1, 28, 28),
        partitions=parts,
        test=_to_dataset(x_test, y_test),
        device_names=writers,
    )
    log.info("Loaded %s from %s", data.summary(), root)
    return data


def _load_femnist_hub(max_devices: int | None, seed: int, test_fraction: float) -> FederatedData:
    try:
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import NaturalIdPartitioner
    except ImportError as err:
        raise DataError(
            "load_femnist without root downloads flwrlabs/femnist through flwr_datasets, which is not "
            "installed (pip install 'flwr-datasets[vision]'); or pass root=<folder with LEAF train/ and test/ json>"
        ) from err
    fds = FederatedDataset(
        dataset="flwrlabs/femnist", partitioners={"train": NaturalIdPartitioner(partition_by="writer_id")}
    )
    first = fds.load_partition(0)
    total = fds.partitioners["train"].num_partitions
    count = total if max_devices is None else min(total, _check_int("max_devices", max_devices, 1))
    parts: list[TensorDataset] = []
    names: list[str] = []
    x_tests: list[np.ndarray] = []
    y_tests: list[np.ndarray] = []
    for pid in range(count):
        part = first if pid == 0 else fds.load_partition(pid)
        x = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in part["image"]]).reshape(-1, 1, 28, 28)
        y = np.asarray(part["character"], dtype=np.int64)
        perm = np.random.default_rng([seed, pid]).permutation(y.size)
        n_test = int(round(test_fraction * y.size))
        if y.size - n_test < 1:
            continue
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        parts.append(_to_dataset(x[train_idx], y[train_idx]))
        names.append(str(part["writer_id"][0]))
        x_tests.append(x[test_idx])
        y_tests.append(y[test_idx])
    data = FederatedData(
        name="femnist",
        num_classes=FEMNIST_CLASSES,
        input_shape=(1, 28, 28),
        partitions=parts,
        test=_to_dataset(np.concatenate(x_tests), np.concatenate(y_tests)),
        device_names=names,
    )
    log.info("Loaded %s from flwrlabs/femnist", data.summary())
    return data


def load_femnist(
    root: str | Path | None = None,
    max_devices: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
) -> FederatedData:
    """FEMNIST (62 classes, 28x28 greyscale) with one device per writer.

    Offline (``root`` given): a LEAF-format directory with ``train/*.json`` and
    ``test/*.json`` shards (e.g. ``../shared/data/femnist_leaf``), each json holding
    ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]],
    "y": [int]}}}``. Every writer in the train shards becomes a device (in shard order);
    the test set is all writers' test data. LEAF pixels are kept as they are: values in
    [0, 1] with **1 = white background and 0 = ink** (LEAF stores the NIST scans
    un-inverted).

    Online (``root`` None): ``flwrlabs/femnist`` through ``flwr_datasets`` with a
    ``NaturalIdPartitioner(partition_by="writer_id")`` (optional dependency, imported
    here only); each writer's samples are split into train and a ``test_fraction`` held
    out for the centralized test set. Pixels are the PNG's grey levels / 255.

    Parameters
    ----------
    root : str | Path | None (default: None)
        LEAF directory; None downloads through ``flwr_datasets``.
    max_devices : int | None (default: None)
        Keep only the first ``max_devices`` writers (the test set stays complete for LEAF).
    seed : int (default: 0)
        Seed of the per-writer train/test split (online source only).
    test_fraction : float (default: 0.1)
        Share of each writer's samples held out for testing (online source only).

    Returns
    -------
    FederatedData
        One partition per writer; ``device_names`` holds the writer ids.
    """
    frac = float(test_fraction)
    if not 0.0 <= frac < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if root is not None:
        return _load_femnist_leaf(Path(root), max_devices)
    return _load_femnist_hub(max_devices, int(seed), frac)


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle archives)
# ---------------------------------------------------------------------------------------

_CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "classes": 10,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "classes": 100,
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "torchvision": "CIFAR100",
    },
}


def _read_cifar_batch(file: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (uint8 images (n, 3, 32, 32), int64 labels (n,))."""
    if not file.is_file():
        raise DataError(f"CIFAR batch file {file} not found")
    try:
        with file.open("rb") as fh:
            # the official archives are python pickles (as read by torchvision); only load
            # files you trust
            batch = pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"CIFAR batch file {file} is not a readable python pickle: {err}") from err
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"CIFAR batch file {file}: expected keys 'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR batch file {file}: expected 'data' of shape (n, 3072) and {label_key!r} of length n, "
            f"got {data.shape} and {labels.shape}"
        )
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255 or np.any(data != np.round(data))):
            raise DataError(f"CIFAR batch file {file}: 'data' must hold bytes 0..255")
        data = data.astype(np.uint8)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"CIFAR batch file {file}: labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_dir(name: str, root: Path, download: bool) -> Path:
    layout = _CIFAR_LAYOUT[name]
    for candidate in (root / layout["folder"], root):
        if all((candidate / f).is_file() for f in layout["train"] + layout["test"]):
            return candidate
    if download:
        try:
            import torchvision.datasets as tvd
        except ImportError as err:
            raise DataError(f"downloading {name} needs torchvision (pip install 'flwr-distreal[vision]')") from err
        getattr(tvd, layout["torchvision"])(str(root), train=True, download=True)
        return root / layout["folder"]
    raise DataError(
        f"{name} not found under {root}: expected the extracted archive {root / layout['folder']} with files "
        f"{layout['train'] + layout['test']} (pass download=True to fetch it)"
    )


def _load_cifar(
    name: str,
    root: str | Path,
    download: bool,
    num_devices: int,
    samples_per_device: int | None,
    partition: str,
    alpha: float,
    shards_per_device: int,
    seed: int,
    augment: bool,
    normalize: bool,
) -> FederatedData:
    layout = _CIFAR_LAYOUT[name]
    folder = _cifar_dir(name, Path(root), download)
    splits = {}
    for split in ("train", "test"):
        batches = [_read_cifar_batch(folder / f, layout["label_key"], layout["classes"]) for f in layout[split]]
        splits[split] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

    def prep(x: np.ndarray) -> np.ndarray:
        img = x.astype(np.float32) / 255.0
        if normalize:
            img = (img - np.asarray(layout["mean"], np.float32)[None, :, None, None]) / np.asarray(
                layout["std"], np.float32
            )[None, :, None, None]
        return img

    mean = tuple(layout["mean"]) if normalize else None
    std = tuple(layout["std"]) if normalize else None
    fill = tuple((0.0 - m) / s for m, s in zip(layout["mean"], layout["std"])) if normalize else None
    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    return _federate(
        name,
        prep(x_train),
        y_train,
        prep(x_test),
        y_test,
        num_classes=layout["classes"],
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device,
        alpha=alpha,
        shards_per_device=shards_per_device,
        augment=RandomCropFlip(padding=4, flip=True, fill=fill) if augment else None,
        mean=mean,
        std=std,
    )


def load_cifar10(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = 500,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    augment: bool = True,
    normalize: bool = True,
) -> FederatedData:
    """CIFAR-10 (10 classes, 3x32x32), IID over devices as in the paper (100 x 500 samples).

    Reads the extracted python archive ``<root>/cifar-10-batches-py`` (``data_batch_1``
    .. ``data_batch_5``, ``test_batch``; ``root`` may also be that folder itself), after
    downloading it through ``torchvision.datasets.CIFAR10`` when ``download`` is True.
    Images are scaled to [0, 1] and normalised with :data:`CIFAR10_MEAN` /
    :data:`CIFAR10_STD`; training batches get :class:`RandomCropFlip` (crop 32, padding
    4, horizontal flip).

    Parameters
    ----------
    root : str | Path
        Folder holding (or receiving) ``cifar-10-batches-py``.
    download : bool (default: False)
        Download the archive when it is not under ``root``.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: 500)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    augment : bool (default: True)
        Attach the standard training augmentation.
    normalize : bool (default: True)
        Normalise with the channel means and stds (otherwise images stay in [0, 1]).
    """
    spd = samples_per_device if partition == "iid" else None
    return _load_cifar(
        "cifar10", root, download, num_devices, spd, partition, alpha, shards_per_device, seed, augment, normalize
    )


def load_cifar100(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = 500,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    augment: bool = True,
    normalize: bool = True,
) -> FederatedData:
    """CIFAR-100 (100 fine classes, 3x32x32), IID over devices as in the paper (100 x 500).

    Reads ``<root>/cifar-100-python`` (``train``, ``test``; fine labels), downloading it
    through ``torchvision.datasets.CIFAR100`` when ``download`` is True. Otherwise as
    :func:`load_cifar10`, with :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`.

    Parameters
    ----------
    root : str | Path
        Folder holding (or receiving) ``cifar-100-python``.
    download : bool (default: False)
        Download the archive when it is not under ``root``.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: 500)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    augment : bool (default: True)
        Attach the standard training augmentation.
    normalize : bool (default: True)
        Normalise with the channel means and stds.
    """
    spd = samples_per_device if partition == "iid" else None
    return _load_cifar(
        "cifar100", root, download, num_devices, spd, partition, alpha, shards_per_device, seed, augment, normalize
    )


# ---------------------------------------------------------------------------------------
# MNIST (idx files)
# ---------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an idx file (gzipped or not) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DataError(f"MNIST file {path} is not readable: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"MNIST file {path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"MNIST file {path}: expected unsigned-byte data (type 0x08), got type {raw[2]:#04x}")
    dims = raw[3]
    if dims != expected_dims:
        raise DataError(f"MNIST file {path}: expected {expected_dims} dimensions, got {dims}")
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"MNIST file {path}: header says shape {shape} but the file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_mnist_raw(root: Path) -> Path | None:
    for candidate in (root / "MNIST" / "raw", root / "raw", root):
        if all(
            (candidate / f).is_file() or (candidate / f"{f}.gz").is_file()
            for pair in _MNIST_FILES.values()
            for f in pair
        ):
            return candidate
    return None


def load_mnist(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
) -> FederatedData:
    """MNIST (10 classes, 1x28x28) split over devices.

    Reads torchvision's layout ``<root>/MNIST/raw`` (also ``<root>/raw`` or ``root``
    itself): the four official idx files, gzipped or not (a read-only folder with only the
    ``.gz`` files, such as ``../shared/data/MNIST/raw``, works; torchvision itself would
    need them extracted). With ``download`` True and no files present, they are fetched
    through ``torchvision.datasets.MNIST``. Pixels are scaled to [0, 1] (ink = 1).

    Parameters
    ----------
    root : str | Path
        Folder containing ``MNIST/raw``.
    download : bool (default: False)
        Download through torchvision when the files are missing.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: None)
        Training samples per device for the IID split; None divides all 60,000.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        ``"shards"`` is the by-label shard split of McMahan et al. (2017).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    """
    base = Path(root)
    raw = _find_mnist_raw(base)
    if raw is None and download:
        try:
            import torchvision.datasets as tvd
        except ImportError as err:
            raise DataError("downloading MNIST needs torchvision (pip install 'flwr-distreal[vision]')") from err
        tvd.MNIST(str(base), train=True, download=True)
        raw = _find_mnist_raw(base)
    if raw is None:
        names = [f for pair in _MNIST_FILES.values() for f in pair]
        raise DataError(
            f"MNIST not found under {base}: expected {base / 'MNIST' / 'raw'} with the idx files {names} "
            f"(optionally .gz); pass download=True to fetch them"
        )
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (img_name, lbl_name) in _MNIST_FILES.items():
        img_path = raw / img_name if (raw / img_name).is_file() else raw / f"{img_name}.gz"
        lbl_path = raw / lbl_name if (raw / lbl_name).is_file() else raw / f"{lbl_name}.gz"
        images = _read_idx(img_path, 3)
        labels = _read_idx(lbl_path, 1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(
                f"MNIST {split} files in {raw}: expected images (n, 28, 28) and n labels, "
                f"got {images.shape} and {labels.shape}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"MNIST {split} labels in {lbl_path} must be 0..9")
        arrays[split] = (images.astype(np.float32)[:, None] / 255.0, labels.astype(np.int64))
    return _federate(
        "mnist",
        *arrays["train"],
        *arrays["test"],
        num_classes=10,
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device if partition == "iid" else None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )


# ---------------------------------------------------------------------------------------
# Generic npz
# ---------------------------------------------------------------------------------------


def _images_to_nchw(x: np.ndarray, layout: str, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what} must have 3 (N, H, W) or 4 dimensions, got shape {x.shape}")
    if layout == "auto":
        nhwc = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        layout = "nhwc" if nhwc else "nchw"
    if layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    return x


def _images_to_float(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        out = x.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise DataError(f"{what} holds NaN or infinite values")
        return out
    raise DataError(f"{what} must be uint8 (0..255) or float, got dtype {x.dtype}")


def _npz_problem(file: Path) -> str | None:
    """Why ``file`` is not an ``.npz`` archive (``None`` when it starts like one: a zip file)."""
    try:
        with file.open("rb") as fh:
            head = fh.read(8)
    except OSError as err:
        return f"cannot be read ({err})"
    if head.startswith(b"PK"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "is a .npy file (a single NumPy array, np.save), not an .npz archive of named arrays (np.savez)"
    if not head:
        return "is empty, not an .npz archive"
    return "is not an .npz archive (a zip of named arrays written by np.savez)"


def load_npz(
    path: str | Path,
    num_devices: int = 10,
    samples_per_device: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    layout: str = "auto",
    num_classes: int | None = None,
    name: str = "npz",
) -> FederatedData:
    """A dataset from a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Images may be (N, H, W) (one channel), NCHW or NHWC; ``layout="auto"`` treats a
    4-D array as NHWC when its last axis has 1, 3 or 4 entries and its second does not.
    uint8 images are scaled to [0, 1]; float images are kept as they are. Labels must be
    integers in ``[0, num_classes)``.

    Parameters
    ----------
    path : str | Path
        The ``.npz`` file.
    num_devices : int (default: 10)
        Number of devices.
    samples_per_device : int | None (default: None)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    layout : {"auto", "nchw", "nhwc"} (default: "auto")
        Axis order of 4-D image arrays.
    num_classes : int | None (default: None)
        Number of classes; None infers ``max(label) + 1`` over both splits.
    name : str (default: "npz")
        Name of the resulting dataset.
    """
    file = Path(path)
    if layout not in ("auto", "nchw", "nhwc"):
        raise DataError(f"layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
    if not file.is_file():
        raise DataError(f"npz dataset {file} not found; expected a .npz file with x_train, y_train, x_test, y_test")
    problem = _npz_problem(file)
    if problem is not None:
        raise DataError(
            f"npz dataset {file} {problem}; expected an .npz file with x_train, y_train, x_test, y_test "
            "(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))"
        )
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise DataError(f"npz dataset {file}: missing arrays {missing}; it has {sorted(npz.files)}")
            arrays = {k: np.asarray(npz[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"npz dataset {file} is not a readable .npz file: {err}") from err
    xs = {}
    for split in ("train", "test"):
        x = _images_to_nchw(arrays[f"x_{split}"], layout, f"npz dataset {file}: x_{split}")
        xs[split] = _images_to_float(x, f"npz dataset {file}: x_{split}")
        y = arrays[f"y_{split}"]
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"npz dataset {file}: y_{split} must have shape ({x.shape[0]},), got {y.shape}")
        integral = np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and bool(np.all(y == np.round(y)))
        )
        if not integral:
            raise DataError(f"npz dataset {file}: y_{split} must hold integer labels, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise DataError(f"npz dataset {file}: y_{split} has negative labels")
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(
            f"npz dataset {file}: train images {xs['train'].shape[1:]} and test images {xs['test'].shape[1:]} "
            "differ in shape"
        )
    y_train = arrays["y_train"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64)
    inferred = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    classes = inferred if num_classes is None else _check_int("num_classes", num_classes, 2)
    if classes < inferred:
        raise DataError(f"npz dataset {file}: labels go up to {inferred - 1} but num_classes is {classes}")
    return _federate(
        name,
        xs["train"],
        y_train,
        xs["test"],
        y_test,
        num_classes=max(classes, 2),
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device if partition == "iid" else None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )


# ---------------------------------------------------------------------------------------
# Embedded default: scikit-learn digits
# ---------------------------------------------------------------------------------------


def load_digits(
    num_devices: int = 20,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int = 28,
) -> FederatedData:
    """The embedded default: scikit-learn's bundled digits, no download needed.

    1,797 8x8 greyscale digits (10 classes, values 0..16) are scaled to [0, 1] (ink = 1)
    and upsampled bilinearly to ``image_size`` x ``image_size`` so the FEMNIST CNN
    (1x28x28 input) runs on them unchanged. A ``test_fraction`` of the samples, drawn
    with ``seed``, is held out as the centralized test set; the rest is split over
    devices.

    Parameters
    ----------
    num_devices : int (default: 20)
        Number of devices.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme; ``"dirichlet"`` with a small ``alpha`` gives non-IID label
        distributions.
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the test split and of the device split.
    test_fraction : float (default: 0.2)
        Share of samples held out for testing, in (0, 1).
    image_size : int (default: 28)
        Side of the upsampled images.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    frac = float(test_fraction)
    if not 0.0 < frac < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    size = _check_int("image_size", image_size, 8)
    bunch = sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x = images.clamp(0.0, 1.0).numpy()
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng([int(seed), 1797]).permutation(y.size)
    n_test = int(round(frac * y.size))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _federate(
        "digits",
        x[train_idx],
        y[train_idx],
        x[test_idx],
        y[test_idx],
        num_classes=10,
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )


# ---------------------------------------------------------------------------------------
# Dispatch by name
# ---------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., FederatedData]] = {
    "digits": load_digits,
    "femnist": load_femnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "mnist": load_mnist,
    "npz": load_npz,
}


# ---------------------------------------------------------------------------------------
# A real node's own data (deployment)
# ---------------------------------------------------------------------------------------


def regroup(data: FederatedData, num_partitions: int) -> FederatedData:
    """The dataset's devices regrouped into ``num_partitions`` partitions, for a deployment with
    that many SuperNodes: partition ``p`` holds the devices ``d`` with ``d % num_partitions == p``
    (so each keeps whole devices: FEMNIST writers stay together, non-IID stays non-IID).

    Raises
    ------
    DataError
        If ``num_partitions`` is not an int in ``[1, data.num_devices]``.
    """
    n = _check_int("num-partitions", num_partitions, 1)
    if n > data.num_devices:
        raise DataError(
            f"num-partitions={n} but {data.name} has only {data.num_devices} devices to share out; "
            f"give the dataset more devices (dataset.num_devices) or each node its own data-path"
        )
    if n == data.num_devices:
        return data
    parts = []
    for p in range(n):
        members = [data.partitions[d] for d in range(p, data.num_devices, n)]
        parts.append(
            TensorDataset(torch.cat([m.tensors[0] for m in members]), torch.cat([m.tensors[1] for m in members]))
        )
    names = None
    if data.device_names is not None:
        names = ["+".join(data.device_names[d] for d in range(p, data.num_devices, n)) for p in range(n)]
    return FederatedData(
        data.name, data.num_classes, data.input_shape, parts, data.test, data.augment, data.mean, data.std, names
    )


def node_data_from_npz(path: str | Path, reference: FederatedData, layout: str = "auto") -> FederatedData:
    """One node's own training data from an ``.npz`` with ``x_train`` and ``y_train``, as a
    one-partition dataset that shares ``reference``'s classes, image shape, augmentation and
    test set (the server evaluates on the reference's test set).

    Images may be (N, H, W), NCHW or NHWC, uint8 (scaled to [0, 1]) or float; when the reference
    is normalised (``mean``/``std``), images in [0, 1] are normalised the same way.

    Raises
    ------
    DataError
        If the file is missing or unreadable, lacks an array, or its images or labels do not fit
        the reference (shape, label range), naming the file and the problem.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data-path {file} not found; expected an .npz file with x_train and y_train")
    problem = _npz_problem(file)
    if problem is not None:
        raise DataError(f"data-path {file}: {problem}; expected an .npz file with x_train and y_train")
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train") if k not in npz.files]
            if missing:
                raise DataError(f"data-path {file}: missing arrays {missing}; it has {sorted(npz.files)}")
            x_raw, y = np.asarray(npz["x_train"]), np.asarray(npz["y_train"])
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"data-path {file} is not a readable .npz file: {err}") from err
    x = _images_to_float(_images_to_nchw(x_raw, layout, f"data-path {file}: x_train"), f"data-path {file}: x_train")
    if tuple(x.shape[1:]) != tuple(reference.input_shape):
        raise DataError(
            f"data-path {file}: images of shape {tuple(x.shape[1:])}, but the run's model takes {reference.input_shape}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data-path {file}: y_train must be {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    if y.size == 0:
        raise DataError(f"data-path {file}: no training samples")
    if y.min() < 0 or y.max() >= reference.num_classes:
        raise DataError(
            f"data-path {file}: labels in [{y.min()}, {y.max()}] but the run has {reference.num_classes} classes"
        )
    images = torch.as_tensor(x, dtype=torch.float32)
    if reference.mean is not None and reference.std is not None:
        mean = torch.tensor(reference.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(reference.std, dtype=torch.float32).view(1, -1, 1, 1)
        images = (images - mean) / std
    part = TensorDataset(images.contiguous(), torch.as_tensor(y.astype(np.int64)))
    return FederatedData(
        reference.name, reference.num_classes, reference.input_shape, [part], reference.test, reference.augment,
        reference.mean, reference.std, [file.stem],
    )


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_federated`."""
    return sorted(_LOADERS)


def load_federated(name: str, **kwargs: Any) -> FederatedData:
    """Load a federated dataset by name.

    Keyword arguments whose value is None are dropped, so unset config entries keep the
    loader's defaults. Unknown keyword arguments are refused with the accepted ones listed.

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`: ``"digits"`` (embedded default), ``"femnist"``,
        ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"npz"``.
    **kwargs : Any
        Arguments of the loader (:func:`load_digits`, :func:`load_femnist`, ...).

    Returns
    -------
    FederatedData
        The loaded and partitioned dataset.
    """
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; valid: {list_datasets()}")
    loader = _LOADERS[name]
    params = inspect.signature(loader).parameters
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise DataError(f"dataset {name!r} does not accept {unknown}; accepted: {sorted(params)}")
    missing = [
        p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in given
    ]
    if missing:
        raise DataError(f"dataset {name!r} needs {missing}")
    if "seed" in given:
        seed = given["seed"]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(
                f"seed must be an integer >= 0 (numpy's random generators refuse negative seeds), got {seed!r}"
            )
    return loader(**given)
